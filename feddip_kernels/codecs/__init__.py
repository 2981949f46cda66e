"""Codecs for sparse models: positions (bitmask, CSR, Golomb-coded gaps, or none when a shared mask
says where the values go), values (lossless as raw words or entropy-coded; opt-in fp16, bf16, int8
and b-bit quantisation, entropy-coded or not), and the versioned wire format of
docs/wire-format.md. Decoding validates every length against the message and a caller-set output
limit before allocating, and raises CodecError on any inconsistency.

One file per part of the format: `format` (structs, codes, reader, checksum), `positions`,
`values`, `entropy` (entropy-coded values' blocks), `records` (what every version's records
share), `plain` (tensors of other dtypes, which travel whole; the checks of encode_model's
inputs), `model` (messages of named tensors), `stream` (version 3: messages written and read
through file objects). The numcodecs codec (SparseCodec) lives with the other frameworks'
adapters, in integrations.numcodecs."""

from typing import Any

from .format import (
    DEFAULT_MAX_BYTES,
    DOMAIN_FULL,
    DOMAIN_REFERENCE,
    DTYPE_CODES,
    DTYPES,
    MAGIC,
    MAX_NDIM,
    PLAIN_CODES,
    PLAIN_DTYPES,
    POSITION_NAMES,
    POSITIONS,
    STREAM_VERSION,
    VALUE_NAMES,
    VALUES,
    VERSION,
    CodecError,
    crc32c,
)
from .model import decode_model, encode_model
from .records import Decoded
from .stream import decode_stream, encode_stream
from .values import NAMES as VALUE_CODECS

__all__ = [
    "DEFAULT_MAX_BYTES", "DOMAIN_FULL", "DOMAIN_REFERENCE", "DTYPES", "DTYPE_CODES", "MAGIC", "MAX_NDIM",
    "PLAIN_CODES", "PLAIN_DTYPES", "POSITIONS", "POSITION_NAMES", "STREAM_VERSION", "VALUES", "VALUE_CODECS",
    "VALUE_NAMES", "VERSION", "CodecError",
    "Decoded", "crc32c", "decode_model", "decode_stream", "encode_model", "encode_stream",
]


def __getattr__(name: str) -> Any:
    """codecs.SparseCodec, where it lived before integrations.numcodecs (imported on first use:
    that module imports this package)."""
    if name == "SparseCodec":
        from ..integrations.numcodecs import SparseCodec

        return SparseCodec
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
