"""Entropy-coded values (values="ans", "auto", "fp16-ans", "bf16-ans", "int2-ans" .. "int8-ans") against
the lossless and lossy float compressors that a sparse model could be sent with instead.

Two model vectors in ResNet-18's 21 weight shapes (11,164,352 float32): He-initialised
(`resnet18_weights()`) and i.i.d. N(0, 1), each pruned by GLOBAL magnitude top-5% (one threshold
over all tensors: the He-initialised layers keep 0.8% to 86% of their weights, the N(0, 1) ones
4.5% to 5.0%), pruned elements +0.0; 558,218 weights kept.

- Lossless, ONE thread each (`fk.set_num_threads(1)`; pcodec is single threaded), in the same run:
  encode_model(values="raw" / "ans" / "auto") against pcodec 1.1 (`standalone.simple_compress` per
  tensor, the baseline of the groups; decoded with `simple_decompress_into` into preallocated
  arrays), and the peers on the dense tensors: ZipNN, blosc2 (zstd clevel 9, SHUFFLE and
  BITSHUFFLE, typesize 4), zstd -19, torch.save of the state dict + zstd -19. extra: `ratio` (dense
  fp32 bytes / compressed bytes), `ratio_vs_pcodec`; the interleaved group gives the speed ratios
  against pcodec as medians of round-by-round ratios (targets: ratio >= 0.98x, encode >= 3x,
  decode >= 2x pcodec's).
- A shared mask (encode_model(masks=m, reference=m)): positions cost nothing, values only.
- Lossy: `value_bits` (the values' payload bits a kept value: the message with a shared mask, less
  the framing that the raw values' message carries beyond 32 bits a value) against the nominal
  16 / 16 / 8 / b bits; max abs error and SNR over the whole model.
- NNCodec (DeepCABAC, ISO/IEC 15938-17) at the same int-b grid: its step per tensor the largest of
  its own steps (qp_density 6) not over ours, so its max error with dependent quantisation off is at
  most ours; and with dependent quantisation (its default) at the same step. NNCodec codes every
  element, so the sizes compared are whole messages (positions included).
- values="ans" on 2 threads, in dense elements a second (target 1 G elements/s).

Plain `pytest` runs each benchmark once; there the peers and NNCodec compress only the first 6
tensors (blosc2 clevel 9 is zstd level 22: about 25 s for the model, zstd -19 about 8 s; NNCodec
1-2 s). `pytest --benchmark` times everything, those slow ones in one round after a warm-up.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field

import numpy as np
import pytest

import feddip_kernels as fk

from .conftest import RESNET18_SHAPES, alternating, resnet18_weights

KEEP = 0.05
MODELS = {"he": "He-init", "normal": "N(0,1)"}
# Nominal bits a value of the lossy codecs (the ans variants entropy-code the same values).
NOMINAL = {"ans": 32, "fp16": 16, "fp16-ans": 16, "bf16": 16, "bf16-ans": 16, "int8": 8,
           **{f"int{b}-ans": b for b in range(2, 9)}}
SMOKE_TENSORS = 6  # the first 6 tensors, 224k elements: what the slow peers compress in a smoke run


@dataclass
class Model:
    key: str
    label: str
    tensors: dict[str, np.ndarray] = field(repr=False)
    cache: dict = field(default_factory=dict, repr=False)

    @property
    def n(self) -> int:
        return sum(v.size for v in self.tensors.values())

    @property
    def masks(self) -> dict[str, np.ndarray]:
        if "masks" not in self.cache:
            self.cache["masks"] = {k: v != 0 for k, v in self.tensors.items()}
        return self.cache["masks"]

    @property
    def kept(self) -> int:
        return sum(int(np.count_nonzero(m)) for m in self.masks.values())

    def head(self, count: int) -> Model:
        return Model(self.key, self.label, dict(list(self.tensors.items())[:count]))


def prune_global(ws: list[np.ndarray], keep: float = KEEP) -> dict[str, np.ndarray]:
    """Global magnitude top-k: one threshold over all tensors, the rest +0.0 (np.where)."""
    mags = np.concatenate([np.abs(w).ravel() for w in ws])
    k = int(round(keep * mags.size))
    thr = np.partition(mags, mags.size - k)[mags.size - k]
    return {f"layer{i}.weight": np.where(np.abs(w) >= thr, w, np.float32(0)) for i, w in enumerate(ws)}


@pytest.fixture(scope="module", params=list(MODELS))
def model(request) -> Model:
    if request.param == "he":
        ws = resnet18_weights()
    else:
        rng = np.random.default_rng(1)
        ws = [rng.standard_normal(s, dtype=np.float32) for s in RESNET18_SHAPES]
    return Model(request.param, MODELS[request.param], prune_global(ws))


@pytest.fixture
def one_thread():
    fk.set_num_threads(1)
    yield
    fk.set_num_threads(0)


def _sized(benchmark, model: Model) -> Model:
    """The model, or its first tensors in a smoke run (a slow peer's single untimed call)."""
    return model.head(SMOKE_TENSORS) if benchmark.disabled else model


def _bitwise_equal(a, b) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    return a.shape == b.shape and np.array_equal(a.view(np.uint32), b.view(np.uint32))


def _errors(model: Model, decoded) -> dict[str, float]:
    """max |error| and SNR (dB) over every element of the model."""
    err, sig, noise = 0.0, 0.0, 0.0
    for k, v in model.tensors.items():
        d = np.asarray(decoded[k], dtype=np.float64).reshape(v.shape) - v
        err = max(err, float(np.abs(d).max()))
        sig += float(np.square(v, dtype=np.float64).sum())
        noise += float(np.square(d).sum())
    return {"max_abs_err": err, "snr_db": 10 * np.log10(sig / noise) if noise else float("inf")}


def _pcodec_size(model: Model) -> int | None:
    if "pcodec_size" not in model.cache:
        try:
            from pcodec import ChunkConfig, standalone
        except ImportError:
            return None
        model.cache["pcodec_size"] = sum(
            len(standalone.simple_compress(v.ravel(), ChunkConfig())) for v in model.tensors.values())
    return model.cache["pcodec_size"]


def _vs_pcodec(model: Model, size: int) -> dict[str, float]:
    p = _pcodec_size(model)
    return {} if p is None else {"ratio_vs_pcodec": p / size}


def _groups(model: Model) -> tuple[str, str]:
    tail = f"1 thread: ResNet-18 {model.label} global top-5%"
    return f"lossless encode, {tail}", f"lossless decode, {tail}"


# --- lossless: ours -------------------------------------------------------------------------------

@pytest.mark.parametrize("values", ["raw", "ans", "auto"])
def test_lossless_encode(record, model, one_thread, values):
    t, n = model.tensors, model.n
    size = len(fk.encode_model(t, values=values))
    msg = record(lambda: fk.encode_model(t, values=values), group=_groups(model)[0], name=f"feddip encode {values}",
                 dense_bytes=4 * n, ratio=4 * n / size, **_vs_pcodec(model, size))
    out = fk.decode_model(msg).tensors
    assert all(_bitwise_equal(out[k], v) for k, v in t.items())


def test_lossless_encode_shared_mask(record, model, one_thread):
    """Values only: the receiver holds the mask (reference), so positions cost nothing."""
    t, m, n = model.tensors, model.masks, model.n
    size = len(fk.encode_model(t, values="ans", masks=m, reference=m))
    msg = record(lambda: fk.encode_model(t, values="ans", masks=m, reference=m), group=_groups(model)[0],
                 name="feddip encode ans, shared mask", dense_bytes=4 * n, ratio=4 * n / size,
                 **_vs_pcodec(model, size))
    out = fk.decode_model(msg, reference=m).tensors
    assert all(_bitwise_equal(out[k], v) for k, v in t.items())


@pytest.mark.parametrize("values", ["raw", "ans", "auto"])
def test_lossless_decode(record, model, one_thread, values):
    t, n = model.tensors, model.n
    msg = fk.encode_model(t, values=values)
    bufs = {k: np.empty_like(v) for k, v in t.items()}
    record(lambda: fk.decode_model(msg, out=bufs), group=_groups(model)[1], name=f"feddip decode {values} into buffers",
           dense_bytes=4 * n, ratio=4 * n / len(msg))
    assert all(_bitwise_equal(bufs[k], v) for k, v in t.items())


# --- lossless: pcodec (the baseline) and the peers ------------------------------------------------

def test_pcodec_encode(record, model):
    pcodec = pytest.importorskip("pcodec", reason="pcodec is not installed (the [peers] extra)")
    t, n = model.tensors, model.n

    def enc():
        return [pcodec.standalone.simple_compress(v.ravel(), pcodec.ChunkConfig()) for v in t.values()]

    blobs = record(enc, group=_groups(model)[0], name="pcodec 1.1 simple_compress", dense_bytes=4 * n, baseline=True,
                   ratio=4 * n / _pcodec_size(model))
    assert sum(len(b) for b in blobs) == _pcodec_size(model)


def test_pcodec_decode(record, model):
    pcodec = pytest.importorskip("pcodec", reason="pcodec is not installed (the [peers] extra)")
    t, n = model.tensors, model.n
    blobs = [pcodec.standalone.simple_compress(v.ravel(), pcodec.ChunkConfig()) for v in t.values()]
    bufs = [np.empty_like(v) for v in t.values()]

    def dec():
        for b, o in zip(blobs, bufs):
            pcodec.standalone.simple_decompress_into(b, o.reshape(-1))  # a view: fills the buffer

    record(dec, group=_groups(model)[1], name="pcodec 1.1 simple_decompress_into", dense_bytes=4 * n, baseline=True,
           ratio=4 * n / sum(len(b) for b in blobs))
    assert all(_bitwise_equal(o, v) for o, v in zip(bufs, t.values()))


def _peer(name: str, t: dict[str, np.ndarray]):
    """(encode() -> blobs, decode(blobs) -> arrays in t's order, rounds): a lossless peer on the dense
    tensors, one thread. rounds=1 for the ones that take seconds a call (one call after the warm-up)."""
    if name == "zipnn":
        zipnn = pytest.importorskip("zipnn", reason="zipnn is not installed (the [peers] extra)")
        z = zipnn.ZipNN(input_format="numpy", bytearray_dtype="float32", threads=1)  # method "AUTO"
        return (lambda: [z.compress(v) for v in t.values()]), (lambda blobs: [z.decompress(b) for b in blobs]), None
    if name.startswith("blosc2"):
        blosc2 = pytest.importorskip("blosc2", reason="blosc2 is not installed (the [peers] extra)")
        filt = blosc2.Filter.BITSHUFFLE if name.endswith("bitshuffle") else blosc2.Filter.SHUFFLE
        cparams = {"codec": blosc2.Codec.ZSTD, "clevel": 9, "filters": [filt], "typesize": 4, "nthreads": 1}
        bufs = [np.empty_like(v) for v in t.values()]

        def dec_blosc(blobs):
            for b, o in zip(blobs, bufs):
                blosc2.decompress2(b, dst=o, nthreads=1)
            return bufs

        return (lambda: [blosc2.compress2(v, **cparams) for v in t.values()]), dec_blosc, 1
    zstd = pytest.importorskip("zstandard", reason="zstandard is not installed (the [peers] extra)")
    c, d = zstd.ZstdCompressor(level=19), zstd.ZstdDecompressor()  # threads=0: one thread
    if name == "zstd-19":
        return ((lambda: [c.compress(v) for v in t.values()]),
                (lambda blobs: [np.frombuffer(d.decompress(b), v.dtype).reshape(v.shape)
                                for b, v in zip(blobs, t.values())]), 1)
    assert name == "torch.save+zstd-19"
    torch = pytest.importorskip("torch", reason="torch is not installed")
    state = {k: torch.from_numpy(v) for k, v in t.items()}

    def enc_torch():
        f = io.BytesIO()
        torch.save(state, f)
        return [c.compress(f.getbuffer())]

    def dec_torch(blobs):
        sd = torch.load(io.BytesIO(d.decompress(blobs[0])), weights_only=True)
        return [sd[k].numpy() for k in t]

    return enc_torch, dec_torch, 1


PEERS = ["zipnn", "blosc2 zstd-9 shuffle", "blosc2 zstd-9 bitshuffle", "zstd-19", "torch.save+zstd-19"]
PEER_NAMES = {"zipnn": "ZipNN (AUTO, 1 thread)", "zstd-19": "zstd -19 (dense fp32 bytes)"}


def _last(fn):
    """(timed, last): timed() calls fn and keeps its result in last[0], for metrics taken after the
    timing from the timed calls' own output (a slow peer is not called once more for its size)."""
    last: list = [None]

    def timed():
        last[0] = fn()
        return last[0]

    return timed, last


@pytest.mark.parametrize("peer", PEERS)
def test_peer_encode(record, benchmark, model, peer):
    m = _sized(benchmark, model)
    enc, dec, rounds = _peer(peer, m.tensors)
    timed, last = _last(enc)
    blobs = record(timed, group=_groups(model)[0], name=PEER_NAMES.get(peer, peer), dense_bytes=4 * m.n,
                   rounds=rounds, ratios_of=lambda: {"ratio": 4 * m.n / sum(len(b) for b in last[0])})
    model.cache[("peer", peer, m.n)] = blobs  # for test_peer_decode
    assert all(_bitwise_equal(o, v) for o, v in zip(dec(blobs), m.tensors.values()))


@pytest.mark.parametrize("peer", PEERS)
def test_peer_decode(record, benchmark, model, peer):
    m = _sized(benchmark, model)
    enc, dec, _ = _peer(peer, m.tensors)
    blobs = model.cache.get(("peer", peer, m.n)) or enc()
    out = record(dec, blobs, group=_groups(model)[1], name=PEER_NAMES.get(peer, peer), dense_bytes=4 * m.n,
                 ratio=4 * m.n / sum(len(b) for b in blobs))
    assert all(_bitwise_equal(o, v) for o, v in zip(out, m.tensors.values()))


def test_ans_vs_pcodec_interleaved(record, model, one_thread):
    """values="ans" and pcodec, encode and decode, one thread each, in an order drawn at random
    each round: the speed ratios are medians of the rounds' own ratios, immune to a slow spell."""
    pcodec = pytest.importorskip("pcodec", reason="pcodec is not installed (the [peers] extra)")
    t, n = model.tensors, model.n
    cfg = pcodec.ChunkConfig()
    msg = fk.encode_model(t, values="ans")
    blobs = [pcodec.standalone.simple_compress(v.ravel(), cfg) for v in t.values()]
    ours, theirs = {k: np.empty_like(v) for k, v in t.items()}, [np.empty_like(v) for v in t.values()]

    def pco_dec():
        for b, o in zip(blobs, theirs):
            pcodec.standalone.simple_decompress_into(b, o.reshape(-1))

    round_, times = alternating({
        "enc": lambda: fk.encode_model(t, values="ans"),
        "pco_enc": lambda: [pcodec.standalone.simple_compress(v.ravel(), cfg) for v in t.values()],
        "dec": lambda: fk.decode_model(msg, out=ours),
        "pco_dec": pco_dec,
    }, seed=len(model.key))

    def ratios() -> dict[str, float]:
        tm = {k: np.array(v) for k, v in times.items()}
        return {"rounds": len(tm["enc"]), "ratio_vs_pcodec": sum(len(b) for b in blobs) / len(msg),
                "encode_speed_vs_pcodec": float(np.median(tm["pco_enc"] / tm["enc"])),
                "decode_speed_vs_pcodec": float(np.median(tm["pco_dec"] / tm["dec"])),
                "ms_enc": float(np.median(tm["enc"])) * 1e3, "ms_pcodec_enc": float(np.median(tm["pco_enc"])) * 1e3,
                "ms_dec": float(np.median(tm["dec"])) * 1e3, "ms_pcodec_dec": float(np.median(tm["pco_dec"])) * 1e3}

    record(round_, group=f"ans vs pcodec, interleaved, 1 thread: ResNet-18 {model.label} global top-5%",
           name="encode + decode, ans and pcodec", dense_bytes=4 * 4 * n, ratios_of=ratios, rounds=15)
    assert all(_bitwise_equal(ours[k], v) for k, v in t.items())
    assert all(_bitwise_equal(o, v) for o, v in zip(theirs, t.values()))


# --- lossy values: bits a value, error ------------------------------------------------------------

def _framing(model: Model) -> int:
    """Bytes of a shared-mask message that are not values: the raw message less 4 bytes a value."""
    if "framing" not in model.cache:
        m = model.masks
        raw = fk.encode_model(model.tensors, values="raw", masks=m, reference=m)
        model.cache["framing"] = len(raw) - 4 * model.kept
    return model.cache["framing"]


def _value_bits(model: Model, values: str) -> float:
    m = model.masks
    size = len(fk.encode_model(model.tensors, values=values, masks=m, reference=m))
    return 8 * (size - _framing(model)) / model.kept


def _lossy_extra(model: Model, values: str, msg: bytes) -> dict[str, float]:
    out = fk.decode_model(msg).tensors
    return {"value_bits": _value_bits(model, values), "nominal_bits": NOMINAL[values],
            "msg_bits_a_value": 8 * len(msg) / model.kept, "ratio": 4 * model.n / len(msg), **_errors(model, out)}


@pytest.mark.parametrize("values", list(NOMINAL))
def test_lossy_values(record, model, one_thread, values):
    t = model.tensors
    msg = fk.encode_model(t, values=values)
    record(lambda: fk.encode_model(t, values=values),
           group=f"lossy values, encode, 1 thread: ResNet-18 {model.label} top-5%", name=f"feddip encode {values}",
           dense_bytes=4 * model.n, baseline=values == "ans",
           **_lossy_extra(model, values, msg))
    out = fk.decode_model(msg).tensors
    for k, v in t.items():  # positions are lossless: the pruned places stay +0.0
        assert not np.any(out[k].view(np.uint32)[v == 0])
    plain = values.removesuffix("-ans")
    if plain in ("fp16", "bf16", "int8"):  # the entropy coding is lossless: the same values as plain fp16/bf16/int8
        ref = fk.decode_model(fk.encode_model(t, values=plain)).tensors
        assert all(_bitwise_equal(out[k], ref[k]) for k in t)
    elif plain.startswith("int"):  # nearest rounding: |error| <= scale / 2, scale = max |v| / (2^(b-1) - 1)
        b = int(plain[3:])
        for k, v in t.items():
            scale = float(np.abs(v).max()) / (2 ** (b - 1) - 1)
            assert float(np.abs(out[k].astype(np.float64) - v).max()) <= scale / 2 * (1 + 1e-5)


# --- lossy: NNCodec (DeepCABAC) at our int-b grid -------------------------------------------------

QP_DENSITY = 6  # NNCodec's steps: (64 + qp % 64) * 2^(qp // 64 - 6), 1.6% apart


def _nnc():
    return pytest.importorskip(
        "nncodec.nnc_core",
        reason="NNCodec is not installed: `pip install --no-deps nncodec` (its sdist pins numpy<2 and pulls "
               "torchvision, opencv, pandas, scikit-learn; only its core and the DeepCABAC extension are used)")


def _nnc_encode(params: dict[str, np.ndarray], qp: dict[str, np.int32], dq: bool) -> bytes:
    """nncodec.nnc.compress()'s steps (uniform quantisation, qp per tensor, CABAC) without its
    framework imports (pandas, torchvision, opencv)."""
    core = _nnc()
    mdl = core.nnr_model.NNRModel(params)
    data = core.approximator.init_approx_data(params, mdl.model_info, qp_density=QP_DENSITY, scan_order=0)
    info = core.approximator.ApproxInfo(data, mdl.model_info, "uniform", 0, -38, False, not dq, 10, 0,
                                        nonweight_qp=-75, qp_per_tensor=qp).approx_info
    enc_info = {"cabac_unary_length_minus1": 10, "param_opt_flag": True, "partial_data_counter": 0,
                "general_profile_idc": 1, "node_id_present_flag": 1, "device_id": 0,
                "mps_parent_signalling_enabled_flag": 0, "parent_node_id_present_flag": 0,
                "temporal_context_modeling_flag": 0, "row_skip_enabled_flag": 0, "pre_signalling": 0}
    approx = core.approximator.approx(info, mdl.model_info, data, enc_info)
    return bytes(core.coder.encode(enc_info=enc_info, model_info=mdl.model_info, approx_data=approx)[0])


def _nnc_decode(bitstream: bytes) -> dict[str, np.ndarray]:
    core = _nnc()
    flags = ("mps_sparsification_flag", "lps_sparsification_flag", "mps_pruning_flag", "lps_pruning_flag",
             "mps_unification_flag", "lps_unification_flag", "mps_decomposition_performance_map_flag",
             "lps_decomposition_performance_map_flag")
    info = {"parameter_type": {}, "parameter_dimensions": {}, "parameter_index": {}, "block_identifier": {},
            "topology_storage_format": None, "topology_compression_format": None,
            "performance_maps": {"mps": {}, "lps": {}}, "performance_map_flags": {f: {} for f in flags}}
    data = core.coder.decode(bytearray(bitstream), info, hls_stats={}, oob_dict={})
    core.approximator.rec(data)
    return core.approximator.recompose_params(info, data)["parameters"]


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("coder", ["feddip", "nncodec", "nncodec-dq"])
def test_lossy_vs_nncodec(record, benchmark, model, one_thread, bits, coder):
    m = _sized(benchmark, model)
    t, kept = m.tensors, m.kept
    group = f"int{bits} vs NNCodec, encode, 1 thread: ResNet-18 {model.label} top-5%"
    if coder == "feddip":
        values = f"int{bits}-ans"
        msg = fk.encode_model(t, values=values)
        record(lambda: fk.encode_model(t, values=values), group=group, name=f"feddip {values}",
               dense_bytes=4 * m.n, msg_bits_a_value=8 * len(msg) / kept, ratio=4 * m.n / len(msg),
               **_errors(m, fk.decode_model(msg).tensors))
        return
    _nnc()
    from nncodec.nnc_core.common import get_qp_from_stepsize, get_stepsize_from_qp

    qp, step_vs_ours = {}, 0.0
    for k, v in t.items():  # NNCodec's largest step not over our scale
        scale = float(np.abs(v).max()) / (2 ** (bits - 1) - 1)
        q = np.int32(np.floor(get_qp_from_stepsize(scale, QP_DENSITY)))
        while get_stepsize_from_qp(q, QP_DENSITY) > scale:
            q -= 1
        qp[k] = q
        step_vs_ours = max(step_vs_ours, float(get_stepsize_from_qp(q, QP_DENSITY)) / scale)
    dq = coder == "nncodec-dq"
    timed, last = _last(lambda: _nnc_encode(t, qp, dq))
    record(timed, group=group, name=f"NNCodec DeepCABAC, step <= ours, DQ {'on' if dq else 'off'}",
           dense_bytes=4 * m.n, baseline=not dq, rounds=1, step_vs_ours_max=step_vs_ours,
           ratios_of=lambda: {"msg_bits_a_value": 8 * len(last[0]) / kept, "ratio": 4 * m.n / len(last[0]),
                              **_errors(m, _nnc_decode(last[0]))})


# --- values="ans" on 2 threads: dense elements a second -------------------------------------------

@pytest.mark.parametrize("kind", ["encode", "decode"])
@pytest.mark.parametrize("values", ["raw", "ans"])
def test_ans_two_threads(record, benchmark, model, kind, values):
    t, n = model.tensors, model.n
    msg = fk.encode_model(t, values=values)
    bufs = {k: np.empty_like(v) for k, v in t.items()}
    fn = (lambda: fk.encode_model(t, values=values)) if kind == "encode" else (lambda: fk.decode_model(msg, out=bufs))

    def rate() -> dict[str, float]:
        stats = getattr(benchmark, "stats", None)
        median = stats.stats.median if stats is not None else None
        return {"G_elements_per_s": n / median / 1e9} if median else {}

    fk.set_num_threads(2)
    try:
        record(fn, group=f"{kind} on 2 threads: ResNet-18 {model.label} top-5%",
               name=f"feddip {kind} {values}{' into buffers' if kind == 'decode' else ''}", dense_bytes=4 * n,
               baseline=values == "raw", ratios_of=rate, ratio=4 * n / len(msg))
    finally:
        fk.set_num_threads(0)
    if kind == "decode":
        assert all(_bitwise_equal(bufs[k], v) for k, v in t.items())
