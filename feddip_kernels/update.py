"""FedDIP's local update: masked error-feedback SGD with the incremental p-norm regulariser, as one
fused in-place pass over memory (native and numba), with a step-by-step NumPy reference."""

from __future__ import annotations

import math
from itertools import repeat
from typing import Any, Optional, Sequence

import numpy as np

from . import _backend
from ._arrays import FLOAT_DTYPES, as_array, check_disjoint, contiguous, dtype_name, flat_mask, is_torch, writable_view


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
    (the device kernels, _torch_kernels; `backend` and `mask_bits` do not apply), checked as host
    arrays are. All of them must be on the one device.

    Parameters
    ----------
    w : the dense weights (float32 or float64), written in place.
    g : the gradient at w * m, w's number of elements and dtype.
    mask : bool mask (non-zero = kept) of w's number of elements, or None (dense).
    lr, weight_decay, lam, momentum : finite and >= 0.
    p : 1 or 2, the regulariser's norm.
    momentum_buffer : w's shape and dtype, written in place (with momentum).
    pruned_out : receives w * m after the step.
    norm : ||w * m||_p before the step, or None.
    mask_bits : the mask packed (pack_mask), in place of `mask`.
    backend : "auto", "native", "numba" or "numpy" (host arrays).

    Returns
    -------
    float : ||w * m||_p after the step.

    Raises
    ------
    TypeError : an argument of the wrong type or dtype.
    ValueError : sizes that differ, arrays that share memory or are not writable where written,
        a hyperparameter out of range, both mask and mask_bits, or an unknown backend.
    """
    kernels = _backend.kernels_for(w, g, mask, momentum_buffer, pruned_out, mask_bits, backend=backend)
    hyper = _hyper(lr, weight_decay, lam, momentum, p)
    layers, packed = _check_layers(kernels, [w], [g], None if mask is None else [mask],
                                   None if mask_bits is None else [mask_bits], [momentum_buffer], [pruned_out], [norm],
                                   momentum)
    return _run(kernels, layers, packed, hyper, single=True)[0]


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
    at a time returns. torch tensors on a CUDA device (all layers on the one device) are stepped
    there, one layer after another, as masked_ef_step steps them.

    Parameters
    ----------
    ws, gs : the layers' dense weights and gradients (as masked_ef_step's w and g).
    masks, mask_bits, momentum_buffers, pruned_outs, norms : a list with an entry per layer (None
        allowed), or None for none at all.
    lr, weight_decay, lam, p, momentum, backend : as masked_ef_step's, for all layers.

    Returns
    -------
    list[float] : each layer's ||w * m||_p after the step.

    Raises
    ------
    TypeError, ValueError : as masked_ef_step, for any layer (nothing is written then), or lists
        of another length than ws.
    """
    hyper = _hyper(lr, weight_decay, lam, momentum, p)
    kernels = _backend.kernels_for(*ws, *gs, backend=backend)
    layers, packed = _check_layers(kernels, ws, gs, masks, mask_bits, momentum_buffers, pruned_outs, norms, momentum)
    return _run(kernels, layers, packed, hyper, single=False)


class StepLayers:
    """masked_ef_step_many's layers checked once, for a caller that steps the same arrays again
    and again with new gradients (FedDIPSGD): what stays (weights, masks, buffers, pruned copies)
    is checked by the step's validator when made, with a first set of gradients; each `step` checks
    what changes (gradients, norms, hyperparameters) and makes masked_ef_step_many's one call of
    the kernels, with the same results."""

    def __init__(self, ws: Sequence[Any], gs: Sequence[Any], masks: Optional[Sequence[Any]] = None, *,
                 momentum_buffers: Optional[Sequence[Any]] = None, pruned_outs: Optional[Sequence[Any]] = None,
                 mask_bits: Optional[Sequence[Any]] = None, momentum: float = 0.0, backend: str = "auto") -> None:
        self.kernels = _backend.kernels_for(*ws, *gs, backend=backend)
        self.layers, self.packed = _check_layers(self.kernels, ws, gs, masks, mask_bits, momentum_buffers,
                                                 pruned_outs, None, momentum)
        self.buffered = all(b is not None for b in self.layers[3])
        self.device = _backend.is_device(self.kernels)
        self.overlaps = _backend.checks_overlaps(self.kernels)

    def step(self, gs: Sequence[Any], *, lr: float, weight_decay: float = 0.0, lam: float = 0.0, p: int = 2,
             momentum: float = 0.0, norms: Optional[Sequence[Optional[float]]] = None) -> list[float]:
        """masked_ef_step_many of the layers with these gradients (one per layer) and norms."""
        hyper = _hyper(lr, weight_decay, lam, momentum, p)
        if momentum != 0.0 and not self.buffered:
            raise ValueError("momentum != 0 needs a momentum_buffer (zero-initialised, same shape as w)")
        ws, _, ms, bufs, outs, _ = self.layers
        n = len(ws)
        if type(gs) is not list or len(gs) != n:
            gs = _entries(gs, "gs", n)
        if self.device:
            gs = [_device_grad(g, w) for g, w in zip(gs, ws)]
        else:
            ndarray = np.ndarray
            for g, w in zip(gs, ws):  # as _host_grad passes them, without a call each
                if type(g) is not ndarray or g.dtype is not w.dtype or g.size != w.size or not g.flags.carray:
                    gs = [_host_grad(g, w) for g, w in zip(gs, ws)]
                    break
        if norms is None:
            norms = [None] * n
        else:
            if type(norms) is not list or len(norms) != n:
                norms = _entries(norms, "norms", n)
            for nm in norms:  # as _checked_norm passes them
                if nm is not None and (type(nm) is not float or not (nm >= 0 or nm != nm)):
                    norms = [_checked_norm(nm) for nm in norms]
                    break
        return _run(self.kernels, (ws, gs, ms, bufs, outs, norms), self.packed, hyper, False, self.overlaps)


# Checked layers, as columns: (ws, gs, masks, momentum buffers, pruned copies, norms), entries None
# where a layer has none.
Layers = tuple


def _check_layers(kernels: Any, ws: Sequence[Any], gs: Sequence[Any], masks: Optional[Sequence[Any]],
                  mask_bits: Optional[Sequence[Any]], bufs: Optional[Sequence[Any]], outs: Optional[Sequence[Any]],
                  norms: Optional[Sequence[Optional[float]]], momentum: float) -> tuple[Layers, bool]:
    """The step's validator: masked_ef_step_many's arguments (masked_ef_step's, as one layer)
    checked for the kernels and converted to what they take: (the checked layers, whether the
    masks are packed bits). NumPy arrays that the host kernels take as they are pass after a few
    checks (a small model's step makes many calls); anything else goes layer by layer through
    _host_layer or _device_layer, which convert it or name the problem."""
    n = len(ws)
    listed = (list, tuple)  # the usual kinds, checked here without a call
    ws = ws if type(ws) in listed else _entries(ws, "ws", n)
    gs = gs if type(gs) in listed and len(gs) == n else _entries(gs, "gs", n)
    masks = masks if masks is None or type(masks) in listed and len(masks) == n else _entries(masks, "masks", n)
    mask_bits = mask_bits if mask_bits is None or type(mask_bits) in listed and len(mask_bits) == n else \
        _entries(mask_bits, "mask_bits", n)
    bufs = bufs if bufs is None or type(bufs) in listed and len(bufs) == n else _entries(bufs, "momentum_buffers", n)
    outs = outs if outs is None or type(outs) in listed and len(outs) == n else _entries(outs, "pruned_outs", n)
    norms = norms if norms is None or type(norms) in listed and len(norms) == n else _entries(norms, "norms", n)
    device = _backend.is_device(kernels)
    if not device and (masks is None or mask_bits is None):
        packed = mask_bits is not None
        given = mask_bits if packed else masks
        if _as_they_are(ws, gs, given, packed, bufs, outs, norms, momentum):
            none = [None] * n
            return (ws, gs, none if given is None else given, none if bufs is None else bufs,
                    none if outs is None else outs, none if norms is None else norms), packed
    layer = _device_layer if device else _host_layer
    checked = [layer(w, g, m, mb, b, o, momentum, nm)
               for w, g, m, mb, b, o, nm in zip(ws, gs, repeat(None) if masks is None else masks,
                                                repeat(None) if mask_bits is None else mask_bits,
                                                repeat(None) if bufs is None else bufs,
                                                repeat(None) if outs is None else outs,
                                                repeat(None) if norms is None else norms)]
    all_packed: Optional[bool] = None  # how the layers give their masks: all alike
    for layer_checked in checked:
        kind = layer_checked[6]
        if kind is not None and kind is not all_packed:
            if all_packed is not None:
                raise ValueError("give every layer's mask the same way: all as masks or all as mask_bits")
            all_packed = kind
    if not checked:
        return ([],) * 6, False
    return tuple(zip(*checked))[:6], all_packed is True


def _as_they_are(ws: Sequence[Any], gs: Sequence[Any], given: Optional[Sequence[Any]], packed: bool,
                 bufs: Optional[Sequence[Any]], outs: Optional[Sequence[Any]], norms: Optional[Sequence[Any]],
                 momentum: float) -> bool:
    """Whether the host kernels take every layer as it is, which _host_layer would pass unchanged:
    NumPy arrays of one float dtype a layer, C-contiguous, aligned, writeable (the gradient too:
    a read-only one takes the longer way), of w's size; masks (`given`) bool arrays, or uint8
    packed bits; a buffer wherever momentum is on; norms floats >= 0 or NaN."""
    ndarray, f32, f64 = np.ndarray, _F32, _F64
    kind = _UINT8 if packed else _BOOL
    if bufs is None and momentum != 0.0:
        return False
    for i, w in enumerate(ws):
        g = gs[i]
        if type(w) is not ndarray or type(g) is not ndarray:
            return False
        dt, size = w.dtype, w.size
        if dt is not f32 and dt is not f64 or g.dtype is not dt or g.size != size or not w.flags.carray \
                or not g.flags.carray:
            return False
        if given is not None:
            m = given[i]
            if m is not None and (type(m) is not ndarray or m.dtype is not kind
                                  or m.size != ((size + 7) >> 3 if packed else size) or not m.flags.c_contiguous):
                return False
        if bufs is not None:
            b = bufs[i]
            if b is None:
                if momentum != 0.0:
                    return False
            elif type(b) is not ndarray or b.dtype is not dt or b.size != size or not b.flags.carray:
                return False
        if outs is not None:
            o = outs[i]
            if o is not None and (type(o) is not ndarray or o.dtype is not dt or o.size != size or not o.flags.carray):
                return False
        if norms is not None:
            nm = norms[i]
            if nm is not None and (type(nm) is not float or not (nm >= 0 or nm != nm)):
                return False
    return True


def _entries(xs: Sequence[Any], name: str, n: int) -> Sequence[Any]:
    """A per-layer argument of masked_ef_step_many: a list (or tuple, or sequence) of n entries."""
    if (type(xs) is list or type(xs) is tuple or not (isinstance(xs, np.ndarray) or is_torch(xs))) and len(xs) == n:
        return xs
    raise ValueError(f"{name} must be a list with one entry per layer ({n})")


_NAMES = ("w", "g", "mask", "momentum_buffer", "pruned_out")
_F32, _F64 = FLOAT_DTYPES
_BOOL, _UINT8 = np.dtype(np.bool_), np.dtype(np.uint8)


def _run(kernels: Any, layers: Layers, packed: bool, hyper: dict, single: bool,
         overlaps: Optional[bool] = None) -> list[float]:
    """The one call of the kernels' multi-layer step on checked layers (one layer: masked_ef_step),
    after the overlap check where the kernels do not make it themselves (`overlaps`: whether they
    do, _backend.checks_overlaps; naming the arrays "w", "g", ... of a `single` layer, else "w of
    layer i" and so on)."""
    ws, gs, ms, bufs, outs, norms = layers
    if not ws:
        return []
    if not (_backend.checks_overlaps(kernels) if overlaps is None else overlaps):
        if single:
            check_disjoint(dict(zip(_NAMES, (ws[0], gs[0], ms[0], bufs[0], outs[0]))))
        else:
            check_disjoint({f"{name} of layer {i}": a for name, xs in zip(_NAMES, layers) for i, a in enumerate(xs)})
    return kernels.masked_ef_step_many(ws, gs, ms, momentum_buffers=bufs, pruned_outs=outs, norms=norms,
                                       mask_packed=packed, **hyper)


def _hyper(lr: float, weight_decay: float, lam: float, momentum: float, p: int) -> dict:
    """The step's hyperparameters, checked, as the kernels take them."""
    _check_hyper(lr, weight_decay, lam, momentum, p)
    return dict(lr=float(lr), weight_decay=float(weight_decay), lam=float(lam), momentum=float(momentum), p=p)


def _check_hyper(lr: float, weight_decay: float, lam: float, momentum: float, p: int) -> None:
    if p not in (1, 2):
        raise ValueError(f"p must be 1 or 2, got {p}")
    inf = math.inf
    if 0.0 <= lr < inf and 0.0 <= weight_decay < inf and 0.0 <= lam < inf and 0.0 <= momentum < inf:
        return  # the common case, in one expression (NaN fails it)
    for name, v in (("lr", lr), ("weight_decay", weight_decay), ("lam", lam), ("momentum", momentum)):
        if not math.isfinite(v) or v < 0:
            raise ValueError(f"{name} must be finite and >= 0, got {v}")


def _host_layer(w: Any, g: Any, mask: Any, mask_bits: Any, momentum_buffer: Any, pruned_out: Any, momentum: float,
                norm: Optional[float]) -> tuple:
    """The step's validator for the host kernels, layer by layer: one layer's arguments checked and
    converted to what the kernels take (NumPy views, a flat bool mask or packed bits), as a tuple
    (w, g, mask or None, buffer or None, pruned copy or None, norm or None, whether the mask is
    packed bits: True, False or None without a mask)."""
    wa = as_array(w, "w")
    if wa.dtype not in FLOAT_DTYPES:
        raise TypeError(f"w has dtype {wa.dtype}; float32 or float64 is required")
    wa = writable_view(wa, "w", wa.dtype, wa.size)
    ga = _host_grad(g, wa)
    ma, packed = _layer_mask(mask, mask_bits, wa.size)
    buf = None if momentum_buffer is None else writable_view(momentum_buffer, "momentum_buffer", wa.dtype, wa.size)
    if momentum != 0.0 and buf is None:
        raise ValueError("momentum != 0 needs a momentum_buffer (zero-initialised, same shape as w)")
    out = None if pruned_out is None else writable_view(pruned_out, "pruned_out", wa.dtype, wa.size)
    return wa, ga, ma, buf, out, _checked_norm(norm), None if ma is None else packed


def _device_layer(w: Any, g: Any, mask: Any, mask_bits: Any, momentum_buffer: Any, pruned_out: Any, momentum: float,
                  norm: Optional[float]) -> tuple:
    """The step's validator for the device kernels: the host's checks (the same errors) on torch
    tensors of one device, which stay as they are (the mask as a bool tensor)."""
    if mask_bits is not None:
        raise ValueError("mask_bits is for host arrays; pass the mask as a bool tensor on the device")
    args = dict(zip(_NAMES, (w, g, mask, momentum_buffer, pruned_out)))
    where = w.device if is_torch(w) else next(t.device for t in args.values() if is_torch(t))
    for name, t in args.items():
        if t is not None and (not is_torch(t) or t.device != where):
            raise ValueError(f"{name} must be a torch tensor on {where} like w" if name != "w" else
                             f"w must be a torch tensor on {where}, where the other arguments are")
    if str(w.dtype) not in ("torch.float32", "torch.float64"):
        raise TypeError(f"w has dtype {dtype_name(w)}; float32 or float64 is required")
    _written_in_place(w, "w")
    n = w.numel()
    _device_grad(g, w)
    if mask is not None:
        mask = flat_mask(mask, n, "mask", where)
    for name, t in (("momentum_buffer", momentum_buffer), ("pruned_out", pruned_out)):
        if t is not None:
            if t.dtype != w.dtype:
                raise TypeError(f"{name} has dtype {dtype_name(t)}, expected {dtype_name(w)}")
            if t.numel() != n:
                raise ValueError(f"{name} has {t.numel()} elements, expected {n}")
            _written_in_place(t, name)
        if name == "momentum_buffer" and momentum != 0.0 and t is None:
            raise ValueError("momentum != 0 needs a momentum_buffer (zero-initialised, same shape as w)")
    return w, g, mask, momentum_buffer, pruned_out, _checked_norm(norm), None if mask is None else False


def _host_grad(g: Any, w: np.ndarray) -> np.ndarray:
    """The gradient checked against a checked layer's weights: a C-contiguous NumPy array of w's
    dtype and size (a view of g where it can be)."""
    if type(g) is np.ndarray and g.dtype is w.dtype and g.size == w.size and g.flags.carray:
        return g
    ga = as_array(g, "g")
    if ga.dtype != w.dtype or ga.size != w.size:
        raise ValueError(f"g must match w ({w.size} x {w.dtype}), got {ga.size} x {ga.dtype}")
    return contiguous(ga)


def _device_grad(g: Any, w: Any) -> Any:
    """The gradient checked against a checked layer's weights on a device: a tensor there of w's
    dtype and size."""
    if not is_torch(g) or g.device != w.device:
        raise ValueError(f"g must be a torch tensor on {w.device} like w")
    if g.dtype != w.dtype or g.numel() != w.numel():
        raise ValueError(f"g must match w ({w.numel()} x {dtype_name(w)}), got {g.numel()} x {dtype_name(g)}")
    return g


def _written_in_place(t: Any, what: str) -> None:
    if not t.is_contiguous():
        raise ValueError(f"{what} must be a writeable, aligned, C-contiguous array (it is written in place)")


def _checked_norm(norm: Optional[float]) -> Optional[float]:
    if norm is None or type(norm) is float and (norm >= 0 or norm != norm):
        return norm
    if not (norm >= 0 or math.isnan(norm)):
        raise ValueError(f"norm must be >= 0 (or NaN), got {norm}")
    return float(norm)


def masked_norm(w: Any, mask: Any = None, *, p: int = 2, mask_bits: Any = None, backend: str = "auto") -> float:
    """||w * m||_p (p = 1 or 2), accumulated in double; for p = 2 values are rescaled by a power of
    two when their squares would underflow, so subnormal layers get their exact norm, not 0. The
    mask is given as `mask` or packed as `mask_bits`, as in masked_ef_step.

    Parameters
    ----------
    w : float32 or float64 array or tensor.
    mask, mask_bits : the mask (non-zero = kept) or the mask packed; None for none.
    p : 1 or 2.
    backend : "auto", "native", "numba" or "numpy".

    Returns
    -------
    float : the norm.

    Raises
    ------
    TypeError : w not float32 or float64.
    ValueError : p not 1 or 2, or a mask of another size.
    """
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

