"""The numcodecs codec, SparseCodec (id "feddip_sparse"): its config, the registry, numcodecs' own
conformance helpers and the encoded fixtures in tests/fixture/feddip_sparse."""

import numpy as np
import pytest

import feddip_kernels as fk


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
    # The first three were written when "raw" was the default; the fourth with entropy-coded values.
    codecs_ = [fk.SparseCodec(values="raw"), fk.SparseCodec(positions="bitmask", values="raw"),
               fk.SparseCodec(positions="golomb", dtype="<f8", values="raw"), fk.SparseCodec(values="ans")]
    check_backwards_compatibility(fk.SparseCodec.codec_id, _conformance_arrays()[:4], codecs_)
