"""Strategies and helpers that several codec test files share (tests/test_codecs_*.py, and
tests/test_stream.py): drawn sparse arrays and bit patterns, and resealing mutated messages."""

import math
import struct

import numpy as np
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from feddip_kernels import codecs

POSITIONS = ["auto", "bitmask", "csr", "golomb"]


@st.composite
def sparse_arrays(draw, allow_nan=True):
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=9))
    density = draw(st.sampled_from([0.0, 0.05, 0.3, 1.0]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    a = rng.standard_normal(shape).astype(dtype) * (rng.random(shape) < density)
    if allow_nan and a.size and draw(st.booleans()):
        a.reshape(-1)[0] = draw(st.sampled_from([np.inf, -np.inf, np.nan, -0.0]))
    return a


def _reseal(body: bytes) -> bytes:
    return body + struct.pack("<I", codecs.crc32c(body))


def mutated_body(msg: bytes, data) -> bytearray:
    """The message without its checksum, one to four bytes overwritten as hypothesis draws."""
    body = bytearray(msg[:-4])
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(body) - 1))
        body[i] = data.draw(st.integers(0, 255))
    return body


_UINT = {np.dtype(np.float32): np.uint32, np.dtype(np.float64): np.uint64}


# Bit patterns besides zeros and normal numbers: +-inf, quiet and signalling NaNs of either sign
# with payloads, the smallest and largest subnormals of either sign, the largest finite number.
_SPECIALS = {
    np.dtype(np.float32): [0x7F800000, 0xFF800000, 0x7FC00001, 0xFFC12345, 0x7F800001, 0xFFA00000, 0x00000001,
                           0x807FFFFF, 0x7F7FFFFF],
    np.dtype(np.float64): [0x7FF0000000000000, 0xFFF0000000000000, 0x7FF8000000000001, 0xFFF8123456789ABC,
                           0x7FF0000000000001, 0xFFF4000000000000, 0x0000000000000001, 0x800FFFFFFFFFFFFF,
                           0x7FEFFFFFFFFFFFFF],
}


@st.composite
def bit_patterns(draw):
    """Float arrays of zeros of either sign, normal numbers and the special bit patterns, in drawn
    proportions (empty, 0-d, all +0.0, all -0.0 included), set through integer views so that
    signalling NaNs keep their bits."""
    dtype = np.dtype(draw(st.sampled_from([np.float32, np.float64])))
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=9))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    zero, negative, special = (draw(st.sampled_from(c)) for c in ([0.0, 0.5, 0.95, 1.0], [0.0, 0.5, 1.0], [0.0, 0.2]))
    n = math.prod(shape)
    a = rng.standard_normal(n).astype(dtype)
    is_zero = rng.random(n) < zero
    a[is_zero] = np.where(rng.random(int(is_zero.sum())) < negative, -0.0, 0.0)
    pick = ~is_zero & (rng.random(n) < special)
    specials = np.array(_SPECIALS[dtype], dtype=_UINT[dtype])
    a.view(_UINT[dtype])[pick] = specials[rng.integers(0, specials.size, int(pick.sum()))]
    return a.reshape(shape)
