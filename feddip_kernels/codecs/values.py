"""Values codecs (docs/wire-format.md). Fixed-width words: raw (lossless), fp16, bf16 (rounded to
nearest even) and int8 with a per-tensor scale. Entropy-coded (codecs/entropy.py): "ans" (the raw
words, lossless), "fp16-ans", "bf16-ans" (those words, the same values as fp16 and bf16), and
"int2-ans" .. "int8-ans", b-bit uniform quantisation with a per-tensor scale ("int8-ans": int8's
values). "auto" takes, per tensor, the smaller of "raw" and "ans". Codecs go by name; their ids
(format.VALUES) are for the records' bytes only, turned into names where a record is read."""

from __future__ import annotations

import math
import sys
from typing import Any, NamedTuple, Optional, Sequence, Union

import numpy as np

from .._arrays import contiguous
from . import entropy
from .format import VALUES, CodecError

_LITTLE = sys.byteorder == "little"

# Entropy-coded codecs: name -> id; "int{b}-ans" share one id, b being the block's word_bits.
QUANTISED = {f"int{b}-ans": b for b in range(2, 9)}
ENTROPY_CODED = ("ans", "fp16-ans", "bf16-ans", *QUANTISED)
LOSSLESS = ("raw", "ans", "auto")
NAMES = (*(v for v in VALUES if v != "int-ans"), *QUANTISED, "auto")  # what encoders take
ROUNDINGS = ("nearest", "stochastic")


def record_id(codec: str) -> int:
    """The id a record carries for a codec."""
    return VALUES["int-ans"] if codec in QUANTISED else VALUES[codec]


def check_codec(values: str, rounding: str = "nearest") -> None:
    if values not in NAMES:
        raise ValueError(f"unknown values codec {values!r}; one of {sorted(NAMES)}")
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
    if rounding != "nearest" and values not in QUANTISED:  # the others have no rounding to choose
        raise ValueError(f"stochastic rounding applies to the int2-ans .. int8-ans codecs, not {values!r}")


def _bf16_encode(v: np.ndarray) -> np.ndarray:
    u = np.ascontiguousarray(v, dtype=np.float32).view(np.uint32)
    rounded = ((u.astype(np.uint64) + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    nan = np.isnan(v)
    if nan.any():  # keep NaN a NaN (rounding could carry it into inf)
        rounded[nan] = ((u[nan] >> 16) | 0x40).astype(np.uint16)
    return rounded


def quantise(v: np.ndarray, bits: int, rounding: str = "nearest",
             rng: Optional[np.random.Generator] = None) -> tuple[np.ndarray, float]:
    """(q, scale): integers in [-(2^(bits-1) - 1), 2^(bits-1) - 1] with q * scale close to v,
    scale = max|v| / (2^(bits-1) - 1) rounded to float32 (1 for no or only zero values). Nearest
    rounding (ties to even) errs by at most scale / 2, stochastic rounding (up with probability the
    fraction, so unbiased) by less than scale; the clip to the range adds at most float32's
    rounding of the scale. ValueError on a non-finite value."""
    top = (1 << (bits - 1)) - 1
    peak = float(np.abs(v).max()) if v.size else 0.0  # NaN with any NaN
    if not math.isfinite(peak):
        raise ValueError(f"int{bits} values need finite inputs; use raw, fp16 or bf16")
    if peak == 0:
        scale = np.float32(1.0)
    elif peak / top < _F32_MAX:  # (a tensor at a time: the errstate only where it can overflow)
        scale = np.float32(peak / top)
    else:
        with np.errstate(over="ignore"):
            scale = np.float32(peak / top)
        if not np.isfinite(scale):
            raise ValueError(f"int{bits} values: a peak of {peak} is beyond float32's range for the scale")
    if scale == 0:  # a peak among float32's smallest subnormals
        scale = np.nextafter(np.float32(0), np.float32(1))
    # A subnormal scale may have rounded down by up to half: up, or the clip would err by steps.
    # (A normal one rounds by half an ulp at most, which rint absorbs; int8's bytes stay as they were.)
    while scale < _F32_TINY and float(scale) * top < peak:
        scale = np.nextafter(scale, np.float32(np.inf))
    x = np.asarray(v / scale)  # in v's precision, as int8 values have always been rounded (0-d: an array)
    if rounding == "stochastic":
        x = np.floor(x + (rng if rng is not None else np.random.default_rng()).random(x.shape))
    else:
        np.rint(x, out=x)
    np.minimum(x, top, out=x)  # the clip to [-top, top] (finite: no NaN to keep)
    np.maximum(x, -top, out=x)
    return x.astype(np.int8), float(scale)


_F32_MAX = float(np.finfo(np.float32).max)
_F32_TINY = np.finfo(np.float32).tiny


def _to_words(v: np.ndarray, codec: str, rounding: str, rng: Optional[np.random.Generator]
              ) -> tuple[np.ndarray, int, float]:
    """(words, word_bits, scale) of an entropy-coded codec's values."""
    if codec == "ans":
        return v.view(np.uint32 if v.dtype.itemsize == 4 else np.uint64), 8 * v.dtype.itemsize, 0.0
    if codec == "fp16-ans":
        return v.astype(np.float16).view(np.uint16), 16, 0.0
    if codec == "bf16-ans":
        return _bf16_encode(v.astype(np.float32)), 16, 0.0
    bits = QUANTISED[codec]
    q, scale = quantise(v, bits, rounding, rng)
    return _SIGN_MAGNITUDE[bits].take(q.view(np.uint8)), bits, scale


def _sign_magnitude(bits: int) -> np.ndarray:
    """The word of each int8 q (indexed by its byte): |q| with the sign in bit bits - 1."""
    u = np.arange(256)
    return (np.where(u >= 128, 256 - u, u) | (u >= 128) << (bits - 1)).astype(np.uint8)


_SIGN_MAGNITUDE = {bits: _sign_magnitude(bits) for bits in QUANTISED.values()}


def _native(v: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(v if v.dtype.isnative else v.astype(v.dtype.newbyteorder("=")))


def encode_values(v: np.ndarray, codec: str) -> tuple[Union[bytes, memoryview], float]:
    """(the payload's bytes, int8 scale or 0) of a fixed-width codec. Raw values come back as a
    view of the array: the message's one join copies them, no second copy first."""
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
        q, scale = quantise(v, 8)
        return q.tobytes(), scale
    raise ValueError(f"unknown values codec {codec!r}; one of {sorted(NAMES)}")


class Coded(NamedTuple):
    """A tensor's values coded: the codec used (what `auto` chose), payload pieces and scale, and
    with encode_many's `decoded` the values a decoder gets back from them."""

    codec: str
    payload: list[Any]
    scale: float
    decoded: Optional[np.ndarray] = None


def encode_many(k: Any, items: Sequence[Sequence[np.ndarray]], codec: str, rounding: str = "nearest",
                rng: Optional[np.random.Generator] = None, fixed_width: bool = True,
                decoded: bool = False) -> list[Coded]:
    """Each tensor's values (in pieces, back to back, in position order) coded. Fixed-width codecs
    a piece at a time, nothing joined (except int8, whose one scale is over all of them); the
    entropy-coded ones joined and coded in one call for all tensors (in parallel with the native
    backend). A tensor whose block would be larger than fixed-width words of the same values is
    sent as those: "auto" as "raw", "fp16-ans" and "bf16-ans" as "fp16" and "bf16", the
    quantised codecs as "int8" (their q and scale, which int8 decodes to the same values): a
    block's head and table outweigh a few values (a bias, a small layer). Not with
    `fixed_width=False` (a version 3 record has one codec for all its chunks). `decoded`: each
    Coded also holds the values decode_many gives back (in the tensor's dtype, native order),
    from the words and scale the encoder wrote, by the decoder's own arithmetic."""
    if codec not in ENTROPY_CODED and codec != "auto":
        out = []
        for pieces in items:
            if len(pieces) == 1 or codec == "int8":
                payload, scale = encode_values(pieces[0] if len(pieces) == 1 else np.concatenate(pieces), codec)
                out.append(Coded(codec, [payload], scale))
            else:
                out.append(Coded(codec, [encode_values(v, codec)[0] for v in pieces], 0.0))
        if decoded:
            out = [c._replace(decoded=_decoded_fixed(c, pieces)) for c, pieces in zip(out, items)]
        return out
    coder = "ans" if codec == "auto" else codec
    fixed = _FIXED.get(coder, "int8")
    joined = [_native(pieces[0] if len(pieces) == 1 else np.concatenate(pieces)) for pieces in items]
    words = [_to_words(v, coder, rounding, rng) for v in joined]
    # Fixed-width words shorter than any block are sent as such without coding the block.
    short = [fixed_width and 0 < v.size * value_size(fixed, v.dtype) < entropy.MIN_BLOCK for v in joined]
    coded = iter(entropy.encode_blocks(k, [(w, bits) for (w, bits, _), s in zip(words, short) if not s]))
    out = []
    for v, (w, bits, scale), s in zip(joined, words, short):
        block = [] if s else next(coded)
        if s or fixed_width and sum(map(len, block)) > v.size * value_size(fixed, v.dtype):
            c = _fixed_width(v, w, bits, fixed, scale)
            out.append(c._replace(decoded=_decoded_fixed(c, [v])) if decoded else c)
        else:
            out.append(Coded(coder, block, scale, _decoded_words(w, coder, v, scale, bits) if decoded else None))
    return out


def _decoded_fixed(c: Coded, pieces: Sequence[np.ndarray]) -> np.ndarray:
    """What a fixed-width codec's payload decodes to (its values themselves when lossless)."""
    dtype = pieces[0].dtype if pieces else np.dtype(np.float32)
    if c.codec == "raw":
        return _native(pieces[0] if len(pieces) == 1 else np.concatenate(pieces)) if pieces else np.zeros(0, dtype)
    raw = memoryview(c.payload[0] if len(c.payload) == 1 else b"".join(c.payload))
    return decode_values(raw, c.codec, len(raw) // value_size(c.codec, dtype), dtype, c.scale)


def _decoded_words(words: np.ndarray, codec: str, v: np.ndarray, scale: float, bits: int) -> np.ndarray:
    """What an entropy-coded block of these words decodes to (`v` itself when lossless)."""
    return v if codec == "ans" else _from_words(words, "int-ans" if codec in QUANTISED else codec, v.dtype, scale,
                                                bits)


_FIXED = {"ans": "raw", "fp16-ans": "fp16", "bf16-ans": "bf16"}  # the quantised codecs': int8


def _fixed_width(v: np.ndarray, words: np.ndarray, bits: int, fixed: str, scale: float) -> Coded:
    """The fixed-width codec `fixed` sending an entropy-coded codec's values unchanged: its words,
    or for int8 the quantised codec's q with its scale."""
    if fixed == "raw":
        return Coded("raw", [encode_values(v, "raw")[0]], 0.0)
    if fixed in ("fp16", "bf16"):
        return Coded(fixed, [words.astype("<u2").tobytes()], 0.0)
    mag = (words & ((1 << (bits - 1)) - 1)).astype(np.int8)
    return Coded("int8", [np.where(words >> (bits - 1), -mag, mag).astype(np.int8).tobytes()], scale)


_SIZES = {"fp16": 2, "bf16": 2, "int8": 1}  # bytes a value; raw: the dtype's


def value_size(codec: str, dtype: np.dtype) -> int:
    """Bytes a value of a fixed-width codec."""
    return dtype.itemsize if codec == "raw" else _SIZES[codec]


def word_bits(codec: str, dtype: np.dtype) -> Union[int, range]:
    """The word width an entropy-coded codec's block must have (a range for the quantised ones)."""
    if codec == "ans":
        return 8 * dtype.itemsize
    return 16 if codec in ("fp16-ans", "bf16-ans") else range(2, 9)


class Payload(NamedTuple):
    """A tensor's (or chunk's) values, checked, not yet decoded: a fixed-width payload, or an
    entropy-coded block."""

    codec: str  # the record's codec: a fixed-width one, "ans", "fp16-ans", "bf16-ans" or "int-ans"
    nnz: int
    dtype: np.dtype
    scale: float
    raw: memoryview
    block: Optional[entropy.Block] = None


def check_scale(codec: str, scale: float, where: str) -> None:
    """Only the quantised codecs carry a scale."""
    if codec in ("int8", "int-ans"):
        if not math.isfinite(scale) or scale <= 0:
            raise CodecError(f"{where}: scale {scale} is not a positive finite number")
    elif scale != 0:
        raise CodecError(f"{where}: scale {scale} for values that have none")


def read_payload(raw: memoryview, codec: str, nnz: int, dtype: np.dtype, scale: float, where: str) -> Payload:
    """A record's values payload (exactly `raw`), its lengths and an entropy-coded block's head and
    table checked; CodecError otherwise."""
    if codec in ("raw", "fp16", "bf16", "int8"):
        if len(raw) != nnz * value_size(codec, dtype):
            raise CodecError(f"{where}: values take {len(raw)} bytes, {nnz} values need "
                             f"{nnz * value_size(codec, dtype)}")
        return Payload(codec, nnz, dtype, scale, raw)
    return Payload(codec, nnz, dtype, scale, raw, entropy.read_block(raw, nnz, word_bits(codec, dtype), where))


def decode_many(k: Any, payloads: Sequence[Payload], names: Sequence[str]) -> list[np.ndarray]:
    """Each payload's values in its dtype (native order): the entropy-coded blocks in one call (in
    parallel with the native backend); CodecError naming the first corrupt one."""
    coded = [(p.block, p.nnz) for p in payloads if p.block is not None]
    words = iter(entropy.decode_blocks(k, coded, [nm for p, nm in zip(payloads, names) if p.block is not None]))
    return [decode_values(p.raw, p.codec, p.nnz, p.dtype, p.scale) if p.block is None else
            _from_words(next(words), p.codec, p.dtype, p.scale, p.block.model.word_bits) for p in payloads]


def _from_words(words: np.ndarray, codec: str, dtype: np.dtype, scale: float, bits: int) -> np.ndarray:
    dtype = dtype.newbyteorder("=")
    if codec == "ans":
        return words.view(dtype)
    if codec == "fp16-ans":
        return words.view(np.float16).astype(dtype)
    if codec == "bf16-ans":
        return (words.astype(np.uint32) << 16).view(np.float32).astype(dtype, copy=False)
    # Each of the 2^bits words' value, then looked up: the same float32 product for every word.
    with np.errstate(over="ignore"):  # a hostile scale times a large q: inf, as int8's decoder gives
        table = (_Q_OF_WORD[bits] * np.float32(scale)).astype(dtype, copy=False)
    return table.take(words)


def _q_of_word(bits: int) -> np.ndarray:
    """q of each of the 2^bits words (sign and magnitude), as float32: +0.0 for both zeros."""
    u = np.arange(1 << bits)
    mag = (u & ((1 << (bits - 1)) - 1)).astype(np.float32)
    return np.where(u >> (bits - 1), -mag, mag) + np.float32(0)


_Q_OF_WORD = {bits: _q_of_word(bits) for bits in range(2, 9)}


def decode_values(raw: memoryview, codec: str, nnz: int, dtype: np.dtype, scale: float) -> np.ndarray:
    """A fixed-width codec's values."""
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
