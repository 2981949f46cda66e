"""FedDIP's server side as its authors run it (the protocol: docs/protocol.md), in
NumPy alone: the schedules, each client's round-0 mask, the aggregation and the global magnitude
pruning. `feddip simulate` and the Flower strategy both drive this one implementation.

One round t = 0 .. T-1:
- clients train from the global model (masked by the global mask m, dense before round 0's
  pruning) under m, or in round 0 under a random ERK mask of their own at density 1 - s0;
- the server averages the uploads (weighted as given), re-applies m, and when t % R == 0 prunes
  the prunable tensors jointly by magnitude to sparsity s_t = sp + (s0 - sp)(1 - t/T)^3. The new
  mask is taken inside the old one, so masks are nested and pruned weights never return.

Positions outside the mask are +0.0, in the model and in the transfers; the average is summed in
float64 in the order of the uploads, so uploads that carry only the values under m (what this
library sends) give the same bits as the authors' dense uploads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

import numpy as np

from ..pruning import erk_densities, global_topk_masks, k_for_density
from .schedules import lambda_schedule, sparsity_schedule


@dataclass(frozen=True)
class Schedule:
    """The per-round settings: sparsity s_t, regulariser lambda_t, learning rate lr_t, and whether
    round t updates the mask. `horizon` is the T of the sparsity and lambda schedules (default: the
    whole run, as in the paper)."""

    rounds: int
    s0: float = 0.5
    sp: float = 0.95
    mask_every: int = 5
    lambda_max: float = 1e-3
    lambda_segments: int = 20
    lr: float = 0.1
    lr_decay: float = 0.998
    horizon: Optional[int] = None

    def __post_init__(self) -> None:
        if not (isinstance(self.rounds, int) and self.rounds >= 1):
            raise ValueError(f"rounds must be an integer >= 1, got {self.rounds!r}")
        if not (isinstance(self.mask_every, int) and self.mask_every >= 1):
            raise ValueError(f"mask_every must be an integer >= 1, got {self.mask_every!r}")
        if not 0.0 <= self.s0 <= self.sp < 1.0:
            raise ValueError(f"need 0 <= s0 <= sp < 1, got s0={self.s0}, sp={self.sp}")
        if self.horizon is not None and not (isinstance(self.horizon, int) and self.horizon >= 1):
            raise ValueError(f"horizon must be an integer >= 1, got {self.horizon!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)) or not 0 < self.lr_decay <= 1:
            raise ValueError(f"need lr > 0 and 0 < lr_decay <= 1, got {self.lr}, {self.lr_decay}")

    @property
    def T(self) -> int:
        return self.horizon or self.rounds

    def sparsity(self, t: int) -> float:
        return sparsity_schedule(t, self.T, self.s0, self.sp)

    def lam(self, t: int) -> float:
        return lambda_schedule(t, self.T, self.lambda_max, self.lambda_segments)

    def learning_rate(self, t: int) -> float:
        return self.lr * self.lr_decay**t

    def updates_mask(self, t: int) -> bool:
        return t % self.mask_every == 0


def random_erk_masks(
    shapes: Mapping[str, Sequence[int]], density: float, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """Random masks with ERK layer densities (overall `density`): each layer keeps
    round(density_l * size) positions drawn uniformly without replacement."""
    names = list(shapes)
    out = {}
    for name, d in zip(names, erk_densities([tuple(shapes[k]) for k in names], density)):
        n = math.prod(shapes[name])
        m = np.zeros(n, dtype=bool)
        m[rng.choice(n, k_for_density(n, d), replace=False)] = True
        out[name] = m.reshape(tuple(shapes[name]))
    return out


def apply_mask(w: np.ndarray, m: np.ndarray) -> np.ndarray:
    """w where m is set, +0.0 elsewhere (w * m would leave -0.0 for negative w, NaN for inf)."""
    w, m = np.asarray(w), np.asarray(m)
    fast = w.dtype.kind == "f" and w.dtype.isnative and m.dtype == np.bool_
    words = _WORDS.get(w.dtype.itemsize) if fast else None
    if words is None:
        return np.where(m, w, np.zeros((), dtype=w.dtype))
    # The float's bits times 0 or 1: the same bits, a third of np.where's time on a bool mask.
    return np.multiply(w.view(words), m, dtype=words).view(w.dtype)


_WORDS = {2: np.uint16, 4: np.uint32, 8: np.uint64}


def seed_for(*parts: int) -> int:
    """A 32-bit seed derived from integers (run seed, purpose, round, client)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


class FedDIPServer:
    """The global model and mask of one FedDIP run (or FedAvg with prune=False), advanced one round
    per `aggregate` call.

    `weights`: the initial global model (name -> array; every float tensor the clients exchange).
    `prunable`: the names pruned (conv and linear weights); the rest are averaged densely.
    """

    def __init__(
        self,
        weights: Mapping[str, np.ndarray],
        prunable: Sequence[str],
        schedule: Schedule,
        *,
        prune: bool = True,
        seed: int = 0,
    ) -> None:
        missing = [k for k in prunable if k not in weights]
        if missing:
            raise ValueError(f"prunable tensors not in the model: {missing}")
        self.weights = {k: np.array(v, copy=True) for k, v in weights.items()}
        self.prunable = list(prunable)
        self.schedule = schedule
        self.prune = prune
        self.seed = seed
        self.masks: dict[str, np.ndarray] = {}  # the global mask; empty before round 0's pruning
        self.round = 0

    def training_masks(self, client: int, t: Optional[int] = None) -> dict[str, np.ndarray]:
        """The mask `client` trains under in round t (default: the current round): in round 0 a
        random ERK mask of its own at density 1 - s0, later the global mask; {} without pruning."""
        t = self.round if t is None else t
        if not self.prune:
            return {}
        if t == 0 or not self.masks:
            rng = np.random.default_rng(seed_for(self.seed, 1, client))
            shapes = {k: self.weights[k].shape for k in self.prunable}
            return random_erk_masks(shapes, 1.0 - self.schedule.s0, rng)
        return self.masks

    def aggregate(self, uploads: Sequence[tuple[Mapping[str, np.ndarray], float]]) -> dict[str, np.ndarray]:
        """Average the clients' models (each with its weight: 1 for equal weighting, the sample
        count otherwise), re-apply the global mask, prune on mask rounds; advances the round and
        returns the new global model. A tensor missing from an upload, or of another shape, raises
        ValueError (callers drop such uploads before)."""
        if not uploads:
            raise ValueError("no uploads to aggregate")
        total = math.fsum(float(w) for _, w in uploads)
        if not total > 0:
            raise ValueError("upload weights must sum to a positive number")
        new = {}
        for name, ref in self.weights.items():
            acc = np.zeros(ref.shape, dtype=np.float64)
            for model, w in uploads:
                x = model.get(name)
                if x is None or x.shape != ref.shape:
                    raise ValueError(f"an upload lacks {name!r} or has another shape")
                acc += np.asarray(x, dtype=np.float64) * float(w)
            new[name] = (acc / total).astype(ref.dtype)
        t = self.round
        if self.masks:
            for k, m in self.masks.items():
                new[k] = apply_mask(new[k], m)
        if self.prune and self.schedule.updates_mask(t):
            self.masks = self._magnitude_masks(new, 1.0 - self.schedule.sparsity(t))
            for k, m in self.masks.items():
                new[k] = apply_mask(new[k], m)
        self.weights = new
        self.round = t + 1
        return new

    def _magnitude_masks(self, weights: Mapping[str, np.ndarray], density: float) -> dict[str, np.ndarray]:
        """Global magnitude top-k of the prunable tensors, inside the current mask: positions already
        pruned are +0.0 and only win a tie at zero, which the old mask then takes back out."""
        names = self.prunable
        masks = dict(zip(names, global_topk_masks([weights[k] for k in names], density=density)))
        if self.masks:
            masks = {k: m & self.masks[k] for k, m in masks.items()}
        return masks

    def sparsity(self) -> float:
        """Fraction of zeros in the prunable tensors of the global model."""
        n = sum(self.weights[k].size for k in self.prunable)
        zeros = sum(int(np.count_nonzero(self.weights[k] == 0)) for k in self.prunable)
        return zeros / n if n else 0.0
