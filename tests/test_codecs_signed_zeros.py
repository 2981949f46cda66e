"""Signed zeros: lossless is bit for bit, -0.0 included (issue 23; docs/wire-format.md, "Signed
zeros"): every lossless setting, sparsify's search for -0.0, the zero-sign blocks' layout and the
decoder's checks of them."""

import io
import struct

import numpy as np
import pytest
from codec_helpers import _UINT, POSITIONS, _reseal, bit_patterns
from hypothesis import HealthCheck, given, settings, strategies as st

import feddip_kernels as fk
from feddip_kernels import _backend, codecs, reference
from feddip_kernels._core import golomb_parameter


def _bits(a) -> bytes:
    return np.ascontiguousarray(a).tobytes()


def _negative_zeros(a: np.ndarray) -> np.ndarray:
    return np.signbit(a) & (a == 0)


@settings(suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(
    bit_patterns(),
    st.sampled_from([*POSITIONS, "all"]),
    st.sampled_from(["values", "reference", "mask", "mask+signs"]),
    st.booleans(),
    st.booleans(),
    st.data(),
)
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
