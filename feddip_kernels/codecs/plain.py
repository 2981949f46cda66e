"""Tensors of other dtypes than float32/float64 (integers, bool, float16, bfloat16, complex), which
travel whole in version 1 and 2 records of their own dtype codes (docs/wire-format.md, "Other
dtypes"): every element as a little-endian word, positions "all", values "raw". Also what
encode_model and decode_model check of their inputs (a mapping of str names) and how decoded
arrays become torch tensors. torch is imported only when a torch tensor is given or asked for."""

from __future__ import annotations

import math
from typing import Any, Mapping, NamedTuple, Optional

import numpy as np

from .._arrays import FLOAT_DTYPES, as_array, contiguous, is_torch, writable_view
from .format import MAX_NDIM, PLAIN_CODES, PLAIN_DTYPES, CodecError

# Where a record of another dtype sets its fields: every element a position, raw words, nothing more.
# (domain, positions, values, signs, reserved, golomb_m, pos_len); domain_size = nnz = n; scale 0.
_FIXED = (0, 0, 0, 0, 0, 0, 0)
_CARRIED = ("float32 and float64 are sparse-coded; bool, int8 .. int64, uint8 .. uint64, float16, bfloat16 "
            "(torch), complex64 and complex128 travel as they are")


def check_mapping(x: Any, caller: str, what: str = "tensors") -> None:
    """TypeError unless `x` is a mapping (names to tensors or masks)."""
    if not isinstance(x, Mapping):
        kind = "a mapping of names to tensors" if what == "tensors" else f"{what} as a mapping of names to masks"
        raise TypeError(f"{caller} takes {kind}, got {type(x).__name__}")


def check_name(name: Any) -> None:
    if not isinstance(name, str):
        raise TypeError(f"tensor names must be str, got {type(name).__name__} {name!r}")


def check_float(t: Any, what: str) -> None:
    """For encode_stream, which sends float32/float64 only: a torch tensor of another dtype refused
    by name and dtype (NumPy arrays are, by flat_float; torch's own error for a bfloat16 tensor
    named neither)."""
    if is_torch(t) and str(t.dtype) not in ("torch.float32", "torch.float64"):
        raise TypeError(f"{what} has dtype {str(t.dtype).removeprefix('torch.')}; float32 or float64 is required "
                        "(encode_stream sends those; encode_model carries other dtypes whole)")


def unsupported(what: str, dtype: str) -> TypeError:
    return TypeError(f"{what} has dtype {dtype}, which encode_model does not carry ({_CARRIED})")


class PlainIn(NamedTuple):
    """A tensor of another dtype on its way into a message: its shape, dtype code and words
    (flat, little-endian, as bytes)."""

    shape: tuple[int, ...]
    code: int
    words: np.ndarray  # uint8


def split(name: str, t: Any, what: str) -> tuple[Any, Optional[PlainIn]]:
    """(the float32/float64 tensor to sparse-code, None), or (None, its words) for another dtype
    that travels whole; TypeError naming `what` and the dtype for one that does not. A NumPy
    float32/float64 array in the other byte order is sparse-coded from a native copy."""
    if is_torch(t):
        dt = str(t.dtype).removeprefix("torch.")
        if dt in ("float32", "float64"):
            return t, None
        code = PLAIN_CODES.get(dt)
        if code is None:
            raise unsupported(what, dt)
        x = t.detach()
        x = (x.resolve_conj() if x.is_complex() else x).resolve_neg().cpu().contiguous()
        shape = tuple(int(s) for s in x.shape)
        words = x.reshape(-1).view(_torch().uint8).numpy()  # its bytes (torch is little-endian)
    else:
        a = as_array(t, what)
        if a.dtype in FLOAT_DTYPES:
            return t, None
        if a.dtype.kind == "f" and a.dtype.newbyteorder("=") in FLOAT_DTYPES:
            return a.astype(a.dtype.newbyteorder("=")), None
        code = PLAIN_CODES.get(a.dtype.name) if a.dtype.kind in "biufc" else None
        if code is None or code == PLAIN_CODES["bfloat16"]:  # bfloat16: from torch only
            raise unsupported(what, str(a.dtype))
        shape = a.shape
        flat = contiguous(a).reshape(-1)
        words = (flat if a.dtype.kind == "b" else flat.astype(PLAIN_DTYPES[code][1], copy=False)).view(np.uint8)
    if len(shape) > MAX_NDIM:
        raise ValueError(f"{what} has {len(shape)} dimensions, at most {MAX_NDIM}")
    if code == PLAIN_CODES["bool"]:
        words = (words != 0).view(np.uint8)  # bytes 0 and 1
    return None, PlainIn(shape, code, np.ascontiguousarray(words))


def check_whole(mask: Any, n: int, what: str, name: str, dtype: str) -> None:
    """A mask (or reference mask) given for a tensor that travels whole: accepted when it keeps
    every element (what is sent anyway), refused otherwise."""
    from .._arrays import flat_mask

    if not flat_mask(mask, n, what).all():
        raise ValueError(f"{what} leaves out elements of {name!r}, a {dtype} tensor: masks and references apply to "
                         "float32/float64 tensors (other dtypes travel whole; an all-true mask is accepted)")


class PlainRecord(NamedTuple):
    """A record of another dtype, checked, not yet copied out."""

    name: str
    shape: tuple[int, ...]
    n: int
    code: int
    raw: memoryview  # n little-endian words


def dtype_of(code: int) -> str:
    return PLAIN_DTYPES[code][0]


def words_of(code: int) -> np.dtype:
    return PLAIN_DTYPES[code][1]


def out_dtype(code: int) -> np.dtype:
    """The NumPy dtype a record decodes to (bfloat16: its 16-bit words, shown to torch as bfloat16)."""
    return np.dtype(np.bool_) if dtype_of(code) == "bool" else words_of(code).newbyteorder("=")


def check_record(name: str, code: int, n: int, fields: tuple[int, ...], d: int, nnz: int, scale: float,
                 val_len: int) -> None:
    """A record of another dtype's fields (`fields` as _FIXED orders them), before its payload is read."""
    if fields != _FIXED or d != n or nnz != n or scale != 0 or math.copysign(1.0, scale) < 0:
        raise CodecError(f"{name!r}: a {dtype_of(code)} record carries every element as raw words (domain 0, "
                         "positions 'all', values 'raw', no zero signs; domain size and count the element count; "
                         "Golomb parameter, scale, reserved fields and positions length 0)")
    want = n * words_of(code).itemsize
    if val_len != want:
        raise CodecError(f"{name!r}: {val_len} bytes of values for {n} {dtype_of(code)} elements, {want} expected")


def check_payload(rec: PlainRecord) -> None:
    """A bool record's bytes are 0 or 1 (anything else is no bool NumPy or torch would make)."""
    if dtype_of(rec.code) == "bool" and rec.n and int(np.frombuffer(rec.raw, dtype=np.uint8).max()) > 1:
        raise CodecError(f"{rec.name!r}: bool bytes other than 0 and 1")


def out_view(x: Any, code: int, what: str, n: int) -> np.ndarray:
    """A flat NumPy view of the caller's `out` tensor to copy a record of `code` into (bfloat16:
    a torch.bfloat16 tensor's 16-bit words)."""
    if dtype_of(code) != "bfloat16":
        return writable_view(x, what, out_dtype(code), n).reshape(-1)
    if not is_torch(x) or str(x.dtype) != "torch.bfloat16":
        raise TypeError(f"{what} has dtype {str(x.dtype).removeprefix('torch.')}, expected bfloat16 (a torch tensor)")
    torch = _torch()
    return writable_view(x.view(torch.int16), what, np.dtype(np.int16), n).reshape(-1).view(np.uint16)


def copy_out(rec: PlainRecord, dest: np.ndarray) -> None:
    """The record's words into `dest` (flat, out_dtype: byte order turned to the host's)."""
    dest.view(words_of(rec.code).newbyteorder("="))[...] = np.frombuffer(rec.raw, dtype=words_of(rec.code))


def decoded_whole(plain: PlainIn) -> np.ndarray:
    """What decode_model gives back for a tensor of another dtype: its words, as copy_out writes them."""
    dest = np.empty(math.prod(plain.shape), out_dtype(plain.code))
    dest.view(words_of(plain.code).newbyteorder("="))[...] = np.frombuffer(plain.words, dtype=words_of(plain.code))
    return dest.reshape(plain.shape)


def to_torch(a: np.ndarray, code: Optional[int]) -> Any:
    """A decoded array as a torch tensor sharing its memory (code: a record of another dtype's)."""
    torch = _torch()
    if code is not None and dtype_of(code) == "bfloat16":
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


def _torch() -> Any:
    try:
        import torch
    except ImportError:
        raise ImportError("torch tensors out (as_torch=True) need torch installed") from None
    return torch
