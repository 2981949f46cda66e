"""Conversion of user inputs (NumPy arrays, torch tensors, DLPack or buffer objects) to NumPy views."""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence, Union

import numpy as np

try:
    from numpy.lib.array_utils import byte_bounds
except ImportError:  # NumPy before 2.0
    from numpy import byte_bounds  # type: ignore[attr-defined,no-redef]

FLOAT_DTYPES: tuple[np.dtype, np.dtype] = (np.dtype(np.float32), np.dtype(np.float64))


def is_torch(x: Any) -> bool:
    if x is None or type(x) is np.ndarray:  # the common cases, answered without string work
        return False
    return type(x).__module__.startswith("torch") and hasattr(x, "detach")


def on_device(*xs: Any) -> bool:
    """Whether any argument is a torch tensor on a device other than the CPU (CUDA): the question
    that _backend.kernels_for asks to hand out the device kernels (_torch_kernels)."""
    for x in xs:
        if x is not None and type(x) is not np.ndarray and is_torch(x) and x.device.type != "cpu":
            return True
    return False


def dtype_name(x: Any) -> str:
    """x's dtype as NumPy names it ("float32"), for a NumPy array or a torch tensor alike: error
    messages read the same for either."""
    return str(x.dtype).removeprefix("torch.")


# What an argument is, for error messages: a string, or (format, *args) formatted only when there
# is an error to report (per-tensor loops would otherwise format every name for nothing).
What = Union[str, tuple]


def described(what: What) -> str:
    return what if isinstance(what, str) else what[0].format(*what[1:])


def as_array(x: Any, what: What = "tensor") -> np.ndarray:
    """A NumPy view of `x` sharing its memory where the object allows it (torch CPU tensors,
    DLPack producers, buffer-protocol objects); a copy only for plain Python sequences."""
    if isinstance(x, np.ndarray):
        return x
    if is_torch(x):
        if x.device.type != "cpu":
            raise ValueError(f"{described(what)} is on device {x.device}; move it to the CPU first")
        return x.detach().resolve_conj().resolve_neg().numpy()
    if hasattr(x, "__dlpack__"):
        return np.from_dlpack(x)
    try:
        return np.asarray(memoryview(x))
    except TypeError:
        return np.asarray(x)


def flat_float(x: Any, what: What, max_ndim: int, device: bool) -> tuple[Any, tuple[int, ...], np.dtype]:
    """(flat C-order view, shape, dtype) of a float32/float64 tensor with at most max_ndim
    dimensions: a NumPy view, or with `device` (x on a device, see on_device) a flat torch tensor
    where x is."""
    if device:
        got = x.dtype
        dtype = {"torch.float32": FLOAT_DTYPES[0], "torch.float64": FLOAT_DTYPES[1]}.get(str(got))
        shape, flat = tuple(x.shape), x.detach().reshape(-1)
    else:
        a = as_array(x, what)
        got, shape = a.dtype, a.shape
        dtype = a.dtype if a.dtype in FLOAT_DTYPES else None
        flat = contiguous(a).reshape(-1) if dtype is not None else None
    if dtype is None:
        raise TypeError(f"{described(what)} has dtype {got}; float32 or float64 is required")
    if len(shape) > max_ndim:
        raise ValueError(f"{described(what)} has {len(shape)} dimensions, at most {max_ndim}")
    return flat, shape, dtype


def contiguous(a: np.ndarray) -> np.ndarray:
    """`a` itself when C-contiguous and aligned for its dtype, else such a copy (keeps 0-d arrays
    0-d). Views into byte buffers (np.frombuffer at an odd offset) can be misaligned, and native
    kernels may not read them."""
    return a if a.flags.c_contiguous and a.flags.aligned else a.copy(order="C")


def flat_mask(x: Any, size: Optional[int] = None, what: str = "mask", device: Any = None) -> Any:
    """A flat, C-contiguous bool view of a mask (any non-zero counts as set), optionally checked to
    have `size` elements; with `device` (a torch device: where the tensor it masks is), a flat bool
    torch tensor there instead (copied there if need be)."""
    if device is not None:
        import torch

        t = torch.as_tensor(x, device=device).reshape(-1)
        if size is not None and t.numel() != size:
            raise ValueError(f"{what} has {t.numel()} elements, expected {size}")
        return t if t.dtype == torch.bool else t != 0
    m = as_array(x, what)
    if size is not None and m.size != size:
        raise ValueError(f"{what} has {m.size} elements, expected {size}")
    m = contiguous(m).reshape(-1)
    return m if m.dtype == np.bool_ else m != 0


def writable_view(x: Any, what: str, dtype: np.dtype, size: int) -> np.ndarray:
    """A NumPy view of `x` that can be written in place: checks dtype, size, C order, writability."""
    a = as_array(x, what)
    if a.dtype != dtype:
        raise TypeError(f"{what} has dtype {a.dtype}, expected {dtype}")
    if a.size != size:
        raise ValueError(f"{what} has {a.size} elements, expected {size}")
    if not a.flags.c_contiguous or not a.flags.writeable or not a.flags.aligned:
        raise ValueError(f"{what} must be a writeable, aligned, C-contiguous array (it is written in place)")
    return a


def check_disjoint(arrays: dict[str, Any]) -> None:
    """Raise ValueError naming two of the arrays (NumPy arrays, or torch tensors of one device)
    whose memory overlaps: a kernel that writes one while reading another would give a result that
    depends on its order of work."""
    named = [(name, a) for name, a in arrays.items() if a is not None and a.nbytes]
    tensors = any(is_torch(a) for _, a in named)
    if len(named) <= 16 and not tensors:  # a few arrays (a step's): each pair's bounds, the cheapest for so few
        for i, (first, a) in enumerate(named):
            for second, b in named[i + 1:]:
                if np.may_share_memory(a, b):  # overlapping address ranges (a bounds check, no solving)
                    raise ValueError(f"{first} and {second} share memory; pass separate arrays")
        return
    # Many (a model's tensors), or tensors: their address ranges in order, each against the furthest end so far.
    spans = sorted((*_bounds(a), i) for i, (_, a) in enumerate(named))
    reach, holder = 0, -1
    for lo, hi, i in spans:
        if lo < reach:
            raise ValueError(f"{named[holder][0]} and {named[i][0]} share memory; pass separate arrays")
        if hi > reach:
            reach, holder = hi, i


def _bounds(a: Any) -> tuple[int, int]:
    """The byte addresses [lo, hi) that an array or a (non-empty) torch tensor spans."""
    if not is_torch(a):
        return byte_bounds(a)
    lo = a.data_ptr()  # torch strides are never negative: the first element is the lowest
    return lo, lo + (sum((n - 1) * st for n, st in zip(a.shape, a.stride())) + 1) * a.element_size()


def float_tensors(tensors: Sequence[Any], what: str = "tensors", device: bool = False) -> list[Any]:
    """Contiguous float32/float64 NumPy views of a list of tensors that share one dtype; with
    `device` (the device kernels take them, see _backend.kernels_for), the torch tensors as they
    are, checked alike and to be on one device."""
    if isinstance(tensors, (np.ndarray, str, bytes)) or is_torch(tensors) or not hasattr(tensors, "__iter__"):
        raise TypeError(f"{what} must be a list of arrays, got {type(tensors).__name__}")
    if device:
        arrays = list(tensors)
        for i, t in enumerate(arrays):
            if not is_torch(t) or t.device != arrays[0].device:
                raise ValueError(f"{what}[{i}] is on {_place(t)} but {what}[0] on {_place(arrays[0])}; "
                                 "pass the tensors on one device")
        floats: tuple[Any, ...] = ("torch.float32", "torch.float64")
    else:
        arrays = [as_array(t, f"{what}[{i}]") for i, t in enumerate(tensors)]
        floats = FLOAT_DTYPES
    dtype = arrays[0].dtype if arrays else None
    for i, a in enumerate(arrays):
        if (str(a.dtype) if device else a.dtype) not in floats:
            raise TypeError(f"{what}[{i}] has dtype {dtype_name(a)}; float32 or float64 is required")
        if a.dtype != dtype:
            raise TypeError(f"{what}[{i}] has dtype {dtype_name(a)} but {what}[0] has {dtype_name(arrays[0])}; "
                            "use one dtype")
    return arrays if device else [contiguous(a) for a in arrays]


def _place(x: Any) -> str:
    return str(x.device) if is_torch(x) else "the host"


def like_input(out: np.ndarray, original: Any) -> Any:
    """Return `out` as a torch tensor (zero-copy) when the original input was one."""
    if is_torch(original):
        import torch

        return torch.from_numpy(out)
    return out


def block_views(specs: Sequence[Optional[tuple[tuple[int, ...], np.dtype]]]) -> list[Optional[np.ndarray]]:
    """New arrays of the given (shape, dtype) as views into one block, each starting 64-byte
    aligned; None entries stay None. A large block gets huge pages (NumPy advises them), so writing
    it faults in a few pages rather than one per 4 kB."""
    offsets, total = [], 0
    for spec in specs:
        offsets.append(total)
        if spec is not None:
            total += -(-math.prod(spec[0]) * np.dtype(spec[1]).itemsize // 64) * 64
    block = np.empty(total, dtype=np.uint8)
    views: list[Optional[np.ndarray]] = []
    for spec, off in zip(specs, offsets):
        if spec is None:
            views.append(None)
        else:
            shape, dtype = spec
            nbytes = math.prod(shape) * np.dtype(dtype).itemsize
            views.append(block[off : off + nbytes].view(dtype).reshape(shape))
    return views

