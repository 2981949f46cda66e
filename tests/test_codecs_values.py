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
