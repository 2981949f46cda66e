"""The wire format's structure (docs/wire-format.md): constants and codes, the header and record
structs, a bounds-checked reader, the checksum, and CodecError."""

from __future__ import annotations

import functools
import struct
from typing import Any, NamedTuple, Optional

import numpy as np

from .. import _backend
from .._arrays import What, described

MAGIC = b"FDKW"
VERSION = 2  # encode_model writes it when a record is chunked; version 1 (no chunk tables) otherwise
STREAM_VERSION = 3  # encode_stream's: records laid out to be written and read front to back
VERSIONS = (1, 2, 3)
DEFAULT_MAX_BYTES = 1 << 31  # decoded output limit unless the caller sets one

HEADER = struct.Struct("<4sBBHI")  # magic, version, flags, reserved, n_tensors
RECORD = struct.Struct("<BBBBBBQQIfQQ")  # after name and shape, see docs/wire-format.md
CRC = struct.Struct("<I")
CHUNK = struct.Struct("<QQIQ")  # version 2 chunk table entry: domain_len, nnz, golomb_m, pos_len
# Header flag of versions 1 and 2: records may carry the signs of their zeros (a record's `signs`
# byte, then a SIGNS block after its values). Set only when one does, so that messages without
# -0.0 keep the bytes that readers older than the flag accept; those refuse a flagged message.
FLAG_ZERO_SIGNS = 0x01
SIGNS = struct.Struct("<BQIQ")  # zero-sign block: positions codec, count, golomb_m, length; then the payload
STREAM_RECORD = struct.Struct("<BBHQ")  # version 3, after name and shape: dtype, values, reserved, chunk_elems
STREAM_CHUNK = struct.Struct("<BBBBQQIfQ")  # version 3: domain, positions, signs, reserved, domain_size, nnz, golomb_m,
#                                               scale, pos_len; then the chunk's positions and values, and with
#                                               signs = 1 a SIGNS block over the chunk's elements

# The elements of a chunk. encode_model sparsifies and Golomb-codes a tensor of more elements than
# this in runs of this many, independently and in parallel (a Golomb stream is sequential): each
# run is a chunk of its version 2 record when that record is chunked, and decode_model decodes the
# chunks in parallel. encode_stream cuts tensors into version 3 chunks of this many by default. A
# multiple of 8, so runs of packed bits start on byte boundaries. 4 Mi elements: 16 MiB of float32
# a run. ("Chunk" is the wire format's word; the encoder's pieces of a tensor are "runs".)
CHUNK_ELEMS = 1 << 22
MAX_STREAM_CHUNK = 1 << 24  # the most elements a version 3 chunk may cover (bounds a reader's buffers)

DTYPES = {1: np.dtype("<f4"), 2: np.dtype("<f8")}
DTYPE_CODES = {np.dtype(np.float32): 1, np.dtype(np.float64): 2}
# The other dtypes a version 1 or 2 record may have (docs/wire-format.md, "Other dtypes"): such a
# record carries every element as a little-endian word (positions "all", values "raw"). By code:
# the dtype's name (NumPy's and torch's alike) and its words (bfloat16, which NumPy lacks: its
# 16-bit patterns; bool: bytes 0 and 1). Not in DTYPES: version 3 streams do not define them.
PLAIN_DTYPES: dict[int, tuple[str, np.dtype]] = {
    code: (name, np.dtype(words))
    for code, name, words in [
        (3, "float16", "<f2"), (4, "bfloat16", "<u2"), (5, "bool", "|u1"), (6, "int8", "|i1"), (7, "uint8", "|u1"),
        (8, "int16", "<i2"), (9, "uint16", "<u2"), (10, "int32", "<i4"), (11, "uint32", "<u4"), (12, "int64", "<i8"),
        (13, "uint64", "<u8"), (14, "complex64", "<c8"), (15, "complex128", "<c16"),
    ]
}
PLAIN_CODES = {name: code for code, (name, _) in PLAIN_DTYPES.items()}

DOMAIN_FULL, DOMAIN_REFERENCE = 0, 1
POSITIONS = {"all": 0, "bitmask": 1, "csr": 2, "golomb": 3}
POSITION_NAMES = {v: k for k, v in POSITIONS.items()}
# Values codecs by id: fixed-width words, then entropy-coded blocks ("int-ans": the quantised
# codecs int2-ans .. int8-ans, whose width is the block's word_bits).
VALUES = {"raw": 0, "fp16": 1, "bf16": 2, "int8": 3, "ans": 4, "fp16-ans": 5, "bf16-ans": 6, "int-ans": 7}
VALUE_NAMES = {v: k for k, v in VALUES.items()}
MAX_NDIM = 32
# NumPy's bound on an array's size in bytes, zero-length dimensions counted as 1 (it refuses shapes
# such as (0, 2**62) although they hold no element).
MAX_ARRAY_BYTES = np.iinfo(np.intp).max


class CodecError(ValueError):
    """The bytes are not a valid message: corrupt, truncated, over a limit, or inconsistent."""


# Files that decoders are handed by mistake, by their first bytes: what they are and what reads them.
_FOREIGN = [
    (b"PK\x03\x04", "a zip archive, such as a torch.save file", "torch.load reads it"),
    (b"FDKS", "a file written by feddip_kernels.save", "feddip_kernels.load reads it"),
    (b"FDKC", "a simulation checkpoint (feddip_kernels.fl.checkpoint)", "load_checkpoint reads it"),
    (b"\x93NUM", "a .npy file", "numpy.load reads it"),
    (b"FDKI", "a compact transport message opening with an init frame (feddip_kernels.protocol.transport)",
     "a ClientEnd's receive reads it"),
]


def bad_magic(head: bytes) -> str:
    """The error for bytes whose first four are not MAGIC, saying what they are where that is
    known (a torch.save file, the library's own files): checked before any checksum."""
    head = bytes(head[:4])
    said = f"bad magic {head!r}, expected {MAGIC!r}: these bytes are"
    for magic, what, reader in _FOREIGN:
        if head.startswith(magic):
            return f"{said} {what}, not a feddip message; {reader}"
    if head[:1] == b"\x80" and head[1:2] and 2 <= head[1] <= 5:  # pickle protocol 2 to 5
        return (f"{said} a pickle, such as a legacy torch.save file, not a feddip message; torch.load reads it "
                "(only from a source you trust: loading a pickle runs code)")
    return f"{said} not a feddip message (one that encode_model or encode_stream wrote)"


def crc32c(data: Any, crc: int = 0, *, backend: str = "auto") -> int:
    """CRC-32C (Castagnoli) of a bytes-like object's bytes in logical (C) order, continuing from
    `crc`; a strided view (reversed, stepped) is copied first."""
    view = memoryview(data)
    return _backend.kernels(backend).crc32c(view if view.c_contiguous else view.tobytes(), crc)


class Reader:
    """Reads a message front to back; every take is checked against what is left."""

    def __init__(self, view: memoryview) -> None:
        self.view, self.pos = view, 0

    def take(self, n: int, what: What) -> memoryview:
        if n < 0 or n > len(self.view) - self.pos:
            raise CodecError(f"truncated message: {described(what)} needs {n} bytes, {len(self.view) - self.pos} left")
        out = self.view[self.pos : self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: struct.Struct | str, what: What) -> tuple:
        s = fmt if isinstance(fmt, struct.Struct) else _struct(fmt)
        return s.unpack(self.take(s.size, what))


@functools.lru_cache(maxsize=64)
def _struct(fmt: str) -> struct.Struct:
    """A compiled format, made once (records read "<H", "<B" and "<nQ" each)."""
    return struct.Struct(fmt)


def read_header_flags(r: Reader) -> tuple[int, int, int]:
    """A message's version, flags and tensor count, from its checked header (flags: those its
    version defines, FLAG_ZERO_SIGNS for versions 1 and 2)."""
    magic, version, flags, reserved, count = r.unpack(HEADER, "header")
    if magic != MAGIC:
        raise CodecError(bad_magic(magic))
    if version not in VERSIONS:
        raise CodecError(f"unsupported format version {version} (this library reads {', '.join(map(str, VERSIONS))})")
    if flags & ~(FLAG_ZERO_SIGNS if version < STREAM_VERSION else 0):
        raise CodecError(f"unknown header flags {flags:#x}")
    if reserved != 0:
        raise CodecError(f"reserved header field is {reserved:#x}, must be 0")
    return version, flags, count


def read_header(r: Reader) -> tuple[int, int]:
    """A message's version and tensor count, from its checked header: for readers of version 3,
    which defines no flags (readers of versions 1 and 2 need read_header_flags)."""
    version, _, count = read_header_flags(r)
    return version, count


class Chunk(NamedTuple):
    """A chunk of a version 2 record (an entry of its chunk table): the run [start, start + size)
    of the record's domain, its nnz positions Golomb-coded with parameter m in `pos_raw`, and its
    values from value index `first` on."""

    start: int
    size: int
    nnz: int
    m: int
    first: int
    pos_raw: memoryview


class ZeroSigns(NamedTuple):
    """A record's zero-sign block, checked, not yet decoded: its elements that decode to -0.0 (all
    off its positions), as positions over its n elements in C order."""

    codec: int  # POSITIONS: all, bitmask or golomb
    count: int  # type: ignore[assignment]  # the field shadows tuple.count
    m: int
    raw: memoryview


class Record(NamedTuple):
    """One tensor's record of a message, validated, its payloads not yet decoded."""

    name: str
    shape: tuple[int, ...]
    n: int
    dtype: np.dtype
    domain: int
    pos_codec: int
    val_codec: str  # the values codec's name (VALUE_NAMES of the record's id)
    d: int
    nnz: int
    m: int
    scale: float
    pos_raw: memoryview
    val_raw: memoryview
    chunks: tuple[Chunk, ...] = ()  # version 2: the positions in independently coded runs
    signs: Optional[ZeroSigns] = None  # with FLAG_ZERO_SIGNS: the zeros that are -0.0
    block: Any = None  # entropy-coded values: their block (entropy.Block), head and table checked
