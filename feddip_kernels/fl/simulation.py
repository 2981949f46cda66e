"""The FL loop: a server holding the global model (and, for FedDIP/FedDP, the global mask), clients
training locally, and every transfer encoded with feddip_kernels.codecs and counted in bytes."""

from __future__ import annotations

import os
import time
from typing import Callable, Optional

import numpy as np
import torch
from torch import nn

from ..codecs import decode_model, encode_model
from ..integrations.pytorch import FedDIPSGD
from ..protocol import ClientEnd, FedDIPServer, Schedule, ServerEnd, seed_for
from ..protocol.transport import read_init_frame
from .checkpoint import CompactState, read_checkpoint, save_checkpoint
from .cifar import augment_batch
from .dataset import Dataset
from .models import make_model
from .state import _REGULARISED, ALGORITHMS, PRESETS, ServerState, SimulationConfig, float_state, initial_state

# The run's state lives in fl.state; SimulationConfig and the rest are imported from here too.
__all__ = [
    "ALGORITHMS",
    "PRESETS",
    "ServerState",
    "SimulationConfig",
    "dense_model_bytes",
    "evaluate",
    "run_simulation",
]


def _load(model: nn.Module, weights: dict[str, np.ndarray]) -> None:
    missing, unexpected = model.load_state_dict(
        {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in weights.items()}, strict=False)
    state = model.state_dict()
    if unexpected or any(state[k].is_floating_point() for k in missing):
        raise ValueError(f"weights do not fit the model: missing {missing}, unexpected {unexpected}")


@torch.no_grad()
def evaluate(model: nn.Module, data: Dataset, batch: int = 256) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) of `model` on `data`, on the model's device. Batches of
    256: on a CPU 1000 images' activations leave the caches (LeNet-5 1.6x slower an image,
    ResNet-18 1.3x). A batch size can change a library's kernels and so the logits' last bits
    (not LeNet-5's on this CPU), and the loss's summation."""
    model.eval()
    device = next(model.parameters()).device
    correct = torch.zeros((), dtype=torch.int64, device=device)
    loss = torch.zeros((), dtype=torch.float64, device=device)
    for i in range(0, len(data), batch):
        x = torch.from_numpy(data.x[i : i + batch]).to(device)
        y = torch.from_numpy(data.y[i : i + batch]).to(device)
        out = model(x)
        loss += nn.functional.cross_entropy(out, y, reduction="sum").double()
        correct += (out.argmax(1) == y).sum()
    n = max(len(data), 1)
    return int(correct) / n, float(loss) / n


def _train_client(
    cfg: SimulationConfig, model: nn.Module, weights: dict[str, np.ndarray], masks: dict[str, np.ndarray],
    data: Dataset, t: int, client: int,
) -> dict[str, torch.Tensor]:
    """Local training in place on `model` from the global `weights`, under `masks` (the client's
    round-0 ERK mask or the global mask): error feedback (FedDIP, FedDP: the gradient at w * m
    applied to the dense w), or masked SGD without it (feddip-noef), plain SGD for FedAvg, all
    through FedDIPSGD's fused kernel. Returns the client's model, on the model's device: every float
    tensor, the masked ones as the dense weights (what the authors upload)."""
    torch.manual_seed(seed_for(cfg.seed, 2, t, client))
    _load(model, weights)
    model.train()
    schedule = cfg.schedule
    lam = schedule.lam(t) if cfg.algorithm in _REGULARISED else 0.0
    opt = FedDIPSGD(model.parameters(), lr=schedule.learning_rate(t), momentum=cfg.momentum,
                    weight_decay=cfg.weight_decay, lam=lam)
    params = dict(model.named_parameters())
    device = next(model.parameters()).device
    mask_tensors: dict[torch.Tensor, torch.Tensor] = {
        params[k]: torch.from_numpy(np.ascontiguousarray(m)).to(device) for k, m in masks.items()
    }
    if masks:
        opt.set_masks(mask_tensors)
    no_feedback = cfg.algorithm == "feddip-noef"

    @torch.no_grad()
    def drop_outside_mask() -> None:  # the ablation: no error feedback, nothing lives outside the mask
        for prm, m in mask_tensors.items():
            opt.dense(prm).mul_(m)

    if no_feedback:
        drop_outside_mask()
    rng = np.random.default_rng(seed_for(cfg.seed, 3, t, client))
    augment_rng = np.random.default_rng(seed_for(cfg.seed, 5, t, client))
    x, y = torch.from_numpy(data.x), torch.from_numpy(data.y)
    for _ in range(cfg.local_epochs):
        order = rng.permutation(len(data))
        for i in range(0, len(data), cfg.batch_size):
            idx = order[i : i + cfg.batch_size]
            xb = torch.from_numpy(augment_batch(data.x[idx], augment_rng)) if data.augment else x[idx]
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(xb.to(device)), y[idx].to(device)).backward()
            opt.step()
            if no_feedback:
                drop_outside_mask()
    local = {k: v.clone() for k, v in float_state(model).items()}
    local.update({k: opt.dense(params[k]).clone() for k in masks})
    return local


def _upload(local: dict[str, torch.Tensor], shared: Optional[dict[str, np.ndarray]], values: str, client: int) -> bytes:
    """The message a client sends: its model's values under the shared mask (all of it before
    there is one), sparsified where the tensors are: from a GPU only the message's positions and
    values cross to the host. A seam for tests that make a client send bad bytes."""
    return encode_model(local, masks=shared, reference=shared, values=values)


def _reply(end: ClientEnd, local: dict[str, torch.Tensor], t: int) -> bytes:
    """The compact coding's upload: the client's model as a quantised delta from the one it holds
    (protocol.transport). A seam for tests, as _upload."""
    return end.reply({k: v.detach().cpu().numpy() for k, v in local.items()}, t)


def _same_bits(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return a.keys() == b.keys() and all(
        a[k].shape == b[k].shape and a[k].dtype == b[k].dtype
        and np.array_equal(a[k].view(f"u{a[k].itemsize}"), b[k].view(f"u{b[k].itemsize}")) for k in a)


class _Compact:
    """The compact coding's two ends for a run: the server's and each contacted client's."""

    def __init__(self, cfg: SimulationConfig, init: dict[str, np.ndarray]) -> None:
        self.cfg = cfg
        self.init_seed = seed_for(cfg.seed, 0)  # what the clients build the initial model from
        self.server = ServerEnd(init, values=cfg.values, rounding=cfg.rounding, seed=cfg.seed, init_seed=self.init_seed)
        self.clients: dict[int, ClientEnd] = {}

    def _build(self, seed: int) -> dict[str, np.ndarray]:
        # A client would run torch.manual_seed(seed) and make_model; in the simulation it is the
        # server's initial model, which the frame's CRC checks all the same.
        if seed != self.init_seed:
            raise ValueError(f"init frame seed {seed}, the run's is {self.init_seed}")
        return self.server.init

    def client(self, c: int) -> ClientEnd:
        if c not in self.clients:
            cfg = self.cfg
            self.clients[c] = ClientEnd(c, values=cfg.values, rounding=cfg.rounding, seed=cfg.seed, build=self._build,
                                        residual_feedback=cfg.residual_feedback)
        return self.clients[c]

    def downlink(self, c: int, weights: dict[str, np.ndarray], shared: Optional[dict[str, np.ndarray]],
                 known: Optional[dict[str, np.ndarray]], t: int) -> tuple[bytes, dict[str, np.ndarray]]:
        """(the message, the model the client trains from): the client decodes the bytes itself,
        and must hold the model the server believes it holds, bit for bit."""
        msg, held = self.server.downlink(c, weights, shared, known, t)
        end = self.client(c)
        received = end.receive(msg, masked=list(shared) if shared else ())
        if not _same_bits(received, held):
            raise RuntimeError(f"round {t}: client {c} decoded another model than the server holds for it")
        end.held = held  # one copy of each client's model (the server's, the same bits)
        return msg, held

    def saved(self) -> CompactState:
        """What a checkpoint keeps: each contacted client's model (the server's copy, which the
        client shares) and residual. Its mask is the run's client_masks entry: the client decoded
        it from the positions of the message that sent it the global mask, which were that mask."""
        return CompactState(init_crc=read_init_frame(self.server.frame)[1], held=dict(self.server.held),
                            residual={c: end.residual for c, end in self.clients.items() if end.residual})

    def restore(self, saved: CompactState, client_masks: dict[int, dict[str, np.ndarray]]) -> None:
        """Both ends as `saved` left them (on an instance built from the run's initial model)."""
        for c, held in saved.held.items():
            self.server.held[c] = held
            end = self.client(c)
            end.held, end.masks, end.residual = held, client_masks.get(c, {}), saved.residual.get(c, {})


def _kept(weights: dict[str, np.ndarray], masks: dict[str, np.ndarray]) -> int:
    """The positions a model sends in the authors' count (every weight but the pruned ones)."""
    return sum(v.size for v in weights.values()) - sum(int(m.size - np.count_nonzero(m)) for m in masks.values())


def _history_row(cfg: SimulationConfig, schedule: Schedule, server: FedDIPServer, t: int, acc: float, loss: float,
                 bytes_up: int, bytes_down: int, history: list[dict], clients: int, kept: int, failures: list[str],
                 times: dict[str, float]) -> dict:
    """Round t's history row (run_simulation's and the Flower engine's): `kept` as the round
    started, `times` in seconds by part."""
    return {
        "round": server.round, "accuracy": acc, "loss": loss, "sparsity": server.sparsity(),
        "sparsity_target": schedule.sparsity(t) if server.prune and schedule.updates_mask(t) else None,
        "lr": schedule.learning_rate(t), "lambda": schedule.lam(t) if cfg.algorithm in _REGULARISED else 0.0,
        "bytes_up": bytes_up, "bytes_down": bytes_down,
        "bytes_total": (history[-1]["bytes_total"] if history else 0) + bytes_up + bytes_down,
        # The authors' count: 32 (1 - s) n bits a model, s the share of pruned positions, no index cost.
        "bytes_authors": 2 * clients * 4 * kept,
        "clients": clients, "clients_failed": len(failures), "failures": failures,
        **{f"time_{k}": v for k, v in times.items()},
    }


def run_simulation(
    cfg: SimulationConfig,
    train: Dataset,
    test: Dataset,
    partition: list[np.ndarray],
    *,
    checkpoint: Optional[str] = None,
    resume: bool = False,
    on_round: Optional[Callable[[dict], None]] = None,
    device: str = "cpu",
    adapt_threads: bool = False,
) -> ServerState:
    """Run (or resume) a simulation; returns the final server state with one history row a round:
    accuracy, loss, sparsity, bytes up/down (real encoded sizes), time split (train, encode, prune,
    evaluate, in seconds on the host's clock) and the round's wall time (time_round).

    Transport: the server sends each sampled client the global model coded relative to the global
    mask that client last received (values only while the mask is unchanged, the delta after a
    pruning round, all positions for a client that never received one; dense in round 0); the
    client sends back the values of its model under the global mask it trained with (in round 0,
    before there is one, its whole model). The server decodes and aggregates what arrived.
    With cfg.coding "compact" and lossy values both directions carry instead the difference from
    the model the other end holds, quantised, the error carried to the next contact
    (protocol.transport; a 21-byte init frame on a client's first contact, counted in bytes_down).

    `device` ("cpu", "cuda", "cuda:1", ...) is where clients train and the model is evaluated; the
    server's state and the messages stay on the host.

    `adapt_threads`: before each client trains, time an empty parallel region (the kernels' own
    contention signal, csrc/common.hpp); while one started late in the last 10 s (another process
    holds the cores), torch trains on one thread, else on the threads it had. torch's reductions
    then follow the load, and so do a run's last bits: leave it off for bit-reproducible runs.
    """
    threads = torch.get_num_threads()
    try:
        return _run(cfg, train, test, partition, checkpoint, resume, on_round, device, adapt_threads, threads)
    finally:
        torch.set_num_threads(threads)


def _cores_shared() -> bool:
    """Whether a parallel region started late in the last 10 s, after timing one now."""
    from .. import _backend

    core = _backend.native_module()
    if core is None or not core.openmp:
        return False
    core._probe_contention()
    since = core._contention()[3]
    return 0 <= since < 10.0


def _run(cfg: SimulationConfig, train: Dataset, test: Dataset, partition: list[np.ndarray], checkpoint: Optional[str],
         resume: bool, on_round: Optional[Callable[[dict], None]], device: str, adapt_threads: bool,
         threads: int) -> ServerState:
    if len(partition) != cfg.clients:
        raise ValueError(f"partition has {len(partition)} shards for {cfg.clients} clients")
    torch.manual_seed(seed_for(cfg.seed, 0))
    model = make_model(cfg.model, train.x.shape[1], max(train.num_classes, test.num_classes))
    saved: Optional[CompactState] = None
    if resume and checkpoint and os.path.exists(checkpoint):
        state, saved = read_checkpoint(checkpoint, cfg, model)
    else:
        state = initial_state(cfg, model)
    compact = None
    if cfg.compact:  # both ends start from the initial model (the init frame's CRC covers it), not a resumed one
        compact = _Compact(cfg, state.server.weights if saved is None else initial_state(cfg, model).server.weights)
        if saved is not None:
            compact.restore(saved, state.client_masks)
    model.to(device)
    server = state.server
    schedule = server.schedule
    shards = [Dataset(train.x[p], train.y[p], augment=train.augment) for p in partition]
    sizes = np.array([len(p) for p in partition], dtype=np.float64)

    while server.round < cfg.rounds:
        t = server.round
        round_start = time.perf_counter()
        chosen = cfg.clients_in_round(t)
        times = {"train": 0.0, "prune": 0.0, "encode": 0.0}
        bytes_down = bytes_up = 0
        shared = server.masks or None  # the global mask of this round (None before the first)
        kept = _kept(server.weights, server.masks)
        uploads, failures = [], []
        for c in chosen:  # ints
            # Downlink: the global model, relative to the global mask this client already has.
            t0 = time.perf_counter()
            known = state.client_masks.get(int(c)) if shared else None
            if compact:  # the difference from what the client holds (an init frame on first contact)
                msg, received = compact.downlink(int(c), server.weights, shared, known, t)
            else:
                msg = encode_model(server.weights, masks=shared, reference=known, values=cfg.values)
                received = decode_model(msg, reference=known).tensors
            bytes_down += len(msg)
            if shared:
                state.client_masks[int(c)] = server.masks
            t1 = time.perf_counter()
            if adapt_threads:
                torch.set_num_threads(1 if _cores_shared() else threads)
            try:  # a client that fails (its training raises, its upload does not decode) is dropped
                local = _train_client(cfg, model, received, server.training_masks(int(c)), shards[c], t, int(c))
                t2 = time.perf_counter()
                # Uplink: the values under the shared mask (the server zeroes the rest of a dense upload).
                weight = sizes[c] if cfg.weighting == "samples" else 1.0
                if compact:  # the server rebuilds the upload from what it knows the client holds
                    msg = _reply(compact.client(int(c)), local, t)
                    bytes_up += len(msg)
                    uploads.append((compact.server.uplink(int(c), msg, shared), weight))
                else:
                    msg = _upload(local, shared, cfg.values, int(c))
                    bytes_up += len(msg)
                    uploads.append((decode_model(msg, reference=shared).tensors, weight))
            except Exception as e:  # noqa: BLE001 - any failure of one client; recorded in the row
                failures.append(f"client {int(c)}: {type(e).__name__}: {e}")
                t2 = time.perf_counter()
            times["train"] += t2 - t1
            times["encode"] += time.perf_counter() - t2 + t1 - t0
        if not uploads:
            raise RuntimeError(f"round {t}: every client failed: {failures}")
        t0 = time.perf_counter()
        server.aggregate(uploads)
        times["prune"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        _load(model, server.weights)
        acc, loss = evaluate(model, test)
        times["evaluate"] = time.perf_counter() - t0
        times["round"] = time.perf_counter() - round_start  # all of it, on the host's clock
        row = _history_row(cfg, schedule, server, t, acc, loss, bytes_up, bytes_down, state.history, len(chosen),
                           kept, failures, times)
        state.history.append(row)
        if checkpoint:
            save_checkpoint(checkpoint, state, compact.saved() if compact else None)
        if on_round:
            on_round(row)
    return state


def dense_model_bytes(cfg: SimulationConfig, in_channels: int, num_classes: int) -> int:
    """Size of one dense float32 model, for reference."""
    return 4 * sum(p.numel() for p in make_model(cfg.model, in_channels, num_classes).parameters())
