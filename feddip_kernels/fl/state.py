"""A run's settings and its resumable state: the configuration (with the paper's and the quick
presets), the server's state, and what both the loop (simulation) and checkpoints (checkpoint)
derive from them, such as the clients a round trains."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

import numpy as np

from ..codecs import VALUE_CODECS
from ..codecs.values import LOSSLESS, QUANTISED, ROUNDINGS
from ..protocol import FedDIPServer, Schedule, seed_for

if TYPE_CHECKING:  # torch loads where a model is built, not where settings are checked
    import torch
    from torch import nn

ALGORITHMS = ("feddip", "feddp", "feddip-noef", "fedavg")
_REGULARISED = ("feddip", "feddip-noef")

CODINGS = ("plain", "compact")
_PAPER: dict[str, Any] = dict(clients=50, clients_per_round=5, rounds=1000, local_epochs=5, batch_size=128,
                              lr=0.1, lr_decay=0.998, momentum=0.0, weight_decay=5e-4, s0=0.5, sp=0.95,
                              mask_every=5, lambda_max=1e-3, lambda_segments=20, horizon=None, coding="plain",
                              values={})

# The paper's setup (docs/protocol.md); the README's quick job, which keeps the paper's algorithm
# and settings and shrinks the run (clients, rounds, epochs) to minutes; and compact, the paper's
# setup over 150 rounds (schedules over 15) with the compact coding: quantised, entropy-coded
# deltas (protocol.transport). "values": the value codec per algorithm (others: raw).
_COMPACT_VALUES = {"feddip": "int4-ans", "feddp": "int4-ans", "feddip-noef": "int4-ans"}  # fedavg: raw
PRESETS: dict[str, dict] = {
    "paper": _PAPER,
    "quick": dict(_PAPER, clients=10, clients_per_round=None, rounds=20, local_epochs=1, batch_size=64,
                  mask_every=2, coding="compact", values=_COMPACT_VALUES),
    "compact": dict(_PAPER, rounds=150, horizon=15, coding="compact", values=_COMPACT_VALUES),
}


@dataclass
class SimulationConfig:
    """One run. Defaults: the paper's setup (PRESETS["paper"]). The sparsity and lambda schedules
    span the whole run unless `horizon` (rounds) is set."""

    # feddip | feddp (no regulariser) | feddip-noef (no error feedback: the gradient only updates
    # weights under the mask) | fedavg (dense)
    algorithm: str = "feddip"
    model: str = "lenet5"
    clients: int = 50
    clients_per_round: Optional[int] = 5  # None: all clients every round
    rounds: int = 1000
    local_epochs: int = 5
    batch_size: int = 128
    lr: float = 0.1
    lr_decay: float = 0.998  # lr_t = lr * lr_decay^t
    momentum: float = 0.0
    weight_decay: float = 5e-4
    s0: float = 0.5  # sparsity of round 0's ERK masks and of the first global mask
    sp: float = 0.95  # final sparsity
    horizon: Optional[int] = None  # T of the schedules; None: rounds
    mask_every: int = 5  # R: prune every R rounds (t % R == 0)
    lambda_max: float = 1e-3
    lambda_segments: int = 20  # Q
    weighting: str = "samples"  # how uploads are averaged: by sample count, or "equal"
    values: str = "raw"  # value codec of every transfer: raw | fp16 | bf16 | int8 | ans | int4-ans | ...
    seed: int = 0
    # plain: each transfer carries the model itself; compact (with lossy values): the difference
    # from what the other end holds, quantised, its error carried to the next contact
    # (protocol.transport). With lossless values compact sends what plain does.
    coding: str = "plain"
    rounding: str = "nearest"  # of the quantised values: nearest | stochastic (compact, int*-ans only)
    residual_feedback: bool = True  # compact: carry each upload's quantisation error to the next

    def __post_init__(self) -> None:
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {self.algorithm!r}")
        if self.clients < 1 or self.rounds < 1 or self.local_epochs < 1 or self.batch_size < 1:
            raise ValueError("clients, rounds, local_epochs and batch_size must be >= 1")
        if self.clients_per_round is not None and not 1 <= self.clients_per_round <= self.clients:
            raise ValueError("clients_per_round must be in [1, clients]")
        if self.weighting not in ("samples", "equal"):
            raise ValueError(f"weighting must be 'samples' or 'equal', got {self.weighting!r}")
        if self.values not in VALUE_CODECS:
            raise ValueError(f"values must be one of {', '.join(VALUE_CODECS)}, got {self.values!r}")
        if self.coding not in CODINGS:
            raise ValueError(f"coding must be one of {CODINGS}, got {self.coding!r}")
        if self.rounding not in ROUNDINGS:
            raise ValueError(f"rounding must be one of {ROUNDINGS}, got {self.rounding!r}")
        if self.rounding != "nearest" and not (self.compact and self.values in QUANTISED):
            raise ValueError("stochastic rounding needs the compact coding with int2-ans .. int8-ans values")
        if not isinstance(self.residual_feedback, bool):
            raise ValueError(f"residual_feedback must be a bool, got {self.residual_feedback!r}")
        _ = self.schedule  # validates the schedule settings

    @property
    def compact(self) -> bool:
        """Whether transfers go through the compact transport (compact coding, lossy values)."""
        return self.coding == "compact" and self.values not in LOSSLESS

    @property
    def schedule(self) -> Schedule:
        return Schedule(rounds=self.rounds, s0=self.s0, sp=self.sp, mask_every=self.mask_every,
                        lambda_max=self.lambda_max, lambda_segments=self.lambda_segments, lr=self.lr,
                        lr_decay=self.lr_decay, horizon=self.horizon)

    def clients_in_round(self, t: int) -> list[int]:
        """The clients round t trains, in increasing order: all, or clients_per_round drawn
        uniformly without replacement from the run's seed and t (checkpoints check against it)."""
        if self.clients_per_round is None:
            return list(range(self.clients))
        rng = np.random.default_rng(seed_for(self.seed, 4, t))
        return np.sort(rng.choice(self.clients, self.clients_per_round, replace=False)).tolist()


@dataclass
class ServerState:
    """Everything needed to resume a run (checkpointed after every round)."""

    config: SimulationConfig
    server: FedDIPServer
    history: list[dict] = field(default_factory=list)
    # The global mask each client last received (downlinks are coded relative to it); shared objects.
    client_masks: dict[int, dict[str, np.ndarray]] = field(default_factory=dict)

    @property
    def round(self) -> int:
        return self.server.round

    @property
    def weights(self) -> dict[str, np.ndarray]:
        return self.server.weights

    @property
    def masks(self) -> dict[str, np.ndarray]:
        return self.server.masks


def float_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's float tensors (parameters, BatchNorm statistics), where the model is: what the
    transfers carry. Integer buffers (BatchNorm's num_batches_tracked) stay with each model."""
    return {k: v.detach() for k, v in model.state_dict().items() if v.is_floating_point()}


def initial_state(cfg: SimulationConfig, model: nn.Module) -> ServerState:
    from .models import prunable_parameters

    weights = {k: v.cpu().numpy().copy() for k, v in float_state(model).items()}
    server = FedDIPServer(weights, list(prunable_parameters(model)), cfg.schedule,
                          prune=cfg.algorithm != "fedavg", seed=cfg.seed)
    return ServerState(cfg, server)
