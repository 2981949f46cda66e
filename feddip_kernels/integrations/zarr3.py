"""A zarr v3 array-to-bytes codec: each chunk is one wire-format message (docs/wire-format.md), so
a sparse chunk stores its non-zero values and their coded positions. Needs zarr >= 3 (the `zarr`
extra); zarr finds it through the "zarr.codecs" entry point under the name "feddip_sparse":

    {"name": "feddip_sparse", "configuration": {"positions": "auto", "values": "auto"}}

`positions` is "auto", "bitmask", "csr", "golomb" or "all"; `values` is "auto" (lossless, -0.0
kept, the smaller of raw and entropy-coded words), "raw" or "ans", or a lossy codec ("fp16",
"bf16", "int8", "fp16-ans", "bf16-ans", "int2-ans" .. "int8-ans"). Arrays of float32 or float64
(either byte order).
Further codecs (e.g. zstd) may follow it in the pipeline as bytes-to-bytes codecs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from zarr.abc.codec import ArrayBytesCodec
from zarr.core.common import parse_named_configuration

from ..codecs import POSITIONS, VALUE_CODECS, CodecError, decode_model, encode_model

if TYPE_CHECKING:
    from zarr.core.array_spec import ArraySpec
    from zarr.core.buffer import Buffer, NDBuffer

NAME = "feddip_sparse"


@dataclass(frozen=True)
class SparseZarrCodec(ArrayBytesCodec):
    """Chunks as feddip sparse messages (see the module docstring for the configuration).

    Parameters
    ----------
    positions : the positions codec: "auto" (the smallest per chunk), "bitmask", "csr", "golomb"
        or "all".
    values : the values codec: lossless (-0.0 kept) "auto" (the default: per chunk the smaller of
        "raw" and "ans", the words entropy-coded), "raw" or "ans"; lossy "fp16", "bf16", "int8",
        "fp16-ans", "bf16-ans", "int8-ans" or "int2-ans" .. "int7-ans".

    Raises
    ------
    ValueError : an unknown positions or values codec.
    """

    positions: str = "auto"
    values: str = "auto"
    is_fixed_size = False

    def __post_init__(self) -> None:
        if self.positions not in ("auto", *POSITIONS):
            raise ValueError(f"positions must be 'auto' or one of {sorted(POSITIONS)}, got {self.positions!r}")
        if self.values not in VALUE_CODECS:
            raise ValueError(f"values must be one of {sorted(VALUE_CODECS)}, got {self.values!r}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SparseZarrCodec":
        """The codec of its zarr metadata, as `to_dict` writes it.

        Parameters
        ----------
        data : {"name": "feddip_sparse", "configuration": {...}}; the configuration (optional, and
            empty by default) holds "positions" and "values", each optional.

        Returns
        -------
        SparseZarrCodec : the codec.

        Raises
        ------
        ValueError : another name, no "name" key, configuration keys other than "positions" and
            "values", or a codec the constructor refuses.
        TypeError : `data` or its configuration not a dict, or a name that is not a string.
        """
        _, config = parse_named_configuration(data, NAME, require_configuration=False)
        options: dict[str, Any] = dict(config or {})  # JSON values: __init__ checks them
        unknown = sorted(set(options) - {"positions", "values"})
        if unknown:
            raise ValueError(f"unknown {NAME} configuration keys {unknown}")
        return cls(**options)

    def to_dict(self) -> dict[str, Any]:
        """The codec's zarr metadata.

        Returns
        -------
        dict : {"name": "feddip_sparse", "configuration": {"positions": ..., "values": ...}}, which
            `from_dict` takes back.
        """
        return {"name": NAME, "configuration": {"positions": self.positions, "values": self.values}}

    def validate(self, *, shape: Any, dtype: Any, chunk_grid: Any) -> None:
        """Check that the array is one this codec stores (zarr calls it as it builds an array's
        metadata, on creating or opening it): float32 or float64, either byte order; any shape and
        chunk grid.

        Parameters
        ----------
        shape : the array's shape (not checked).
        dtype : the array's zarr data type.
        chunk_grid : the array's chunk grid (not checked).

        Raises
        ------
        ValueError : a data type other than float32/float64.
        """
        native = dtype.to_native_dtype()
        if native.kind != "f" or native.itemsize not in (4, 8):
            raise ValueError(f"{NAME} stores float32 and float64 arrays, not {native}")

    def _encode_sync(self, chunk_array: "NDBuffer", chunk_spec: "ArraySpec") -> "Buffer":
        a = np.asarray(chunk_array.as_numpy_array())
        a = np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("="))
        # Positions are the elements whose bits are not all zero, so -0.0 survives a lossless trip.
        with np.errstate(invalid="ignore"):
            keep = (a != 0) | np.signbit(a)
        message = encode_model({"": a}, masks={"": keep}, positions=self.positions, values=self.values)
        return chunk_spec.prototype.buffer.from_bytes(message)

    def _decode_sync(self, chunk_bytes: "Buffer", chunk_spec: "ArraySpec") -> "NDBuffer":
        dtype = chunk_spec.dtype.to_native_dtype()
        native = dtype.newbyteorder("=")
        data = chunk_bytes.as_numpy_array()
        decoded = decode_model(data, expect={"": (tuple(chunk_spec.shape), native)},
                               max_bytes=max(int(np.prod(chunk_spec.shape)) * native.itemsize, 0))
        a = decoded.tensors[""]
        if a.dtype != dtype:
            a = a.astype(dtype)
        return chunk_spec.prototype.nd_buffer.from_numpy_array(a)

    async def _encode_single(self, chunk_array: "NDBuffer", chunk_spec: "ArraySpec") -> "Buffer":
        return self._encode_sync(chunk_array, chunk_spec)

    async def _decode_single(self, chunk_bytes: "Buffer", chunk_spec: "ArraySpec") -> "NDBuffer":
        return self._decode_sync(chunk_bytes, chunk_spec)

    def compute_encoded_size(self, input_byte_length: int, chunk_spec: "ArraySpec") -> int:
        raise NotImplementedError  # variable-sized, as compressors are


__all__ = ["NAME", "CodecError", "SparseZarrCodec"]
