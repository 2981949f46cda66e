"""Codecs for sparse models: positions (bitmask, CSR, Golomb-coded gaps, or none when a shared mask
says where the values go), values (lossless, or opt-in fp16/bf16/int8), and the versioned wire
format of docs/wire-format.md. Decoding validates every length against the message and a
caller-set output limit before allocating, and raises CodecError on any inconsistency."""

from __future__ import annotations

import math
import struct
from typing import TYPE_CHECKING, Any, Mapping, NamedTuple, Optional

import numpy as np

from . import _backend
from ._arrays import as_array, block_views, check_disjoint, contiguous, flat_mask, on_device, writable_view

if TYPE_CHECKING:
    from ._contract import Kernels

MAGIC = b"FDKW"
VERSION = 1
DEFAULT_MAX_BYTES = 1 << 31  # decoded output limit unless the caller sets one

_HEADER = struct.Struct("<4sBBHI")  # magic, version, flags, reserved, n_tensors
_RECORD = struct.Struct("<BBBBBBQQIfQQ")  # after name and shape, see docs/wire-format.md
_CRC = struct.Struct("<I")

DTYPES = {1: np.dtype("<f4"), 2: np.dtype("<f8")}
DTYPE_CODES = {np.dtype(np.float32): 1, np.dtype(np.float64): 2}
_TORCH_FLOATS = {"torch.float32": np.dtype(np.float32), "torch.float64": np.dtype(np.float64)}

DOMAIN_FULL, DOMAIN_REFERENCE = 0, 1
POSITIONS = {"all": 0, "bitmask": 1, "csr": 2, "golomb": 3}
POSITION_NAMES = {v: k for k, v in POSITIONS.items()}
VALUES = {"raw": 0, "fp16": 1, "bf16": 2, "int8": 3}
VALUE_NAMES = {v: k for k, v in VALUES.items()}
MAX_NDIM = 32
# NumPy's bound on an array's size in bytes, zero-length dimensions counted as 1 (it refuses shapes
# such as (0, 2**62) although they hold no element).
_MAX_ARRAY_BYTES = np.iinfo(np.intp).max


class CodecError(ValueError):
    """The bytes are not a valid message: corrupt, truncated, over a limit, or inconsistent."""


def crc32c(data: Any, crc: int = 0, *, backend: str = "auto") -> int:
    """CRC-32C (Castagnoli) of a bytes-like object's bytes in logical (C) order, continuing from
    `crc`; a strided view (reversed, stepped) is copied first."""
    view = memoryview(data)
    return _backend.kernels(backend).crc32c(view if view.c_contiguous else view.tobytes(), crc)


# ----------------------------------------------------------------------------- values


def _bf16_encode(v: np.ndarray) -> np.ndarray:
    u = np.ascontiguousarray(v, dtype=np.float32).view(np.uint32)
    rounded = ((u.astype(np.uint64) + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    nan = np.isnan(v)
    if nan.any():  # keep NaN a NaN (rounding could carry it into inf)
        rounded[nan] = ((u[nan] >> 16) | 0x40).astype(np.uint16)
    return rounded


def _encode_values(v: np.ndarray, codec: str) -> tuple[bytes, float]:
    if codec == "raw":
        return v.astype(v.dtype.newbyteorder("<"), copy=False).tobytes(), 0.0
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


def _value_size(codec: int, dtype: np.dtype) -> int:
    return {0: dtype.itemsize, 1: 2, 2: 2, 3: 1}[codec]


def _decode_values(raw: memoryview, codec: int, nnz: int, dtype: np.dtype, scale: float) -> np.ndarray:
    # Whatever the bytes say is decoded as such: signalling NaNs and int8 products beyond the
    # float range become NaN / inf without floating-point warnings.
    with np.errstate(invalid="ignore", over="ignore"):
        return _decode_values_as_sent(raw, codec, nnz, dtype, scale)


def _decode_values_as_sent(raw: memoryview, codec: int, nnz: int, dtype: np.dtype, scale: float) -> np.ndarray:
    if codec == 0:  # a view of the message when aligned (values sit at any byte offset)
        return contiguous(np.frombuffer(raw, dtype=dtype, count=nnz).astype(dtype.newbyteorder("="), copy=False))
    if codec == 1:
        return np.frombuffer(raw, dtype="<f2", count=nnz).astype(dtype)
    if codec == 2:
        u = np.frombuffer(raw, dtype="<u2", count=nnz).astype(np.uint32) << 16
        return u.view(np.float32).astype(dtype, copy=False)
    if not math.isfinite(scale) or scale <= 0:
        raise CodecError(f"int8 scale {scale} is not a positive finite number")
    return (np.frombuffer(raw, dtype=np.int8, count=nnz).astype(np.float32) * np.float32(scale)).astype(dtype, copy=False)


# -------------------------------------------------------------------------- positions


def _csr_layout(shape: tuple[int, ...], n: int) -> tuple[int, int, int]:
    rows = shape[0] if len(shape) >= 1 and n else 1
    cols = n // rows if rows else 0
    width = 1 if cols <= 1 << 8 else 2 if cols <= 1 << 16 else 4
    return rows, cols, width


def _csr_encode(bits: np.ndarray, n: int, shape: tuple[int, ...]) -> bytes:
    rows, cols, width = _csr_layout(shape, n)
    flat = np.flatnonzero(np.unpackbits(bits, count=n, bitorder="little"))
    r, c = np.divmod(flat, max(cols, 1))
    indptr = np.zeros(rows + 1, dtype="<u4")
    np.cumsum(np.bincount(r, minlength=rows), out=indptr[1:])
    return indptr.tobytes() + c.astype({1: "<u1", 2: "<u2", 4: "<u4"}[width]).tobytes()


def _csr_size(shape: tuple[int, ...], n: int, nnz: int) -> int:
    rows, cols, width = _csr_layout(shape, n)
    return 4 * (rows + 1) + width * nnz


def _csr_decode(raw: memoryview, n: int, nnz: int, shape: tuple[int, ...]) -> np.ndarray:
    rows, cols, width = _csr_layout(shape, n)
    if len(raw) != _csr_size(shape, n, nnz):
        raise CodecError("CSR positions have the wrong length")
    indptr = np.frombuffer(raw, dtype="<u4", count=rows + 1).astype(np.int64)
    col = np.frombuffer(raw, dtype={1: "<u1", 2: "<u2", 4: "<u4"}[width], offset=4 * (rows + 1), count=nnz).astype(np.int64)
    if indptr[0] != 0 or indptr[-1] != nnz or (np.diff(indptr) < 0).any():
        raise CodecError("CSR row pointers are not a valid partition of the values")
    if nnz and (col >= cols).any():
        raise CodecError("CSR column index out of range")
    row = np.repeat(np.arange(rows, dtype=np.int64), np.diff(indptr))
    flat = row * cols + col
    if nnz > 1 and (np.diff(flat) <= 0).any():
        raise CodecError("CSR column indices are not strictly increasing within rows")
    mask = np.zeros(n, dtype=bool)
    mask[flat] = True
    return np.packbits(mask, bitorder="little")


def _encode_positions(
    bits: np.ndarray, d: int, nnz: int, codec: str, shape: Optional[tuple[int, ...]], golomb: Optional[tuple[int, bytes]]
) -> tuple[int, int, bytes]:
    """(codec id, Golomb parameter, payload) for packed positions over a domain of d elements;
    `golomb` is the (parameter, stream) already encoded when codec is "auto" or "golomb". "auto"
    takes the smallest payload (the others are sized by formula and built only when chosen)."""
    sizes = {"bitmask": (d + 7) // 8}
    if shape is not None and d < 1 << 32 and nnz < 1 << 32:
        sizes["csr"] = _csr_size(shape, d, nnz)
    if nnz == d:
        sizes["all"] = 0
    if golomb is not None:
        sizes["golomb"] = len(golomb[1])
    if codec == "auto":
        codec = min(sizes, key=lambda k: (sizes[k], k != "all"))
    if codec not in sizes:
        raise ValueError(f"positions codec {codec!r} is not available here (choose from {sorted(sizes)})")
    if codec == "all":
        return POSITIONS["all"], 0, b""
    if codec == "bitmask":
        return POSITIONS["bitmask"], 0, bits.tobytes()
    if codec == "csr":
        return POSITIONS["csr"], 0, _csr_encode(bits, d, shape)
    assert golomb is not None
    return POSITIONS["golomb"], golomb[0], golomb[1]


def _decode_positions(k: "Kernels", raw: memoryview, codec: int, d: int, nnz: int, shape: tuple[int, ...]) -> np.ndarray:
    if codec == POSITIONS["all"]:
        if nnz != d or len(raw):
            raise CodecError("'all' positions need nnz equal to the domain size and no payload")
        bits = np.full((d + 7) // 8, 0xFF, dtype=np.uint8)
        if d % 8:
            bits[-1] = (1 << (d % 8)) - 1
        return bits
    if codec == POSITIONS["bitmask"]:
        if len(raw) != (d + 7) // 8:
            raise CodecError(f"bitmask positions have {len(raw)} bytes, {(d + 7) // 8} expected")
        bits = np.frombuffer(raw, dtype=np.uint8).copy()  # a copy: nothing returned aliases the message
        if d % 8 and bits[-1] >> (d % 8):
            raise CodecError("bitmask padding bits are not zero")
        if k.count_bits(bits, d) != nnz:
            raise CodecError("bitmask holds a different number of positions than the record says")
        return bits
    if codec == POSITIONS["csr"]:
        return _csr_decode(raw, d, nnz, shape)
    raise CodecError(f"unknown positions codec {codec}")  # Golomb streams: _decode_golomb_positions


def _check_golomb(raw: memoryview, nnz: int, m: int) -> None:
    if m < 1:
        raise CodecError("Golomb parameter must be >= 1")
    if 8 * len(raw) < nnz:
        raise CodecError("Golomb payload is shorter than one bit per position")


# ------------------------------------------------------------------------------ model


class Decoded:
    """A decoded model: `tensors`, dense arrays (zeros off the positions), and `masks`, the
    positions as bool arrays (unpacked on first access)."""

    def __init__(self) -> None:
        self.tensors: dict[str, np.ndarray] = {}
        self.packed: dict[str, np.ndarray] = {}  # positions, packed little-endian bits
        self._masks: Optional[dict[str, np.ndarray]] = None

    @property
    def masks(self) -> dict[str, np.ndarray]:
        if self._masks is None:
            from .pruning import unpack_mask

            self._masks = {k: unpack_mask(b, self.tensors[k].shape) for k, b in self.packed.items()}
        return self._masks


class _Sparse(NamedTuple):
    """One tensor on its way into a message: its positions (over the domain) and values."""

    name: bytes
    shape: tuple[int, ...]
    dtype: np.dtype
    domain: int
    d: int
    nnz: int
    pos_bits: np.ndarray
    csr_shape: Optional[tuple[int, ...]]
    vals: np.ndarray


def encode_model(
    tensors: Mapping[str, Any],
    *,
    masks: Optional[Mapping[str, Any]] = None,
    reference: Optional[Mapping[str, Any]] = None,
    positions: str = "auto",
    values: str = "raw",
    backend: str = "auto",
) -> bytes:
    """Encode named float32/float64 tensors as one message.

    Positions kept per tensor: `masks[name]` if given (values there are sent even when zero), else
    the non-zeros (+0.0 and -0.0 both count as zero). With `reference[name]`, a mask the receiver
    already has: kept positions equal to it cost nothing (values go in mask order), positions that
    are a subset of it are coded relative to it (mask delta); otherwise the full tensor is the
    domain. `positions` is "auto" (smallest per tensor), "bitmask", "csr", "golomb" or "all";
    `values` is "raw" (lossless) or the lossy "fp16", "bf16", "int8" (per-tensor scale).
    Tensors on a CUDA device are sparsified there: only their packed positions and kept values
    are copied to the host.
    """
    if values not in VALUES:
        raise ValueError(f"unknown values codec {values!r}; one of {sorted(VALUES)}")
    if positions not in ("auto", *POSITIONS):
        raise ValueError(f"unknown positions codec {positions!r}")
    k = _backend.kernels(backend)
    prepared: list[_Sparse] = []
    for name, t in tensors.items():
        if on_device(t):  # positions and values are found where the tensor is; only they cross
            from . import _torch_kernels

            dtype = _TORCH_FLOATS.get(str(t.dtype))
            if dtype is None:
                raise TypeError(f"tensors[{name!r}] has dtype {t.dtype}; float32 or float64 is required")
            if t.ndim > MAX_NDIM:
                raise ValueError(f"tensors[{name!r}] has {t.ndim} dimensions, at most {MAX_NDIM}")
            shape, n = tuple(int(s) for s in t.shape), t.numel()
            bits, vals = _torch_kernels.sparsify(t, masks[name] if masks and name in masks else None)
        else:
            a = as_array(t, f"tensors[{name!r}]")
            if a.dtype not in DTYPE_CODES:
                raise TypeError(f"tensors[{name!r}] has dtype {a.dtype}; float32 or float64 is required")
            if a.ndim > MAX_NDIM:
                raise ValueError(f"tensors[{name!r}] has {a.ndim} dimensions, at most {MAX_NDIM}")
            shape, dtype = tuple(int(s) for s in a.shape), a.dtype
            a = contiguous(a).reshape(-1)
            n = a.size
            mask = flat_mask(masks[name], n, f"masks[{name!r}]") if masks and name in masks else None
            bits, vals = k.sparsify(a, mask)
        nnz = vals.size
        domain, d, pos_bits, csr_shape = DOMAIN_FULL, n, bits, shape
        if reference is not None and name in reference:
            ref = flat_mask(reference[name], n, f"reference[{name!r}]")
            keep = np.unpackbits(bits, count=n, bitorder="little").view(bool)
            if not (keep & ~ref).any():  # a subset of the reference: code relative to it
                domain, d, csr_shape = DOMAIN_REFERENCE, int(ref.sum()), None
                pos_bits = k.pack_bits(np.ascontiguousarray(keep[ref]))
        name_b = name.encode("utf-8")
        if len(name_b) > 0xFFFF:
            raise ValueError(f"tensor name longer than 65535 bytes: {name[:40]!r}...")
        prepared.append(_Sparse(name_b, shape, dtype, domain, d, nnz, pos_bits, csr_shape, vals))
    # The Golomb streams of all tensors in one call (the native backend encodes them in parallel).
    golomb: list[Optional[tuple[int, bytes]]] = [None] * len(prepared)
    if positions in ("auto", "golomb"):
        ms = [k.golomb_parameter(sp.nnz, sp.d) for sp in prepared]
        streams = k.golomb_encode_many([(sp.pos_bits, sp.d, m) for sp, m in zip(prepared, ms)])
        golomb = list(zip(ms, streams))
    parts = [_HEADER.pack(MAGIC, VERSION, 0, 0, len(tensors))]
    for sp, g in zip(prepared, golomb):
        pos_codec, m, pos_payload = _encode_positions(sp.pos_bits, sp.d, sp.nnz, positions, sp.csr_shape, g)
        val_payload, scale = _encode_values(sp.vals, values)
        parts += [
            struct.pack("<H", len(sp.name)),
            sp.name,
            struct.pack(f"<B{len(sp.shape)}Q", len(sp.shape), *sp.shape),
            _RECORD.pack(DTYPE_CODES[sp.dtype], sp.domain, pos_codec, VALUES[values], 0, 0, sp.d, sp.nnz, m, scale,
                         len(pos_payload), len(val_payload)),
            pos_payload,
            val_payload,
        ]
    body = b"".join(parts)
    return body + _CRC.pack(k.crc32c(body))


class _Reader:
    def __init__(self, view: memoryview) -> None:
        self.view, self.pos = view, 0

    def take(self, n: int, what: str) -> memoryview:
        if n < 0 or n > len(self.view) - self.pos:
            raise CodecError(f"truncated message: {what} needs {n} bytes, {len(self.view) - self.pos} left")
        out = self.view[self.pos : self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: struct.Struct | str, what: str) -> tuple:
        s = fmt if isinstance(fmt, struct.Struct) else struct.Struct(fmt)
        return s.unpack(self.take(s.size, what))


def decode_model(
    data: Any,
    *,
    reference: Optional[Mapping[str, Any]] = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
    out: Optional[Mapping[str, Any]] = None,
    expect: Optional[Mapping[str, tuple[tuple[int, ...], Any]]] = None,
    backend: str = "auto",
) -> Decoded:
    """Decode a message from encode_model. `reference` supplies the shared masks of tensors coded
    relative to one. `max_bytes` caps the total size of the decoded arrays: a message that would
    exceed it is rejected before anything is allocated. `expect` maps names to (shape, dtype): the
    message must hold exactly those tensors, which is checked before anything is allocated (a peer
    replying for another model is refused at no cost). `out` maps names to existing arrays (or
    torch CPU tensors) of the right dtype and size to decode into, skipping the allocation; they
    are returned in `tensors` and must not overlap each other or the message. Nothing else returned
    shares memory with `data`, which the caller may reuse. Raises CodecError on any corruption
    (`out` may then be partly written)."""
    k = _backend.kernels(backend)
    view = memoryview(data).cast("B")
    if len(view) < _HEADER.size + _CRC.size:
        raise CodecError(f"message of {len(view)} bytes is shorter than header and checksum")
    body = view[: len(view) - _CRC.size]
    (stored,) = _CRC.unpack(view[len(view) - _CRC.size :])
    if k.crc32c(body) != stored:
        raise CodecError("checksum mismatch: the message is corrupt")
    r = _Reader(body)
    magic, version, flags, reserved, count = r.unpack(_HEADER, "header")
    if magic != MAGIC:
        raise CodecError(f"bad magic {bytes(magic)!r}, expected {MAGIC!r}")
    if version != VERSION:
        raise CodecError(f"unsupported format version {version} (this library reads {VERSION})")
    if flags != 0:
        raise CodecError(f"unknown header flags {flags:#x}")
    if reserved != 0:
        raise CodecError(f"reserved header field is {reserved:#x}, must be 0")
    records: list[_Record] = []
    seen: set[str] = set()
    budget = max_bytes
    for i in range(count):
        (name_len,) = r.unpack("<H", f"tensor {i} name length")
        try:
            name = bytes(r.take(name_len, f"tensor {i} name")).decode("utf-8")
        except UnicodeDecodeError:
            raise CodecError(f"tensor {i} name is not UTF-8") from None
        if name in seen:
            raise CodecError(f"tensor {name!r} appears twice")
        seen.add(name)
        (ndim,) = r.unpack("<B", f"{name!r} ndim")
        if ndim > MAX_NDIM:
            raise CodecError(f"{name!r} has {ndim} dimensions, at most {MAX_NDIM}")
        shape = r.unpack(f"<{ndim}Q", f"{name!r} shape")
        (dtype_code, domain, pos_codec, val_codec, r0, r1, d, nnz, m, scale, pos_len, val_len) = r.unpack(_RECORD, f"{name!r} record")
        if dtype_code not in DTYPES:
            raise CodecError(f"{name!r}: unknown dtype code {dtype_code}")
        if val_codec not in VALUE_NAMES or pos_codec not in POSITION_NAMES or domain not in (0, 1) or r0 or r1:
            raise CodecError(f"{name!r}: unknown codec, domain or reserved field")
        if pos_codec == POSITIONS["csr"] and domain != DOMAIN_FULL:
            raise CodecError(f"{name!r}: CSR positions are defined for the tensor's own index space only")
        dtype = DTYPES[dtype_code]
        if math.prod(max(s, 1) for s in shape) * dtype.itemsize > _MAX_ARRAY_BYTES:
            raise CodecError(f"{name!r}: shape {tuple(shape)} is too large for an array")
        n = math.prod(shape)
        if n * dtype.itemsize > budget:
            raise CodecError(f"{name!r}: decoded size exceeds the limit of {max_bytes} bytes (decode_model's max_bytes)")
        budget -= n * dtype.itemsize
        if domain == DOMAIN_FULL and d != n:
            raise CodecError(f"{name!r}: domain size {d} differs from the element count {n}")
        if domain == DOMAIN_REFERENCE and d > n:
            raise CodecError(f"{name!r}: reference domain larger than the tensor")
        if nnz > d:
            raise CodecError(f"{name!r}: {nnz} values for a domain of {d}")
        if val_len != nnz * _value_size(val_codec, dtype):
            raise CodecError(f"{name!r}: values take {val_len} bytes, {nnz} values need {nnz * _value_size(val_codec, dtype)}")
        pos_raw = r.take(pos_len, f"{name!r} positions")
        val_raw = r.take(val_len, f"{name!r} values")
        records.append(_Record(name, tuple(shape), n, dtype, domain, pos_codec, val_codec, d, nnz, m, scale, pos_raw, val_raw))
    if expect is not None:
        _check_expected(records, expect)
    if r.pos != len(body):
        raise CodecError(f"{len(body) - r.pos} unexpected bytes after the last tensor")
    dests = {
        rec.name: writable_view(out[rec.name], f"out[{rec.name!r}]", rec.dtype.newbyteorder("="), rec.n).reshape(-1)
        for rec in records
        if out is not None and rec.name in out
    }
    check_disjoint({"the message": np.frombuffer(view, dtype=np.uint8), **{f"out[{k!r}]": a for k, a in dests.items()}})
    targets = _allocate(records, out)
    golomb = _decode_golomb_positions(k, records)
    result = Decoded()
    for i, (rec, target) in enumerate(zip(records, targets)):
        name, n = rec.name, rec.n
        bits = golomb[i] if i in golomb else _decode_positions(k, rec.pos_raw, rec.pos_codec, rec.d, rec.nnz, rec.shape)
        vals = _decode_values(rec.val_raw, rec.val_codec, rec.nnz, rec.dtype, rec.scale)
        if rec.domain == DOMAIN_REFERENCE:
            if reference is None or name not in reference:
                raise CodecError(f"{name!r} is coded relative to a shared mask; pass it as reference[{name!r}]")
            try:
                ref = flat_mask(reference[name], n, f"reference[{name!r}]")
            except ValueError as e:  # the message's shape and the caller's mask disagree
                raise CodecError(f"{name!r}: {e}") from None
            if int(ref.sum()) != rec.d:
                raise CodecError(f"{name!r}: the reference mask has {int(ref.sum())} positions, the sender's had {rec.d}")
            full = np.zeros(n, dtype=bool)
            full[ref] = np.unpackbits(bits, count=rec.d, bitorder="little").view(bool)
            bits = k.pack_bits(full)
        if name in dests:
            k.densify(bits, n, vals, dests[name])
            result.tensors[name] = out[name]
        else:
            k.densify(bits, n, vals, target)
            result.tensors[name] = target.reshape(rec.shape)
        result.packed[name] = bits
    return result


def _check_expected(records: list["_Record"], expect: Mapping[str, tuple[tuple[int, ...], Any]]) -> None:
    names = [rec.name for rec in records]
    if set(names) != set(expect):
        missing, extra = sorted(set(expect) - set(names)), sorted(set(names) - set(expect))
        raise CodecError(f"the message holds other tensors than expected (missing {missing}, unexpected {extra})")
    for rec in records:
        shape, dtype = expect[rec.name]
        if rec.shape != tuple(shape) or rec.dtype.newbyteorder("=") != np.dtype(dtype):
            raise CodecError(f"{rec.name!r} is {rec.shape} {rec.dtype}, expected {tuple(shape)} {np.dtype(dtype)}")


def _decode_golomb_positions(k: "Kernels", records: list[_Record]) -> dict[int, np.ndarray]:
    """The Golomb-coded positions of all records at once (the native backend decodes several
    tensors' streams in parallel, each stream being sequential), by record index."""
    index = [i for i, rec in enumerate(records) if rec.pos_codec == POSITIONS["golomb"]]
    index.sort(key=lambda i: -records[i].d)  # largest first: better balance between threads
    for i in index:
        rec = records[i]
        try:
            _check_golomb(rec.pos_raw, rec.nnz, rec.m)
        except CodecError as e:
            raise CodecError(f"{rec.name!r}: {e}") from None
    bits, failed, message = k.golomb_decode_many([(records[i].pos_raw, records[i].d, records[i].nnz, records[i].m) for i in index])
    if failed >= 0:
        raise CodecError(f"{records[index[failed]].name!r}: {message}")
    return dict(zip(index, bits))


class _Record(NamedTuple):
    """One tensor's record of a message, validated, its payloads not yet decoded."""

    name: str
    shape: tuple[int, ...]
    n: int
    dtype: np.dtype
    domain: int
    pos_codec: int
    val_codec: int
    d: int
    nnz: int
    m: int
    scale: float
    pos_raw: memoryview
    val_raw: memoryview


def _allocate(records: list[_Record], out: Optional[Mapping[str, Any]]) -> list[Optional[np.ndarray]]:
    """Flat output arrays for the records not decoded into `out`, views into one block; its size is
    within the caller's max_bytes (each record's size was checked against it)."""
    return block_views(
        [None if out is not None and rec.name in out else ((rec.n,), rec.dtype.newbyteorder("=")) for rec in records]
    )


class SparseCodec:
    """numcodecs-style codec for one float array: encode(buffer) -> bytes, decode(bytes, out=None)
    -> array, get_config()/from_config(). Registered with numcodecs when it is installed.

    Lossless settings give back the same bytes (-0.0 included). A float32/float64 array (or torch
    tensor) is encoded with its shape (C order) or, when only
    Fortran-contiguous, as its elements in memory order (decode then returns them flat, as
    numcodecs' filters do). A buffer without a float dtype (bytes, bytearray, array.array, ...)
    is read as `dtype`, which must then be set. `out` may be any writable buffer of the decoded
    size: an array of the decoded shape gets the elements by index, anything else the bytes in
    order.
    """

    codec_id = "feddip_sparse"

    def __init__(self, positions: str = "auto", values: str = "raw", max_bytes: int = DEFAULT_MAX_BYTES,
                 dtype: Optional[str] = None) -> None:
        if positions not in ("auto", *POSITIONS) or values not in VALUES:
            raise ValueError(f"bad codec configuration positions={positions!r} values={values!r}")
        if dtype is not None and np.dtype(dtype) not in DTYPE_CODES:
            raise ValueError(f"dtype must be float32 or float64, got {dtype!r}")
        self.positions, self.values, self.max_bytes = positions, values, int(max_bytes)
        self.dtype = None if dtype is None else np.dtype(dtype).str

    def _array(self, buf: Any) -> np.ndarray:
        a = as_array(buf, "buffer")
        if a.dtype in DTYPE_CODES:
            return a if a.flags.c_contiguous or not a.flags.f_contiguous else a.ravel(order="A")
        if self.dtype is None:
            raise TypeError(f"buffer has dtype {a.dtype}; set SparseCodec(dtype=...) to read raw bytes as floats")
        return a.reshape(-1, order="A").view(np.uint8).view(self.dtype)

    def encode(self, buf: Any) -> bytes:
        # Positions are the elements whose bits are not all zero: -0.0 is kept, so a lossless
        # round trip gives back the same bytes (encode_model's default would send it as +0.0).
        a = self._array(buf)
        with np.errstate(invalid="ignore"):
            keep = (a != 0) | np.signbit(a)
        return encode_model({"": a}, masks={"": keep}, positions=self.positions, values=self.values)

    def decode(self, buf: Any, out: Any = None) -> Any:
        decoded = decode_model(buf, max_bytes=self.max_bytes)
        if set(decoded.tensors) != {""}:
            raise CodecError("message holds no single unnamed tensor")
        result = decoded.tensors[""]
        if out is None:
            return result
        dst = out if isinstance(out, np.ndarray) else np.asarray(memoryview(out))
        if not dst.flags.writeable:
            raise ValueError("out is read-only")
        if dst.shape == result.shape and dst.dtype == result.dtype:
            np.copyto(dst, result)
        else:
            flat = dst.reshape(-1, order="A")
            if not np.may_share_memory(flat, dst) or flat.nbytes != result.nbytes:
                raise ValueError(f"out holds {dst.nbytes} bytes, contiguous, for {result.nbytes} decoded bytes")
            flat.view(np.uint8)[:] = np.ascontiguousarray(result).reshape(-1).view(np.uint8)
        return out

    def get_config(self) -> dict:
        config = {"id": self.codec_id, "positions": self.positions, "values": self.values, "max_bytes": self.max_bytes}
        if self.dtype is not None:
            config["dtype"] = self.dtype
        return config

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "SparseCodec":
        cfg = dict(config)
        if cfg.pop("id", cls.codec_id) != cls.codec_id:
            raise ValueError(f"config is not for {cls.codec_id}")
        return cls(**cfg)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SparseCodec) and self.get_config() == other.get_config()

    def __repr__(self) -> str:
        args = [f"positions={self.positions!r}", f"values={self.values!r}"]
        if self.max_bytes != DEFAULT_MAX_BYTES:
            args.append(f"max_bytes={self.max_bytes}")
        if self.dtype is not None:
            args.append(f"dtype={self.dtype!r}")
        return f"SparseCodec({', '.join(args)})"


try:  # optional: make the codec discoverable by numcodecs.get_codec
    from numcodecs.registry import register_codec

    register_codec(SparseCodec)
except ImportError:
    pass
