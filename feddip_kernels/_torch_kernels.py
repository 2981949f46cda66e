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

from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

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


def _magnitudes(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """|w| of all tensors in list order as one flat tensor. On a device one copy costs less than a
    pass per tensor: a few launches over all elements instead of a few per tensor (flattened and
    joined in one C++ call, as torch's distributed code does it)."""
    if len({t.dtype for t in tensors}) > 1 or any(t.dtype not in (torch.float32, torch.float64) for t in tensors):
        raise TypeError("tensors must be float32 or float64, one dtype per call")
    if len({t.device for t in tensors}) > 1:
        raise ValueError("tensors must be on one device")
    if not tensors:
        return torch.empty(0)
    with torch.no_grad():
        if len(tensors) == 1:  # flattening one tensor is a view of it: abs out of place
            return tensors[0].reshape(-1).abs()
        return _flatten_dense_tensors(list(tensors)).abs_()


def _no_nan(peak: torch.Tensor) -> float:
    """The largest magnitude (max propagates NaN) as a float; NaN raises as on the host."""
    value = float(peak)
    if value != value:
        raise ValueError("NaN in tensors: magnitudes of NaN have no order")
    return value


def max_magnitude(tensors: Sequence[torch.Tensor]) -> float:
    a = _magnitudes(tensors)
    return _no_nan(a.max()) if a.numel() else 0.0


def _kth_largest(a: torch.Tensor, k: int, peak: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The k-th largest of the flat magnitudes `a` (1 <= k <= n) as a 0-d tensor, and how many
    elements are at least that large. A strided sample gives a floor that at least k elements
    clear with high probability; one pass gathers those (about k of n, plus a margin), and a
    selection among them finishes (the smaller side of it: k largest or the rest smallest). A
    missed floor (heavily tied data) selects among all magnitudes. `peak` is a.max(): NaN raises,
    checked where the device has been waited for anyway (two waits in all)."""
    n = a.numel()
    sample = a[:: max(1, n // _SAMPLE)].sort(descending=True).values
    rank = k * sample.numel() / n  # expected rank of the k-th largest in the sample
    floor_rank = int(rank + 4.0 * rank**0.5 + 8)
    cand = a[a >= sample[floor_rank]] if floor_rank < sample.numel() else a  # waits for the device (the count)
    _no_nan(peak)
    if cand.numel() < k:
        cand = a
    rest = cand.numel() - k + 1  # tau is the rest-th smallest of cand
    if k <= rest:
        tau = torch.topk(cand, k, sorted=False).values.min()
    else:
        tau = torch.topk(cand, rest, largest=False, sorted=False).values.max()
    return tau, int((cand >= tau).sum())  # every element >= tau is in cand


def magnitude_threshold(tensors: Sequence[torch.Tensor], k: int) -> float:
    """The k-th largest |w| over all tensors (+inf for k = 0)."""
    a = _magnitudes(tensors)
    if not a.numel():
        return float("inf")
    if k == 0:
        _no_nan(a.max())
        return float("inf")
    return float(_kth_largest(a, k, a.max())[0])


def topk_masks(tensors: Sequence[torch.Tensor], k: int) -> list[torch.Tensor]:
    """Bool masks keeping exactly the k largest |w|, ties at the threshold taken in list order
    (tensor index, then flat index), as the reference's rule (README): views into one flat mask,
    as the host's masks are views into one block."""
    a = _magnitudes(tensors)
    keep = torch.empty(a.shape, dtype=torch.bool, device=a.device)
    masks = list(_unflatten_dense_tensors(keep, list(tensors))) if tensors else []  # made while the device copies
    if not a.numel():
        return masks
    peak = a.max()
    if k == 0:
        _no_nan(peak)
        keep.zero_()
        return masks
    tau, at_least = _kth_largest(a, k, peak)
    torch.ge(a, tau, out=keep)
    if at_least > k:  # ties at tau beyond the k-th: keep the first in list order
        eq = a == tau
        need = k - (at_least - int(eq.sum()))
        torch.gt(a, tau, out=keep)
        keep |= eq & (eq.cumsum(0) <= need)
    return masks


# ------------------------------------------------------------------------------- sparsify


# Eight bool bytes read as one little-endian int64 (byte j is 0 or 1 at bit 8j), times this, hold
# byte j's value at bit 56 + j and nothing that carries into bits 56-63: the top byte is the eight
# packed little-endian (element j is bit j). Tested on every byte pattern.
_GATHER_BITS = 0x0102040810204080


def pack_bits(keep: torch.Tensor) -> torch.Tensor:
    """A flat bool tensor packed little-endian (element i is bit i % 8 of byte i // 8), on its device."""
    flat = keep.reshape(-1).contiguous()
    if not flat.numel():
        return flat.new_zeros(0, dtype=torch.uint8)
    if flat.numel() % 8 or flat.storage_offset() % 8:  # whole int64 words, aligned
        flat = torch.cat([flat, flat.new_zeros(-flat.numel() % 8)])
    words = flat.view(torch.uint8).view(torch.int64) * _GATHER_BITS
    return (words >> 56).to(torch.uint8)


def sparsify(t: torch.Tensor, mask: Optional[torch.Tensor]) -> tuple[np.ndarray, np.ndarray]:
    """(packed positions, kept values) of `t` on the host (sparsify_many of one tensor)."""
    from . import _backend

    return sparsify_many([(t, mask)], _backend.kernels("auto").count_bits)[0]


def flat_keep(items: Sequence[tuple[torch.Tensor, Any]], device: torch.device,
              dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, list[int], list[int]]:
    """(flat, keep, sizes, padded sizes) of (tensor, mask) pairs of one device and dtype: the
    tensors one after another in one buffer, each padded with zeros to whole bytes of positions,
    and which of its elements are kept (the mask's, non-zero = kept, else the non-zeros; never
    the padding)."""
    sizes = [t.numel() for t, _ in items]
    padded = [(n + 7) // 8 * 8 for n in sizes]
    zeros = torch.zeros(8, dtype=dtype, device=device)
    pieces = []
    for (t, _), n, pn in zip(items, sizes, padded):
        pieces.append(t.detach().reshape(-1))
        if pn > n:
            pieces.append(zeros[: pn - n])
    flat = torch.cat(pieces) if pieces else zeros[:0]
    keep = flat != 0  # the padding is zero: never kept
    offset = 0
    for (_, mask), n, pn in zip(items, sizes, padded):
        if mask is not None:
            m = torch.as_tensor(mask, device=device).reshape(-1)
            if m.numel() != n:
                raise ValueError(f"mask has {m.numel()} elements, expected {n}")
            keep[offset : offset + n] = m if m.dtype == torch.bool else m != 0
        offset += pn
    return flat, keep, sizes, padded


def sparsify_many(items: Sequence[tuple[torch.Tensor, Any]],
                  count_bits: Callable[[np.ndarray, int], int]) -> list[tuple[np.ndarray, np.ndarray]]:
    """(packed positions, kept values) on the host of each (tensor, mask) pair, computed where the
    tensors are: the positions of the mask (any tensor or array, non-zero = kept), else the
    non-zeros. The tensors of one device and dtype go as one: one copy into a flat buffer (each
    padded to whole bytes of positions), one pass for the positions, one gather of the values,
    and two copies to the host of only the packed bits and the values, through pinned memory."""
    out: list[Any] = [None] * len(items)
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, (t, _) in enumerate(items):
        groups.setdefault((t.device, t.dtype), []).append(i)
    for (device, dtype), idx in groups.items():
        flat, keep, sizes, padded = flat_keep([items[i] for i in idx], device, dtype)
        bits = _to_host(pack_bits(keep))
        vals = _to_host(flat[keep])  # waits for the device (the count), then for both copies
        if device.type == "cuda":
            torch.cuda.current_stream(device).synchronize()
        bits_np, vals_np = bits.numpy(), vals.numpy()
        byte, start = 0, 0
        for i, n, pn in zip(idx, sizes, padded):
            b = bits_np[byte : byte + pn // 8]
            nnz = count_bits(b, n)
            out[i] = (b, vals_np[start : start + nnz])
            byte, start = byte + pn // 8, start + nnz
    return out


def _to_host(t: torch.Tensor) -> torch.Tensor:
    """A copy of `t` on the host, without waiting for it (pinned memory) where `t` is on CUDA."""
    if t.device.type != "cuda":
        return t.cpu()
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    return host
