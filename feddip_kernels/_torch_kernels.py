"""The kernels for tensors on an accelerator (CUDA), written in torch operations so that they run
where the tensors are: only compact results (a threshold, packed positions and kept values) cross
to the host. Same definitions as the NumPy reference (reference.py), tested against it on CPU
tensors; a tensor on the CPU goes through the native kernels instead.

The local step is one elementwise function of (w, g, m, buffer) plus the layer's norm; under
torch.compile it becomes one fused kernel (Triton on CUDA, C++ on the CPU) that reads w, g, m and
the buffer once and writes w, the buffer and the pruned copy once, as fused SGD does plus the mask
and the pruned copy. Hyper-parameters travel as a float64 tensor so that a new learning rate does
not recompile it.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

# Candidates per tensor list that the sampled bracket of the k-th magnitude aims to leave.
_SAMPLE = 1 << 16


def on_accelerator(*xs: object) -> bool:
    """Whether any argument is a torch tensor on a device other than the CPU."""
    return any(isinstance(x, torch.Tensor) and x.device.type != "cpu" for x in xs)


# ------------------------------------------------------------------------------- local step


def hyper(lr: float, weight_decay: float, lam: float, momentum: float, device: torch.device) -> torch.Tensor:
    """The step's scalars as one float64 tensor on `device` (arguments of `ef_step`)."""
    return torch.tensor([lr, weight_decay, lam, momentum], dtype=torch.float64, device=device)


def norm(w: torch.Tensor, m: Optional[torch.Tensor], p: int) -> torch.Tensor:
    """||w * m||_p accumulated in float64, as a 0-d tensor on w's device (no host sync)."""
    v = w if m is None else w * m.to(w.dtype)
    if p == 1:
        return v.abs().sum(dtype=torch.float64)
    return torch.linalg.vector_norm(v, dtype=torch.float64)


def ef_step(
    w: torch.Tensor,
    g: torch.Tensor,
    m: Optional[torch.Tensor],
    buf: Optional[torch.Tensor],
    wp: Optional[torch.Tensor],
    hp: torch.Tensor,
    p: int,
    prev_norm: Optional[torch.Tensor],
) -> torch.Tensor:
    """masked_ef_step in torch operations (hp = hyper(lr, weight_decay, lam, momentum)): updates w,
    buf and wp in place and returns ||w * m||_p after the step as a 0-d float64 tensor."""
    lr, wd, lam, mu = hp[0], hp[1], hp[2], hp[3]
    mf = None if m is None else m.to(w.dtype)
    wm = w if mf is None else mf * w
    if p == 2:
        n = norm(w, m, 2) if prev_norm is None else prev_norm
        ok = (n > 0) & torch.isfinite(n)
        # lam * w / norm in float64: each term is at most lam even where lam / norm overflows w's dtype.
        reg = torch.where(ok, lam * wm.double() / n, 0 * w.double()).to(w.dtype)
    else:
        reg = lam.to(w.dtype) * torch.sign(w) * (mf if mf is not None else 1)
    d = g.reshape(w.shape) + wd.to(w.dtype) * w + reg
    if buf is not None:
        buf.copy_(mu.to(w.dtype) * buf + d)
        d = buf
    w.sub_(lr.to(w.dtype) * d)
    if wp is not None:
        wp.copy_(w if mf is None else w * mf)
    return norm(w, m, p)


_compiled = None


def ef_step_fused(*args: object) -> torch.Tensor:
    """ef_step compiled into one kernel per layer shape (compiled on first use)."""
    global _compiled
    if _compiled is None:
        _compiled = torch.compile(ef_step, dynamic=True)
    return _compiled(*args)


# ---------------------------------------------------------------------------- global top-k


def _check(tensors: Sequence[torch.Tensor]) -> None:
    if len({t.dtype for t in tensors}) > 1 or any(t.dtype not in (torch.float32, torch.float64) for t in tensors):
        raise TypeError("tensors must be float32 or float64, one dtype per call")
    if len({t.device for t in tensors}) > 1:
        raise ValueError("tensors must be on one device")
    if tensors and bool(torch.stack([torch.isnan(t).any() for t in tensors]).any()):
        raise ValueError("NaN in tensors: magnitudes of NaN have no order")


def max_magnitude(tensors: Sequence[torch.Tensor]) -> float:
    _check(tensors)
    return max((float(t.detach().abs().max()) for t in tensors if t.numel()), default=0.0)


def magnitude_threshold(tensors: Sequence[torch.Tensor], k: int) -> float:
    """The k-th largest |w| over all tensors (+inf for k = 0), never concatenating them: a strided
    sample brackets it, one pass counts the elements above the bracket and gathers those inside,
    and a selection among those few finishes. A missed bracket (heavily tied data) falls back to
    a selection over all magnitudes."""
    _check(tensors)
    n = sum(t.numel() for t in tensors)
    if k == 0:
        return float("inf")
    flat = [t.detach().reshape(-1) for t in tensors if t.numel()]
    stride = max(1, n // _SAMPLE)
    sample = torch.cat([f[::stride].abs() for f in flat]).sort(descending=True).values
    s = sample.numel()
    rank = k * s / n  # expected rank of the k-th largest in the sample
    margin = 4.0 * rank**0.5 + 8
    hi_rank, lo_rank = int(rank - margin), int(rank + margin)
    hi = sample[hi_rank] if hi_rank >= 1 else None  # elements above hi are surely kept
    lo = sample[lo_rank] if lo_rank < s else None  # elements below lo surely are not
    above, inside = 0, []
    for f in flat:
        a = f.abs()
        if hi is not None:
            above += (a > hi).sum()
        keep = torch.ones_like(a, dtype=torch.bool) if hi is None else a <= hi
        if lo is not None:
            keep &= a >= lo
        inside.append(a[keep])
    cand = torch.cat(inside)
    above = int(above)
    if above < k <= above + cand.numel():
        return float(torch.topk(cand, k - above, sorted=False).values.min())
    return float(torch.topk(torch.cat([f.abs() for f in flat]), k, sorted=False).values.min())


def topk_masks(tensors: Sequence[torch.Tensor], k: int) -> list[torch.Tensor]:
    """Bool masks keeping exactly the k largest |w|, ties at the threshold taken in list order
    (tensor index, then flat index), as the reference's rule (README)."""
    tau = magnitude_threshold(tensors, k)
    if k == 0:
        return [torch.zeros_like(t, dtype=torch.bool) for t in tensors]
    tau_t = [torch.tensor(tau, dtype=t.dtype, device=t.device) for t in tensors]
    masks = [t.detach().abs() > tt for t, tt in zip(tensors, tau_t)]
    ties = [t.detach().abs() == tt for t, tt in zip(tensors, tau_t)]
    counts = torch.stack([m.sum() for m in masks] + [e.sum() for e in ties]).tolist() if tensors else []
    left = k - sum(counts[: len(tensors)])
    for mask, eq, c in zip(masks, ties, counts[len(tensors) :]):
        if left <= 0:
            break
        if c <= left:
            mask |= eq
        else:
            flat = eq.reshape(-1)
            mask.reshape(-1)[flat & (flat.cumsum(0) <= left)] = True
        left -= c
    return masks


# ------------------------------------------------------------------------------- sparsify


_BIT_WEIGHTS: dict[torch.device, torch.Tensor] = {}


def pack_bits(keep: torch.Tensor) -> torch.Tensor:
    """A flat bool tensor packed little-endian (element i is bit i % 8 of byte i // 8), on its device."""
    n = keep.numel()
    padded = torch.zeros((n + 7) // 8 * 8, dtype=torch.uint8, device=keep.device)
    padded[:n] = keep.reshape(-1)
    w = _BIT_WEIGHTS.get(keep.device)
    if w is None:
        w = _BIT_WEIGHTS[keep.device] = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8,
                                                     device=keep.device)
    return (padded.view(-1, 8) * w).sum(1, dtype=torch.uint8)


def sparsify(t: torch.Tensor, mask: Optional[torch.Tensor]) -> tuple[np.ndarray, np.ndarray]:
    """(packed positions, kept values) of `t` on the host, computed where `t` is: the positions of
    `mask` (any tensor or array, non-zero = kept), else the non-zeros. Only the packed bits and
    the values cross to the host."""
    flat = t.detach().reshape(-1)
    if mask is None:
        keep = flat != 0
    else:
        keep = torch.as_tensor(mask, device=t.device).reshape(-1)
        if keep.numel() != flat.numel():
            raise ValueError(f"mask has {keep.numel()} elements, expected {flat.numel()}")
        keep = keep != 0 if keep.dtype != torch.bool else keep
    return pack_bits(keep).cpu().numpy(), flat[keep].cpu().numpy()
