import math

import numpy as np
import pytest
from hypothesis import given, strategies as st
from hypothesis.extra import numpy as hnp

import feddip_kernels as fk
from feddip_kernels import reference

ALL = ["native", "numba", "numpy"]


def test_every_backend_is_built():
    # CI installs the native extension and numba (a skip fails there); elsewhere numba is optional.
    if "numba" not in fk.available_backends():
        pytest.skip("numba is not installed (the [numba] extra): its backend's cases are not run")
    assert fk.available_backends() == ALL


# Few distinct magnitudes make ties common; signed zeros, infinities and subnormals included.
SPECIAL = [0.0, -0.0, 1.0, -1.0, 2.0, -2.0, math.inf, -math.inf, 1e-40, -3.5]


@st.composite
def tensor_lists(draw, max_tensors=5):
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    tied = draw(st.booleans())
    elements = st.sampled_from(SPECIAL) if tied else st.floats(allow_nan=False, width=32)
    tensors = draw(
        st.lists(
            hnp.arrays(dtype, hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=6), elements=elements),
            max_size=max_tensors,
        )
    )
    n = sum(t.size for t in tensors)
    k = draw(st.integers(0, n))
    return tensors, k


@given(tensor_lists())
def test_masks_match_reference(backend, case):
    tensors, k = case
    expected = reference.topk_mask_list(tensors, k)
    masks = fk.global_topk_masks(tensors, k, backend=backend)
    assert len(masks) == len(tensors)
    for m, e, t in zip(masks, expected, tensors):
        assert m.dtype == np.bool_ and m.shape == t.shape
        np.testing.assert_array_equal(m, e)
    assert sum(int(m.sum()) for m in masks) == k


@given(tensor_lists())
def test_threshold_matches_reference(backend, case):
    tensors, k = case
    assert fk.global_magnitude_threshold(tensors, k, backend=backend) == reference.magnitude_threshold(tensors, k)


def _big_cases():
    rng = np.random.default_rng(7)
    layered = [
        rng.standard_normal(s).astype(np.float32) * scale
        for s, scale in [((300, 1000), 0.1), ((700_000,), 3.0), ((1000, 300), 1.0)]
    ]
    ties = [np.round(rng.standard_normal(600_000)).astype(np.float32), np.ones(700_000, np.float32)]
    constant = [np.full(1_100_000, -0.5)]  # float64, all tied: the sample bracket cannot help
    skewed = [np.concatenate([np.zeros(1_000_000), rng.standard_normal(200_000)]).astype(np.float32)]
    return [("layered", layered), ("ties", ties), ("constant", constant), ("skewed", skewed)]


@pytest.mark.parametrize("name,tensors", _big_cases())
@pytest.mark.parametrize("frac", [0.0, 1e-6, 0.05, 0.5, 1.0])
def test_large_inputs_match_reference(backend, name, tensors, frac):
    # Over 2^20 elements: exercises the native one-pass sample bracket and its radix fallback.
    n = sum(t.size for t in tensors)
    k = int(frac * n)
    expected = reference.topk_mask_list(tensors, k)
    for m, e in zip(fk.global_topk_masks(tensors, k, backend=backend), expected):
        np.testing.assert_array_equal(m, e)
    assert fk.global_magnitude_threshold(tensors, k, backend=backend) == reference.magnitude_threshold(tensors, k)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_nan_raises(backend, dtype):
    tensors = [np.ones(5, dtype), np.array([1.0, np.nan], dtype)]
    with pytest.raises(ValueError, match="NaN"):
        fk.global_topk_masks(tensors, 2, backend=backend)
    with pytest.raises(ValueError, match="NaN"):
        fk.global_magnitude_threshold(tensors, 0, backend=backend)
    big = [np.ones(1 << 21, dtype)]
    big[0][123_456] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        fk.global_magnitude_threshold(big, 10, backend=backend)


def test_bad_arguments(backend):
    t = [np.ones(4, np.float32)]
    with pytest.raises(ValueError, match="exceeds"):
        fk.global_topk_masks(t, 5, backend=backend)
    with pytest.raises(ValueError, match=">= 0"):
        fk.global_topk_masks(t, -1, backend=backend)
    with pytest.raises(TypeError, match="integer"):
        fk.global_topk_masks(t, 1.5, backend=backend)
    with pytest.raises(ValueError, match="exactly one"):
        fk.global_topk_masks(t, 1, density=0.5, backend=backend)
    with pytest.raises(ValueError, match="density"):
        fk.global_topk_masks(t, density=1.5, backend=backend)
    with pytest.raises(TypeError, match="float32 or float64"):
        fk.global_topk_masks([np.ones(3, np.int32)], 1, backend=backend)
    with pytest.raises(TypeError, match="one dtype"):
        fk.global_topk_masks([np.ones(3, np.float32), np.ones(3)], 1, backend=backend)
    with pytest.raises(TypeError, match="list of arrays"):
        fk.global_topk_masks(np.ones(3, np.float32), 1, backend=backend)
    with pytest.raises(ValueError, match="backend"):
        fk.global_topk_masks(t, 1, backend="gpu")


def test_empty_list(backend):
    assert fk.global_topk_masks([], 0, backend=backend) == []
    assert fk.global_magnitude_threshold([], 0, backend=backend) == math.inf


def test_density_rounding():
    t = [np.arange(10, dtype=np.float32)]
    assert fk.k_for_density(10, 0.25) == 3  # round half up
    assert int(fk.global_topk_masks(t, density=0.25)[0].sum()) == 3


def test_non_contiguous_input(backend):
    a = np.arange(24, dtype=np.float64).reshape(4, 6)[:, ::2]
    m = fk.global_topk_masks([a], 3, backend=backend)[0]
    np.testing.assert_array_equal(m, reference.topk_mask_list([np.ascontiguousarray(a)], 3)[0])


def test_torch_tensors_in_torch_masks_out(backend):
    torch = pytest.importorskip("torch")
    ts = [torch.randn(5, 3, requires_grad=True), torch.randn(7)]
    masks = fk.global_topk_masks(ts, 6, backend=backend)
    assert all(isinstance(m, torch.Tensor) and m.dtype == torch.bool for m in masks)
    expected = reference.topk_mask_list([t.detach().numpy() for t in ts], 6)
    for m, e in zip(masks, expected):
        np.testing.assert_array_equal(m.numpy(), e)


@given(hnp.arrays(np.bool_, st.integers(0, 200)))
def test_pack_matches_numpy(backend, mask):
    bits = fk.pack_mask(mask, backend=backend)
    np.testing.assert_array_equal(bits, np.packbits(mask, bitorder="little"))
    np.testing.assert_array_equal(fk.unpack_mask(bits, mask.shape, backend=backend), mask)


def test_pack_normalises_bytes(backend):
    raw = np.array([0, 1, 2, 255, 128, 0, 7, 0, 9], dtype=np.uint8)
    np.testing.assert_array_equal(fk.pack_mask(raw, backend=backend), np.packbits(raw != 0, bitorder="little"))


def test_unpack_too_short(backend):
    with pytest.raises(ValueError, match="bytes"):
        fk.unpack_mask(np.zeros(1, np.uint8), (3, 3), backend=backend)


def test_erk_densities_hit_target():
    shapes = [(6, 1, 5, 5), (16, 6, 5, 5), (120, 400), (84, 120), (10, 84)]
    sizes = [math.prod(s) for s in shapes]
    for density in [0.01, 0.05, 0.2, 0.5, 1.0]:
        d = fk.erk_densities(shapes, density)
        assert all(0.0 <= x <= 1.0 for x in d)
        assert sum(x * n for x, n in zip(d, sizes)) == pytest.approx(density * sum(sizes))
    d = fk.erk_densities(shapes, 0.05)
    # Raw scores sum(shape)/prod(shape): small layers are denser.
    sparse = [i for i, x in enumerate(d) if x < 1.0]
    raw = [sum(s) / math.prod(s) for s in shapes]
    ratios = {round(d[i] / raw[i], 12) for i in sparse}
    assert len(ratios) == 1


def test_erk_dense_layers():
    shapes = [(6, 1, 5, 5), (16, 6, 5, 5), (120, 400)]
    d = fk.erk_densities(shapes, 0.1, dense=[0])
    assert d[0] == 1.0
    with pytest.raises(ValueError, match="exceed"):
        fk.erk_densities([(100, 100), (2, 2)], 0.0001, dense=[0])
    with pytest.raises(ValueError, match="out of range"):
        fk.erk_densities(shapes, 0.1, dense=[5])


# The native kernel splits tensors into chunks of 2^15 and samples a bracket from 2^20 elements
# on: tensors one element either side of a chunk, totals either side of the sampling threshold.
@pytest.mark.parametrize("total", [(1 << 20) - 1, 1 << 20, (1 << 20) + 1])
@pytest.mark.parametrize("tied", [False, True])
def test_chunk_and_sampling_boundaries_match_reference(backend, total, tied):
    rng = np.random.default_rng(total)
    sizes = [(1 << 15) - 1, 1 << 15, (1 << 15) + 1, 3]
    sizes.append(total - sum(sizes))
    draw = (
        (lambda s: rng.integers(-3, 4, s).astype(np.float32))
        if tied
        else (lambda s: rng.standard_normal(s).astype(np.float32))
    )
    tensors = [draw(s) for s in sizes]
    for k in (1, (1 << 15) + 1, total // 20, total - 1):
        expected = reference.topk_mask_list(tensors, k)
        for m, e in zip(fk.global_topk_masks(tensors, k, backend=backend), expected):
            np.testing.assert_array_equal(m, e)
        assert fk.global_magnitude_threshold(tensors, k, backend=backend) == reference.magnitude_threshold(tensors, k)


def test_auto_falls_back_when_the_native_module_is_missing(monkeypatch):
    from feddip_kernels import _backend

    tensors = [np.arange(-5, 5, dtype=np.float32)]
    expected = reference.topk_mask_list(tensors, 3)
    msg = fk.encode_model({"w": tensors[0]})
    cases = ((["native"], "numba"), (["native", "numba"], "numpy"))
    for missing, chosen in cases if "numba" in fk.available_backends() else cases[1:]:
        for name in missing:
            monkeypatch.setattr(_backend, f"{name}_module", lambda: None)
        assert _backend.resolve("auto") == chosen
        assert fk.available_backends()[0] == chosen
        np.testing.assert_array_equal(fk.global_topk_masks(tensors, 3)[0], expected[0])
        assert fk.encode_model({"w": tensors[0]}) == msg
        w = np.ones(4, np.float32)
        fk.masked_ef_step(w, np.ones(4, np.float32), lr=0.5)
        np.testing.assert_array_equal(w, np.full(4, 0.5, np.float32))
        with pytest.raises(RuntimeError, match="not built"):
            _backend.resolve("native")


@given(tensor_lists())
def test_max_magnitude_matches_reference(backend, case):
    tensors, _ = case
    assert fk.max_magnitude(tensors, backend=backend) == reference.max_magnitude([t for t in tensors])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_max_magnitude_nan_and_empty(backend, dtype):
    assert fk.max_magnitude([], backend=backend) == 0.0
    assert fk.max_magnitude([np.zeros(0, dtype), np.array([-0.0], dtype)], backend=backend) == 0.0
    assert fk.max_magnitude([np.array([1.0, -np.inf], dtype)], backend=backend) == math.inf
    big = np.ones(100_003, dtype)
    big[100_001] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        fk.max_magnitude([np.ones(3, dtype), big], backend=backend)


def _expected_threshold_and_masks(tensors, k):
    """The k-th largest |x| and the masks by the selection rule, without a full sort."""
    mags = np.concatenate([np.abs(t).ravel() for t in tensors])
    th = float(np.partition(mags, mags.size - k)[mags.size - k])
    keep = mags > th
    ties = np.flatnonzero(mags == th)[: k - int(keep.sum())]
    keep[ties] = True
    bounds = np.cumsum([0] + [t.size for t in tensors])
    return (
        th,
        [keep[a:b].reshape(t.shape) for a, b, t in zip(bounds[:-1], bounds[1:], tensors)],
        int((mags == th).sum()),
    )


def _fast_path_cases():
    rng = np.random.default_rng(11)
    sizes = [(1 << 15) + 5, 1000, 1, 31, 33, (1 << 20) + 17, 333_333]  # chunk tails of every length
    normal = [rng.standard_normal(s).astype(np.float32) * np.float32(10.0 ** rng.integers(-3, 2)) for s in sizes]
    # Eight significant bits: many equal keys inside the bracket (the in-cache selection's ties).
    coarse = [np.float32(np.round(w * 16.0) / 16.0) for w in normal]
    special = [w.copy() for w in normal]
    special[0][7] = np.inf
    special[5][-1] = -np.inf
    special[6][:1000] = -0.0
    special[1][3] = 1e-42
    return {"normal": normal, "coarse": coarse, "special": special, "float64": [w.astype(np.float64) for w in normal]}


FAST_PATH_CASES = _fast_path_cases()


@pytest.mark.parametrize("case", sorted(FAST_PATH_CASES))
def test_every_isa_gives_the_exact_top_k(isa, case):
    from feddip_kernels import _core

    tensors = FAST_PATH_CASES[case]
    n = sum(t.size for t in tensors)
    for k in (1, 17, n // 20, n // 2, n - 1, n):
        th, masks, n_tied = _expected_threshold_and_masks(tensors, k)
        fallbacks = _core._sample_fallbacks()
        assert fk.global_magnitude_threshold(tensors, k, backend="native") == th, (case, k)
        for got, want in zip(fk.global_topk_masks(tensors, k, backend="native"), masks):
            np.testing.assert_array_equal(got, want)
        # The results came from the fast path itself (a wrong bracket or gather would otherwise
        # hide behind the radix fallback's correct answer), unless the k-th magnitude's ties alone
        # come near the gather's room of 2^18 keys.
        if n_tied < 1 << 16:
            assert _core._sample_fallbacks() == fallbacks, (case, k, n_tied)


@pytest.mark.parametrize("threads", [1, 4, 16])
def test_bracket_keys_in_few_threads_chunks_stay_on_the_fast_path(isa, threads):
    """Layers of very different scales, as a model's are: the keys near the k-th magnitude all lie
    in one large tensor, so in the chunks of a few threads. Each thread's room for them grows as it
    needs (a fixed share of the room, 1/16 of it on 16 threads, made ResNet-18's masks fall back to
    the radix passes on 8 and 16 threads); the masks and threshold are the same on every thread count."""
    from feddip_kernels import _core

    rng = np.random.default_rng(12)
    tensors = [rng.standard_normal(n).astype(np.float32) * np.float32(s)
               for n, s in ((1 << 22, 1e-3), (1 << 18, 1.0), (1 << 22, 1e3), (5000, 1.0))]
    # All of the 1e3 tensor and half of the unit one, whose 8 chunks hold all the bracket's keys.
    k = (1 << 22) + (1 << 17)
    th, masks, _ = _expected_threshold_and_masks(tensors, k)
    fallbacks = _core._sample_fallbacks()
    assert _core.magnitude_threshold(tensors, k, n_threads=threads) == th
    got = [np.zeros(t.shape, bool) for t in tensors]
    _core.topk_masks(tensors, got, k, n_threads=threads)
    for g, want in zip(got, masks):
        np.testing.assert_array_equal(g, want)
    assert _core._sample_fallbacks() == fallbacks


def test_heavy_ties_fall_back_to_the_radix_passes():
    from feddip_kernels import _core

    w = np.random.default_rng(3).integers(-3, 4, (1 << 21) + 5).astype(np.float32)
    fallbacks = _core._sample_fallbacks()
    th, masks, _ = _expected_threshold_and_masks([w], 100_000)
    assert fk.global_magnitude_threshold([w], 100_000, backend="native") == th
    np.testing.assert_array_equal(fk.global_topk_masks([w], 100_000, backend="native")[0], masks[0])
    assert _core._sample_fallbacks() == fallbacks + 2


@pytest.mark.parametrize("where", [0, 29, 32, (1 << 15) - 1, (1 << 20) + 3])
def test_every_isa_finds_nan(isa, where):
    w = np.random.default_rng(where).standard_normal((1 << 20) + 40).astype(np.float32)
    w[where] = np.nan  # in a vector block, in a block's tail, at a chunk's end, in the last chunk
    with pytest.raises(ValueError, match="NaN"):
        fk.global_magnitude_threshold([w], 1000, backend="native")


def test_a_generator_of_tensors_is_read_once(backend):
    """The top-k functions ask which kernels take the tensors (_backend.kernels_for) before checking
    them: a generator is read once, into a list, for both (it used to be read empty)."""
    rng = np.random.default_rng(8)
    ws = [rng.standard_normal(s).astype(np.float32) for s in (30, 7)]
    want = reference.topk_mask_list(ws, 5)
    got = fk.global_topk_masks((w for w in ws), 5, backend=backend)
    assert len(got) == 2 and all(np.array_equal(a, b) for a, b in zip(got, want))
    assert fk.global_magnitude_threshold((w for w in ws), 5, backend=backend) == reference.magnitude_threshold(ws, 5)
    assert fk.max_magnitude((w for w in ws), backend=backend) == max(np.abs(w).max() for w in ws)
