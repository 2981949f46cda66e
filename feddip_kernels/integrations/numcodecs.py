"""The numcodecs adapter: SparseCodec, one float array per message, registered with numcodecs
(id "feddip_sparse") when numcodecs is installed."""

from __future__ import annotations

from typing import Any, Mapping, Optional

import numpy as np

from .._arrays import as_array
from ..codecs.format import DEFAULT_MAX_BYTES, DTYPE_CODES, POSITIONS, CodecError
from ..codecs.model import decode_model, encode_model
from ..codecs.values import NAMES as VALUE_CODECS


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

    Parameters
    ----------
    positions : the positions codec: "auto" (the smallest per message), "bitmask", "csr", "golomb"
        or "all".
    values : the values codec: lossless "auto" (the default: per message the smaller of "raw" and
        "ans", the words entropy-coded), "raw" or "ans"; lossy "fp16", "bf16", "int8", their
        entropy-coded forms "fp16-ans", "bf16-ans", "int8-ans", or "int2-ans" .. "int7-ans".
    max_bytes : the most bytes a decoded array may take (decode refuses larger messages).
    dtype : "float32" or "float64" (any spelling NumPy reads, in native byte order), the dtype that
        buffers without a float dtype are read as; None (the default): such buffers are refused.

    Raises
    ------
    ValueError : an unknown positions or values codec, or a dtype other than float32/float64.
    TypeError : a dtype that NumPy does not understand.
    """

    codec_id = "feddip_sparse"

    def __init__(self, positions: str = "auto", values: str = "auto", max_bytes: int = DEFAULT_MAX_BYTES,
                 dtype: Optional[str] = None) -> None:
        if positions not in ("auto", *POSITIONS) or values not in VALUE_CODECS:
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
        """Encode one array as a message: its elements whose bits are not all zero, -0.0 included.

        Parameters
        ----------
        buf : a float32/float64 array or torch CPU tensor, or any buffer (bytes, bytearray,
            array.array, ...) to read as `dtype`.

        Returns
        -------
        bytes : the message (docs/wire-format.md), holding one unnamed tensor.

        Raises
        ------
        TypeError : a buffer without a float32/float64 dtype while `dtype` is None.
        ValueError : a buffer whose size is not a multiple of `dtype`'s, a torch tensor on a
            device, or an array of more dimensions than the format holds.
        """
        # Positions are the elements whose bits are not all zero: -0.0 is kept as a value, so a
        # lossless round trip gives back the same bytes, lossy values included (no zero-sign
        # blocks; with raw values, a message that readers predating them read).
        a = self._array(buf)
        with np.errstate(invalid="ignore"):
            keep = (a != 0) | np.signbit(a)
        return encode_model({"": a}, masks={"": keep}, positions=self.positions, values=self.values)

    def decode(self, buf: Any, out: Any = None) -> Any:
        """Decode a message from `encode`, into `out` when given.

        Parameters
        ----------
        buf : the message (bytes or any buffer).
        out : None, or a writable buffer of the decoded size: an array of the decoded shape and
            dtype gets the elements by index, anything else (contiguous) the decoded bytes in order.

        Returns
        -------
        numpy.ndarray or the type of out : the decoded array (of the encoded shape, or flat for an
            array encoded in Fortran memory order), or `out` itself, filled.

        Raises
        ------
        CodecError : bytes that are not a valid message (corrupt, truncated, inconsistent), a
            message whose decoded array exceeds `max_bytes`, or one that does not hold exactly one
            unnamed tensor.
        ValueError : an `out` that is read-only, or (unless of the decoded shape and dtype) one that
            is not contiguous or not of the decoded size in bytes.
        TypeError : a `buf` or `out` that is not a buffer.
        """
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
        """The codec's configuration, as numcodecs stores it.

        Returns
        -------
        dict : "id" ("feddip_sparse"), "positions", "values", "max_bytes", and "dtype" where set;
            `from_config` takes it back.
        """
        config = {"id": self.codec_id, "positions": self.positions, "values": self.values, "max_bytes": self.max_bytes}
        if self.dtype is not None:
            config["dtype"] = self.dtype
        return config

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "SparseCodec":
        """The codec of a configuration from `get_config`.

        Parameters
        ----------
        config : the configuration: the constructor's keyword arguments, and optionally "id".

        Returns
        -------
        SparseCodec : the codec.

        Raises
        ------
        ValueError : an "id" other than "feddip_sparse", or a setting the constructor refuses.
        TypeError : a key the constructor does not take, or a dtype NumPy does not understand.
        """
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
