"""FedDIP's local update: masked error-feedback SGD with the incremental p-norm regulariser, as one
fused in-place pass over memory (native and numba), with a step-by-step NumPy reference."""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import numpy as np

from . import _backend
from ._arrays import FLOAT_DTYPES, as_array, check_disjoint, contiguous, flat_mask, is_torch, on_device, writable_view


def masked_ef_step(
    w: Any,
    g: Any,
    mask: Any = None,
    *,
    lr: float,
    weight_decay: float = 0.0,
    lam: float = 0.0,
    p: int = 2,
    momentum: float = 0.0,
    momentum_buffer: Any = None,
    pruned_out: Any = None,
    norm: Optional[float] = None,
    mask_bits: Any = None,
    backend: str = "auto",
) -> float:
    """One FedDIP local step on one layer, in place:

        d   = g + weight_decay * w + lam * d||w * m||_p / dw
        buf = momentum * buf + d;  d = buf            (if momentum_buffer is given)
        w  -= lr * d
        pruned_out = w * m                            (if pruned_out is given)

    `g` is the gradient computed at the pruned point w * m; it is applied to the dense `w` (error
    feedback). The regulariser is the non-squared p-norm of the masked layer (p = 1 or 2): its
    gradient is m * w / ||w * m||_2 (zero for a zero or non-finite norm) or m * sign(w); each of
    its terms stays within lam even for subnormal weights, where lam / norm alone would overflow.
    `mask` None means dense. NaN and inf in w, g or the buffer are not checked: they propagate by
    IEEE arithmetic, the same in every backend and as in torch (w * m is NaN for an unmasked inf,
    so the layer's norm is NaN and its regulariser term drops out; tests/test_update.py).
    Momentum follows torch.optim.SGD (no dampening, no Nesterov); start from a zero buffer.

    `norm` is ||w * m||_p before the step; when None it is computed with an extra read pass (a
    non-finite norm, as a step returns for a layer holding NaN or inf, drops the regulariser term). The
    return value is ||w * m||_p after the step: pass it as `norm` next time to keep each step a
    single pass over memory. `w`, `momentum_buffer` and `pruned_out` are written in place (NumPy
    arrays or torch CPU tensors, C-contiguous); `g` and `mask` have w's number of elements. No two
    of w, g, mask, momentum_buffer and pruned_out may share memory (ValueError).

    `mask_bits` may replace `mask`: the mask packed as pack_mask writes it ((n + 7) / 8 bytes,
    little-endian bit order), 1/8 of the memory and traffic. The native kernel reads the bits
    directly; the numba and numpy backends unpack them first.

    torch tensors on a CUDA device are stepped there, by the same arithmetic in torch operations
    (_torch_kernels.ef_step; `backend` and `mask_bits` do not apply). All of them must be on the
    one device.
    """
    if on_device(w, g, mask, momentum_buffer, pruned_out, mask_bits):
        return _step_on_device(w, g, mask, lr=lr, weight_decay=weight_decay, lam=lam, p=p, momentum=momentum,
                               momentum_buffer=momentum_buffer, pruned_out=pruned_out, norm=norm, mask_bits=mask_bits)
    _check_hyper(lr, weight_decay, lam, momentum, p)
    if _backend.resolve(backend) == "native":  # plain arrays: straight to the binding (see _native_many_as_given)
        hyper = dict(lr=float(lr), weight_decay=float(weight_decay), lam=float(lam), momentum=float(momentum), p=p)
        fast = _native_many_as_given([w], [g], None if mask is None else [mask],
                                     None if mask_bits is None else [mask_bits], [momentum_buffer], [pruned_out],
                                     [norm], hyper)
        if fast is not None:
            return fast[0]
    wa, ga, ma, packed, buf, out = _host_layer(w, g, mask, mask_bits, momentum_buffer, pruned_out, momentum, norm)
    check_disjoint({"w": wa, "g": ga, "mask": ma, "momentum_buffer": buf, "pruned_out": out})
    return _backend.kernels(backend).masked_ef_step(
        wa, ga, ma, momentum_buffer=buf, pruned_out=out, lr=float(lr), weight_decay=float(weight_decay),
        lam=float(lam), momentum=float(momentum), p=p, norm=None if norm is None else float(norm), mask_packed=packed)


def masked_ef_step_many(
    ws: Sequence[Any],
    gs: Sequence[Any],
    masks: Optional[Sequence[Any]] = None,
    *,
    lr: float,
    weight_decay: float = 0.0,
    lam: float = 0.0,
    p: int = 2,
    momentum: float = 0.0,
    momentum_buffers: Optional[Sequence[Any]] = None,
    pruned_outs: Optional[Sequence[Any]] = None,
    norms: Optional[Sequence[Optional[float]]] = None,
    mask_bits: Optional[Sequence[Any]] = None,
    backend: str = "auto",
) -> list[float]:
    """masked_ef_step on every layer of a model with one set of hyperparameters, as torch's fused
    multi-tensor optimisers do: one call, one parallel pass over all layers (native), where a call
    per layer pays a thread start and the argument checks for each small layer.

    `ws` and `gs` are lists of layers; `masks`, `mask_bits`, `momentum_buffers`, `pruned_outs` and
    `norms` are lists with an entry (None allowed) per layer, or None for none at all. Each layer
    is checked as masked_ef_step checks it (layers may differ in dtype), and no two arrays of any
    layers may share memory.
    Returns each layer's ||w * m||_p after the step, the same values that stepping the layers one
    at a time returns. Host arrays only (CUDA tensors: step them with masked_ef_step)."""
    n_layers = len(ws)

    def entries(xs: Optional[Sequence[Any]], name: str) -> Sequence[Any]:
        if xs is None:
            return [None] * n_layers
        if isinstance(xs, np.ndarray) or is_torch(xs) or len(xs) != n_layers:
            raise ValueError(f"{name} must be a list with one entry per layer ({n_layers})")
        return xs

    _check_hyper(lr, weight_decay, lam, momentum, p)
    if _backend.resolve(backend) == "native":
        hyper = dict(lr=float(lr), weight_decay=float(weight_decay), lam=float(lam), momentum=float(momentum), p=p)
        fast = _native_many_as_given(ws, gs, masks, mask_bits, momentum_buffers, pruned_outs, norms, hyper)
        if fast is not None:
            return fast
    if on_device(*ws, *gs):
        raise ValueError("masked_ef_step_many steps host arrays; step CUDA tensors with masked_ef_step")
    layers = [
        _host_layer(w, g, m, mb, b, o, momentum, nm)
        for w, g, m, mb, b, o, nm in zip(entries(ws, "ws"), entries(gs, "gs"), entries(masks, "masks"),
                                         entries(mask_bits, "mask_bits"), entries(momentum_buffers, "momentum_buffers"),
                                         entries(pruned_outs, "pruned_outs"), entries(norms, "norms"))
    ]
    packed = {layer[3] for layer in layers if layer[2] is not None}
    if len(packed) > 1:
        raise ValueError("give every layer's mask the same way: all as masks or all as mask_bits")
    kernels = _backend.kernels(backend)
    if _backend.resolve(backend) != "native":  # the native binding checks overlaps itself, in C++
        check_disjoint({f"{name} of layer {i}": a for i, layer in enumerate(layers)
                        for name, a in zip(("w", "g", "mask", "", "momentum_buffer", "pruned_out"), layer) if name})
    return kernels.masked_ef_step_many(
        [layer[0] for layer in layers], [layer[1] for layer in layers], [layer[2] for layer in layers],
        momentum_buffers=[layer[4] for layer in layers], pruned_outs=[layer[5] for layer in layers], lr=float(lr),
        weight_decay=float(weight_decay), lam=float(lam), momentum=float(momentum), p=p,
        norms=[None if nm is None else float(nm) for nm in entries(norms, "norms")], mask_packed=packed == {True})


_BOOL, _UINT8 = np.dtype(np.bool_), np.dtype(np.uint8)


def _native_many_as_given(ws: Sequence[Any], gs: Sequence[Any], masks: Optional[Sequence[Any]],
                          mask_bits: Optional[Sequence[Any]], bufs: Optional[Sequence[Any]],
                          outs: Optional[Sequence[Any]], norms: Optional[Sequence[Optional[float]]],
                          hyper: dict) -> Optional[list[float]]:
    """The native step (of masked_ef_step_many, and of masked_ef_step as one layer) on the caller's
    arrays as they are, where every one is a NumPy array of a kind the binding takes without
    conversion (bool masks, uint8 bits): the binding checks sizes, dtypes, order, alignment,
    writability and overlaps itself, in C++ (ResNet-18's 21 small layers: about 20 us a call, against
    50 checked here). None where the arguments need the checked path: other kinds of arrays or lists,
    arguments only that path checks, or any that the binding refuses (the checked path then names
    the problem, or converts what it can)."""
    if masks is not None and mask_bits is not None:
        return None
    given, packed, kind = (mask_bits, True, _UINT8) if mask_bits is not None else (masks, False, _BOOL)
    n = len(ws) if isinstance(ws, (list, tuple)) else -1
    for xs, required, dtype in ((ws, True, None), (gs, True, None), (bufs, hyper["momentum"] != 0.0, None),
                                (outs, False, None), (given, False, kind)):
        if xs is None:
            if required:
                return None
            continue
        if not isinstance(xs, (list, tuple)) or len(xs) != n:
            return None
        for a in xs:
            if a is None:
                if required:
                    return None
            elif type(a) is not np.ndarray or (dtype is not None and a.dtype != dtype):
                return None
    if norms is not None:
        if not isinstance(norms, (list, tuple)) or len(norms) != n:
            return None
        for nm in norms:
            if nm is not None and not (isinstance(nm, float) and (nm >= 0 or math.isnan(nm))):
                return None
    none = [None] * n
    try:
        return _backend.native_module().masked_ef_step_many(
            ws, gs, none if given is None else given, momentum_buffers=none if bufs is None else bufs,
            pruned_outs=none if outs is None else outs, norms=none if norms is None else norms, mask_packed=packed,
            **hyper)
    except (ValueError, TypeError):
        return None


def _check_hyper(lr: float, weight_decay: float, lam: float, momentum: float, p: int) -> None:
    if p not in (1, 2):
        raise ValueError(f"p must be 1 or 2, got {p}")
    for name, v in (("lr", lr), ("weight_decay", weight_decay), ("lam", lam), ("momentum", momentum)):
        if not math.isfinite(v) or v < 0:
            raise ValueError(f"{name} must be finite and >= 0, got {v}")


def _host_layer(w: Any, g: Any, mask: Any, mask_bits: Any, momentum_buffer: Any, pruned_out: Any, momentum: float,
                norm: Optional[float]) -> tuple[np.ndarray, np.ndarray, Optional[np.ndarray], bool,
                                                Optional[np.ndarray], Optional[np.ndarray]]:
    """One layer's arrays for the kernels, checked: (w, g, mask, mask is packed bits, buffer, pruned)."""
    wa = as_array(w, "w")
    if wa.dtype not in FLOAT_DTYPES:
        raise TypeError(f"w has dtype {wa.dtype}; float32 or float64 is required")
    wa = writable_view(wa, "w", wa.dtype, wa.size)
    ga = as_array(g, "g")
    if ga.dtype != wa.dtype or ga.size != wa.size:
        raise ValueError(f"g must match w ({wa.size} x {wa.dtype}), got {ga.size} x {ga.dtype}")
    ga = contiguous(ga)
    ma, packed = _layer_mask(mask, mask_bits, wa.size)
    buf = None if momentum_buffer is None else writable_view(momentum_buffer, "momentum_buffer", wa.dtype, wa.size)
    if momentum != 0.0 and buf is None:
        raise ValueError("momentum != 0 needs a momentum_buffer (zero-initialised, same shape as w)")
    out = None if pruned_out is None else writable_view(pruned_out, "pruned_out", wa.dtype, wa.size)
    if norm is not None and not (norm >= 0 or math.isnan(norm)):
        raise ValueError(f"norm must be >= 0 (or NaN), got {norm}")
    return wa, ga, ma, packed, buf, out


def _step_on_device(w: Any, g: Any, mask: Any, *, lr: float, weight_decay: float, lam: float, p: int,
                    momentum: float, momentum_buffer: Any, pruned_out: Any, norm: Optional[float],
                    mask_bits: Any) -> float:
    import torch

    from . import _torch_kernels

    if mask_bits is not None:
        raise ValueError("mask_bits is for host arrays; pass the mask as a bool tensor on the device")
    args = {"w": w, "g": g, "mask": mask, "momentum_buffer": momentum_buffer, "pruned_out": pruned_out}
    for name, t in args.items():
        if t is not None and (not isinstance(t, torch.Tensor) or t.device != w.device):
            raise ValueError(f"{name} must be a torch tensor on {w.device} like w")
    if w.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"w has dtype {w.dtype}; float32 or float64 is required")
    for name, t in (("g", g), ("momentum_buffer", momentum_buffer), ("pruned_out", pruned_out)):
        if t is not None and (t.dtype != w.dtype or t.numel() != w.numel()):
            raise ValueError(f"{name} must match w ({w.numel()} x {w.dtype}), got {t.numel()} x {t.dtype}")
    if mask is not None and mask.numel() != w.numel():
        raise ValueError(f"mask has {mask.numel()} elements, expected {w.numel()}")
    _check_hyper(lr, weight_decay, lam, momentum, p)
    if momentum != 0.0 and momentum_buffer is None:
        raise ValueError("momentum != 0 needs a momentum_buffer (zero-initialised, same shape as w)")
    for name, t in (("w", w), ("momentum_buffer", momentum_buffer), ("pruned_out", pruned_out)):
        if t is not None and not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous (it is written in place)")
    m = None if mask is None else (mask if mask.dtype == torch.bool else mask != 0).reshape(w.shape)
    prev = None if norm is None else torch.tensor(float(norm), dtype=torch.float64, device=w.device)
    hp = _torch_kernels.hyper(lr, weight_decay, lam, momentum, w.device)
    buf = None if momentum_buffer is None else momentum_buffer.view(w.shape)
    out = None if pruned_out is None else pruned_out.view(w.shape)
    with torch.no_grad():
        return float(_torch_kernels.ef_step(w.detach(), g.detach().reshape(w.shape), m, buf, out, hp, p, prev))


def masked_norm(w: Any, mask: Any = None, *, p: int = 2, mask_bits: Any = None, backend: str = "auto") -> float:
    """||w * m||_p (p = 1 or 2), accumulated in double; for p = 2 values are rescaled by a power of
    two when their squares would underflow, so subnormal layers get their exact norm, not 0. The
    mask is given as `mask` or packed as `mask_bits`, as in masked_ef_step."""
    wa = contiguous(as_array(w, "w"))
    if wa.dtype not in FLOAT_DTYPES:
        raise TypeError(f"w has dtype {wa.dtype}; float32 or float64 is required")
    ma, packed = _layer_mask(mask, mask_bits, wa.size)
    if p not in (1, 2):
        raise ValueError(f"p must be 1 or 2, got {p}")
    return _backend.kernels(backend).masked_norm(wa, ma, p=p, mask_packed=packed)


def _layer_mask(mask: Any, mask_bits: Any, n: int) -> tuple[Optional[np.ndarray], bool]:
    """(flat mask array or None, whether it is packed bits) from the mask or mask_bits argument."""
    if mask_bits is None:
        return (None if mask is None else flat_mask(mask, n)), False
    if mask is not None:
        raise ValueError("give mask or mask_bits, not both")
    bits = contiguous(as_array(mask_bits, "mask_bits")).reshape(-1)
    if bits.dtype != np.uint8:
        raise TypeError(f"mask_bits has dtype {bits.dtype}, expected uint8 (as pack_mask returns)")
    if bits.size != (n + 7) // 8:
        raise ValueError(f"mask_bits has {bits.size} bytes, {(n + 7) // 8} expected for {n} elements")
    return bits, True

