import io
import math
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings, strategies as st
from hypothesis.extra import numpy as hnp

import feddip_kernels as fk
from feddip_kernels import _backend, codecs, reference
from feddip_kernels._core import golomb_decode, golomb_encode, golomb_parameter

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


@given(sparse_arrays(), st.sampled_from(POSITIONS))
def test_lossless_round_trip(a, positions):
    msg = fk.encode_model({"w": a, "b": np.ones(3, np.float32)}, positions=positions)
    out = fk.decode_model(msg)
    assert out.tensors["w"].dtype == a.dtype and out.tensors["w"].shape == a.shape
    np.testing.assert_array_equal(out.tensors["w"], a)
    np.testing.assert_array_equal(out.masks["w"], a != 0)
    np.testing.assert_array_equal(out.tensors["b"], np.ones(3, np.float32))


@given(sparse_arrays(allow_nan=False), st.sampled_from(["fp16", "bf16", "int8"]))
def test_lossy_values_error_bounds(a, values):
    out = fk.decode_model(fk.encode_model({"w": a}, values=values)).tensors["w"]
    np.testing.assert_array_equal(out != 0, (a != 0) & (out != 0))  # positions preserved
    ref = a.astype(np.float64)
    err = np.abs(out.astype(np.float64) - ref)
    if values == "int8":
        peak = np.abs(ref).max() if a.size else 0.0
        assert (err <= peak / 127 / 2 * 1.0001 + 1e-30).all()
    else:
        rel = 2.0**-11 if values == "fp16" else 2.0**-8
        finite = np.abs(ref) < (6e4 if values == "fp16" else 3e38)
        tiny = 6.2e-5 if values == "fp16" else 1.2e-38  # below the normal range: absolute error
        assert (err[finite] <= rel * np.abs(ref[finite]) + tiny).all()


def test_int8_rejects_non_finite():
    with pytest.raises(ValueError, match="finite"):
        fk.encode_model({"w": np.array([1.0, np.inf], np.float32)}, values="int8")


def test_explicit_mask_keeps_zeros_and_shared_mask_costs_nothing():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((64, 50)).astype(np.float32)
    mask = rng.random(w.shape) < 0.2
    w[0, :] = 0.0
    mask[0, :5] = True  # zeros inside the mask are still values
    sparse = w * mask
    msg = fk.encode_model({"w": sparse}, masks={"w": mask}, reference={"w": mask})
    assert len(msg) < 4 * mask.sum() + 120  # values only, no positions
    out = fk.decode_model(msg, reference={"w": mask})
    np.testing.assert_array_equal(out.tensors["w"], sparse)
    np.testing.assert_array_equal(out.masks["w"], mask)
    with pytest.raises(fk.CodecError, match="reference"):
        fk.decode_model(msg)
    other = mask.copy()
    other[1, 1] = ~other[1, 1]
    with pytest.raises(fk.CodecError, match="reference mask"):
        fk.decode_model(msg, reference={"w": other})


def test_mask_delta_is_coded_relative_to_previous_mask():
    rng = np.random.default_rng(2)
    w = rng.standard_normal(200_000).astype(np.float32)
    prev = rng.random(w.size) < 0.2
    new = prev & (rng.random(w.size) < 0.5)  # a subset: half of the previous mask survives
    full = fk.encode_model({"w": w * new}, masks={"w": new})
    delta = fk.encode_model({"w": w * new}, masks={"w": new}, reference={"w": prev})
    assert len(delta) < len(full)
    out = fk.decode_model(delta, reference={"w": prev})
    np.testing.assert_array_equal(out.masks["w"], new)
    np.testing.assert_array_equal(out.tensors["w"], w * new)


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


def test_auto_picks_smallest():
    rng = np.random.default_rng(4)
    dense = rng.standard_normal((40, 40)).astype(np.float32)
    sizes = {p: len(fk.encode_model({"w": dense}, positions=p)) for p in ["bitmask", "csr", "golomb", "all"]}
    assert len(fk.encode_model({"w": dense})) == min(sizes.values()) == sizes["all"]
    sparse = dense * (rng.random(dense.shape) < 0.05)
    sizes = {p: len(fk.encode_model({"w": sparse}, positions=p)) for p in ["bitmask", "csr", "golomb"]}
    assert len(fk.encode_model({"w": sparse})) == min(sizes.values())


def test_lossless_ratio_at_five_percent():
    rng = np.random.default_rng(5)
    w = rng.standard_normal(4_000_000).astype(np.float32) * (rng.random(4_000_000) < 0.05)  # -0.0 at half the zeros
    plain = np.where(w == 0, np.float32(0), w)  # the same numbers, pruned to +0.0
    assert 4 * w.size / len(fk.encode_model({"w": plain})) >= 16.5
    # The -0.0 among w's zeros, about half of them, cost a bit an element (a bitmask), and nothing
    # with signed_zeros=False.
    extra = len(fk.encode_model({"w": w})) - len(fk.encode_model({"w": plain}))
    assert 0 < extra <= w.size / 8 + 64
    assert fk.encode_model({"w": w}, signed_zeros=False) == fk.encode_model({"w": plain})


def test_torch_tensors_are_accepted():
    torch = pytest.importorskip("torch")
    t = torch.zeros(10, 10)
    t[3, 4] = 2.5
    out = fk.decode_model(fk.encode_model({"t": t})).tensors["t"]
    np.testing.assert_array_equal(out, t.numpy())


def test_codec_class_config_and_out():
    codec = fk.SparseCodec(values="bf16")
    again = fk.SparseCodec.from_config(codec.get_config())
    assert again == codec and codec.get_config()["id"] == "feddip_sparse"
    a = np.zeros((5, 7), np.float32)
    a[1, 2] = 3.0
    out = np.empty_like(a)
    assert again.decode(codec.encode(a), out=out) is out
    np.testing.assert_array_equal(out, a)
    with pytest.raises(ValueError):
        fk.SparseCodec(positions="zip")


def test_numcodecs_finds_the_codec_by_id():
    # Through the "numcodecs.codecs" entry point (pyproject.toml) or the registration on import.
    numcodecs = pytest.importorskip("numcodecs")
    codec = numcodecs.get_codec({"id": "feddip_sparse", "values": "fp16"})
    assert isinstance(codec, fk.SparseCodec) and codec.values == "fp16"
    a = np.zeros((4, 25), np.float32)
    a[1, 3] = 1.5
    np.testing.assert_array_equal(codec.decode(codec.encode(a)), a)
    assert numcodecs.get_codec(codec.get_config()) == codec


# ----------------------------------------------------------------- untrusted input


def _sample_messages() -> list[tuple[bytes, dict | None]]:
    """(message, reference mask) pairs of every kind: positions in the tensor or relative to a shared
    mask (values only, or a subset of it), every value codec, empty and 0-d tensors."""
    rng = np.random.default_rng(6)
    shapes = [(20, 30), (100,), (3, 4, 5), (0,), ()]
    w = {f"t{i}": rng.standard_normal(s).astype(np.float32) * (rng.random(s) < 0.1) for i, s in enumerate(shapes)}
    w["d"] = rng.standard_normal((6, 7))
    shared = {k: rng.random(v.shape) < 0.3 for k, v in w.items()}
    subset = {k: m & (rng.random(m.shape) < 0.5) for k, m in shared.items()}
    out: list[tuple[bytes, dict | None]] = [(fk.encode_model(w, positions=p), None) for p in ["bitmask", "csr", "golomb", "auto"]]
    for values in ["raw", "fp16", "bf16", "int8"]:
        out.append((fk.encode_model(w, masks=shared, reference=shared, values=values), shared))
        out.append((fk.encode_model(w, masks=subset, reference=shared, values=values), shared))
    return out


MESSAGES = _sample_messages()


def _reseal(body: bytes) -> bytes:
    return body + struct.pack("<I", codecs.crc32c(body))


def mutated_body(msg: bytes, data) -> bytearray:
    """The message without its checksum, one to four bytes overwritten as hypothesis draws."""
    body = bytearray(msg[:-4])
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(body) - 1))
        body[i] = data.draw(st.integers(0, 255))
    return body


@settings(suppress_health_check=[HealthCheck.too_slow], max_examples=300)
@given(st.sampled_from(MESSAGES), st.data())
def test_fuzz_mutations_raise_codec_error_only(case, data):
    msg, reference = case
    body = mutated_body(msg, data)
    for sealed in (_reseal(bytes(body)), bytes(body) + msg[-4:]):
        for ref in (reference, None):
            try:
                out = fk.decode_model(sealed, reference=ref, max_bytes=1 << 24)
            except fk.CodecError:
                continue
            assert all(t.size * t.itemsize <= 1 << 24 for t in out.tensors.values())


@given(st.sampled_from(MESSAGES), st.data())
def test_fuzz_truncation(case, data):
    msg, reference = case
    cut = data.draw(st.integers(0, len(msg) - 1))
    with pytest.raises(fk.CodecError):
        fk.decode_model(msg[:cut], reference=reference)
    with pytest.raises(fk.CodecError):
        fk.decode_model(_reseal(msg[: max(0, cut - 4)]), reference=reference)


def test_reference_of_another_shape_is_a_codec_error():
    # Found by fuzzing: a message whose shape disagrees with the receiver's mask raised ValueError.
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    shared = {"a": a > 5}
    msg = fk.encode_model({"a": a}, masks=shared, reference=shared)
    with pytest.raises(fk.CodecError, match="elements"):
        fk.decode_model(msg, reference={"a": np.ones(10, bool)})


@given(st.binary(max_size=200))
def test_fuzz_random_bytes(blob):
    with pytest.raises(fk.CodecError):
        fk.decode_model(blob)
    sealed = _reseal(codecs.MAGIC + bytes([1, 0, 0, 0]) + blob)
    try:
        fk.decode_model(sealed, max_bytes=1 << 20)
    except fk.CodecError:
        pass


def test_size_limit_checked_before_allocating():
    huge = bytearray(fk.encode_model({"w": np.zeros(4, np.float32)}))
    body = huge[:-4]
    # shape u64 sits after header (12) + name_len (2) + name (1) + ndim (1)
    struct.pack_into("<Q", body, 16, 1 << 60)
    with pytest.raises(fk.CodecError, match="exceed max_bytes=2147483648; pass a larger max_bytes to decode_model"):
        fk.decode_model(_reseal(bytes(body)))
    with pytest.raises(fk.CodecError, match="max_bytes=100"):
        fk.decode_model(fk.encode_model({"w": np.zeros(1000, np.float32)}), max_bytes=100)


def test_bad_header_fields():
    msg = fk.encode_model({"w": np.ones(4, np.float32)})
    with pytest.raises(fk.CodecError, match="magic"):
        fk.decode_model(_reseal(b"XXXX" + msg[4:-4]))
    with pytest.raises(fk.CodecError, match="version"):
        fk.decode_model(_reseal(msg[:4] + b"\x09" + msg[5:-4]))
    with pytest.raises(fk.CodecError, match="checksum"):
        fk.decode_model(msg[:-1] + bytes([msg[-1] ^ 1]))
    with pytest.raises(fk.CodecError, match="unexpected bytes"):
        fk.decode_model(_reseal(msg[:-4] + b"\x00"))


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


def test_decode_into_existing_arrays():
    rng = np.random.default_rng(8)
    w = {"a": rng.standard_normal((30, 40)).astype(np.float32) * (rng.random((30, 40)) < 0.1), "b": np.arange(5.0)}
    out = {"a": np.full((30, 40), 7.0, np.float32)}
    decoded = fk.decode_model(fk.encode_model(w), out=out)
    assert decoded.tensors["a"] is out["a"]
    np.testing.assert_array_equal(out["a"], w["a"])
    np.testing.assert_array_equal(decoded.tensors["b"], w["b"])
    with pytest.raises(TypeError, match="dtype"):
        fk.decode_model(fk.encode_model(w), out={"a": np.zeros((30, 40))})
    with pytest.raises(ValueError, match="elements"):
        fk.decode_model(fk.encode_model(w), out={"a": np.zeros(3, np.float32)})


# ------------------------------------------------------------- backends agree


@given(sparse_arrays(), st.sampled_from(POSITIONS), st.sampled_from(["raw", "bf16"]))
def test_every_backend_encodes_the_same_bytes(backend, a, positions, values):
    tensors = {"w": a, "v": np.linspace(-1, 1, 11)}
    msg = fk.encode_model(tensors, positions=positions, values=values, backend=backend)
    assert msg == fk.encode_model(tensors, positions=positions, values=values, backend="numpy")
    out = fk.decode_model(msg, backend=backend)
    ref = fk.decode_model(msg, backend="numpy")
    for k in tensors:
        np.testing.assert_array_equal(out.tensors[k], ref.tensors[k])
        np.testing.assert_array_equal(out.masks[k], ref.masks[k])


def test_crc32c_check_value(backend):
    assert codecs.crc32c(b"123456789", backend=backend) == 0xE3069283
    assert codecs.crc32c(b"56789", codecs.crc32c(b"1234", backend=backend), backend=backend) == 0xE3069283
    assert codecs.crc32c(b"", backend=backend) == 0


@pytest.mark.parametrize("n", [8 * 4096 * 3 - 1, 4096 * 3, 4096 * 3 + 13, 100_003])
def test_crc32c_lanes_match_the_reference(backend, n):
    # The native CRC runs three 4 KiB lanes side by side from 12 KiB and joins their registers.
    data = np.random.default_rng(n).integers(0, 256, n, dtype=np.uint8).tobytes()
    want = reference.crc32c(data)
    assert codecs.crc32c(data, backend=backend) == want
    assert codecs.crc32c(data[n // 3:], codecs.crc32c(data[: n // 3], backend=backend), backend=backend) == want


def test_crc32c_in_pieces_a_thread_is_exact():
    # From 256 KiB the native CRC takes a piece a thread and joins them: every thread count and
    # every starting register give the one-thread result.
    native = pytest.importorskip("feddip_kernels._core")
    rng = np.random.default_rng(3)
    try:
        for n in ((1 << 18) - 1, 1 << 18, (1 << 18) + 7, 3_000_017):
            data = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
            results = set()
            for threads in (1, 2, 3, 5):
                fk.set_num_threads(threads)
                results.add((native.crc32c(data), native.crc32c(data, 0x12345678)))
            assert len(results) == 1, n
            fk.set_num_threads(1)
            assert results.pop()[0] == native.crc32c(data[n // 2:], native.crc32c(data[: n // 2]))
    finally:
        fk.set_num_threads(0)


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


def test_fuzz_campaign_tool_runs_clean():
    # tools/fuzz_codecs.py is the long campaign (run it for minutes); here two seconds of it.
    import subprocess
    import sys
    from pathlib import Path

    tool = Path(__file__).resolve().parent.parent / "tools" / "fuzz_codecs.py"
    done = subprocess.run([sys.executable, str(tool), "--seconds", "2", "--seed", "7"], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert done.stdout.strip().endswith(" 0 failures")


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


def _misaligned(a: np.ndarray) -> np.ndarray:
    buf = bytearray(a.nbytes + 1)
    out = np.frombuffer(buf, dtype=a.dtype, count=a.size, offset=1).reshape(a.shape)
    out[...] = a
    assert not out.flags.aligned or a.itemsize == 1
    return out


def test_misaligned_inputs_are_read_through_aligned_copies(backend):
    # Views into byte buffers at odd offsets are valid NumPy arrays; native kernels must not read
    # them in place (undefined behaviour in C++, found with -fsanitize=undefined).
    rng = np.random.default_rng(8)
    a = (rng.standard_normal((7, 9)) * (rng.random((7, 9)) < 0.3)).astype(np.float32)
    msg = fk.encode_model({"a": _misaligned(a)}, backend=backend)
    assert msg == fk.encode_model({"a": a}, backend=backend)
    np.testing.assert_array_equal(fk.decode_model(msg, backend=backend).tensors["a"], a)
    assert fk.global_magnitude_threshold([_misaligned(a)], 5, backend=backend) == fk.global_magnitude_threshold([a], 5)
    w1, w2 = a.copy(), a.copy()
    fk.masked_ef_step(w1, a, a != 0, lr=0.1, backend=backend)
    fk.masked_ef_step(w2, _misaligned(a), _misaligned(a != 0), lr=0.1, backend=backend)
    np.testing.assert_array_equal(w1, w2)
    with pytest.raises(ValueError, match="aligned"):
        fk.masked_ef_step(_misaligned(a), a, lr=0.1, backend=backend)


# --------------------------------------------------------------- audit regressions


def _record_offsets(msg: bytes) -> dict:
    """Byte offsets of the first record's fields (name and shape of any length)."""
    name_len = struct.unpack_from("<H", msg, 12)[0]
    ndim = msg[14 + name_len]
    shape_at = 15 + name_len
    fields = shape_at + 8 * ndim
    return {"shape": shape_at, "domain": fields + 1, "positions": fields + 2}


def test_shape_whose_size_overflows_is_a_codec_error():
    # (0, 2**62) holds no element, so the size check passed, and NumPy refused the shape later.
    body = bytearray(fk.encode_model({"w": np.zeros((0, 3), np.float32)})[:-4])
    struct.pack_into("<Q", body, _record_offsets(bytes(body))["shape"] + 8, 1 << 62)
    with pytest.raises(fk.CodecError, match="too large"):
        fk.decode_model(_reseal(bytes(body)))
    fine = fk.decode_model(fk.encode_model({"w": np.zeros((0, 1 << 20), np.float32)}))
    assert fine.tensors["w"].shape == (0, 1 << 20)


@pytest.mark.parametrize("positions", ["bitmask", "csr", "golomb", "all"])
def test_nothing_returned_aliases_the_message(positions):
    a = np.arange(1, 101, dtype=np.float32) * (np.arange(100) % 3 == 0)
    if positions == "all":
        a = np.arange(1, 101, dtype=np.float32)
    buf = bytearray(fk.encode_model({"w": a}, positions=positions))
    out = fk.decode_model(buf)
    buf[:] = bytes(len(buf))  # the caller reuses its buffer
    np.testing.assert_array_equal(out.masks["w"], a != 0)
    np.testing.assert_array_equal(fk.unpack_mask(out.packed["w"], 100), a != 0)
    np.testing.assert_array_equal(out.tensors["w"], a)


def test_nonzero_reserved_header_field_is_rejected():
    msg = fk.encode_model({"w": np.ones(4, np.float32)})
    with pytest.raises(fk.CodecError, match="reserved"):
        fk.decode_model(_reseal(msg[:6] + b"\x01\x00" + msg[8:-4]))


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


def test_out_arrays_must_not_overlap():
    msg = fk.encode_model({"a": np.ones(8, np.float32), "b": np.ones(8, np.float32)})
    block = np.zeros(12, np.float32)
    with pytest.raises(ValueError, match="share memory"):
        fk.decode_model(msg, out={"a": block[:8], "b": block[4:]})
    msg = fk.encode_model({"a": np.ones(2, np.float32)}, positions="bitmask")
    store = np.frombuffer(bytearray(msg), dtype=np.uint8)
    with pytest.raises(ValueError, match="share memory"):  # decoding over the message's own bytes
        fk.decode_model(store, out={"a": store[16:24].view(np.float32)})


@pytest.mark.parametrize("count", [3, 40])  # a few out arrays checked pair by pair, many by sorted ranges
def test_out_arrays_of_many_tensors_must_not_overlap(count):
    model = {f"t{i}": np.full(8, i, np.float32) for i in range(count)}
    msg = fk.encode_model(model)
    block = np.zeros(8 * count + 8, np.float32)
    out = {f"t{i}": block[8 * i : 8 * i + 8] for i in range(count)}  # adjacent, disjoint: fine
    fk.decode_model(msg, out=out)
    np.testing.assert_array_equal(block[: 8 * count], np.repeat(np.arange(count, dtype=np.float32), 8))
    for a, b, start in ((0, count - 1, 4), (count // 2, 1, 8 * (count // 2) - 1)):  # a partial overlap, anywhere
        bad = dict(out, **{f"t{b}": block[start : start + 8]})
        with pytest.raises(ValueError, match="share memory"):
            fk.decode_model(msg, out=bad)


# Every binding that reads a buffer, given views whose bytes are not ptr .. ptr + size: the
# native module must refuse them or read them right, never read outside the view.
def _strided_views():
    base = np.arange(256, dtype=np.uint8)
    return {
        "reversed": memoryview(base)[::-1],
        "stepped": memoryview(base)[::3],
        "offset": memoryview(base)[5:133],
        "2-d column": memoryview(base.reshape(16, 16)[:, 3]),
        "numpy reversed": base[::-1],
    }


@pytest.mark.parametrize("kind", list(_strided_views()))
def test_native_bindings_never_read_outside_a_strided_view(kind):
    from feddip_kernels import _core

    view = _strided_views()[kind]
    logical = np.asarray(view).tobytes()
    bits = np.frombuffer(logical, np.uint8)
    calls = {
        "crc32c": (lambda v: _core.crc32c(v), lambda: reference.crc32c(logical)),
        "golomb_decode": (lambda v: bytes(_core.golomb_decode(v, 8 * len(logical), 3, 1)),
                          lambda: bytes(_core.golomb_decode(logical, 8 * len(logical), 3, 1))),
        "golomb_decode_many": (lambda v: bytes(_core.golomb_decode_many([(v, 8 * len(logical), 3, 1)])[0][0]),
                               lambda: bytes(_core.golomb_decode_many([(logical, 8 * len(logical), 3, 1)])[0][0])),
        "pack_bits": (lambda v: bytes(_core.pack_bits(np.asarray(v).view(bool))),
                      lambda: bytes(_core.pack_bits(bits.astype(bool)))),
        "unpack_bits": (lambda v: _core.unpack_bits(np.asarray(v), 8 * len(logical)).tobytes(),
                        lambda: _core.unpack_bits(bits, 8 * len(logical)).tobytes()),
        "count_bits": (lambda v: _core.count_bits(np.asarray(v), 8 * len(logical)),
                       lambda: _core.count_bits(bits, 8 * len(logical))),
        "golomb_encode": (lambda v: _core.golomb_encode(np.asarray(v), 8 * len(logical), 4),
                          lambda: _core.golomb_encode(bits, 8 * len(logical), 4)),
        "densify": (lambda v: _core.densify(np.asarray(v), 8 * len(logical), np.ones(int(np.unpackbits(bits).sum()), np.float32)).tobytes(),
                    lambda: _core.densify(bits, 8 * len(logical), np.ones(int(np.unpackbits(bits).sum()), np.float32)).tobytes()),
    }
    def outcome(f, *args):
        try:
            return f(*args)
        except ValueError as e:
            return f"ValueError: {e}"

    for name, (native, expected) in calls.items():
        got = outcome(native, view)
        if not (isinstance(got, str) and "contiguous" in got):  # refused, or read right
            assert got == outcome(expected), name
    # The public function reads any view in logical order, the same in every backend.
    for be in fk.available_backends():
        assert codecs.crc32c(view, backend=be) == reference.crc32c(logical)


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


def test_coverage_guided_fuzzing_short_run(tmp_path):
    # tools/fuzz_atheris.py: libFuzzer through atheris, from the committed seed corpus (copied, as
    # libFuzzer adds the inputs it finds to its corpus directory). Any crash fails the run.
    pytest.importorskip("atheris")
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).parent.parent
    corpus = tmp_path / "corpus"
    shutil.copytree(root / "tests" / "fuzz_corpus", corpus)
    run = subprocess.run(
        [sys.executable, str(root / "tools" / "fuzz_atheris.py"), "-max_total_time=8", "-timeout=20", str(corpus)],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    assert "Done" in run.stderr and not list(tmp_path.glob("crash-*"))
    assert len(list(corpus.iterdir())) >= 44


def test_expected_schema_is_checked_before_allocating():
    w = {"a": np.ones((3, 4), np.float32), "b": np.ones(5)}
    msg = fk.encode_model(w)
    schema = {"a": ((3, 4), np.float32), "b": ((5,), np.float64)}
    out = fk.decode_model(msg, expect=schema)
    assert set(out.tensors) == {"a", "b"}
    bad = [({"a": ((3, 4), np.float32)}, "other tensors"), ({**schema, "c": ((1,), np.float32)}, "missing \\['c'\\]"),
           ({**schema, "a": ((4, 3), np.float32)}, "expected \\(4, 3\\)"), ({**schema, "b": ((5,), np.float32)}, "float32")]
    for expect, match in bad:
        with pytest.raises(fk.CodecError, match=match):
            fk.decode_model(msg, expect=expect, max_bytes=100)  # refused by the schema, not the limit


def _conformance_arrays():
    rng = np.random.default_rng(11)
    out = []
    for dtype in (np.float32, np.float64):
        a = rng.standard_normal((20, 30)).astype(dtype) * (rng.random((20, 30)) < 0.1)
        out += [a, np.asfortranarray(a), a.reshape(-1), np.zeros(7, dtype), np.asfortranarray(a.reshape(4, 5, 30))]
    return out


@pytest.mark.parametrize("index", range(10))
def test_numcodecs_conformance(index, tmp_path, monkeypatch):
    # numcodecs' own helpers, for the lossless settings (issue 14): arrays of either order, raw
    # buffers read through the dtype setting, `out` of any layout or any writable buffer.
    pytest.importorskip("numcodecs")
    from numcodecs.tests.common import check_config, check_encode_decode, check_encode_decode_array, check_repr

    arr = _conformance_arrays()[index]
    for positions in ("auto", "bitmask", "golomb"):
        codec = fk.SparseCodec(positions=positions, dtype=arr.dtype.str)
        check_encode_decode(arr, codec)
        check_encode_decode_array(arr, codec)
        check_config(codec)
    import numcodecs.tests.common as common

    monkeypatch.setattr(common, "SparseCodec", fk.SparseCodec, raising=False)  # check_repr evals in its module
    check_repr("SparseCodec(positions='auto', values='raw')")
    check_repr("SparseCodec(positions='golomb', values='fp16', max_bytes=1000, dtype='<f4')")
    with pytest.raises(TypeError, match="dtype"):
        fk.SparseCodec().encode(arr.tobytes())


def test_numcodecs_backwards_compatibility(monkeypatch):
    # Encoded fixtures kept in tests/fixture/feddip_sparse must still decode to their arrays.
    pytest.importorskip("numcodecs")
    from pathlib import Path

    from numcodecs.tests.common import check_backwards_compatibility

    monkeypatch.chdir(Path(__file__).parent)
    codecs_ = [fk.SparseCodec(), fk.SparseCodec(positions="bitmask"), fk.SparseCodec(positions="golomb", dtype="<f8")]
    check_backwards_compatibility(fk.SparseCodec.codec_id, _conformance_arrays()[:4], codecs_)


# ------------------------------------------------------------------ version 2: chunked positions


@pytest.fixture
def small_chunks(monkeypatch):
    """Runs of 64 elements, so that small tensors take the chunked (version 2) layout."""
    monkeypatch.setattr(codecs.model, "CHUNK_ELEMS", 64)
    return 64


@given(sparse_arrays(), st.sampled_from(["auto", "golomb", "bitmask"]))
def test_chunked_messages_round_trip_in_every_backend(a, positions):
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(codecs.model, "CHUNK_ELEMS", 8)  # hypothesis' arrays (up to 729 elements) span runs
        msgs = {be: fk.encode_model({"w": a, "b": np.ones(5, np.float32)}, positions=positions, backend=be)
                for be in fk.available_backends()}
        assert len(set(msgs.values())) == 1  # the same bytes from every backend
        msg = next(iter(msgs.values()))
        assert msg[4] == (2 if positions == "golomb" and a.size > 8 else 1 if positions == "bitmask" else msg[4])
        for be in fk.available_backends():
            out = fk.decode_model(msg, backend=be)
            np.testing.assert_array_equal(out.tensors["w"], a)
            np.testing.assert_array_equal(out.masks["w"], a != 0)


def test_version_follows_chunking_and_version_1_still_decodes(small_chunks):
    rng = np.random.default_rng(3)
    w = np.where(rng.random(1000) < 0.05, rng.standard_normal(1000), 0).astype(np.float32)
    v2 = fk.encode_model({"w": w}, positions="golomb")
    assert v2[4] == 2
    assert fk.encode_model({"w": w[:64]}, positions="golomb")[4] == 1  # one run: version 1
    assert fk.encode_model({"w": w}, positions="bitmask")[4] == 1
    codecs.model.CHUNK_ELEMS = 1 << 22
    v1 = fk.encode_model({"w": w}, positions="golomb")
    assert v1[4] == 1
    for msg in (v1, v2):
        np.testing.assert_array_equal(fk.decode_model(msg).tensors["w"], w)


def test_a_large_tensor_in_runs_costs_under_half_a_percent_more():
    rng = np.random.default_rng(5)
    n = 3 * (1 << 22) + 12345
    w = np.zeros(n, np.float32)
    idx = rng.choice(n, n // 20, replace=False)
    w[idx] = rng.standard_normal(idx.size).astype(np.float32)
    v2 = fk.encode_model({"w": w})
    assert v2[4] == 2
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(codecs.model, "CHUNK_ELEMS", 1 << 30)
        v1 = fk.encode_model({"w": w})
    assert v1[4] == 1 and len(v2) <= 1.005 * len(v1)
    np.testing.assert_array_equal(fk.decode_model(v2).tensors["w"], w)
    out = np.full(n, 7.0, np.float32)
    fk.decode_model(v2, out={"w": out})
    np.testing.assert_array_equal(out, w)


def _chunk_table_at(msg: bytes) -> int:
    """Offset of the first record's chunk table in a one-tensor message named "w" of ndim 1."""
    return codecs.format.HEADER.size + 2 + 1 + 1 + 8 + codecs.format.RECORD.size + 4


@pytest.mark.parametrize("field, value, match", [
    (0, 63, "chunk 0 has size"),  # not a multiple of 8
    (0, 0, "chunk 0 has size"),
    (1, 65, "chunk 0 has size"),  # more positions than elements
    (2, 0, "parameter 0"),
    (0, 72, "add up"),
    (3, 10**9, "add up"),
])
def test_inconsistent_chunk_tables_are_refused(small_chunks, field, value, match):
    rng = np.random.default_rng(1)
    w = np.where(rng.random(300) < 0.1, 1.0, 0.0).astype(np.float32)
    msg = bytearray(fk.encode_model({"w": w}, positions="golomb")[:-4])
    at = _chunk_table_at(msg)
    assert struct.unpack_from("<I", msg, at - 4)[0] == 5  # 300 elements in runs of 64
    entry = list(codecs.format.CHUNK.unpack_from(msg, at))
    entry[field] = value
    codecs.format.CHUNK.pack_into(msg, at, *entry)
    with pytest.raises(fk.CodecError, match=match):
        fk.decode_model(_reseal(bytes(msg)))


def test_chunks_are_only_for_golomb_in_the_own_index_space(small_chunks):
    rng = np.random.default_rng(2)
    w = np.where(rng.random(300) < 0.1, 1.0, 0.0).astype(np.float32)
    msg = bytearray(fk.encode_model({"w": w}, positions="golomb")[:-4])
    rec_at = codecs.format.HEADER.size + 2 + 1 + 1 + 8
    fields = list(codecs.format.RECORD.unpack_from(msg, rec_at))
    for i, v in ((2, codecs.POSITIONS["bitmask"]), (8, 3)):  # positions codec; the record's Golomb parameter
        bad = bytearray(msg)
        f = list(fields)
        f[i] = v
        codecs.format.RECORD.pack_into(bad, rec_at, *f)
        with pytest.raises(fk.CodecError, match="chunks are for Golomb"):
            fk.decode_model(_reseal(bytes(bad)))
    # A version 1 reader's view: the same bytes labelled version 1 do not parse.
    bad = bytearray(msg)
    bad[4] = 1
    with pytest.raises(fk.CodecError):
        fk.decode_model(_reseal(bytes(bad)))


@pytest.mark.parametrize("sizes", [[], [0], [5, 0, 9], [1 << 18, 3, (1 << 18) + 5], [3_000_001, 77, 1_000_003]])
def test_join_crc32c_matches_the_reference(backend, sizes):
    # The native join copies pieces of 256 KiB on every thread and checksums each copy; the
    # registers are joined in order. Every thread count gives the one message.
    rng = np.random.default_rng(len(sizes))
    parts = [rng.integers(0, 256, s, dtype=np.uint8) for s in sizes]
    body = b"".join(p.tobytes() for p in parts)
    want = body + reference.crc32c(body).to_bytes(4, "little") if sum(sizes) < 100_000 else None
    k = _backend.kernels(backend)
    try:
        got = set()
        for threads in (1, 2, 3):
            fk.set_num_threads(threads)
            got.add(k.join_crc32c([*parts[:1], *(p.tobytes() for p in parts[1:])]))
    finally:
        fk.set_num_threads(0)
    assert len(got) == 1
    msg = got.pop()
    assert msg[:-4] == body and int.from_bytes(msg[-4:], "little") == k.crc32c(body)
    if want is not None:
        assert msg == want


# ------------------------------------------------- signed zeros: lossless is bit for bit (issue 23)

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


def _bits(a) -> bytes:
    return np.ascontiguousarray(a).tobytes()


def _negative_zeros(a: np.ndarray) -> np.ndarray:
    return np.signbit(a) & (a == 0)


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


@settings(suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(bit_patterns(), st.sampled_from([*POSITIONS, "all"]), st.sampled_from(["values", "reference", "mask", "mask+signs"]),
       st.booleans(), st.booleans(), st.data())
def test_lossless_settings_give_back_the_same_bytes(a, positions, mode, chunked, into, data):
    """Every lossless setting (raw values) in every backend, every positions codec, chunked
    (version 2) or not, decoded fresh or into buffers: without a mask the same bytes come back;
    with one, its values do (+0.0 elsewhere), and all the bytes with signed_zeros=True when only
    zeros lie outside it."""
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    with np.errstate(invalid="ignore"):
        nonzero = a != 0  # NaN is non-zero; -0.0 is not
    extra = rng.random(a.shape) < 0.3
    kw: dict = {"positions": positions}
    keep, want, signed = nonzero, a, True
    if mode == "reference":  # positions a subset of a shared mask (all of it for "all"): coded relative to it
        ref = nonzero if positions == "all" else nonzero | extra
        kw.update(reference={"w": ref})
    elif mode == "mask":
        keep = np.ones(a.shape, bool) if positions == "all" else extra
        kw.update(masks={"w": keep})
        want, signed = np.where(keep, a, np.zeros((), a.dtype)), False
    elif mode == "mask+signs":
        keep = np.ones(a.shape, bool) if positions == "all" else nonzero | extra
        kw.update(masks={"w": keep}, signed_zeros=True)
    # "all" needs every element of the domain kept; CSR codes the tensor's own index space only.
    if (positions, mode) == ("csr", "reference") or ((positions, mode) == ("all", "values") and not nonzero.all()):
        with pytest.raises(ValueError, match="not available"):
            fk.encode_model({"w": a}, **kw)
        return
    tensors = {"w": a, "b": np.ones(3, np.float32)}
    with pytest.MonkeyPatch.context() as mp:
        if chunked:
            mp.setattr(codecs.model, "CHUNK_ELEMS", 8)
        msgs = {be: fk.encode_model(tensors, backend=be, **kw) for be in fk.available_backends()}
    assert len(set(msgs.values())) == 1  # the same bytes from every backend
    msg = msgs["numpy"]
    assert msg[5] == int(signed and bool((_negative_zeros(a) & ~keep).any()))  # flagged only when -0.0 are sent
    for be in fk.available_backends():
        out = {"w": np.full(a.shape, np.nan, a.dtype)} if into else None
        got = fk.decode_model(msg, reference=kw.get("reference"), out=out, backend=be)
        assert got.tensors["w"].dtype == a.dtype and got.tensors["w"].shape == a.shape
        assert _bits(got.tensors["w"]) == _bits(want)
        assert _bits(got.tensors["b"]) == _bits(tensors["b"])
        np.testing.assert_array_equal(got.masks["w"], keep)  # -0.0 are zeros, not positions


# Sizes about the native loops' edges: a byte of bits (8), an AVX2 step (32), a word (64), a span
# of 2^16 elements, and 2^18, from which the spans run on several threads.
_SPARSIFY_SIZES = [0, 1, 7, 8, 9, 31, 32, 33, 63, 64, 65, 1000, (1 << 16) - 1, 1 << 16, (1 << 16) + 9,
                   (1 << 18) - 1, 1 << 18, (1 << 18) + 7, 5 * (1 << 16) + 33]
# Bit patterns next to -0.0's (the sign bit alone) that are not -0.0: -NaN (0xFFC00000 and one
# with a payload), the smallest and largest negative subnormals, -inf, and +0.0.
_LOOKALIKES = {
    np.dtype(np.float32): [0xFFC00000, 0xFFC12345, 0x80000001, 0x807FFFFF, 0xFF800000, 0],
    np.dtype(np.float64): [0xFFF8000000000000, 0xFFF8123456789ABC, 0x8000000000000001, 0x800FFFFFFFFFFFFF,
                           0xFFF0000000000000, 0],
}


@st.composite
def negative_zero_cases(draw):
    """(flat array, mask or None, whether it holds -0.0): mostly +0.0 with some normal numbers
    and look-alikes, some at drawn places (first, last, a span's edges), and -0.0 at a few drawn
    places or none."""
    dtype = np.dtype(draw(st.sampled_from([np.float32, np.float64])))
    n = draw(st.sampled_from(_SPARSIFY_SIZES))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    a = np.where(rng.random(n) < draw(st.sampled_from([0.0, 0.05, 1.0])), rng.standard_normal(n), 0.0).astype(dtype)
    ints = a.view(_UINT[dtype])
    looks = np.array(_LOOKALIKES[dtype], dtype=_UINT[dtype])
    pick = rng.random(n) < draw(st.sampled_from([0.0, 0.01, 0.5]))
    ints[pick] = looks[rng.integers(0, looks.size, int(pick.sum()))]
    if not n:
        return a, None, False
    edges = [i for i in (0, n - 1, n // 2, (1 << 16) - 1, 1 << 16, 3 << 16, n - 33) if 0 <= i < n]
    places = st.one_of(st.sampled_from(edges), st.integers(0, n - 1))
    for i, look in draw(st.lists(st.tuples(places, st.sampled_from(_LOOKALIKES[dtype])), max_size=3)):
        ints[i] = look
    at = draw(st.lists(places, max_size=3)) if draw(st.booleans()) else []
    ints[at] = _UINT[dtype](1) << _UINT[dtype](8 * dtype.itemsize - 1)
    mask = rng.random(n) < 0.3 if draw(st.booleans()) else None
    return a, mask, bool(at)


def _check_sparsify_negative_zeros(backend: str, a: np.ndarray, mask, has_negative: bool) -> None:
    """sparsify(..., negative_zeros=True) in a backend (the native one with each of its loops)
    against the NumPy reference: the same positions and values as the plain call, and the packed
    -0.0 or None; only the sign bit alone is -0.0."""
    want_bits, want_vals, want = reference.sparsify(a, mask, negative_zeros=True)
    assert (want is None) == (not has_negative)
    if want is not None:
        np.testing.assert_array_equal(np.unpackbits(want, count=a.size, bitorder="little").astype(bool),
                                      a.view(_UINT[a.dtype]) == _UINT[a.dtype](1) << _UINT[a.dtype](8 * a.itemsize - 1))
    k = _backend.kernels(backend)
    native = backend == "native"
    before = k._isa() if native else None
    try:
        for loops in (["avx2", "generic"] if native else [None]):
            if native and k._isa(loops) != loops:
                continue  # a CPU without AVX2 runs only the generic loop
            plain = k.sparsify(a, mask)
            assert len(plain) == 2
            assert plain[0].tobytes() == want_bits.tobytes() and plain[1].tobytes() == want_vals.tobytes()
            bits, vals, negative = k.sparsify(a, mask, negative_zeros=True)
            assert bits.tobytes() == want_bits.tobytes() and vals.tobytes() == want_vals.tobytes()
            assert (negative is None) == (want is None), loops
            if want is not None:
                assert negative.dtype == np.uint8 and negative.tobytes() == want.tobytes(), loops
    finally:
        if native:
            k._isa(before)


@settings(suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large], deadline=None)
@given(negative_zero_cases())
def test_sparsify_finds_negative_zeros_as_the_reference_does(backend, case):
    _check_sparsify_negative_zeros(backend, *case)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n", [1, 33, 1000, (1 << 18) + 7])
def test_look_alikes_of_negative_zero_are_not_found(backend, dtype, n):
    # Each look-alike alone among +0.0 (first, in the vector loop, last): none is -0.0; then a
    # -0.0 beside them is found.
    for look in _LOOKALIKES[np.dtype(dtype)]:
        for i in {0, n // 2, n - 1}:
            a = np.zeros(n, dtype)
            a.view(_UINT[np.dtype(dtype)])[i] = look
            _check_sparsify_negative_zeros(backend, a, None, False)
            if n > 1:
                a[(i + 1) % n] = -0.0
                _check_sparsify_negative_zeros(backend, a, None, True)


def test_a_cnn_pruned_by_multiplication_comes_back_bit_for_bit():
    # Issue 23, item 7: a state dict pruned as w * mask (as torch.nn.utils.prune does) holds -0.0
    # where negative weights were pruned; raw values gave them back as +0.0.
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3), torch.nn.ReLU(), torch.nn.Conv2d(16, 32, 3),
                              torch.nn.Flatten(), torch.nn.Linear(32 * 4 * 4, 10))
    masks = {name: torch.rand(w.shape) < 0.05 for name, w in net.state_dict().items()}
    sd = {name: w * masks[name] for name, w in net.state_dict().items()}
    assert sum(int(_negative_zeros(w.numpy()).sum()) for w in sd.values()) > 1000
    for kw in ({}, {"masks": masks, "signed_zeros": True}):
        out = fk.decode_model(fk.encode_model(sd, **kw)).tensors
        for name, w in sd.items():
            assert _bits(out[name]) == _bits(w.numpy()), name
    # A mask names what is sent: its values come back bit for bit, +0.0 elsewhere, unless asked.
    for kw in ({"masks": masks}, {"signed_zeros": False}):
        out = fk.decode_model(fk.encode_model(sd, **kw)).tensors
        for name, w in sd.items():
            assert _bits(out[name]) == _bits(torch.where(masks[name], w, torch.zeros(())).numpy()), name


def test_messages_without_negative_zeros_keep_their_bytes():
    # Length and checksum of the messages this library wrote before zero signs existed: where no
    # -0.0 is sent (none in the tensor, lossy values, or outside a mask) the bytes are unchanged,
    # flags 0, as readers that predate the flag read them.
    a = np.zeros((7, 9), np.float32)
    a.reshape(-1)[::5] = np.arange(13, dtype=np.float32) - 6
    a[0, 1], a[6, 8] = np.nan, -np.inf
    t = {"a": a, "b": np.arange(-5.0, 6.0), "c": np.zeros(0, np.float32)}
    signed = a.copy()
    signed[1, :] = -0.0
    mask = np.zeros(a.shape, bool)
    mask[::2] = True
    msgs = [fk.encode_model(t, positions=p) for p in ("auto", "bitmask", "csr", "golomb")]
    msgs.append(fk.encode_model({"a": signed}, masks={"a": mask}, reference={"a": mask}))
    msgs.append(fk.encode_model({"a": signed}, values="bf16"))
    assert [(len(m), int.from_bytes(m[-4:], "little")) for m in msgs] == [
        (343, 1121933166), (344, 195487206), (446, 3537115503), (343, 964543994), (226, 1917475183),
        (112, 3290057437)]
    assert all(m[5] == 0 for m in msgs)


def _signed(w: np.ndarray, **kw) -> tuple[bytearray, int]:
    """A message of one 1-d float32 tensor "w" without its checksum, and the offset of its
    zero-sign block."""
    msg = bytearray(fk.encode_model({"w": w}, **kw)[:-4])
    pos_len, val_len = struct.unpack_from("<QQ", msg, codecs.format.HEADER.size + 12 + codecs.format.RECORD.size - 16)
    return msg, codecs.format.HEADER.size + 12 + codecs.format.RECORD.size + pos_len + val_len


def _with_negative_zeros(n_zeros: int, negative: list[int]) -> np.ndarray:
    """1.0, 2.0, then n_zeros zeros, -0.0 at those indices among them."""
    w = np.concatenate([np.array([1.0, 2.0], np.float32), np.zeros(n_zeros, np.float32)])
    w[2 + np.array(negative, int)] = -0.0
    return w


def test_zero_sign_blocks_are_laid_out_as_documented():
    msg, at = _signed(_with_negative_zeros(8, [1, 3, 4, 5, 6]), positions="bitmask")
    rec = codecs.format.RECORD.unpack_from(msg, codecs.format.HEADER.size + 12)
    assert msg[4:6] == b"\x01\x01" and rec[4] == 1  # version 1, flag set; the record's signs byte
    codec, count, m, length = codecs.format.SIGNS.unpack_from(msg, at)
    assert (codec, count, m, length) == (codecs.POSITIONS["bitmask"], 5, 0, 2)
    assert msg[at + codecs.format.SIGNS.size :] == bytes([0b11101000, 0b1])  # elements 3, 5 to 8 of the 10
    every, at = _signed(-np.zeros(7, np.float32))
    assert codecs.format.SIGNS.unpack_from(every, at) == (codecs.POSITIONS["all"], 7, 0, 0)
    assert _bits(fk.decode_model(_reseal(bytes(every))).tensors["w"]) == _bits(-np.zeros(7, np.float32))
    sparse, at = _signed(_with_negative_zeros(5000, [7, 4000]))
    assert codecs.format.SIGNS.unpack_from(sparse, at)[:3] == (codecs.POSITIONS["golomb"], 2,
                                                               golomb_parameter(2, 5002))
    # Half of the zeros -0.0: a Golomb parameter of 1, which codes the bitmask itself; the bitmask is sent.
    half, at = _signed(_with_negative_zeros(1000, list(range(0, 1000, 2))), positions="golomb")
    assert codecs.format.SIGNS.unpack_from(half, at) == (codecs.POSITIONS["bitmask"], 500, 0, 126)


@pytest.mark.parametrize("values", ["fp16", "bf16", "int8"])
def test_lossy_values_send_negative_zeros_when_asked(values):
    w = _with_negative_zeros(40, list(range(0, 40, 3)))
    plain = fk.encode_model({"w": w}, values=values)  # lossy: by default the zeros come back +0.0
    assert plain[5] == 0 and not np.signbit(fk.decode_model(plain).tensors["w"]).any()
    signed = fk.decode_model(fk.encode_model({"w": w}, values=values, signed_zeros=True)).tensors["w"]
    np.testing.assert_array_equal(_negative_zeros(signed), _negative_zeros(w))


@pytest.mark.parametrize("field, value, match", [
    (0, codecs.POSITIONS["csr"], "unknown positions codec"),
    (0, 9, "unknown positions codec"),
    (0, codecs.POSITIONS["all"], "negative zeros for"),  # 5 of 10 elements are not all of them
    (1, 0, "negative zeros for"),
    (1, 9, "negative zeros for"),  # more than the 8 zeros
    (1, 4, "different number"),
    (3, 1, "bytes of bitmask"),
    (2, 3, "Golomb parameter"),
])
def test_inconsistent_zero_sign_blocks_are_refused(field, value, match):
    msg, at = _signed(_with_negative_zeros(8, [1, 3, 4, 5, 6]))
    fields = list(codecs.format.SIGNS.unpack_from(msg, at))
    fields[field] = value
    codecs.format.SIGNS.pack_into(msg, at, *fields)
    with pytest.raises(fk.CodecError, match="'w': zero signs: .*" + match):
        fk.decode_model(_reseal(bytes(msg)))


def test_zero_signs_at_value_positions_are_refused():
    msg, at = _signed(_with_negative_zeros(8, [1, 3, 4, 5, 6]))
    codec, count, m, length = codecs.format.SIGNS.unpack_from(msg, at)
    assert codec == codecs.POSITIONS["bitmask"]
    codecs.format.SIGNS.pack_into(msg, at, codec, count + 1, m, length)
    msg[at + codecs.format.SIGNS.size] |= 1  # element 0 holds 1.0
    with pytest.raises(fk.CodecError, match="'w': zero signs at positions that hold values"):
        fk.decode_model(_reseal(bytes(msg)))


def test_zero_signs_need_the_header_flag_and_a_known_code():
    msg, at = _signed(_with_negative_zeros(8, [1, 3, 4]))
    rec_at = codecs.format.HEADER.size + 12
    older = bytearray(msg)
    older[5] = 0  # the record's signs byte without the header's flag: a reserved byte
    with pytest.raises(fk.CodecError, match="reserved field"):
        fk.decode_model(_reseal(bytes(older)))
    other = bytearray(msg)
    other[rec_at + 4] = 2
    with pytest.raises(fk.CodecError, match="reserved field"):
        fk.decode_model(_reseal(bytes(other)))
    for flags in (0x02, 0x81):
        bad = bytearray(msg)
        bad[5] = flags
        with pytest.raises(fk.CodecError, match="unknown header flags"):
            fk.decode_model(_reseal(bytes(bad)))
    stream = io.BytesIO()
    fk.encode_stream({"w": np.zeros(4, np.float32)}, stream)
    flagged = bytearray(stream.getvalue()[:-4])
    flagged[5] = codecs.format.FLAG_ZERO_SIGNS  # not defined for version 3
    with pytest.raises(fk.CodecError, match="unknown header flags"):
        fk.decode_model(_reseal(bytes(flagged)))
    with pytest.raises(fk.CodecError, match="unknown header flags"):
        fk.decode_stream(io.BytesIO(_reseal(bytes(flagged))))


def test_corrupt_zero_sign_stream_names_its_tensor(backend):
    msg, at = _signed(_with_negative_zeros(5000, [7, 4000]))
    length = codecs.format.SIGNS.unpack_from(msg, at)[3]
    start = at + codecs.format.SIGNS.size
    msg[start : start + length] = bytes(length)  # all quotient bits: no position ends
    with pytest.raises(fk.CodecError, match="'w': zero signs"):
        fk.decode_model(_reseal(bytes(msg)), backend=backend)


def test_device_tensors_send_their_negative_zeros_as_host_arrays_do(monkeypatch):
    # CPU torch tensors routed through the device path (as tests/test_torch_kernels.py does).
    torch = pytest.importorskip("torch")
    monkeypatch.setattr(codecs.model, "on_device", lambda *xs: any(isinstance(x, torch.Tensor) for x in xs))
    rng = np.random.default_rng(9)
    host = {"conv": rng.standard_normal((16, 3, 3, 3)).astype(np.float32) * (rng.random((16, 3, 3, 3)) < 0.1),
            "fc": rng.standard_normal(1000) * (rng.random(1000) < 0.05), "neg": -np.zeros(13, np.float32),
            "plain": np.ones(5, np.float32), "empty": np.zeros(0)}
    masks = {"conv": host["conv"] != 0}
    dev = {k: torch.from_numpy(v) for k, v in host.items()}
    for kw in ({}, {"masks": masks}, {"masks": masks, "signed_zeros": True}, {"signed_zeros": False}):
        msg = fk.encode_model(dev, **kw)
        assert msg == fk.encode_model(host, **kw), kw
    assert msg[5] == 0  # signed_zeros=False: no zero-sign blocks, no flag
    out = fk.decode_model(fk.encode_model(dev)).tensors
    assert all(_bits(out[k]) == _bits(v) for k, v in host.items())
