"""The device kernels: the kernels for torch tensors on an accelerator (CUDA), in torch operations
so that they run where the tensors are, and only compact results (a threshold, packed positions
and kept values) cross to the host. This module meets _contract.DeviceKernels; _backend.kernels_for
hands it out for device tensors, and the public functions validate the arguments as they do for
the host kernels. Same definitions as the NumPy reference (reference.py), tested against it on
CPU tensors (tests/test_torch_kernels.py, tests/test_contract.py).

Where Triton imports, the global top-k of float32 tensors on CUDA runs as a radix select in Triton
(_triton_topk); the codecs' device step (DeviceSparse, Plan) is _torch_golomb's.

The local step is one elementwise function of (w, g, m, buffer) plus the layer's norm; under
torch.compile it becomes one fused kernel (Triton on CUDA, C++ on the CPU) that reads w, g, m and
the buffer once and writes w, the buffer and the pruned copy once, as fused SGD does plus the mask
and the pruned copy. Hyper-parameters travel as a float64 tensor so that a new learning rate does
not recompile it.
"""

from __future__ import annotations

from types import ModuleType
from typing import Optional, Sequence

import torch
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from . import _backend
from ._torch_golomb import DeviceSparse, Plan  # noqa: F401 - the codecs' device step, part of this module's contract

# Candidates per tensor list that the sampled bracket of the k-th magnitude aims to leave.
_SAMPLE = 1 << 16


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


def ef_step_fused(
    w: torch.Tensor,
    g: torch.Tensor,
    m: Optional[torch.Tensor],
    buf: Optional[torch.Tensor],
    wp: Optional[torch.Tensor],
    hp: torch.Tensor,
    p: int,
    prev_norm: Optional[torch.Tensor],
) -> torch.Tensor:
    """ef_step compiled into one kernel per layer shape (compiled on first use)."""
    global _compiled
    if _compiled is None:
        _compiled = torch.compile(ef_step, dynamic=True)
    return _compiled(w, g, m, buf, wp, hp, p, prev_norm)


def sgd_step(w: torch.Tensor, g: torch.Tensor, buf: Optional[torch.Tensor], *, lr: float, weight_decay: float,
             momentum: float) -> None:
    """Plain SGD in place, as torch.optim.SGD makes it (no dampening, no Nesterov): FedDIPSGD's
    step of a layer without a mask (no regulariser, no pruned copy)."""
    d = g.add(w, alpha=weight_decay) if weight_decay else g
    if buf is not None:
        buf.mul_(momentum).add_(d)
        d = buf
    w.add_(d, alpha=-lr)


def masked_ef_step(
    w: torch.Tensor,
    g: torch.Tensor,
    mask: Optional[torch.Tensor],
    *,
    momentum_buffer: Optional[torch.Tensor],
    pruned_out: Optional[torch.Tensor],
    lr: float,
    weight_decay: float,
    lam: float,
    momentum: float,
    p: int,
    norm: Optional[float],
    mask_packed: bool = False,
) -> float:
    """update.masked_ef_step on one layer of device tensors (ef_step); the norm after it."""
    return masked_ef_step_many([w], [g], [mask], momentum_buffers=[momentum_buffer], pruned_outs=[pruned_out], lr=lr,
                               weight_decay=weight_decay, lam=lam, momentum=momentum, p=p, norms=[norm],
                               mask_packed=mask_packed)[0]


def masked_ef_step_many(
    ws: Sequence[torch.Tensor],
    gs: Sequence[torch.Tensor],
    masks: Sequence[Optional[torch.Tensor]],
    *,
    momentum_buffers: Sequence[Optional[torch.Tensor]],
    pruned_outs: Sequence[Optional[torch.Tensor]],
    lr: float,
    weight_decay: float,
    lam: float,
    momentum: float,
    p: int,
    norms: Sequence[Optional[float]],
    mask_packed: bool = False,
) -> list[float]:
    """masked_ef_step on every layer, one ef_step each; their norms after it, brought to the host
    together (one wait for the device). Masks are bool tensors: packed bits are for host arrays."""
    if mask_packed:
        raise ValueError("mask_bits is for host arrays; pass the mask as a bool tensor on the device")
    if not ws:
        return []
    device = ws[0].device
    hp = hyper(lr, weight_decay, lam, momentum, device)
    out = []
    with torch.no_grad():
        for w, g, m, buf, wp, nm in zip(ws, gs, masks, momentum_buffers, pruned_outs, norms):
            shape = w.shape
            prev = None if nm is None else torch.tensor(float(nm), dtype=torch.float64, device=device)
            out.append(ef_step(w.detach(), g.detach().reshape(shape), None if m is None else m.reshape(shape),
                               None if buf is None else buf.view(shape), None if wp is None else wp.view(shape), hp, p,
                               prev))
    return torch.stack(out).tolist()


# ---------------------------------------------------------------------------- global top-k


def _magnitudes(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """|w| of all tensors in list order as one flat tensor. On a device one copy costs less than a
    pass per tensor: a few launches over all elements instead of a few per tensor (flattened and
    joined in one C++ call, as torch's distributed code does it)."""
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
        raise ValueError("input contains NaN")
    return value


def max_magnitude(tensors: Sequence[torch.Tensor]) -> float:
    """The largest |w| over the tensors, 0.0 for no elements (NaN raises)."""
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


def torch_threshold(tensors: Sequence[torch.Tensor], k: int) -> float:
    """The k-th largest |w| over all tensors (+inf for k = 0), in torch operations."""
    a = _magnitudes(tensors)
    if not a.numel():
        return float("inf")
    if k == 0:
        _no_nan(a.max())
        return float("inf")
    return float(_kth_largest(a, k, a.max())[0])


def torch_topk_masks(tensors: Sequence[torch.Tensor], k: int) -> list[torch.Tensor]:
    """Bool masks keeping exactly the k largest |w|, ties at the threshold taken in list order
    (tensor index, then flat index), as the reference's rule (README), in torch operations: views
    into one flat mask, as the host's masks are views into one block."""
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


def radix_select(tensors: Sequence[torch.Tensor], k: int) -> Optional[ModuleType]:
    """The Triton radix select (_triton_topk) where it takes these tensors and 0 < k < n, else None
    (torch operations: float64, devices other than CUDA, no Triton, k = 0 or all)."""
    module = _backend.triton_topk()
    if module is None or not 0 < k < sum(t.numel() for t in tensors) or not module.usable(tensors):
        return None
    return module


def magnitude_threshold(tensors: Sequence[torch.Tensor], k: int) -> float:
    """The k-th largest |w| over all tensors (+inf for k = 0): the radix select where it applies,
    else torch operations."""
    radix = radix_select(tensors, k)
    return radix.magnitude_threshold(tensors, k) if radix is not None else torch_threshold(tensors, k)


def topk_masks(tensors: Sequence[torch.Tensor], k: int) -> list[torch.Tensor]:
    """New bool masks on the tensors' device keeping exactly the k largest |w| (the host's rule):
    the radix select where it applies and the threshold has no ties beyond the k-th, else torch
    operations."""
    radix = radix_select(tensors, k)
    masks = radix.topk_masks(tensors, k) if radix is not None else None
    return masks if masks is not None else torch_topk_masks(tensors, k)
