"""Sparse model codecs on ResNet-18-sized weights (11.16M float32, 21 tensors) at density 5%.

Baselines measured in the same run: zstd level 3 on the dense fp32 bytes (the baseline for the
ratio table; reading the arrays' buffers without a copy, with as many zstd worker threads as our
encoder has OpenMP threads), np.packbits + values, scipy CSR. extra_info carries each payload's
compression ratio against dense fp32."""

import io

import numpy as np
import pytest

import feddip_kernels as fk

from .conftest import alternating, resnet18_weights, thread_counts

GROUP_ENC = "encode ResNet-18 11.2M f32 p=5%"
GROUP_DEC = "decode ResNet-18 11.2M f32 p=5%"


@pytest.fixture(scope="module")
def model():
    rng = np.random.default_rng(0)
    ws = resnet18_weights()
    # Pruned to +0.0 (np.where): pruning by w * mask leaves -0.0 at half of the pruned places,
    # which raw values send at a bit each (README, "Codecs"); this group measures the sparse model.
    m = {f"layer{i}": np.where(rng.random(w.shape) < 0.05, w, np.float32(0)) for i, w in enumerate(ws)}
    return m, sum(w.size for w in ws)


@pytest.mark.parametrize("values", ["raw", "bf16", "int8"])
def test_encode(record, model, values):
    m, n = model
    msg = record(lambda: fk.encode_model(m, values=values), group=GROUP_ENC, name=f"feddip encode auto/{values}",
                 dense_bytes=4 * n, ratio=4 * n / len(fk.encode_model(m, values=values)))
    assert values != "raw" or 4 * n / len(msg) >= 16.5


def test_decode(record, model):
    m, n = model
    msg = fk.encode_model(m)
    out = record(lambda: fk.decode_model(msg), group=GROUP_DEC, name="feddip decode auto/raw", dense_bytes=4 * n,
                 ratio=4 * n / len(msg))
    for k, v in m.items():
        np.testing.assert_array_equal(out.tensors[k], v)


def test_decode_into_buffers(record, model):
    # The FL steady state: the receiver decodes every round into the same model buffers.
    m, n = model
    msg = fk.encode_model(m)
    bufs = {k: np.empty_like(v) for k, v in m.items()}
    record(lambda: fk.decode_model(msg, out=bufs), group=GROUP_DEC, name="feddip decode auto/raw into buffers",
           dense_bytes=4 * n, ratio=4 * n / len(msg))
    for k, v in m.items():
        np.testing.assert_array_equal(bufs[k], v)


def _stream(tensors) -> bytes:
    f = io.BytesIO()  # in memory: the codec's cost, not a disk's
    fk.encode_stream(tensors, f)
    return f.getvalue()


def test_encode_stream(record, model):
    m, n = model
    record(_stream, m, group=GROUP_ENC, name="feddip encode_stream auto/raw", dense_bytes=4 * n,
           ratio=4 * n / len(_stream(m)))


def test_decode_stream_into_buffers(record, model):
    m, n = model
    msg = _stream(m)
    bufs = {k: np.empty_like(v) for k, v in m.items()}
    record(lambda: fk.decode_stream(io.BytesIO(msg), out=bufs), group=GROUP_DEC,
           name="feddip decode_stream auto/raw into buffers", dense_bytes=4 * n, ratio=4 * n / len(msg))
    for k, v in m.items():
        np.testing.assert_array_equal(bufs[k], v)


def test_zstd3(record, model):
    zstd = pytest.importorskip("zstandard")
    m, n = model
    c = zstd.ZstdCompressor(level=3, threads=thread_counts()["native (OpenMP)"])

    def enc():
        return [c.compress(v) for v in m.values()]  # the array's buffer, no copy

    blobs = enc()
    ratio = 4 * n / sum(len(b) for b in blobs)
    record(enc, group=GROUP_ENC, name="zstd-3 (dense fp32 bytes)", dense_bytes=4 * n, baseline=True, ratio=ratio)


def test_zstd3_decode(record, model):
    zstd = pytest.importorskip("zstandard")
    m, n = model
    blobs = [zstd.ZstdCompressor(level=3).compress(v) for v in m.values()]
    d = zstd.ZstdDecompressor()
    record(lambda: [d.decompress(b) for b in blobs], group=GROUP_DEC, name="zstd-3 decompress", dense_bytes=4 * n,
           baseline=True, ratio=4 * n / sum(len(b) for b in blobs))


def test_packbits(record, model):
    m, n = model

    def enc():
        return [(np.packbits(v != 0, bitorder="little"), v[v != 0]) for v in m.values()]

    size = sum(a.nbytes + b.nbytes for a, b in enc())
    record(enc, group=GROUP_ENC, name="np.packbits mask + values", dense_bytes=4 * n, ratio=4 * n / size)


def test_scipy_csr(record, model):
    sparse = pytest.importorskip("scipy.sparse")
    m, n = model

    def enc():
        return [sparse.csr_matrix(v.reshape(v.shape[0], -1)) for v in m.values()]

    size = sum(x.data.nbytes + x.indices.nbytes + x.indptr.nbytes for x in enc())
    record(enc, group=GROUP_ENC, name="scipy CSR", dense_bytes=4 * n, ratio=4 * n / size)


# One large tensor (1e8 float32, 5% kept): version 2 codes its positions in runs of 4 Mi elements,
# encoded and decoded on several threads. The 1-thread runs are the baseline of each group.
GROUP_BIG_ENC = "encode one 1e8-element tensor p=5%"
GROUP_BIG_DEC = "decode one 1e8-element tensor p=5% into a buffer"
BIG = 100_000_000


@pytest.fixture(scope="module")
def big():
    rng = np.random.default_rng(7)
    w = np.zeros(BIG, np.float32)
    idx = rng.choice(BIG, BIG // 20, replace=False)
    w[idx] = rng.standard_normal(idx.size, dtype=np.float32)
    return w


@pytest.mark.parametrize("threads", [1, 2])
def test_encode_one_large_tensor(record, big, threads):
    from feddip_kernels.codecs import model

    chunk, model.CHUNK_ELEMS = model.CHUNK_ELEMS, 1 << 40
    try:
        v1 = len(fk.encode_model({"w": big}))  # the same tensor without runs, for the size
    finally:
        model.CHUNK_ELEMS = chunk
    fk.set_num_threads(threads)
    try:
        msg = record(
            lambda: fk.encode_model({"w": big}),
            group=GROUP_BIG_ENC,
            name=f"feddip encode, {threads} thread(s)",
            dense_bytes=4 * BIG,
            baseline=threads == 1,
            size_vs_unsplit=len(fk.encode_model({"w": big})) / v1,
        )
    finally:
        fk.set_num_threads(0)
    assert msg[4] == 2 and len(msg) <= 1.005 * v1


@pytest.mark.parametrize("threads", [1, 2])
def test_decode_one_large_tensor(record, big, threads):
    msg = fk.encode_model({"w": big})
    out = {"w": np.empty_like(big)}
    fk.set_num_threads(threads)
    try:
        record(lambda: fk.decode_model(msg, out=out, max_bytes=4 * BIG), group=GROUP_BIG_DEC,
               name=f"feddip decode, {threads} thread(s)", dense_bytes=4 * BIG, baseline=threads == 1)
    finally:
        fk.set_num_threads(0)
    np.testing.assert_array_equal(out["w"], big)


def test_encode_stream_one_large_tensor(record, big):
    threads = fk.get_num_threads()
    record(_stream, {"w": big}, group=GROUP_BIG_ENC, name=f"feddip encode_stream, {threads} thread(s)",
           dense_bytes=4 * BIG, size_vs_encode_model=len(_stream({"w": big})) / len(fk.encode_model({"w": big})))


def test_decode_stream_one_large_tensor(record, big):
    msg, out = _stream({"w": big}), {"w": np.empty_like(big)}
    record(lambda: fk.decode_stream(io.BytesIO(msg), out=out, max_bytes=4 * BIG), group=GROUP_BIG_DEC,
           name=f"feddip decode_stream, {fk.get_num_threads()} thread(s)", dense_bytes=4 * BIG)
    np.testing.assert_array_equal(out["w"], big)


@pytest.mark.parametrize("kind", ["encode", "decode", "encode_stream", "decode_stream"])
def test_two_thread_speedup_one_large_tensor(record, big, kind):
    """1 and 2 threads back to back in each round, in an order drawn at random each round, so that
    the speed-up is a median of the rounds' own ratios: the separate 1- and 2-thread benchmarks
    above are timed minutes apart, and this machine's memory speed drifts between them."""
    msg, stream_msg, out = fk.encode_model({"w": big}), _stream({"w": big}), {"w": np.empty_like(big)}
    call = {"encode": lambda: fk.encode_model({"w": big}),
            "decode": lambda: fk.decode_model(msg, out=out, max_bytes=4 * BIG),
            "encode_stream": lambda: _stream({"w": big}),
            "decode_stream": lambda: fk.decode_stream(io.BytesIO(stream_msg), out=out, max_bytes=4 * BIG)}[kind]
    def on(threads):
        def run():
            fk.set_num_threads(threads)
            call()
        return run

    alternate, times = alternating({1: on(1), 2: on(2)}, seed=len(kind))

    def round_():
        try:
            alternate()
        finally:
            fk.set_num_threads(0)

    def ratios() -> dict[str, float]:
        one, two = np.array(times[1]), np.array(times[2])
        return {"rounds": len(one), "ms_1_thread": float(np.median(one)) * 1e3,
                "ms_2_threads": float(np.median(two)) * 1e3, "speedup": float(np.median(one / two))}

    record(round_, group="1e8-element tensor p=5%: 2-thread speed-up, interleaved", name=f"{kind}, 1 + 2 threads",
           dense_bytes=8 * BIG, ratios_of=ratios, rounds=25)
    if kind.startswith("decode"):
        np.testing.assert_array_equal(out["w"], big)


GROUP_SMALL = "100 small tensors (64 f32 each): the per-tensor cost"


@pytest.mark.parametrize("kind", ["encode", "decode into buffers"])
def test_many_small_tensors(record, kind):
    """A model's biases and norm parameters are many small tensors: the time here is the codec's
    work per tensor (checks, record headers, the calls), reported as us a tensor."""
    rng = np.random.default_rng(3)
    small = {f"bn{i}.weight": rng.standard_normal(64).astype(np.float32) for i in range(100)}
    msg = fk.encode_model(small)
    bufs = {k: np.empty_like(v) for k, v in small.items()}
    fn = (lambda: fk.encode_model(small)) if kind == "encode" else (lambda: fk.decode_model(msg, out=bufs))
    round_, times = alternating({kind: fn}, seed=0)
    record(round_, group=GROUP_SMALL, name=f"feddip {kind}", dense_bytes=4 * 64 * len(small),
           ratios_of=lambda: {"us_a_tensor": float(np.median(times[kind])) * 1e6 / len(small)})
