"""Whole messages (docs/wire-format.md: header, records, domains): lossless round trips, masks and
reference masks (domain 1), the compression ratio, the backends' agreement on the bytes, and what
decode_model returns and writes into."""

import numpy as np
import pytest
from codec_helpers import POSITIONS, sparse_arrays
from hypothesis import given, strategies as st

import feddip_kernels as fk


@given(sparse_arrays(), st.sampled_from(POSITIONS))
def test_lossless_round_trip(a, positions):
    msg = fk.encode_model({"w": a, "b": np.ones(3, np.float32)}, positions=positions)
    out = fk.decode_model(msg)
    assert out.tensors["w"].dtype == a.dtype and out.tensors["w"].shape == a.shape
    np.testing.assert_array_equal(out.tensors["w"], a)
    np.testing.assert_array_equal(out.masks["w"], a != 0)
    np.testing.assert_array_equal(out.tensors["b"], np.ones(3, np.float32))


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
    for _a, b, start in ((0, count - 1, 4), (count // 2, 1, 8 * (count // 2) - 1)):  # a partial overlap, anywhere
        bad = dict(out, **{f"t{b}": block[start : start + 8]})
        with pytest.raises(ValueError, match="share memory"):
            fk.decode_model(msg, out=bad)
