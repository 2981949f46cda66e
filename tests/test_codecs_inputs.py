"""What another framework hands the codecs (issue 29): a torch state_dict or a dict of arrays with
tensors of other dtypes than float32/float64 (BatchNorm's num_batches_tracked, bool, integers,
float16, bfloat16), which travel whole (docs/wire-format.md, "Other dtypes"); torch tensors out;
Decoded as a mapping; errors that name the problem (a list, a name that is no str, a dtype not
carried, torch.save bytes given to the decoder); and hostile bytes for the new records."""

import io
import math
import os
import struct
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from codec_helpers import _reseal, mutated_body
from hypothesis import HealthCheck, given, settings, strategies as st
from hypothesis.extra import numpy as hnp

import feddip_kernels as fk
from feddip_kernels import codecs
from feddip_kernels.codecs.format import HEADER, MAGIC, PLAIN_CODES, RECORD

# NumPy dtypes that travel whole, in both byte orders where they have one.
NUMPY_PLAIN = ["|b1", "|i1", "|u1", "<i2", ">i2", "<u2", "<i4", ">i4", "<u4", "<i8", ">i8", "<u8", "<f2", ">f2",
               "<c8", "<c16"]


def _random(dtype: np.dtype, shape: tuple, rng: np.random.Generator) -> np.ndarray:
    """An array of random bits of `dtype` (any pattern: NaN payloads, -0.0 of float16; bools 0/1)."""
    n = math.prod(shape)
    if dtype.kind == "b":
        return (rng.random(n) < 0.5).reshape(shape)
    return np.frombuffer(rng.bytes(n * dtype.itemsize), dtype=dtype).reshape(shape).copy()


def _same_numpy(got: np.ndarray, want: np.ndarray) -> None:
    """Same shape, the same dtype (in the host's byte order) and the same values bit for bit."""
    assert isinstance(got, np.ndarray)
    assert got.shape == want.shape and got.dtype == want.dtype.newbyteorder("=")
    assert got.tobytes() == want.astype(got.dtype).tobytes()


# ------------------------------------------------------------------------------- NumPy round trips


@given(st.sampled_from(NUMPY_PLAIN), hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=6),
       st.integers(0, 2**32 - 1), st.sampled_from(["raw", "ans", "int8", "fp16-ans"]))
def test_numpy_tensors_of_other_dtypes_round_trip_bit_for_bit(dtype, shape, seed, values):
    rng = np.random.default_rng(seed)
    a = _random(np.dtype(dtype), shape, rng)
    w = rng.standard_normal(shape).astype(np.float32) * (rng.random(shape) < 0.3)
    msg = fk.encode_model({"w": w, "x": a, "y": a[()] if a.ndim else a}, values=values)
    got = fk.decode_model(msg)
    assert list(got) == ["w", "x", "y"]  # the message's order, which is the input's
    _same_numpy(got["x"], a)
    _same_numpy(got["y"], a)
    assert set(got.masks) == {"w"}  # positions are the float tensors'; the others have none
    # the float tensor's record is what it is without the others around it
    alone = fk.decode_model(fk.encode_model({"w": w}, values=values))
    np.testing.assert_array_equal(got["w"], alone["w"])


def test_numpy_scalars_lists_and_every_backend():
    w = {"step": np.int64(7), "flags": np.array([True, False, True]), "half": np.float16(-0.0),
         "ids": np.arange(10, dtype=np.uint32).reshape(2, 5), "z": np.array([1 + 2j, np.nan], np.complex128),
         "big": np.array([2**63 - 1, -2**63], np.int64), "u64": np.array([2**64 - 1], np.uint64),
         "f": np.array([0.0, -0.0, 1.5], np.float32)}
    msgs = {be: fk.encode_model(w, backend=be) for be in fk.available_backends()}
    assert len(set(msgs.values())) == 1
    for be in fk.available_backends():
        got = fk.decode_model(msgs[be], backend=be)
        for k, v in w.items():
            _same_numpy(got[k], np.asarray(v))


def test_float_messages_are_byte_for_byte_as_before_and_old_fixtures_decode():
    # tests/fixture/feddip_sparse: messages written before this change (numcodecs' layout: codec.j's
    # encoded.i.dat is array i, flattened in memory order, through codec j). They decode to the same
    # bytes, and the raw ones (codecs 0 to 2) are what the encoder writes today, byte for byte: float
    # records are untouched. (Codec 3's entropy-coded blocks were written before the encoder's
    # lanes changed, commit 325c5e5: they decode, but today's bytes differ, as before this change.)
    root = Path(__file__).parent / "fixture" / "feddip_sparse"
    made = [fk.SparseCodec(values="raw"), fk.SparseCodec(positions="bitmask", values="raw"),
            fk.SparseCodec(positions="golomb", dtype="<f8", values="raw"), fk.SparseCodec(values="ans")]
    checked = 0
    for j, codec in enumerate(made):
        for path in sorted((root / f"codec.{j:02d}").glob("encoded.*.dat")):
            want = np.load(root / f"array.{int(path.name.split('.')[1]):02d}.npy")
            data = path.read_bytes()
            got = fk.decode_model(data)
            assert list(got) == [""] and data[4] == 1
            assert got[""].tobytes() == want.ravel(order="A").tobytes()
            if j < 3:
                assert codec.encode(want) == data
            checked += 1
    assert checked == 16


# ------------------------------------------------------------------------------- torch


def _bits(t) -> bytes:
    """A torch tensor's bytes (any dtype, bfloat16 and bool included)."""
    import torch

    t = t.detach().contiguous().reshape(-1)
    return t.view(torch.uint8).numpy().tobytes()


def _net():
    import torch

    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                               torch.nn.Flatten(), torch.nn.Linear(8 * 6 * 6, 10))


def _model_state():
    """A small CNN's state dict (Conv2d, BatchNorm2d with num_batches_tracked, Linear), run a
    step so its BatchNorm statistics move, pruned by w * mask (the -0.0 that leaves), and buffers
    of every dtype that travels whole."""
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    net = _net()
    net(torch.randn(4, 3, 8, 8))  # train mode: running stats and num_batches_tracked move
    sd = net.state_dict()
    masks = {}
    for k, v in sd.items():
        if v.dtype == torch.float32 and v.ndim > 1:
            masks[k] = torch.rand(v.shape) < 0.3
            sd[k] = v * masks[k]  # -0.0 where a negative weight was pruned
    sd["flags"] = torch.tensor([True, False, True])
    sd["i8"] = torch.tensor([-128, 0, 127], dtype=torch.int8)
    sd["i16"] = torch.arange(-3, 3, dtype=torch.int16).reshape(2, 3)
    sd["i32"] = torch.tensor(2**31 - 1, dtype=torch.int32)
    sd["u8"] = torch.arange(250, 256, dtype=torch.uint8)
    sd["half"] = torch.randn(4, 5).half()
    sd["half"][0, 0] = float("nan")
    sd["bf"] = torch.randn(3, 4).bfloat16()
    sd["bf"][0, 0] = -0.0
    sd["empty"] = torch.zeros(0, 3, dtype=torch.bfloat16)
    sd["c"] = torch.randn(2, dtype=torch.complex64)
    return net, sd, masks


@pytest.mark.parametrize("values", ["raw", "auto"])
def test_torch_state_dict_round_trips_bit_for_bit(values):
    torch = pytest.importorskip("torch")
    net, sd, masks = _model_state()
    assert sd["1.num_batches_tracked"].dtype == torch.int64 and int(sd["1.num_batches_tracked"]) == 1
    msg = fk.encode_model(sd, masks=masks, values=values, signed_zeros=True)
    got = fk.decode_model(msg, as_torch=True)
    assert list(got) == list(sd)
    for k, v in sd.items():
        assert isinstance(got[k], torch.Tensor), k
        assert got[k].dtype == v.dtype and got[k].shape == v.shape, k
        assert _bits(got[k]) == _bits(v), k
    assert set(got.masks) == {k for k, v in sd.items() if v.dtype in (torch.float32, torch.float64)}
    for k, m in masks.items():
        np.testing.assert_array_equal(got.masks[k], m.numpy())
    # a fresh model takes it as its state dict (Decoded is a mapping)
    fresh = _net()
    result = fresh.load_state_dict({k: v for k, v in got.items() if k in net.state_dict()})
    assert not result.missing_keys and not result.unexpected_keys
    assert int(fresh[1].num_batches_tracked) == 1


TORCH_PLAIN = ["bool", "int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64", "float16", "bfloat16",
               "complex64", "complex128"]


@given(st.sampled_from(TORCH_PLAIN), hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=6),
       st.integers(0, 2**32 - 1), st.booleans())
def test_torch_tensors_of_other_dtypes_round_trip_bit_for_bit(name, shape, seed, strided):
    torch = pytest.importorskip("torch")
    dtype = getattr(torch, name)
    rng = np.random.default_rng(seed)
    n, size = math.prod(shape), torch.empty((), dtype=dtype).element_size()
    raw = torch.from_numpy(np.frombuffer(rng.bytes(n * size), np.uint8).copy())
    t = torch.empty(0, dtype=dtype) if not n else (raw != 0) if name == "bool" else raw.view(dtype)
    t = t.reshape(shape)
    if strided and t.ndim >= 2:
        t = t.transpose(0, 1)  # not contiguous: sent in C order of what it is
    got = fk.decode_model(fk.encode_model({"t": t}), as_torch=True)["t"]
    assert got.dtype == t.dtype and got.shape == t.shape
    assert _bits(got) == _bits(t)
    if name != "bfloat16":  # NumPy out: the same bits as torch's own conversion
        a = fk.decode_model(fk.encode_model({"t": t}))["t"]
        assert a.dtype == t.numpy().dtype and a.tobytes() == t.contiguous().numpy().tobytes()


def test_torch_in_numpy_out_by_default_and_the_bfloat16_rule():
    torch = pytest.importorskip("torch")
    _, sd, masks = _model_state()
    msg = fk.encode_model(sd, masks=masks)
    with pytest.raises(fk.CodecError, match=r"'bf' is a bfloat16 tensor, which NumPy cannot hold: pass as_torch=True"):
        fk.decode_model(msg)
    no_bf = {k: v for k, v in sd.items() if v.dtype != torch.bfloat16}
    got = fk.decode_model(fk.encode_model(no_bf, masks=masks))
    for k, v in no_bf.items():
        assert isinstance(got[k], np.ndarray) and got[k].dtype == v.numpy().dtype, k
        assert got[k].tobytes() == _bits(v) or v.dtype == torch.float32, k  # floats: +0.0 off the masks
    assert int(got["1.num_batches_tracked"]) == 1 and got["1.num_batches_tracked"].dtype == np.int64
    # a torch.bfloat16 out= takes a bfloat16 tensor without as_torch; the others stay NumPy
    out = {"bf": torch.empty(3, 4, dtype=torch.bfloat16), "empty": torch.empty(0, 3, dtype=torch.bfloat16)}
    got = fk.decode_model(msg, out=out)
    assert got["bf"] is out["bf"] and _bits(out["bf"]) == _bits(sd["bf"])
    assert isinstance(got["flags"], np.ndarray)
    with pytest.raises(TypeError, match=r"out\['bf'\] has dtype float16, expected bfloat16"):
        fk.decode_model(msg, as_torch=True, out={"bf": torch.empty(3, 4, dtype=torch.float16)})
    with pytest.raises(TypeError, match=r"out\['i32'\] has dtype int64, expected int32"):
        fk.decode_model(msg, as_torch=True, out={"i32": np.empty((), np.int64)})
    with pytest.raises(ValueError, match="elements"):
        fk.decode_model(msg, as_torch=True, out={"flags": np.empty(4, bool)})


def test_as_torch_gives_torch_tensors_for_every_message_and_keeps_out():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(2)
    w = {"a": rng.standard_normal((5, 6)).astype(np.float32) * (rng.random((5, 6)) < 0.3), "n": np.arange(4)}
    out = {"a": np.empty((5, 6), np.float32)}
    got = fk.decode_model(fk.encode_model(w), as_torch=True, out=out)
    assert got["a"] is out["a"] and isinstance(got["n"], torch.Tensor) and got["n"].dtype == torch.int64
    stream = io.BytesIO()
    fk.encode_stream({"a": w["a"]}, stream)  # version 3, through decode_model
    got = fk.decode_model(stream.getvalue(), as_torch=True)
    assert isinstance(got["a"], torch.Tensor) and torch.equal(got["a"], torch.from_numpy(w["a"]))
    with pytest.raises(TypeError, match="as_torch must be True or False"):
        fk.decode_model(stream.getvalue(), as_torch=1)


def test_expect_takes_numpy_and_torch_dtypes():
    torch = pytest.importorskip("torch")
    msg = fk.encode_model({"w": np.ones(3, np.float32), "n": torch.tensor(5), "b": torch.ones(2).bfloat16()})
    ok = {"w": ((3,), torch.float32), "n": ((), np.int64), "b": ((2,), "bfloat16")}
    assert set(fk.decode_model(msg, expect=ok, as_torch=True)) == {"w", "n", "b"}
    with pytest.raises(fk.CodecError, match=r"'n' is \(\) int64, expected \(\) int32"):
        fk.decode_model(msg, expect={**ok, "n": ((), torch.int32)}, as_torch=True)
    with pytest.raises(fk.CodecError, match=r"'b' is \(2,\) bfloat16, expected \(2,\) float16"):
        fk.decode_model(msg, expect={**ok, "b": ((2,), np.float16)}, as_torch=True)


@pytest.mark.cuda  # left out where there is no CUDA device (conftest.py)
def test_cuda_tensors_of_other_dtypes_travel_whole():
    torch = pytest.importorskip("torch")
    dev = torch.device(os.environ.get("FEDDIP_TEST_DEVICE", "cuda"))
    sd = {"w": torch.randn(100, device=dev) * (torch.rand(100, device=dev) < 0.2),
          "n": torch.tensor(3, device=dev), "h": torch.randn(7, device=dev).half(),
          "bf": torch.randn(2, 3, device=dev).bfloat16(), "b": torch.rand(5, device=dev) < 0.5}
    got = fk.decode_model(fk.encode_model(sd), as_torch=True)
    for k, v in sd.items():
        assert _bits(got[k]) == _bits(v.cpu()), k


# ------------------------------------------------------------------------------- Decoded, a mapping


def test_decoded_is_a_mapping_of_the_tensors():
    from collections.abc import Mapping

    w = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "n": np.int64(3)}
    d = fk.decode_model(fk.encode_model(w))
    assert isinstance(d, Mapping) and isinstance(d, codecs.Decoded)
    assert d["a"] is d.tensors["a"] and len(d) == 2 and list(iter(d)) == ["a", "n"]
    assert "a" in d and "zz" not in d and d.get("zz") is None
    assert list(d.keys()) == ["a", "n"] and [v is d.tensors[k] for k, v in d.items()] == [True, True]
    assert [v is d.tensors[k] for k, v in zip(d, d.values())] == [True, True]
    assert dict(d).keys() == w.keys()
    with pytest.raises(KeyError):
        d["zz"]
    np.testing.assert_array_equal(d.masks["a"], w["a"] != 0)  # the attributes as before
    assert set(d.packed) == {"a"}
    assert d == d and d != fk.decode_model(fk.encode_model(w)) and hash(d) == hash(d)  # identity
    assert "Decoded('a': float32[2, 3], 'n': int64[])" == repr(d)


# ------------------------------------------------------------------------------- errors


def test_inputs_that_are_no_mapping_of_str_names():
    with pytest.raises(TypeError, match="encode_model takes a mapping of names to tensors, got list"):
        fk.encode_model([np.ones(3, np.float32)])
    with pytest.raises(TypeError, match="tensor names must be str, got int 3"):
        fk.encode_model({3: np.ones(3, np.float32)})
    with pytest.raises(TypeError, match="encode_model takes masks as a mapping of names to masks, got list"):
        fk.encode_model({"w": np.ones(3, np.float32)}, masks=[np.ones(3, bool)])
    with pytest.raises(TypeError, match="encode_model takes reference as a mapping"):
        fk.encode_model({"w": np.ones(3, np.float32)}, reference=np.ones(3, bool))
    with pytest.raises(TypeError, match="encode_stream takes a mapping of names to tensors, got tuple"):
        fk.encode_stream((np.ones(3, np.float32),), io.BytesIO())
    with pytest.raises(TypeError, match="tensor names must be str, got bytes b'w'"):
        fk.encode_stream({b"w": np.ones(3, np.float32)}, io.BytesIO())
    with pytest.raises(TypeError, match="encode_stream writes to a file object"):
        fk.encode_stream({"w": np.ones(3, np.float32)}, "model.fdkw")
    with pytest.raises(TypeError, match="decode_model takes the message's bytes .*, got str"):
        fk.decode_model("FDKW")
    with pytest.raises(TypeError, match="decode_stream reads a file object .*, got bytes; decode_model reads"):
        fk.decode_stream(b"FDKW")


@pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental")
def test_unsupported_dtypes_are_named_with_their_tensor():
    torch = pytest.importorskip("torch")
    for name, t, dtype in [("s", np.array(["a"]), "<U1"), ("o", np.array([None]), "object"),
                           ("t", np.array([1], "datetime64[s]"), "datetime64"), ("q", np.ones(2, np.longdouble),
                                                                                "float128"),
                           ("f8", torch.zeros(2, dtype=torch.float8_e4m3fn), "float8_e4m3fn"),
                           ("c32", torch.zeros(2, dtype=torch.complex32), "complex32")]:
        with pytest.raises(TypeError, match=rf"tensors\['{name}'\] has dtype {dtype}.*, which encode_model does not"):
            fk.encode_model({"w": np.ones(2, np.float32), name: t})
    # encode_stream sends float32/float64: a bfloat16 tensor is refused by name (torch's own error did not name it)
    with pytest.raises(TypeError, match=r"tensors\['bf'\] has dtype bfloat16; float32 or float64 is required"):
        fk.encode_stream({"bf": torch.ones(3).bfloat16()}, io.BytesIO())
    with pytest.raises(TypeError, match=r"tensors\['n'\] has dtype int64; float32 or float64 is required"):
        fk.encode_stream({"n": np.arange(3)}, io.BytesIO())


def test_masks_for_tensors_that_travel_whole():
    w = {"w": np.arange(4, dtype=np.float32), "n": np.arange(4)}
    whole = fk.decode_model(fk.encode_model(w, masks={"w": w["w"] > 1, "n": np.ones(4, bool)},
                                            reference={"n": np.ones((2, 2))}))
    np.testing.assert_array_equal(whole["n"], w["n"])  # an all-true mask or reference: accepted
    with pytest.raises(ValueError, match=r"masks\['n'\] leaves out elements of 'n', a int64 tensor: masks and "
                                         "references apply to float32/float64"):
        fk.encode_model(w, masks={"n": np.array([1, 1, 0, 1])})
    with pytest.raises(ValueError, match=r"reference\['n'\] leaves out elements of 'n'"):
        fk.encode_model(w, reference={"n": np.zeros(4, bool)})
    with pytest.raises(ValueError, match=r"masks\['n'\] has 3 elements, expected 4"):
        fk.encode_model(w, masks={"n": np.ones(3, bool)})


def test_other_files_given_to_the_decoders_say_what_they_are(tmp_path):
    torch = pytest.importorskip("torch")
    sd = {"w": torch.ones(3), "n": torch.tensor(2)}
    zipped, legacy = io.BytesIO(), io.BytesIO()
    torch.save(sd, zipped)
    torch.save(sd, legacy, _use_new_zipfile_serialization=False)
    saved = io.BytesIO()
    fk.save(sd, saved)
    cases = [
        (zipped.getvalue(), r"bad magic b'PK\\x03\\x04'.*these bytes are a zip archive, such as a torch.save file, "
                            r"not a feddip message; torch.load reads it"),
        (legacy.getvalue(), "these bytes are a pickle, such as a legacy torch.save file, not a feddip message; "
                            "torch.load reads it"),
        (saved.getvalue(), "these bytes are a file written by feddip_kernels.save, not a feddip message; "
                           "feddip_kernels.load reads it"),
        (b"hello, world", r"bad magic b'hell', expected b'FDKW': these bytes are not a feddip message"),
    ]
    for data, match in cases:
        for decode in (fk.decode_model, lambda d: fk.decode_stream(io.BytesIO(d))):
            with pytest.raises(fk.CodecError, match=match) as e:
                decode(data)
            assert "checksum" not in str(e.value)
    with pytest.raises(fk.CodecError, match="not a feddip message"):
        fk.decode_model(b"\x00")
    for short in (b"", b"FD", b"FDKW\x01"):  # a message's beginning, cut
        with pytest.raises(fk.CodecError, match="shorter than header and checksum"):
            fk.decode_model(short)
    assert fk.load(saved.getvalue())["n"].dtype == torch.int64  # what fk.load reads


# ------------------------------------------------------------------------------- hostile bytes


def _plain_message(code: int, shape: tuple, payload: bytes, *, version: int = 1, fields: dict | None = None,
                   chunks: int = 0) -> bytes:
    """A message of one record of another dtype, "x", with its fields as encoders write them
    but for `fields` (names as docs/wire-format.md's record), resealed."""
    n = math.prod(shape)
    f = dict(dtype=code, domain=0, positions=0, values=0, signs=0, reserved=0, domain_size=n, nnz=n, golomb_m=0,
             scale=0.0, pos_len=0, val_len=len(payload))
    f.update(fields or {})
    body = HEADER.pack(MAGIC, version, 0, 0, 1) + struct.pack(f"<H1sB{len(shape)}Q", 1, b"x", len(shape), *shape)
    body += RECORD.pack(*f.values())
    if version == 2:
        body += struct.pack("<I", chunks)
    return _reseal(body + payload)


def test_the_encoder_writes_what_the_format_says():
    a = np.array([[1, -2, 3], [4, 5, 6]], np.int32)
    msg = fk.encode_model({"x": a})
    assert msg == _plain_message(PLAIN_CODES["int32"], (2, 3), a.astype("<i4").tobytes())
    assert msg[4] == 1  # version 1: no flag, no new version
    _same_numpy(fk.decode_model(_plain_message(PLAIN_CODES["bool"], (2,), b"\x01\x00"))["x"], np.array([True, False]))


def test_version_2_messages_carry_them_too(monkeypatch):
    monkeypatch.setattr(codecs.model, "CHUNK_ELEMS", 64)
    rng = np.random.default_rng(4)
    w = {"n": np.arange(5, dtype=np.int16), "w": (rng.standard_normal(1000) * (rng.random(1000) < 0.1)).astype(
        np.float32), "b": np.array(True)}
    msg = fk.encode_model(w, positions="golomb")
    assert msg[4] == 2
    got = fk.decode_model(msg)
    for k, v in w.items():
        _same_numpy(got[k], v)
    code = PLAIN_CODES["int16"]
    ok = _plain_message(code, (5,), w["n"].tobytes(), version=2)
    _same_numpy(fk.decode_model(ok)["x"], w["n"])
    with pytest.raises(fk.CodecError, match="chunks are for Golomb positions"):
        fk.decode_model(_plain_message(code, (5,), w["n"].tobytes(), version=2, chunks=2))


@pytest.mark.parametrize("field, value", [
    ("domain", 1), ("positions", 1), ("positions", 3), ("values", 4), ("values", 1), ("signs", 1), ("reserved", 1),
    ("domain_size", 3), ("nnz", 3), ("golomb_m", 1), ("scale", 1.0), ("scale", -0.0), ("pos_len", 1),
])
def test_fixed_fields_are_checked(field, value):
    payload = np.arange(4, dtype="<i8").tobytes()
    with pytest.raises(fk.CodecError, match="'x': a int64 record carries every element as raw words"):
        fk.decode_model(_plain_message(PLAIN_CODES["int64"], (4,), payload, fields={field: value}))


def test_lying_lengths_and_shapes_are_refused_before_allocating():
    code = PLAIN_CODES["int64"]
    payload = bytes(32)
    cases = [
        (_plain_message(code, (4,), payload, fields={"val_len": 31}), "31 bytes of values for 4 int64 elements, 32"),
        (_plain_message(code, (4,), payload, fields={"val_len": 2**64 - 1}), "bytes of values for 4 int64"),
        # a shape of 2 GiB of int64, its length told truly, its bytes missing
        (_plain_message(code, (2**28,), payload, fields={"val_len": 2**31}), "truncated message"),
        (_plain_message(code, (2**40, 2**30), payload, fields={"domain_size": 0, "nnz": 0}), "too large for an array"),
        (_plain_message(code, (0, 2**62), b""), "too large for an array"),
        (_plain_message(PLAIN_CODES["bool"], (4,), b"\x00\x01\x02\x00"), "bool bytes other than 0 and 1"),
        (_plain_message(99, (4,), payload), "unknown dtype code 99"),
        (_plain_message(code, (4,), payload)[:-9], "checksum"),
    ]
    for msg, match in cases:
        tracemalloc.start()
        try:
            with pytest.raises(fk.CodecError, match=match):
                fk.decode_model(msg, max_bytes=1 << 62)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 1 << 20, (match, peak)
    with pytest.raises(fk.CodecError, match="exceed max_bytes=2147483648"):
        fk.decode_model(_plain_message(code, (2**28 + 1,), payload, fields={"val_len": 8 * (2**28 + 1)}))
    # version 3 defines no such codes: a stream record of one is refused
    stream = io.BytesIO()
    fk.encode_stream({"x": np.ones(3, np.float32)}, stream)
    body = bytearray(stream.getvalue()[:-4])
    at = HEADER.size + 2 + 1 + 1 + 8  # name_len, name, ndim, shape: then the record's dtype
    assert body[at] == 1
    body[at] = PLAIN_CODES["int32"]
    for decode in (fk.decode_model, lambda d: fk.decode_stream(io.BytesIO(d))):
        with pytest.raises(fk.CodecError, match="unknown dtype code 10"):
            decode(_reseal(bytes(body)))


def _hostile_samples() -> list[bytes]:
    rng = np.random.default_rng(5)
    w = {"w": rng.standard_normal((6, 7)).astype(np.float32) * (rng.random((6, 7)) < 0.2),
         "n": np.int64(3), "b": rng.random(11) < 0.5, "h": rng.standard_normal(5).astype(np.float16),
         "e": np.zeros((0, 2), np.uint16), "c": np.array([1j], np.complex64)}
    return [fk.encode_model(w), fk.encode_model(w, values="ans"), fk.encode_model({"n": w["n"]}),
            _plain_message(PLAIN_CODES["bfloat16"], (3,), b"\x80\x3f\x00\x40\x00\xc0")]


SAMPLES = _hostile_samples()


@settings(suppress_health_check=[HealthCheck.too_slow], max_examples=150)
@given(st.sampled_from(SAMPLES), st.data(), st.booleans())
def test_fuzz_mutations_raise_codec_error_only(msg, data, as_torch):
    if as_torch:
        pytest.importorskip("torch")
    body = mutated_body(msg, data)
    for sealed in (_reseal(bytes(body)), bytes(body) + msg[-4:]):
        try:
            out = fk.decode_model(sealed, max_bytes=1 << 20, as_torch=as_torch)
        except fk.CodecError:
            continue
        assert sum(t.numel() * t.element_size() if as_torch else t.nbytes for t in out.values()) <= 1 << 20


@pytest.mark.parametrize("index", range(len(SAMPLES)))
def test_every_truncation_is_refused(index):
    pytest.importorskip("torch")
    msg = SAMPLES[index]
    for cut in range(len(msg)):
        with pytest.raises(fk.CodecError):
            fk.decode_model(msg[:cut], as_torch=True)
        with pytest.raises(fk.CodecError):
            fk.decode_model(_reseal(msg[: max(0, cut - 4)]), as_torch=True)
