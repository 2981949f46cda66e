"""What the records of every format version share on the way in: the name and shape at the head
of a record, the size check against the caller's limit, the check against the tensors the caller
expects, and the decoded result."""

from __future__ import annotations

import math
import struct
from typing import Any, Iterator, Mapping, Optional, cast

import numpy as np

from .._arrays import flat_mask
from .format import DTYPES, MAX_ARRAY_BYTES, MAX_NDIM, CodecError

_SHAPES = [struct.Struct(f"<{ndim}Q") for ndim in range(MAX_NDIM + 1)]  # a shape of ndim sizes


class Decoded(Mapping[str, Any]):
    """A decoded model: `tensors`, dense arrays (+0.0 off the positions, but for the -0.0 that
    the message lists), `packed`, the positions as packed little-endian bits, and `masks`, the
    positions as bool arrays (both made on first access; -0.0 are zeros, not positions; tensors of
    other dtypes than float32/float64 travel whole and have none).

    It is also a read-only mapping of the names to the tensors: `d["w"]`, `len(d)`, `iter(d)`,
    `"w" in d`, `d.keys()`, `d.items()`, `d.values()`, `d.get(...)`, `dict(d)` are those of
    `d.tensors`, in the message's order. Two Decoded are equal only when they are the same object
    (tensors have no single truth value to compare by)."""

    def __getitem__(self, name: str) -> Any:
        return self.tensors[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)

    def __eq__(self, other: object) -> bool:
        return self is other

    def __ne__(self, other: object) -> bool:
        return self is not other

    def __hash__(self) -> int:
        return id(self)

    def __repr__(self) -> str:
        return f"Decoded({', '.join(f'{k!r}: {_dtype_name(t.dtype)}{list(t.shape)}' for k, t in self.tensors.items())})"

    def __init__(self) -> None:
        self.tensors: dict[str, Any] = {}  # NumPy arrays, or torch tensors (decode_model's as_torch)
        self.packed_parts: dict[str, list[np.ndarray]] = {}  # positions of chunked records, by run
        self._packed: dict[str, np.ndarray] = {}
        self._masks: Optional[dict[str, np.ndarray]] = None

    @property
    def packed(self) -> dict[str, np.ndarray]:
        for name, parts in self.packed_parts.items():  # joined only when asked for
            self._packed[name] = np.concatenate(parts)
        self.packed_parts.clear()
        return self._packed

    @property
    def masks(self) -> dict[str, np.ndarray]:
        if self._masks is None:
            from ..pruning import unpack_mask

            self._masks = {k: unpack_mask(b, self.tensors[k].shape) for k, b in self.packed.items()}
        return self._masks


def write_head(name: str, shape: tuple[int, ...]) -> bytes:
    """The name and shape that open a record."""
    name_b = name.encode("utf-8")
    if len(name_b) > 0xFFFF:
        raise ValueError(f"tensor name longer than 65535 bytes: {name[:40]!r}...")
    return struct.pack(f"<H{len(name_b)}sB{len(shape)}Q", len(name_b), name_b, len(shape), *shape)


def read_head(r: Any, i: int, seen: set[str]) -> tuple[str, tuple[int, ...]]:
    """The name and shape that open record i (r: a reader with take and unpack); a name seen
    before is refused."""
    (name_len,) = r.unpack("<H", ("tensor {} name length", i))
    try:
        name = bytes(r.take(name_len, ("tensor {} name", i))).decode("utf-8")
    except UnicodeDecodeError:
        raise CodecError(f"tensor {i} name is not UTF-8") from None
    if name in seen:
        raise CodecError(f"tensor {name!r} appears twice")
    seen.add(name)
    (ndim,) = r.unpack("<B", ("{!r} ndim", name))
    if ndim > MAX_NDIM:
        raise CodecError(f"{name!r} has {ndim} dimensions, at most {MAX_NDIM}")
    return name, r.unpack(_SHAPES[ndim], ("{!r} shape", name))


def record_dtype(name: str, code: int) -> np.dtype:
    if code not in DTYPES:
        raise CodecError(f"{name!r}: unknown dtype code {code}")
    return cast(np.dtype, DTYPES[code])  # format.DTYPES holds only dtypes


class Budget:
    """The decoded bytes a message may still add up to under the caller's max_bytes."""

    def __init__(self, max_bytes: int, caller: str) -> None:
        self.max_bytes, self.left, self.caller = max_bytes, max_bytes, caller

    def take(self, name: str, shape: tuple[int, ...], dtype: np.dtype) -> int:
        """The record's element count, after checking that its array fits NumPy and what is left
        of the limit."""
        if math.prod(max(s, 1) for s in shape) * dtype.itemsize > MAX_ARRAY_BYTES:
            raise CodecError(f"{name!r}: shape {shape} is too large for an array")
        n = math.prod(shape)
        if n * dtype.itemsize > self.left:
            raise CodecError(f"{name!r}: the decoded tensors exceed max_bytes={self.max_bytes}; pass a larger "
                             f"max_bytes to {self.caller} to accept this message")
        self.left -= n * dtype.itemsize
        return n


def reference_mask(reference: Optional[Mapping[str, Any]], name: str, n: int) -> np.ndarray:
    """The caller's shared mask for a record coded relative to one, flat, of the record's size."""
    if reference is None or name not in reference:
        raise CodecError(f"{name!r} is coded relative to a shared mask; pass it as reference[{name!r}]")
    try:
        return flat_mask(reference[name], n, f"reference[{name!r}]")
    except ValueError as e:  # the message's shape and the caller's mask disagree
        raise CodecError(f"{name!r}: {e}") from None


def check_expected(name: str, shape: tuple[int, ...], dtype: Any,
                   expect: Optional[Mapping[str, tuple[tuple[int, ...], Any]]]) -> None:
    """One record against the caller's expected tensors (name, shape, dtype)."""
    if expect is None:
        return
    if name not in expect:
        raise CodecError(f"the message holds other tensors than expected (unexpected {name!r})")
    want_shape, want_dtype = expect[name]
    if isinstance(want_dtype, np.dtype) and dtype == want_dtype and shape == tuple(want_shape):
        return  # the common case, without spelling out the names (a message checks every tensor)
    have, want = _dtype_name(dtype), _dtype_name(want_dtype)
    if shape != tuple(want_shape) or have != want:
        raise CodecError(f"{name!r} is {shape} {have}, expected {tuple(want_shape)} {want}")


def _dtype_name(dtype: Any) -> str:
    """A dtype's name as NumPy and torch both spell it ("int64", "bfloat16"), from a NumPy dtype
    or anything np.dtype reads, a torch dtype, or a name: how records and `expect` compare dtypes
    (float32 in either byte order is float32)."""
    text = str(dtype)
    if text.startswith("torch."):
        return text.removeprefix("torch.")
    try:
        return np.dtype(dtype).name
    except TypeError:  # a name NumPy lacks ("bfloat16")
        return text


def check_all_expected(names: list[str], expect: Optional[Mapping[str, tuple[tuple[int, ...], Any]]]) -> None:
    if expect is not None and set(names) != set(expect):
        missing, extra = sorted(set(expect) - set(names)), sorted(set(names) - set(expect))
        raise CodecError(f"the message holds other tensors than expected (missing {missing}, unexpected {extra})")
