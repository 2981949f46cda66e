import io
import json
import os
import struct
from collections import OrderedDict

import deep_json
import numpy as np
import pytest
from hypothesis import example, given, settings, strategies as st
from hypothesis.extra import numpy as hnp

import feddip_kernels as fk
from feddip_kernels import storage
from feddip_kernels.codecs import CodecError

torch = pytest.importorskip("torch")


def same_bits(a, b) -> bool:
    a, b = np.ascontiguousarray(a), np.ascontiguousarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def same_tensor(a, b) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return (
        a.contiguous().reshape(-1).view(torch.uint8).tolist() == b.contiguous().reshape(-1).view(torch.uint8).tolist()
    )


def sparse(shape, density, dtype=np.float32, seed=0):
    rng = np.random.default_rng(seed)
    return np.where(rng.random(shape) < density, rng.standard_normal(shape), 0.0).astype(dtype)


def arrays_dict():
    a = sparse((40, 30), 0.05)
    a[0, :4] = [-0.0, np.nan, np.inf, -np.inf]
    return {
        "w": a,
        "w64": sparse((7, 3, 3), 0.2, np.float64, 1),
        "dense": np.arange(12, dtype=np.float32).reshape(3, 4) - 5.5,
        "scalar": np.array(-0.0, np.float32),
        "empty": np.zeros((0, 5), np.float32),
        "steps": np.array(17, np.int64),
        "flags": np.array([True, False, True]),
        "half": np.array([1.5, -0.0, 65504], np.float16),
        "bytes": np.arange(7, dtype=np.uint8),
        "big_endian": np.arange(5, dtype=">i4"),
        "cplx": np.array([1 + 2j, -0.0j], np.complex64),
    }


def round_trip(sd, **kw):
    buf = io.BytesIO()
    n = storage.save(sd, buf, **kw)
    assert n == len(buf.getvalue())
    return buf.getvalue()


def test_arrays_round_trip_bit_for_bit_in_order():
    sd = arrays_dict()
    out = storage.load(round_trip(sd, metadata={"round": 3, "note": "x"}))
    assert list(out) == list(sd)
    for k in sd:
        assert isinstance(out[k], np.ndarray)
        assert same_bits(out[k], sd[k].astype(sd[k].dtype.newbyteorder("="))), k
    _, meta = storage.load(round_trip(sd, metadata={"round": 3}), metadata=True)
    assert meta == {"round": 3}


def test_outputs_own_their_memory():
    data = bytearray(round_trip(arrays_dict()))
    out = storage.load(data)
    for v in out.values():
        assert not np.shares_memory(v, np.frombuffer(data, np.uint8))
        assert v.flags.writeable


def test_path_is_written_atomically(tmp_path):
    p = tmp_path / "model.fdks"
    storage.save(arrays_dict(), p)
    assert os.listdir(tmp_path) == ["model.fdks"]
    assert same_bits(storage.load(str(p))["w"], arrays_dict()["w"])
    with open(p, "rb") as f:
        assert same_bits(storage.load(f)["w64"], arrays_dict()["w64"])


def test_torch_state_dict_round_trip_and_loads_into_the_module():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.Linear(6, 4))
    model[1].num_batches_tracked += 5
    sd = model.state_dict()
    with torch.no_grad():
        sd["0.weight"].mul_(sd["0.weight"].abs() > 0.1)  # leaves -0.0 where negatives were pruned
    assert (torch.signbit(sd["0.weight"]) & (sd["0.weight"] == 0)).any()
    sd["extra.bf16"] = torch.randn(3, 5).to(torch.bfloat16)
    sd["extra.half"] = torch.randn(4).half()
    sd["extra.noncontig"] = torch.randn(4, 6).t()
    out = storage.load(round_trip(sd))
    assert list(out) == list(sd)
    for k in sd:
        assert isinstance(out[k], torch.Tensor) and same_tensor(out[k], sd[k]), k
    assert out._metadata == sd._metadata
    for k in ("extra.bf16", "extra.half", "extra.noncontig"):
        del out[k]
    model.load_state_dict(out)
    assert model[1].num_batches_tracked.item() == 5
    as_numpy = storage.load(round_trip({k: v for k, v in sd.items() if k != "extra.bf16"}), as_torch=False)
    assert isinstance(as_numpy["0.weight"], np.ndarray)
    with pytest.raises(TypeError, match="as_torch=True"):
        storage.load(round_trip(sd), as_torch=False)
    assert isinstance(storage.load(round_trip(arrays_dict()), as_torch=True)["w"], torch.Tensor)


def test_float_entries_cost_their_kept_values():
    sd = {"w": sparse((1000, 100), 0.05)}
    size = len(round_trip(sd))
    kept = np.count_nonzero(sd["w"])
    assert size < kept * 4 * 1.25 + 1000  # values plus Golomb positions, not the dense tensor


def test_explicit_masks_store_zeros_under_them_and_come_back():
    w = sparse((20, 20), 0.3)
    mask = w != 0
    mask[0, 0], w[0, 0] = True, 0.0  # a kept position that holds zero
    out, masks = storage.load(round_trip({"w": w, "n": np.arange(3)}, masks={"w": mask}), masks=True)
    assert same_bits(out["w"], w)
    np.testing.assert_array_equal(masks["w"], mask)
    assert "n" not in masks
    bad = mask.copy()
    bad[w != 0] = False
    with pytest.raises(ValueError, match="would be lost"):
        round_trip({"w": w}, masks={"w": bad})
    with pytest.raises(ValueError, match="float32/float64"):
        round_trip({"n": np.arange(3)}, masks={"n": np.ones(3, bool)})
    with pytest.raises(KeyError, match="not in the state dict"):
        round_trip({"w": w}, masks={"v": mask})


def test_signed_zeros_off_stores_plus_zero_and_saves_space():
    rng = np.random.default_rng(3)
    w = rng.standard_normal(100_000).astype(np.float32)
    w *= rng.random(w.size) < 0.05  # multiplication leaves -0.0 at about half the zeros
    exact, plain = round_trip({"w": w}), round_trip({"w": w}, signed_zeros=False)
    assert same_bits(storage.load(exact)["w"], w)
    back = storage.load(plain)["w"]
    np.testing.assert_array_equal(back, w)
    assert not np.signbit(back[back == 0]).any()
    assert len(plain) < 0.7 * len(exact)


def test_lossy_values_apply_to_float_entries_only():
    sd = {"w": sparse((50, 50), 0.1), "n": np.arange(5)}
    out = storage.load(round_trip(sd, values="fp16"))
    np.testing.assert_allclose(out["w"], sd["w"], rtol=1e-3, atol=1e-4)
    assert same_bits(out["n"], sd["n"])


def test_resnet18_95_percent_sparse_is_15x_smaller_than_torch_save():
    from feddip_kernels.fl.models import make_model

    torch.manual_seed(0)
    sd = make_model("resnet18", 3, 100).state_dict()
    weights = [k for k, v in sd.items() if v.ndim > 1]
    threshold = torch.cat([sd[k].abs().reshape(-1) for k in weights]).quantile(0.95)
    with torch.no_grad():
        for k in weights:
            sd[k][sd[k].abs() <= threshold] = 0.0
    ref = io.BytesIO()
    torch.save(sd, ref)
    ours = round_trip(sd)
    assert len(ref.getvalue()) >= 15 * len(ours), (len(ref.getvalue()), len(ours))
    out = storage.load(ours)
    assert all(same_tensor(out[k], sd[k]) for k in sd)


def test_rejects_what_it_cannot_store():
    with pytest.raises(TypeError, match="tensors and arrays"):
        storage.save({"x": 3}, io.BytesIO())
    with pytest.raises(TypeError, match="keys must be strings"):
        storage.save({1: np.zeros(2)}, io.BytesIO())
    with pytest.raises(TypeError, match="does not store"):
        storage.save({"o": np.array(["a"], object)}, io.BytesIO())
    with pytest.raises(TypeError, match="JSON"):
        storage.save({"x": np.zeros(2)}, io.BytesIO(), metadata={"f": object()})
    with pytest.raises(TypeError, match="mapping"):
        storage.save([np.zeros(2)], io.BytesIO())


# ------------------------------------------------------------------------ hostile files


Deep = deep_json.Deep


def reseal(data: bytes, edit) -> bytes:
    """The file with its JSON header replaced by edit(header) and a fresh checksum, so that the
    checks behind the checksum are reached."""
    magic, version, reserved, json_len, message_len = storage._HEADER.unpack_from(data)
    start = storage._HEADER.size
    header = json.loads(data[start : start + json_len])
    edit(header)
    body = deep_json.dumps(header).encode()
    rest = data[start + json_len : -4]
    out = storage._HEADER.pack(magic, version, reserved, len(body), message_len) + body + rest
    return out + struct.pack("<I", fk.codecs.crc32c(out))


def set_entry(entry, **fields):
    def edit(h):
        e = next(e for e in h["entries"] if e["name"] == entry)
        e.update(fields)

    return edit


@pytest.mark.parametrize(
    "edit, match",
    [
        (set_entry("steps", dtype="|O"), "bad raw entry"),
        (set_entry("steps", shape=[2**40, 2**40]), "size or offset"),
        (set_entry("steps", shape=[-1]), "bad shape"),
        (set_entry("steps", offset=1), "size or offset"),
        (set_entry("steps", nbytes=10**15), "size or offset"),
        (set_entry("steps", store="pickle"), "unknown store"),
        (set_entry("w", dtype="<f2"), "float32 and float64"),
        (set_entry("w", shape=[2**31]), "expected \\(2147483648,\\)"),
        (set_entry("w", name="steps"), "repeats"),
        (set_entry("steps", torch="os.system", torch_bytes=True), "torch byte entry"),
        (lambda h: h.pop("entries"), "entry list"),
        (lambda h: h.update(container="pickle"), "storage header"),
        (lambda h: h["entries"].pop(), "unexpected bytes"),
        (set_entry("w", negative_zeros={"count": 1, "positions": "golomb", "m": 1, "offset": 0, "nbytes": 0}),
         "negative-zero|offset"),
    ],
)
def test_inconsistent_headers_are_refused(edit, match):
    data = round_trip(arrays_dict())
    with pytest.raises(CodecError, match=match):
        storage.load(reseal(data, edit))


def test_bad_torch_dtype_names_are_refused():
    data = round_trip({"b": torch.randn(2, 2).bfloat16()})
    with pytest.raises(CodecError, match="unknown torch dtype"):
        storage.load(reseal(data, set_entry("b", torch="system")))
    with pytest.raises(CodecError, match="bytes for shape"):
        storage.load(reseal(data, set_entry("b", shape=[3, 2])))


def test_size_limit_is_checked_before_allocating():
    data = round_trip({"w": np.ones(1000, np.float32), "n": np.arange(1000)})
    with pytest.raises(CodecError, match="max_bytes"):
        storage.load(data, max_bytes=7999)
    with pytest.raises(CodecError, match="max_bytes"):
        storage.load(data, max_bytes=8000 + 3999)
    assert storage.load(data, max_bytes=12000)["n"].size == 1000


def test_every_flipped_byte_and_truncation_is_an_error():
    data = round_trip({k: v for k, v in arrays_dict().items() if k in ("w", "steps", "half")})
    for i in range(len(data)):
        for flip in (0x01, 0x80):
            bad = bytearray(data)
            bad[i] ^= flip
            with pytest.raises(CodecError):
                storage.load(bytes(bad))
    for n in range(0, len(data), 7):
        with pytest.raises(CodecError):
            storage.load(data[:n])
    with pytest.raises(CodecError):
        storage.load(data + b"\0")


def test_version_and_magic_are_checked():
    data = bytearray(round_trip({"n": np.arange(3)}))
    body = bytes(data[:4]).replace(b"FDKS", b"FDKW") + bytes(data[4:-4])
    with pytest.raises(CodecError, match="magic"):
        storage.load(body + struct.pack("<I", fk.codecs.crc32c(body)))
    body = bytes(data[:4]) + b"\x02" + bytes(data[5:-4])
    with pytest.raises(CodecError, match="version"):
        storage.load(body + struct.pack("<I", fk.codecs.crc32c(body)))


@st.composite
def state_dicts(draw):
    out = {}
    for i in range(draw(st.integers(0, 4))):
        dtype = draw(st.sampled_from([np.float32, np.float64, np.int64, np.int8, np.bool_, np.float16, np.uint32]))
        shape = draw(hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=6))
        a = draw(hnp.arrays(dtype, shape))
        if a.dtype.kind == "f" and a.size and draw(st.booleans()):
            with np.errstate(invalid="ignore"):  # inf * 0 is NaN: one more value to carry
                a = a * (np.random.default_rng(i).random(a.shape) < 0.1)
        out[f"t{i}"] = a
    return out


@settings(deadline=None)
@given(state_dicts(), st.booleans())
def test_any_dict_of_arrays_round_trips_bit_for_bit(sd, signed):
    out = storage.load(round_trip(sd, signed_zeros=True))
    assert list(out) == list(sd)
    for k in sd:
        assert same_bits(out[k], sd[k]), k
    if not signed:
        back = storage.load(round_trip(sd, signed_zeros=False))
        for k in sd:
            np.testing.assert_array_equal(back[k], sd[k])


# Values for any header field: every JSON type, ints at and beyond each bound a field has (u32, u63,
# u64, negatives), floats that equal ints or are not finite, strings that are valid elsewhere,
# containers, and nesting from shallow to far past the parser's limit.
EDGE_INTS = [
    -(2**63),
    -(2**31),
    -1,
    0,
    1,
    2,
    3,
    7,
    8,
    2**31,
    2**32 - 1,
    2**32,
    2**40,
    2**62,
    2**63 - 1,
    2**63,
    2**64,
    10**30,
]
json_scalars = (
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.sampled_from(EDGE_INTS)
    | st.floats() | st.sampled_from([0.0, -0.0, 1.0, 3.0, 1e300, float("inf"), float("nan")])
    | st.text(max_size=8)
    | st.sampled_from(["golomb", "bitmask", "raw", "message", "torch", "numpy", "<f4", "<f8", "|u1", "<i8", "|O",
                       "bfloat16", "qint8", "float32", "onnx", "version"])
)
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3),
    max_leaves=6,
) | st.integers(1, 300).map(Deep) | st.just(Deep(100_000))
FIELDS = ["name", "shape", "dtype", "store", "torch", "torch_bytes", "offset", "nbytes", "negative_zeros", "unknown"]
NZ_FIELDS = ["count", "positions", "m", "offset", "nbytes", "unknown"]
TOP_FIELDS = ["torch_metadata", "metadata", "container", "entries", "unknown"]
# Where an edit lands: a top-level field, an entry's field, a negative-zero record's field, or a
# torch_metadata module's field.
TARGETS = ([("top", f) for f in TOP_FIELDS] + [("entry", f) for f in FIELDS] + [("nz", f) for f in NZ_FIELDS]
           + [("tm", "version"), ("tm", "unknown")])


def hostile_state_dict():
    g = np.zeros(400, np.float32)  # negative zeros coded as a Golomb stream (m = 138)
    g[[5, 300]] = -0.0
    g[[10, 20, 30]] = [1, 2, 3]
    sd = OrderedDict(w=sparse((30, 20), 0.1), z=np.array([-0.0, 0.0, 1.0], np.float32), g=g, n=np.arange(4),
                     e=np.zeros((0, 3), np.int64), b=torch.randn(3).bfloat16())
    sd._metadata = {"": {"version": 1}, "fc": {"version": 2}}
    return sd


def edit_field(where, field, op, which, value):
    def edit(h):
        if where == "top":
            target = h
        elif where == "tm":
            target = list(h["torch_metadata"].values())[which % len(h["torch_metadata"])]
        else:
            entries = h["entries"] if where == "entry" else [e for e in h["entries"] if "negative_zeros" in e]
            target = entries[which % len(entries)]
            if where == "nz":
                target = target["negative_zeros"]
        if op == "delete":
            target.pop(field, None)
        else:
            target[field] = value

    return edit


@settings(deadline=None, max_examples=300)
@given(st.integers(0, 20), st.sampled_from(TARGETS), st.sampled_from(["set", "set", "set", "delete"]), json_values)
@example(0, ("top", "metadata"), "set", Deep(100_000))  # RecursionError before: json.loads recursed
@example(1, ("nz", "m"), "set", 2**40)  # TypeError before: the binding takes a u32
@example(4, ("entry", "shape"), "set", [0, 2**62])  # NumPy's ValueError before
@example(5, ("entry", "torch"), "delete", None)  # KeyError before
@example(0, ("tm", "version"), "set", [[[1]]])  # accepted before
def test_any_header_field_value_is_loaded_or_refused_cleanly(which, target, op, value):
    where, field = target
    data = reseal(round_trip(hostile_state_dict()), edit_field(where, field, op, which, value))
    try:
        out = storage.load(data)
    except CodecError:
        return
    except TypeError as e:  # the one refusal that is not corruption: bytes NumPy cannot hold
        assert "as_torch=True" in str(e)
        return
    assert all(isinstance(k, str) for k in out)


def test_deeply_nested_header_is_refused_with_codec_error():
    data = round_trip({"n": np.arange(3)})
    for depth in (101, 100_000):
        with pytest.raises(CodecError, match="nests deeper than 100"):
            storage.load(reseal(data, lambda h, depth=depth: h.update(metadata={"x": Deep(depth)})))
    # Depth is nesting, not the number of brackets, and brackets in strings do not count.
    meta = {"many": [[i] for i in range(500)], "text": "[" * 1000 + '\\"{' * 100, "deep": Deep(90)}
    _, back = storage.load(reseal(data, lambda h: h.update(metadata=meta)), metadata=True)
    assert back["many"][499] == [499] and back["text"] == meta["text"]
    with pytest.raises(ValueError, match="nests deeper"):  # save refuses what load would
        storage.save({"n": np.arange(3)}, io.BytesIO(), metadata={"x": json.loads("[" * 200 + "]" * 200)})


def test_json_depth_scan_is_linear_on_unterminated_strings():
    # An unterminated string full of escaped quotes: each quote must not restart the string match.
    text = b'{"a": [' * 40 + b'"' + b'\\"[' * 200_000
    assert not storage.json_too_deep(text)
    assert storage.json_too_deep(b"[" * 101)
    assert not storage.json_too_deep(b'["' + b"[" * 200 + b'"]')


def test_golomb_parameter_out_of_range_is_refused_naming_it():
    data = round_trip(hostile_state_dict())
    for m in (2**32, 2**40, 2**63 - 1):
        with pytest.raises(CodecError, match="Golomb parameter m = "):
            storage.load(reseal(data, edit_field("nz", "m", "set", 1, m)))
    with pytest.raises(CodecError, match="Golomb parameter m = 0"):
        storage.load(reseal(data, edit_field("nz", "m", "set", 1, 0)))
    with pytest.raises(CodecError, match="bitmask"):
        storage.load(reseal(data, edit_field("nz", "m", "set", 0, 5)))  # z's record is a bitmask


def test_shapes_beyond_numpys_limit_are_refused_even_when_empty():
    data = round_trip(hostile_state_dict())
    with pytest.raises(CodecError, match="size limit"):
        storage.load(reseal(data, set_entry("e", shape=[0, 2**62])))
