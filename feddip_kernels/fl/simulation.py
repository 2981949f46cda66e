"""The FL loop: a server holding the global model (and, for FedDIP/FedDP, the global mask), clients
training locally, and every transfer encoded with feddip_kernels.codecs and counted in bytes."""

from __future__ import annotations

import dataclasses
import os
import pickle
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch
from torch import nn

from ..codecs import decode_model, encode_model
from ..pruning import erk_densities, global_topk_masks, k_for_density
from ..schedules import lambda_schedule, sparsity_schedule
from ..torch import FedDIPSGD
from .data import Dataset
from .models import make_model, prunable_parameters

ALGORITHMS = ("feddip", "feddp", "feddip-noef", "fedavg")
_REGULARISED = ("feddip", "feddip-noef")


@dataclass
class SimulationConfig:
    # feddip | feddp (no regulariser) | feddip-noef (no error feedback: the gradient only updates
    # weights under the mask, so pruned weights stay zero and cannot regrow) | fedavg (dense)
    algorithm: str = "feddip"
    model: str = "lenet5"
    clients: int = 20
    clients_per_round: Optional[int] = None  # None: all clients every round
    rounds: int = 30
    local_epochs: int = 1
    batch_size: int = 64
    lr: float = 0.05
    lr_decay: float = 0.998  # lr_t = lr * lr_decay^t
    momentum: float = 0.0
    weight_decay: float = 5e-4
    s0: float = 0.5  # initial sparsity (ERK masks at density 1 - s0)
    sp: float = 0.95  # target sparsity
    prune_rounds: Optional[int] = None  # T of the sparsity schedule; None: rounds
    mask_every: int = 1  # R: recompute the mask by global top-k every R rounds
    lambda_max: float = 1e-3
    lambda_segments: int = 20  # Q
    values: str = "raw"  # value codec of every transfer: raw | fp16 | bf16 | int8
    seed: int = 0

    def __post_init__(self) -> None:
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {self.algorithm!r}")
        if self.clients < 1 or self.rounds < 1 or self.local_epochs < 1 or self.batch_size < 1:
            raise ValueError("clients, rounds, local_epochs and batch_size must be >= 1")
        if self.clients_per_round is not None and not 1 <= self.clients_per_round <= self.clients:
            raise ValueError("clients_per_round must be in [1, clients]")
        if not 0 <= self.s0 <= 1 or not 0 <= self.sp <= 1:
            raise ValueError("s0 and sp must be in [0, 1]")
        if self.mask_every < 1:
            raise ValueError("mask_every must be >= 1")

    @property
    def horizon(self) -> int:
        return self.prune_rounds or self.rounds


@dataclass
class ServerState:
    """Everything needed to resume a run (checkpointed after every round)."""

    config: SimulationConfig
    round: int
    weights: dict[str, np.ndarray]
    masks: dict[str, np.ndarray]  # prunable tensors only; empty for FedAvg
    history: list[dict] = field(default_factory=list)
    # The mask each client last received (downlinks are coded relative to it); shared objects.
    client_masks: dict[int, dict[str, np.ndarray]] = field(default_factory=dict)


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


def _float_state(model: nn.Module) -> dict[str, np.ndarray]:
    """The model's float tensors (parameters, BatchNorm statistics): what the transfers carry.
    Integer buffers (BatchNorm's num_batches_tracked) stay with each model."""
    return {k: v.detach().numpy() for k, v in model.state_dict().items() if v.is_floating_point()}


def _initial_state(cfg: SimulationConfig, model: nn.Module) -> ServerState:
    weights = {k: v.copy() for k, v in _float_state(model).items()}
    masks: dict[str, np.ndarray] = {}
    if cfg.algorithm != "fedavg":
        prunable = prunable_parameters(model)
        dens = erk_densities([tuple(p.shape) for p in prunable.values()], 1.0 - cfg.s0)
        rng = np.random.default_rng(_seed(cfg.seed, 1))
        for (name, p), d in zip(prunable.items(), dens):
            m = np.zeros(p.numel(), dtype=bool)
            m[rng.choice(p.numel(), k_for_density(p.numel(), d), replace=False)] = True
            masks[name] = m.reshape(p.shape)
            # Rescale the kept weights by 1/sqrt(density) so each layer's output variance matches the
            # dense initialisation; otherwise the sparse start shrinks the signal layer by layer.
            scale = 1.0 / np.sqrt(max(m.mean(), 1e-12))
            weights[name] = (weights[name] * masks[name] * scale).astype(weights[name].dtype)
    return ServerState(cfg, 0, weights, masks)


def _load(model: nn.Module, weights: dict[str, np.ndarray]) -> None:
    missing, unexpected = model.load_state_dict(
        {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in weights.items()}, strict=False)
    state = model.state_dict()
    if unexpected or any(state[k].is_floating_point() for k in missing):
        raise ValueError(f"weights do not fit the model: missing {missing}, unexpected {unexpected}")


@torch.no_grad()
def evaluate(model: nn.Module, data: Dataset, batch: int = 1000) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) of `model` on `data`."""
    model.eval()
    correct, loss = 0, 0.0
    for i in range(0, len(data), batch):
        x = torch.from_numpy(data.x[i : i + batch])
        y = torch.from_numpy(data.y[i : i + batch])
        out = model(x)
        loss += float(nn.functional.cross_entropy(out, y, reduction="sum"))
        correct += int((out.argmax(1) == y).sum())
    n = max(len(data), 1)
    return correct / n, loss / n


def _train_client(
    cfg: SimulationConfig, model: nn.Module, weights: dict[str, np.ndarray], masks: dict[str, np.ndarray],
    data: Dataset, t: int, client: int,
) -> dict[str, np.ndarray]:
    """Local training in place on `model`: error feedback with the global mask (FedDIP/FedDP), or
    masked SGD without it (feddip-noef), plain SGD for FedAvg, all through FedDIPSGD's fused kernel. Returns the client's dense weights of
    the masked tensors (the parameters themselves hold them pruned)."""
    torch.manual_seed(_seed(cfg.seed, 2, t, client))
    _load(model, weights)
    model.train()
    lam = lambda_schedule(t, cfg.horizon, cfg.lambda_max, cfg.lambda_segments) if cfg.algorithm in _REGULARISED else 0.0
    opt = FedDIPSGD(model.parameters(), lr=cfg.lr * cfg.lr_decay**t, momentum=cfg.momentum,
                    weight_decay=cfg.weight_decay, lam=lam)
    params = dict(model.named_parameters())
    mask_tensors = {params[k]: torch.from_numpy(m) for k, m in masks.items()}
    if masks:
        opt.set_masks(mask_tensors)
    no_feedback = cfg.algorithm == "feddip-noef"
    rng = np.random.default_rng(_seed(cfg.seed, 3, t, client))
    x, y = torch.from_numpy(data.x), torch.from_numpy(data.y)
    for _ in range(cfg.local_epochs):
        order = torch.from_numpy(rng.permutation(len(data)))
        for i in range(0, len(data), cfg.batch_size):
            idx = order[i : i + cfg.batch_size]
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
            if no_feedback:  # ablation: drop what error feedback keeps outside the mask
                with torch.no_grad():
                    for prm, m in mask_tensors.items():
                        opt.dense(prm).mul_(m)
    return {k: opt.dense(params[k]).numpy().copy() for k in masks}


def run_simulation(
    cfg: SimulationConfig,
    train: Dataset,
    test: Dataset,
    partition: list[np.ndarray],
    *,
    checkpoint: Optional[str] = None,
    resume: bool = False,
    on_round: Optional[Callable[[dict], None]] = None,
) -> ServerState:
    """Run (or resume) a simulation; returns the final server state with one history row a round:
    accuracy, loss, sparsity, bytes up/down (real encoded sizes) and time split."""
    if len(partition) != cfg.clients:
        raise ValueError(f"partition has {len(partition)} shards for {cfg.clients} clients")
    torch.manual_seed(_seed(cfg.seed, 0))
    model = make_model(cfg.model, train.x.shape[1], max(train.num_classes, test.num_classes))
    if resume and checkpoint and os.path.exists(checkpoint):
        with open(checkpoint, "rb") as f:
            state: ServerState = pickle.load(f)
        before, now = dataclasses.asdict(state.config), dataclasses.asdict(cfg)
        same_but_rounds = {**before, "rounds": 0} == {**now, "rounds": 0}
        # A run may be extended when its schedules do not depend on the total number of rounds.
        extendable = cfg.prune_rounds is not None and cfg.rounds >= state.round
        if not same_but_rounds or (before["rounds"] != now["rounds"] and not extendable):
            raise ValueError(
                f"checkpoint {checkpoint} was written with a different configuration (only --rounds may change, "
                "and only when --prune-rounds fixes the schedule)")
        state.config = cfg
    else:
        state = _initial_state(cfg, model)
    shards = [Dataset(train.x[p], train.y[p]) for p in partition]
    sizes = np.array([len(p) for p in partition], dtype=np.float64)

    while state.round < cfg.rounds:
        t = state.round
        rng = np.random.default_rng(_seed(cfg.seed, 4, t))
        chosen = np.arange(cfg.clients) if cfg.clients_per_round is None else np.sort(
            rng.choice(cfg.clients, cfg.clients_per_round, replace=False))
        times = {"train": 0.0, "prune": 0.0, "encode": 0.0}
        update_mask = bool(state.masks) and (t + 1) % cfg.mask_every == 0
        sparsity_target = sparsity_schedule(t + 1, cfg.horizon, cfg.s0, cfg.sp) if update_mask else None
        next_density = None if sparsity_target is None else 1.0 - sparsity_target
        bytes_down = bytes_up = 0
        total = {k: np.zeros_like(v, dtype=np.float64) for k, v in state.weights.items()}
        for c in chosen:
            # Downlink: the sparse global model, relative to the mask this client already has.
            t0 = time.perf_counter()
            known = state.client_masks.get(int(c)) or None
            msg = encode_model(state.weights, masks=state.masks or None, reference=known, values=cfg.values)
            received = decode_model(msg, reference=known).tensors
            bytes_down += len(msg)
            state.client_masks[int(c)] = state.masks
            t1 = time.perf_counter()
            dense = _train_client(cfg, model, received, state.masks, shards[c], t, int(c))
            t2 = time.perf_counter()
            local = _float_state(model)
            if update_mask:
                # Mask-update round: the client's own top-k of its dense (error-feedback) weights at
                # the next density, positions and values, so weights outside the mask can regrow.
                names = list(dense)
                own = global_topk_masks([dense[k] for k in names], density=next_density)
                local.update({k: dense[k] * m for k, m in zip(names, own)})
                up_masks = dict(zip(names, own))
            else:
                # Otherwise the local model pruned by the shared mask: values only.
                up_masks = state.masks or None
            msg = encode_model(local, masks=up_masks, reference=state.masks or None, values=cfg.values)
            uploaded = decode_model(msg, reference=state.masks or None).tensors
            bytes_up += len(msg)
            for k, v in uploaded.items():
                total[k] += sizes[c] * v
            times["encode"] += time.perf_counter() - t2 + t1 - t0
            times["train"] += t2 - t1
        weight_sum = sizes[chosen].sum()
        new = {k: (v / weight_sum).astype(state.weights[k].dtype) for k, v in total.items()}
        t0 = time.perf_counter()
        if update_mask:  # global magnitude top-k over the averaged prunable weights
            names = list(state.masks)
            state.masks = dict(zip(names, global_topk_masks([new[k] for k in names], density=next_density)))
        for k, m in state.masks.items():
            new[k] = new[k] * m
        times["prune"] = time.perf_counter() - t0
        state.weights = new
        state.round = t + 1
        _load(model, state.weights)
        acc, loss = evaluate(model, test)
        prunable = list(prunable_parameters(model))
        n_prunable = sum(state.weights[k].size for k in prunable)
        zeros = sum(int((state.weights[k] == 0).sum()) for k in prunable)
        row = {
            "round": state.round, "accuracy": acc, "loss": loss, "sparsity": zeros / n_prunable,
            "sparsity_target": sparsity_target, "bytes_up": bytes_up, "bytes_down": bytes_down,
            "bytes_total": (state.history[-1]["bytes_total"] if state.history else 0) + bytes_up + bytes_down,
            "clients": len(chosen), **{f"time_{k}": v for k, v in times.items()},
        }
        state.history.append(row)
        if checkpoint:
            tmp = checkpoint + ".tmp"
            with open(tmp, "wb") as f:
                pickle.dump(state, f)
            os.replace(tmp, checkpoint)
        if on_round:
            on_round(row)
    return state


def dense_model_bytes(cfg: SimulationConfig, in_channels: int, num_classes: int) -> int:
    """Size of one dense float32 model, for reference."""
    return 4 * sum(p.numel() for p in make_model(cfg.model, in_channels, num_classes).parameters())
