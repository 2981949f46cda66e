"""The positions codecs (docs/wire-format.md, `positions`): the encoder's choice among them, Golomb
(against the entropy and the reference coder, every backend, corrupt streams) and CSR."""

import math
import struct

import numpy as np
import pytest
from codec_helpers import _reseal
from hypothesis import assume, given, settings, strategies as st
from hypothesis.extra import numpy as hnp

import feddip_kernels as fk
from feddip_kernels import _backend, codecs, reference
from feddip_kernels._core import golomb_decode, golomb_encode, golomb_parameter


def test_auto_picks_smallest():
    rng = np.random.default_rng(4)
    dense = rng.standard_normal((40, 40)).astype(np.float32)
    sizes = {p: len(fk.encode_model({"w": dense}, positions=p)) for p in ["bitmask", "csr", "golomb", "all"]}
    assert len(fk.encode_model({"w": dense})) == min(sizes.values()) == sizes["all"]
    sparse = dense * (rng.random(dense.shape) < 0.05)
    sizes = {p: len(fk.encode_model({"w": sparse}, positions=p)) for p in ["bitmask", "csr", "golomb"]}
    assert len(fk.encode_model({"w": sparse})) == min(sizes.values())


@pytest.mark.parametrize("p", [0.001, 0.01, 0.05, 0.1, 0.2, 0.3])
def test_golomb_within_one_percent_of_entropy(p):
    rng = np.random.default_rng(3)
    n = 2_000_000
    mask = rng.random(n) < p
    bits = fk.pack_mask(mask)
    nnz = int(mask.sum())
    q = nnz / n
    entropy_bytes = n * -(q * math.log2(q) + (1 - q) * math.log2(1 - q)) / 8
    enc = golomb_encode(bits, n, golomb_parameter(nnz, n))
    assert len(enc) <= 1.01 * entropy_bytes  # as RESULTS.md states
    np.testing.assert_array_equal(golomb_decode(enc, n, nnz, golomb_parameter(nnz, n)), bits)


@given(hnp.arrays(np.bool_, st.integers(0, 500)), st.integers(1, 70))
def test_golomb_matches_reference_coder(mask, m):
    bits = fk.pack_mask(mask)
    enc = golomb_encode(bits, mask.size, m)
    assert enc == reference.golomb_encode(bits, mask.size, m)
    np.testing.assert_array_equal(golomb_decode(enc, mask.size, int(mask.sum()), m), bits)


@pytest.mark.parametrize("m", [1, 2, 3])
def test_golomb_codes_ending_on_a_64_bit_boundary(backend, m):
    # Found by the stress profile: a code of exactly 64 buffered bits made the native decoder shift
    # by 64 (undefined) and report non-zero padding, for two-position masks such as {7, 71} at m = 1.
    k = _backend.kernels(backend)
    for n in range(60, 150):
        for first in range(0, 10):
            mask = np.zeros(n, bool)
            mask[[first, n - 1]] = True
            bits = fk.pack_mask(mask)
            enc = bytes(golomb_encode(bits, n, m))
            np.testing.assert_array_equal(k.golomb_decode(enc, n, 2, m), bits)


@pytest.mark.parametrize("m", [1, 2, 3, 64, 1000, 1 << 20, (1 << 31) - 1])
def test_golomb_long_and_short_quotients(m):
    # Long zero runs force quotients past the decoder's buffered fast path; huge m forces long remainders.
    rng = np.random.default_rng(m)
    mask = np.zeros(20_000, bool)
    mask[[0, 1, 777, 778, 19_999]] = True
    mask[rng.integers(0, mask.size, 30)] = True
    bits = fk.pack_mask(mask)
    enc = golomb_encode(bits, mask.size, m)
    assert enc == reference.golomb_encode(bits, mask.size, m)
    np.testing.assert_array_equal(golomb_decode(enc, mask.size, int(mask.sum()), m), bits)
    with pytest.raises(ValueError):
        golomb_decode(enc[:-1], mask.size, int(mask.sum()), m)


@pytest.mark.parametrize("m", [1, 3, 1000, (1 << 31) - 1])
def test_golomb_backends_long_quotients(backend, m):
    k = _backend.kernels(backend)
    mask = np.zeros(5_000, bool)
    mask[[0, 1, 2_500, 4_999]] = True
    bits = fk.pack_mask(mask)
    enc = k.golomb_encode(bits, mask.size, m)
    assert enc == reference.golomb_encode(bits, mask.size, m)
    np.testing.assert_array_equal(k.golomb_decode(enc, mask.size, 4, m), bits)


@settings(max_examples=150)
@given(hnp.arrays(np.bool_, st.integers(1, 300)), st.integers(1, 40), st.data())
def test_golomb_decoders_agree_on_corrupt_streams(mask, m, data):
    bits = fk.pack_mask(mask)
    enc = bytearray(golomb_encode(bits, mask.size, m))
    if enc:
        i = data.draw(st.integers(0, len(enc) - 1))
        enc[i] ^= data.draw(st.integers(1, 255))
    nnz = int(mask.sum()) + data.draw(st.integers(-1, 1))
    assume(0 <= nnz)
    results = []
    for be in fk.available_backends():
        try:
            results.append(_backend.kernels(be).golomb_decode(bytes(enc), mask.size, nnz, m).tobytes())
        except ValueError:
            results.append(None)
    assert len(set(results)) == 1, results


def test_golomb_batch_coding_matches_single(backend):
    rng = np.random.default_rng(5)
    k = _backend.kernels(backend)
    items, expected, to_encode = [], [], []
    for n, p in [(1000, 0.05), (0, 0.1), (70000, 0.01), (333, 0.5)]:
        bits = fk.pack_mask(rng.random(n) < p)
        nnz = int(k.count_bits(bits, n))
        m = k.golomb_parameter(nnz, n)
        items.append((memoryview(bytes(k.golomb_encode(bits, n, m))), n, nnz, m))
        expected.append(bits)
        to_encode.append((bits, n, m))
    assert [bytes(s) for s in k.golomb_encode_many(to_encode)] == [bytes(it[0]) for it in items]
    out, failed, message = k.golomb_decode_many(items)
    assert failed == -1 and message == ""
    for got, want in zip(out, expected):
        np.testing.assert_array_equal(got, want)
    data, n, nnz, m = items[2]
    items[2] = (memoryview(bytes(len(data))), n, nnz, m)  # no code ever ends: an error, not a hang
    _, failed, message = k.golomb_decode_many(items)
    assert failed == 2 and "Golomb" in message


def test_corrupt_golomb_stream_names_its_tensor(backend):
    rng = np.random.default_rng(6)
    model = {name: (rng.standard_normal(5000) * (rng.random(5000) < 0.05)).astype(np.float32) for name in "ab"}
    body = bytearray(fk.encode_model(model, positions="golomb", signed_zeros=False)[:-4])  # values last
    b = model["b"]
    nnz = int(np.count_nonzero(b))
    k = _backend.kernels("numpy")
    pos_len = len(k.golomb_encode(fk.pack_mask(b != 0), b.size, k.golomb_parameter(nnz, b.size)))
    end = len(body) - 4 * nnz  # b's positions come right before its fp32 values, the last payload
    body[end - pos_len : end] = bytes(pos_len)
    with pytest.raises(fk.CodecError, match="'b'.*Golomb"):
        fk.decode_model(_reseal(bytes(body)), backend=backend)


@pytest.mark.parametrize("cols", [256, 257, 65536, 65537])
def test_csr_column_widths(backend, cols):
    # Column indices take 1 byte up to 256 columns, 2 up to 65536, then 4.
    rng = np.random.default_rng(cols)
    a = np.where(rng.random((3, cols)) < 0.05, rng.standard_normal((3, cols)), 0).astype(np.float32)  # no -0.0
    a[:, -1] = 1.5  # the last column is present, so the widest index is coded
    msg = fk.encode_model({"a": a}, positions="csr", backend=backend)
    assert msg == fk.encode_model({"a": a}, positions="csr", backend="numpy")
    width = 1 if cols <= 256 else 2 if cols <= 65536 else 4
    nnz = int((a != 0).sum())
    assert len(msg) == 12 + 2 + 1 + 1 + 16 + codecs.format.RECORD.size + 4 * 4 + width * nnz + 4 * nnz + 4
    out = fk.decode_model(msg, backend=backend)
    np.testing.assert_array_equal(out.tensors["a"], a)
    np.testing.assert_array_equal(out.masks["a"], a != 0)


def test_csr_positions_relative_to_a_mask_are_rejected():
    # docs/wire-format.md: CSR is defined for domain 0 only. A well-formed CSR payload over the
    # reference's 6 positions (read as 3 rows of 2) must still be refused.
    shared = {"a": np.arange(12).reshape(3, 4) >= 6}
    indptr, cols = np.array([0, 1, 2, 2], "<u4"), np.array([0, 1], "<u1")
    payload = indptr.tobytes() + cols.tobytes()
    values = np.array([1.0, 2.0], "<f4").tobytes()
    body = codecs.format.HEADER.pack(codecs.MAGIC, codecs.VERSION, 0, 0, 1) + struct.pack("<H", 1) + b"a"
    body += struct.pack("<B2Q", 2, 3, 4) + codecs.format.RECORD.pack(
        1, codecs.DOMAIN_REFERENCE, codecs.POSITIONS["csr"], 0, 0, 0, 6, 2, 0, 0.0, len(payload), len(values)
    )
    body += payload + values
    with pytest.raises(fk.CodecError, match="CSR positions are defined"):
        fk.decode_model(_reseal(body), reference=shared)
