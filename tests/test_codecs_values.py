"""The values codecs (docs/wire-format.md, `values`): the lossy ones' error bounds, and int8's scale."""

import numpy as np
import pytest
from codec_helpers import sparse_arrays
from hypothesis import given, strategies as st

import feddip_kernels as fk


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


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and np.array_equal(a.view(f"u{a.itemsize}"),
                                                                        b.view(f"u{b.itemsize}"))


VALUES = ["raw", "ans", "auto", "fp16", "bf16", "int8", "fp16-ans", "bf16-ans", "int2-ans", "int4-ans", "int8-ans"]


@given(st.lists(sparse_arrays(), min_size=1, max_size=4), st.sampled_from(VALUES),
       st.sampled_from(["nearest", "stochastic"]), st.sampled_from([None, True, False]), st.data())
def test_decoded_is_what_decode_model_gives(arrays, values, rounding, signed_zeros, data):
    """encode_model(decoded=True): the same message, and bit for bit the tensors decode_model gives
    back (quantised values, -0.0 off the positions, NaN payloads), for masks, reference masks and
    every backend, without decoding."""
    if values.startswith("int") and not all(np.isfinite(a).all() for a in arrays):
        values = "fp16"  # (the quantised codecs refuse non-finite values)
    if rounding == "stochastic" and not (values.startswith("int") and values.endswith("-ans")):
        rounding = "nearest"
    tensors = {f"t{i}": a for i, a in enumerate(arrays)}
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    masks = {k: rng.random(a.shape) < 0.5 for k, a in tensors.items() if data.draw(st.booleans())}
    reference = {k: m | (rng.random(m.shape) < 0.3) for k, m in masks.items() if data.draw(st.booleans())}
    kw = dict(masks=masks or None, reference=reference or None, values=values, rounding=rounding, seed=5,
              signed_zeros=signed_zeros)
    for backend in fk.available_backends():
        msg, decoded = fk.encode_model(tensors, backend=backend, decoded=True, **kw)
        assert msg == fk.encode_model(tensors, backend=backend, **kw)
        got = fk.decode_model(msg, reference=reference or None).tensors
        assert list(decoded) == list(got) and all(_same_bits(decoded[k], got[k]) for k in got)


def test_decoded_of_tensors_in_runs_and_of_other_dtypes():
    """A tensor of several runs (more than CHUNK_ELEMS elements) and tensors of other dtypes (their
    message decoded) come back as decode_model gives them; bfloat16, which NumPy cannot hold, is
    refused."""
    from feddip_kernels.codecs.format import CHUNK_ELEMS

    rng = np.random.default_rng(0)
    big = rng.standard_normal(CHUNK_ELEMS + 1000).astype(np.float32) * (rng.random(CHUNK_ELEMS + 1000) < 0.05)
    for tensors in ({"big": big}, {"big": big, "steps": np.arange(3, dtype=np.int64)}):
        msg, decoded = fk.encode_model(tensors, values="int4-ans", decoded=True)
        got = fk.decode_model(msg).tensors
        assert list(decoded) == list(got) and all(_same_bits(decoded[k], got[k]) for k in got)
    torch = pytest.importorskip("torch")
    with pytest.raises(ValueError, match="bfloat16"):
        fk.encode_model({"h": torch.zeros(3, dtype=torch.bfloat16)}, decoded=True)


def test_quantise_takes_0d_arrays():
    from feddip_kernels.codecs.values import quantise

    q, scale = quantise(np.array(3.0, np.float32), 4)
    assert int(q) == 7 and scale == pytest.approx(3.0 / 7)
