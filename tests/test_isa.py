"""Capping the native ISA (`_core._isa`, the `isa` fixture) reaches every loop with hand-written
vector code, not only top-k's and the step's (tests/test_pruning.py, tests/test_update.py): CRC-32C
with and without SSE4.2's crc32 instruction, sparsify's packing of positions and densify's float32
scatter with and without AVX2, and the entropy decoder's loops. Each gives the reference's bytes at
every level the CPU has."""

import functools

import numpy as np
import pytest

from feddip_kernels import reference

native = pytest.importorskip("feddip_kernels._core")

# Edges of the native loops: a byte of bits (8), an AVX2 pack (32), a word (64), a sparsify span
# (2^16), the parallel threshold (2^18), the CRC's three 4 KiB lanes (12 KiB) and its 256 KiB pieces.
SPARSE_SIZES = [0, 1, 7, 31, 32, 33, 64, 65, 1000, (1 << 16) + 5, (1 << 18) + 3]
CRC_SIZES = [0, 9, 3 * 4096 - 1, 3 * 4096 + 13, 100_003, (1 << 18) + 7]


@pytest.fixture(params=[1, 2], ids=["1-thread", "2-threads"])
def threads(request):
    native.set_num_threads(request.param)
    yield request.param
    native.set_num_threads(0)


@functools.lru_cache(maxsize=None)
def _bytes(n: int) -> bytes:
    return np.random.default_rng(n).integers(0, 256, n, dtype=np.uint8).tobytes()


@functools.lru_cache(maxsize=None)
def _reference_crc(n: int, crc: int) -> int:
    return reference.crc32c(_bytes(n), crc)


@pytest.mark.parametrize("n", CRC_SIZES)
def test_crc32c_at_every_isa_matches_the_reference(isa, threads, n):
    for crc in (0, 0x12345678):
        assert native.crc32c(_bytes(n), crc) == _reference_crc(n, crc), (isa, n, crc)


def test_join_crc32c_at_every_isa_matches_the_reference(isa, threads):
    parts = [_bytes(n) for n in CRC_SIZES]
    body = b"".join(parts)
    assert native.join_crc32c(parts) == body + reference.crc32c(body).to_bytes(4, "little")


def _values(n: int, dtype) -> np.ndarray:
    """Zeros (half of them -0.0), normals, subnormals, infinities and NaNs with the sign set: only
    the sign bit alone is -0.0, and NaN counts as non-zero."""
    rng = np.random.default_rng(n + 1)
    x = rng.standard_normal(n).astype(dtype)
    x[rng.random(n) < 0.5] = 0
    x[rng.random(n) < 0.1] = -0.0
    info = np.finfo(dtype)
    odd = np.array([np.inf, -np.inf, -np.nan, info.smallest_subnormal, -info.smallest_subnormal], dtype)
    pick = rng.random(n) < 0.01
    x[pick] = odd[rng.integers(0, odd.size, int(pick.sum()))]
    return x


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("masked", [False, True], ids=["nonzero", "mask"])
@pytest.mark.parametrize("n", SPARSE_SIZES)
def test_sparsify_at_every_isa_matches_the_reference(isa, threads, dtype, masked, n):
    x = _values(n, dtype)
    mask = np.random.default_rng(n).random(n) < 0.3 if masked else None
    want_bits, want_values, want_negative = reference.sparsify(x, mask, negative_zeros=True)
    bits, values = native.sparsify(x, mask)
    assert bits.tobytes() == want_bits.tobytes() and values.tobytes() == want_values.tobytes()
    bits, values, negative = native.sparsify(x, mask, negative_zeros=True)
    assert bits.tobytes() == want_bits.tobytes() and values.tobytes() == want_values.tobytes()
    assert (negative is None) == (want_negative is None)
    if negative is not None:
        assert negative.tobytes() == want_negative.tobytes()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("offset", [0, 1], ids=["aligned", "unaligned"])  # AVX2's scatter: 16-byte aligned output
@pytest.mark.parametrize("n", SPARSE_SIZES)
def test_densify_at_every_isa_matches_the_reference(isa, threads, dtype, offset, n):
    x = _values(n, dtype)
    bits, values = reference.sparsify(x, np.random.default_rng(n).random(n) < 0.3)
    want = reference.densify(bits, n, values)
    room = np.full(n + 16, np.nan, dtype)
    start = (-room.ctypes.data % 64) // room.itemsize + offset
    out = room[start : start + n]
    assert native.densify(bits, n, values, out) is out
    assert out.tobytes() == want.tobytes()
    assert native.densify(bits, n, values).tobytes() == want.tobytes()


# The entropy decoder's loops: 32 lanes at a time (AVX-512: words of 8, 16 and 32 bits; AVX2: 32
# bits), the raw fields 16 or 8 at a time (32-bit words with fields of up to 25 bits), and the
# scalar loop for the rest; lengths around a group of 32 and a vector of fields. (The encoder has
# no vector loop: its bytes are compared with the reference's once, in tests/test_entropy.py.)
ANS_SIZES = [1, 31, 32, 33, 97, 1000]


@functools.lru_cache(maxsize=None)
def _ans_cases(n: int, word_bits: int) -> list:
    """(words, model, stream, raw) for the planned model, the finest model the histogram allows,
    and 7 lanes: the reference's encoding of words like those each codec sends."""
    from feddip_kernels._contract import AnsModel
    from feddip_kernels._formulas import word_dtype
    from feddip_kernels.codecs.entropy import _normalise, plan

    rng = np.random.default_rng(n * 101 + word_bits)
    if word_bits == 32:  # float32 bits, as "ans" codes them: a bell's tail, raw fields up to 25 bits
        words = (rng.standard_normal(n).astype(np.float32) * 3).view(np.uint32)
    else:
        top = np.uint64((1 << (word_bits - 1)) - 1)
        words = (rng.integers(0, 1 << 62, n, dtype=np.uint64) & top).astype(word_dtype(word_bits))
        words[rng.random(n) < 0.5] |= word_dtype(word_bits).type(1 << (word_bits - 1))
    planned = plan(reference, words, word_bits)
    shift, base, counts = reference.ans_histogram(words, word_bits=word_bits, max_symbols=4096)
    finest = AnsModel(word_bits, shift, base, _normalise(counts, 13), 13, 32)
    cases = []
    for m in (planned._replace(lanes=32), finest, planned._replace(lanes=7)):
        cases.append((words, m, *reference.ans_encode(words, **m._asdict())))
    return cases


@pytest.mark.parametrize("word_bits", [8, 16, 32, 64])
@pytest.mark.parametrize("n", ANS_SIZES)
def test_ans_decode_at_every_isa_matches_the_reference(isa, word_bits, n):
    for words, m, stream, raw in _ans_cases(n, word_bits):
        got = native.ans_decode(stream, raw, n, **m._asdict())
        assert got.dtype == words.dtype and np.array_equal(got, words), (isa, m.lanes, m.shift)
