"""The Golomb coder in torch operations (_torch_golomb), run on CPU tensors: its streams against
the native golomb_encode_many, and encode_model / encode_stream of tensors routed through the
device path (`on_device` patched, as tests/test_torch_kernels.py does) against the host's
messages, byte for byte."""

import io
import os
import re

import numpy as np
import pytest
from hypothesis import given, strategies as st

import feddip_kernels as fk
from feddip_kernels import _backend, codecs

torch = pytest.importorskip("torch")
from feddip_kernels import _torch_golomb as tg  # noqa: E402

K = _backend.kernels("auto")


def _native(mask: np.ndarray, m: int) -> bytes:
    return K.golomb_encode_many([(np.packbits(mask, bitorder="little"), mask.size, m)])[0]


@st.composite
def segments(draw):
    """A bool mask with the positions of one segment: random densities, none or all set, and
    a few set far apart (quotients past 56 bits)."""
    size = draw(st.integers(0, 700))
    kind = draw(st.sampled_from(["random", "none", "all", "far"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if kind == "random":
        mask = rng.random(size) < draw(st.sampled_from([0.001, 0.02, 0.1, 0.3, 0.5, 0.9]))
    elif kind == "far":
        mask = np.zeros(size, bool)
        mask[rng.integers(0, max(size, 1), 3)[: size and 3]] = True
    else:
        mask = np.full(size, kind == "all")
    m = draw(st.one_of(st.integers(1, 40), st.integers(1, 2**31), st.just(K.golomb_parameter(int(mask.sum()), size))))
    return mask, m


@given(st.lists(segments(), min_size=1, max_size=6))
def test_streams_are_the_native_coders(segs):
    got = tg.golomb_encode_many([(torch.from_numpy(mask), m) for mask, m in segs])
    assert got == [_native(mask, m) for mask, m in segs]
    for (mask, m), stream in zip(segs, got):  # the bounds that the codec choice takes before coding
        lo, hi = codecs.positions.golomb_bounds(mask.size, int(mask.sum()), m)
        assert lo <= len(stream) <= hi


@given(st.lists(st.tuples(segments(), st.integers(0, 20), st.booleans()), min_size=1, max_size=6))
def test_segments_anywhere_in_the_index_space_and_skipped_ones(segs):
    """Segments at any offset (space between them holding set positions of no segment is not
    allowed, but unset space is), some not coded (m = 0): only the coded ones are written."""
    parts, starts, sizes, ms = [], [], [], []
    at = 0
    for (mask, m), space, coded in segs:
        parts += [np.zeros(space, bool), mask]
        starts.append(at + space), sizes.append(mask.size), ms.append(m if coded else 0)
        at += space + mask.size
    space = torch.from_numpy(np.concatenate(parts))
    counts = [int(mask.sum()) for (mask, _), _, _ in segs]
    out, lengths, slots = tg.encode_segments(torch.nonzero(space).reshape(-1), starts, sizes, counts, ms)
    data, lengths = out.numpy(), lengths.tolist()
    for ((mask, m), _, coded), slot, n, next_slot in zip(segs, slots, lengths, slots[1:] + [data.size]):
        if coded:
            want = _native(mask, m)
            assert bytes(data[slot : slot + n]) == want and n == len(want)
            assert not data[slot + n : next_slot].any()  # the rest of the slot stays zero
        else:
            assert next_slot == slot


def test_long_runs_large_parameters_and_word_edges():
    rng = np.random.default_rng(3)
    cases = []
    for n in (1, 7, 8, 63, 64, 65, 127, 128, 129, 4096, 100_003):
        for p in (0.0, 0.0001, 0.01, 0.3, 1.0):
            mask = rng.random(n) < p
            for m in {1, 2, 3, 5, 64, 1000, 2**31, K.golomb_parameter(int(mask.sum()), n)}:
                cases.append((mask, m))
    gaps = np.zeros(200_000, bool)
    gaps[[0, 90_000, 199_999]] = True  # quotients of 90000 bits with m = 1
    cases += [(gaps, 1), (gaps, 2), (gaps, 3)]
    got = tg.golomb_encode_many([(torch.from_numpy(mask), m) for mask, m in cases])
    for (mask, m), g in zip(cases, got):
        assert g == _native(mask, m), (mask.size, int(mask.sum()), m)


def test_decoded_streams_give_back_the_positions():
    rng = np.random.default_rng(4)
    mask = rng.random(10_000) < 0.05
    m = K.golomb_parameter(int(mask.sum()), mask.size)
    (stream,) = tg.golomb_encode_many([(torch.from_numpy(mask), m)])
    bits = K.golomb_decode(stream, mask.size, int(mask.sum()), m)
    np.testing.assert_array_equal(bits, np.packbits(mask, bitorder="little"))


# ------------------------------------------------------------------------------ encode_model


@pytest.fixture
def routed(monkeypatch):
    """CPU torch tensors take the device paths of encode_model and encode_stream."""
    on = lambda *xs: any(isinstance(x, torch.Tensor) for x in xs)  # noqa: E731
    for mod in (codecs.model, codecs.stream):
        monkeypatch.setattr(mod, "on_device", on)
    return monkeypatch


def _model(rng, dtype=np.float32):
    """A pruned model's kinds of tensors: w * mask (-0.0 at about half the pruned places), dense
    ones, an empty one, a 0-d one, all zeros, all -0.0, and a tensor of few -0.0."""
    def pruned(shape, density):
        w = rng.standard_normal(shape).astype(dtype)
        return w * (rng.random(shape) < density).astype(dtype)

    few = np.ones(3000, dtype)
    few[[5, 2000]] = -0.0
    return {"conv": pruned((16, 3, 3, 3), 0.1), "fc": pruned((300, 64), 0.03), "dense": pruned((129,), 0.5),
            "bias": rng.standard_normal(10).astype(dtype), "empty": np.zeros(0, dtype), "scalar": np.array(2.5, dtype),
            "zeros": np.zeros(77, dtype), "negzeros": -np.zeros(13, dtype), "few": few, "one": pruned((5000,), 0.0002)}


def _same(host, kw, **options):
    """The device path's message is the host's (or it raises what the host raises)."""
    dev = {k: torch.from_numpy(np.asarray(v)) for k, v in host.items()}
    dkw = {
        key: {k: torch.from_numpy(np.asarray(v)) for k, v in val.items()} if key == "masks" else val
        for key, val in kw.items()
    }
    try:
        want = fk.encode_model(host, **kw, **options)
    except ValueError as e:  # CSR relative to a reference mask
        with pytest.raises(ValueError, match=re.escape(str(e))):
            fk.encode_model(dev, **dkw, **options)
        return None
    msg = fk.encode_model(dev, **dkw, **options)
    assert msg == want, (kw, options)
    return msg


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("positions", ["auto", "golomb", "bitmask", "csr"])
def test_messages_are_the_hosts_byte_for_byte(routed, dtype, positions):
    rng = np.random.default_rng(5)
    host = _model(rng, dtype)
    masks = {"conv": host["conv"] != 0, "fc": rng.random((300, 64)) < 0.05, "few": np.ones(3000, bool)}
    reference = {"fc": masks["fc"] | (rng.random((300, 64)) < 0.1), "conv": rng.random((16, 3, 3, 3)) < 0.5}
    for values in ("raw", "fp16", "bf16", "int8"):
        for signed in (None, True, False):
            for kw in ({}, {"masks": masks}, {"masks": masks, "reference": reference}, {"reference": reference}):
                _same(host, kw, positions=positions, values=values, signed_zeros=signed)
    back = fk.decode_model(_same(host, {"masks": masks}, positions=positions)).tensors
    assert back["scalar"] == host["scalar"] and back["few"].tobytes() == host["few"].tobytes()


def test_all_positions_codec_and_all_kept(routed):
    host = {"a": np.ones(17, np.float32), "b": np.arange(1, 9, dtype=np.float64), "e": np.zeros(0, np.float32)}
    _same(host, {}, positions="all")
    with pytest.raises(ValueError, match="not available"):
        fk.encode_model({"a": torch.zeros(3)}, positions="all")


def test_chunked_tensors(routed):
    """Tensors over CHUNK_ELEMS: a run per chunk, each its own stream (version 2 records)."""
    rng = np.random.default_rng(6)
    routed.setattr(codecs.model, "CHUNK_ELEMS", 1024)
    host = _model(rng)
    host["big"] = host["fc"] * (rng.random((300, 64)) < 0.5)  # 19200 elements: 19 runs, the last partial
    host["big"].reshape(-1)[:2048] = 0.0  # empty runs
    masks = {"big": host["big"] != 0}
    for kw in ({}, {"masks": masks}):
        for positions in ("auto", "golomb", "bitmask"):
            for signed in (None, True):
                msg = _same(host, kw, positions=positions, signed_zeros=signed)
                assert msg[4] == (1 if positions == "bitmask" else 2)  # version 2: chunked


def test_a_tensor_over_chunk_elems():
    """One real one (4 Mi + 1001 elements), on the device path."""
    rng = np.random.default_rng(7)
    n = codecs.format.CHUNK_ELEMS + 1001
    w = np.zeros(n, np.float32)
    at = rng.choice(n, n // 50, replace=False)
    w[at] = rng.standard_normal(at.size).astype(np.float32)
    w[at[:100]] = -0.0
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(codecs.model, "on_device", lambda *xs: any(isinstance(x, torch.Tensor) for x in xs))
        msg = _same({"w": w}, {})
    assert msg[4] == 2
    np.testing.assert_array_equal(fk.decode_model(msg).tensors["w"].view(np.uint32), w.view(np.uint32))


@given(st.data())
def test_random_models(data):
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    host = {}
    for i in range(data.draw(st.integers(1, 5))):
        shape = tuple(data.draw(st.lists(st.integers(0, 40), max_size=3)))
        w = rng.standard_normal(shape).astype(data.draw(st.sampled_from([np.float32, np.float64])))
        keep = rng.random(shape) < data.draw(st.sampled_from([0.0, 0.01, 0.1, 0.5, 1.0]))
        host[f"t{i}"] = np.where(keep, w, data.draw(st.sampled_from([0.0, -0.0])) * w)
    names = list(host)
    masks = {k: rng.random(host[k].shape) < 0.3 for k in names if data.draw(st.booleans())}
    options = dict(positions=data.draw(st.sampled_from(["auto", "golomb", "bitmask", "csr"])),
                   values=data.draw(st.sampled_from(["raw", "fp16", "int8"])),
                   signed_zeros=data.draw(st.sampled_from([None, True, False])))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(codecs.model, "on_device", lambda *xs: any(isinstance(x, torch.Tensor) for x in xs))
        _same(host, {"masks": masks} if masks else {}, **options)


def test_only_what_the_message_takes_is_fetched():
    """A pruned tensor coded as Golomb fetches no packed positions; its -0.0 (about half its
    zeros: parameter 1) their packed bits, no stream; a dense one nothing but its values."""
    rng = np.random.default_rng(8)
    w = rng.standard_normal(10_000).astype(np.float32)
    w *= (rng.random(10_000) < 0.05).astype(np.float32)
    dense = np.ones(100, np.float32)
    half = np.where(rng.random(1001) < 0.5, 1.0, 0.0).astype(np.float32)  # m = 1: the stream is the bitmask, cut
    half[-20:] = 0.0
    arrays = (w, dense, half)
    dev = tg.DeviceSparse([(torch.from_numpy(a), None, True) for a in arrays], None)
    counts = dev.counts()
    plans = [tg.Plan(*codecs.positions.device_plan(K, runs, neg, "auto", (a.size,), True))
             for (runs, neg), a in zip(counts, arrays)]
    assert plans[0].ms[0] > 1 and not plans[0].bits and plans[0].sign_m == 0 and plans[0].sign_bits
    assert plans[1] == tg.Plan([0], False, 0, False)
    assert plans[2] == tg.Plan([1], False, 0, False)
    got = dev.fetch(plans)
    assert got[0].bits is None and got[0].streams[0] is not None and got[0].negative is not None
    assert got[1].bits is None and got[1].streams == [None] and got[1].negative is None
    np.testing.assert_array_equal(got[0].vals, w[w != 0])
    assert got[2].streams[0].size < got[2].bits.size  # the bitmask, from the shorter stream
    np.testing.assert_array_equal(got[2].bits, np.packbits(half != 0, bitorder="little"))


# ------------------------------------------------------------------------------ encode_stream


@pytest.mark.parametrize("positions", ["auto", "golomb", "bitmask", "all"])
def test_streams_are_the_hosts_byte_for_byte(routed, positions):
    rng = np.random.default_rng(9)
    host = _model(rng)
    host.pop("zeros") if positions == "all" else None
    masks = {"conv": host["conv"] != 0, "fc": rng.random((300, 64)) < 0.05}
    reference = {"fc": masks["fc"] | (rng.random((300, 64)) < 0.1)}
    if positions == "all":
        host = {k: np.ones_like(v) for k, v in host.items()}
        masks, reference = {}, {}
    for kw in ({}, {"masks": masks}, {"masks": masks, "reference": reference}):
        for signed in (None, True):
            a, b = io.BytesIO(), io.BytesIO()
            dkw = {key: {k: torch.from_numpy(np.asarray(v)) for k, v in val.items()} if key == "masks" else val
                   for key, val in kw.items()}
            fk.encode_stream({k: torch.from_numpy(v) for k, v in host.items()}, a, chunk_elems=1024,
                             positions=positions, signed_zeros=signed, **dkw)
            fk.encode_stream(host, b, chunk_elems=1024, positions=positions, signed_zeros=signed, **kw)
            assert a.getvalue() == b.getvalue(), (kw, signed)


# ------------------------------------------------------------------------------ on a device


@pytest.mark.cuda  # left out without a CUDA device (conftest.py); FEDDIP_TEST_DEVICE=cpu runs it on the host
def test_on_the_device_streams_and_messages_are_the_hosts():
    dev = torch.device(os.environ.get("FEDDIP_TEST_DEVICE", "cuda"))
    rng = np.random.default_rng(10)
    cases = [(rng.random(n) < p, m) for n, p, m in ((0, 0.1, 1), (1001, 0.05, 14), (100_000, 0.001, 700),
                                                     (65, 1.0, 1), (5000, 0.0, 3), (200_003, 0.3, 2**31))]
    got = tg.golomb_encode_many([(torch.from_numpy(mask).to(dev), m) for mask, m in cases])
    assert got == [_native(mask, m) for mask, m in cases]
    host = _model(rng)
    n = codecs.format.CHUNK_ELEMS + 1001  # a chunked record
    host["big"] = np.where(rng.random(n) < 0.05, rng.standard_normal(n), rng.choice([0.0, -0.0], n)).astype(np.float32)
    host["f64"] = _model(rng, np.float64)["fc"]
    masks = {"conv": host["conv"] != 0, "fc": rng.random((300, 64)) < 0.05}
    reference = {"fc": masks["fc"] | (rng.random((300, 64)) < 0.1)}
    tensors = {k: torch.from_numpy(np.asarray(v)).to(dev) for k, v in host.items()}
    for positions in ("auto", "golomb", "bitmask"):
        for values in ("raw", "fp16", "int8"):
            for signed in (None, True, False):
                for kw in ({}, {"masks": masks}, {"masks": masks, "reference": reference}):
                    dkw = {key: {k: torch.from_numpy(v).to(dev) for k, v in val.items()} if key == "masks" else val
                           for key, val in kw.items()}
                    options = dict(positions=positions, values=values, signed_zeros=signed)
                    assert fk.encode_model(tensors, **dkw, **options) == fk.encode_model(host, **kw, **options)
    a, b = io.BytesIO(), io.BytesIO()
    fk.encode_stream(tensors, a, chunk_elems=1 << 20, masks={"fc": torch.from_numpy(masks["fc"]).to(dev)})
    fk.encode_stream(host, b, chunk_elems=1 << 20, masks={"fc": masks["fc"]})
    assert a.getvalue() == b.getvalue()
