"""Values codecs (docs/wire-format.md): raw (lossless), fp16, bf16 (rounded to nearest even) and
int8 with a per-tensor scale. Codecs go by name ("raw", "fp16", "bf16", "int8"); their ids
(format.VALUES) are for the records' bytes only, turned into names where a record is read."""

from __future__ import annotations

import math
import sys
from typing import Any, Sequence, Union

import numpy as np

from .._arrays import contiguous
from .format import VALUES, CodecError

_LITTLE = sys.byteorder == "little"


def _bf16_encode(v: np.ndarray) -> np.ndarray:
    u = np.ascontiguousarray(v, dtype=np.float32).view(np.uint32)
    rounded = ((u.astype(np.uint64) + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    nan = np.isnan(v)
    if nan.any():  # keep NaN a NaN (rounding could carry it into inf)
        rounded[nan] = ((u[nan] >> 16) | 0x40).astype(np.uint16)
    return rounded


def encode_values(v: np.ndarray, codec: str) -> tuple[Union[bytes, memoryview], float]:
    """(the payload's bytes, int8 scale or 0). Raw values come back as a view of the array: the
    message's one join copies them, no second copy first."""
    if codec == "raw":
        if not (_LITTLE and v.dtype.isnative):  # the wire is little-endian
            v = v.astype(v.dtype.newbyteorder("<"))
        # numpy's stubs give ndarray the buffer protocol (__buffer__) only for Python >= 3.12
        return memoryview(np.ascontiguousarray(v)).cast("B"), 0.0  # type: ignore[arg-type]
    if codec == "fp16":
        return v.astype("<f2").tobytes(), 0.0
    if codec == "bf16":
        return _bf16_encode(v.astype(np.float32)).astype("<u2").tobytes(), 0.0
    if codec == "int8":
        if v.size and not np.isfinite(v).all():
            raise ValueError("int8 values need finite inputs; use raw, fp16 or bf16")
        peak = float(np.max(np.abs(v))) if v.size else 0.0
        scale = np.float32(peak / 127.0) if peak > 0 else np.float32(1.0)
        q = np.clip(np.rint(v / scale), -127, 127).astype(np.int8)
        return q.tobytes(), float(scale)
    raise ValueError(f"unknown values codec {codec!r}; one of {sorted(VALUES)}")


def encode_value_pieces(pieces: Sequence[np.ndarray], codec: str) -> tuple[list[Any], float]:
    """encode_values of values in pieces (back to back): (the payload's pieces, int8 scale or 0).
    A piece at a time, nothing joined, except for int8, whose one scale is over all of them."""
    if len(pieces) == 1 or codec == "int8":
        payload, scale = encode_values(pieces[0] if len(pieces) == 1 else np.concatenate(pieces), codec)
        return [payload], scale
    return [encode_values(v, codec)[0] for v in pieces], 0.0


_SIZES = {"fp16": 2, "bf16": 2, "int8": 1}  # bytes a value; raw: the dtype's


def value_size(codec: str, dtype: np.dtype) -> int:
    return dtype.itemsize if codec == "raw" else _SIZES[codec]


def decode_values(raw: memoryview, codec: str, nnz: int, dtype: np.dtype, scale: float) -> np.ndarray:
    if codec == "raw":  # raw: no arithmetic, so nothing to warn of (and no errstate to enter per tensor)
        return _decode_values_as_sent(raw, codec, nnz, dtype, scale)
    # Whatever the bytes say is decoded as such: signalling NaNs and int8 products beyond the
    # float range become NaN / inf without floating-point warnings.
    with np.errstate(invalid="ignore", over="ignore"):
        return _decode_values_as_sent(raw, codec, nnz, dtype, scale)


def _decode_values_as_sent(raw: memoryview, codec: str, nnz: int, dtype: np.dtype, scale: float) -> np.ndarray:
    if codec == "raw":  # a view of the message when aligned (values sit at any byte offset)
        return contiguous(np.frombuffer(raw, dtype=dtype, count=nnz).astype(dtype.newbyteorder("="), copy=False))
    if codec == "fp16":
        return np.frombuffer(raw, dtype="<f2", count=nnz).astype(dtype)
    if codec == "bf16":
        u = np.frombuffer(raw, dtype="<u2", count=nnz).astype(np.uint32) << 16
        return u.view(np.float32).astype(dtype, copy=False)
    # int8
    if not math.isfinite(scale) or scale <= 0:
        raise CodecError(f"int8 scale {scale} is not a positive finite number")
    return (np.frombuffer(raw, dtype=np.int8, count=nnz).astype(np.float32) * np.float32(scale)).astype(
        dtype, copy=False
    )
