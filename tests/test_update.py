import numpy as np
import pytest
from hypothesis import assume, example, given, strategies as st
from hypothesis.extra import numpy as hnp

import feddip_kernels as fk
from feddip_kernels import reference


def _tol(dtype):
    # Backends fuse the same arithmetic in one pass; results differ from the step-by-step
    # reference only by rounding (the p = 2 coefficient and the order of fused multiply-adds).
    return dict(rtol=2e-5, atol=2e-6) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-13)


@st.composite
def steps(draw, special=False):
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    n = draw(st.integers(0, 300))
    elems = st.floats(-4, 4, width=32)
    if special:  # NaN and +-inf among ordinary values, in w, g and the buffer
        elems = st.one_of(elems, st.sampled_from([np.nan, np.inf, -np.inf]))
    # Subnormal and tiny weights beside ordinary ones: the p = 2 coefficient lam / ||w*m|| is huge there.
    w_elems = st.one_of(elems, st.sampled_from([1e-45, -3e-42, 1e-38, -1e-30, 1e-20]))
    w = draw(hnp.arrays(dtype, n, elements=w_elems))
    g = draw(hnp.arrays(dtype, n, elements=elems))
    mask = draw(st.one_of(st.none(), hnp.arrays(np.bool_, n)))
    kw = dict(
        lr=draw(st.sampled_from([0.0, 0.01, 0.1])),
        weight_decay=draw(st.sampled_from([0.0, 5e-4])),
        lam=draw(st.sampled_from([0.0, 1e-3, 0.5])),
        p=draw(st.sampled_from([1, 2])),
        momentum=draw(st.sampled_from([0.0, 0.9])),
    )
    use_buf = kw["momentum"] > 0 or draw(st.booleans())
    buf = draw(hnp.arrays(dtype, n, elements=elems)) if use_buf else None
    return w, g, mask, buf, kw, draw(st.booleans()), draw(st.booleans())


_TINY_MASKED = (  # a subnormal masked weight next to an unmasked ordinary one (a CI failure once)
    np.array([1e-45, 4.0], np.float32), np.zeros(2, np.float32), np.array([True, False]), None,
    dict(lr=0.0, weight_decay=0.0, lam=0.0, p=2, momentum=0.0), False, False,
)


@given(steps())
@example(_TINY_MASKED)
@example((*_TINY_MASKED[:4], dict(_TINY_MASKED[4], lr=0.1, lam=1e-3), True, True))
def test_step_matches_reference(backend, case):
    w, g, mask, buf, kw, want_pruned, give_norm = case
    tol = _tol(w.dtype)
    w_ref, buf_ref = w.copy(), None if buf is None else buf.copy()
    pr_ref = np.empty_like(w) if want_pruned else None
    norm = reference.masked_norm(w, mask, p=kw["p"]) if give_norm else None
    out_ref = reference.masked_ef_step(w_ref, g, mask, momentum_buffer=buf_ref, pruned_out=pr_ref, norm=norm, **kw)
    w_b, buf_b = w.copy(), None if buf is None else buf.copy()
    pr_b = np.empty_like(w) if want_pruned else None
    out_b = fk.masked_ef_step(w_b, g, mask, momentum_buffer=buf_b, pruned_out=pr_b, norm=norm, backend=backend, **kw)
    np.testing.assert_allclose(w_b, w_ref, **tol)
    if buf is not None:
        np.testing.assert_allclose(buf_b, buf_ref, **tol)
    if want_pruned:
        np.testing.assert_allclose(pr_b, pr_ref, **tol)
        if mask is not None:
            assert not pr_b[~mask].any()
    # Relative: weights go down to 1e-45, where an absolute tolerance would accept a norm of 0.
    assert out_b == pytest.approx(out_ref, rel=1e-4 if w.dtype == np.float32 else 1e-10, abs=0)


@given(steps(special=True))
def test_nan_and_inf_propagate_as_in_the_reference(backend, case):
    # The documented behaviour: nothing is checked, IEEE arithmetic carries NaN and inf through the
    # same formula in every backend; a non-finite layer norm drops the regulariser for the layer.
    w, g, mask, buf, kw, want_pruned, give_norm = case
    norm = reference.masked_norm(w, mask, p=kw["p"])
    norm = norm if give_norm and np.isfinite(norm) else None
    w_ref, buf_ref = w.copy(), None if buf is None else buf.copy()
    pr_ref = np.empty_like(w) if want_pruned else None
    out_ref = reference.masked_ef_step(w_ref, g, mask, momentum_buffer=buf_ref, pruned_out=pr_ref, norm=norm, **kw)
    w_b, buf_b = w.copy(), None if buf is None else buf.copy()
    pr_b = np.empty_like(w) if want_pruned else None
    out_b = fk.masked_ef_step(w_b, g, mask, momentum_buffer=buf_b, pruned_out=pr_b, norm=norm, backend=backend, **kw)
    tol = _tol(w.dtype)
    np.testing.assert_allclose(w_b, w_ref, **tol)  # NaN where the reference has NaN, same infinities
    if buf is not None:
        np.testing.assert_allclose(buf_b, buf_ref, **tol)
    if want_pruned:
        np.testing.assert_allclose(pr_b, pr_ref, **tol)
    assert out_b == pytest.approx(out_ref, rel=1e-4 if w.dtype == np.float32 else 1e-10, abs=0, nan_ok=True)


@given(steps())
def test_packed_mask_gives_the_same_step(backend, case):
    w, g, mask, buf, kw, want_pruned, _ = case
    assume(mask is not None)
    norm = reference.masked_norm(w, mask, p=kw["p"])  # the same regulariser coefficient for both runs
    runs = []
    for kind in ("mask", "mask_bits"):
        w_b, buf_b = w.copy(), None if buf is None else buf.copy()
        pr_b = np.empty_like(w) if want_pruned else None
        m = {"mask": mask} if kind == "mask" else {"mask_bits": fk.pack_mask(mask)}
        out = fk.masked_ef_step(w_b, g, momentum_buffer=buf_b, pruned_out=pr_b, norm=norm, backend=backend, **m, **kw)
        before = fk.masked_norm(w, p=kw["p"], backend=backend, **m)
        runs.append((w_b, buf_b, pr_b, out, before))
    (w1, b1, p1, o1, n1), (w2, b2, p2, o2, n2) = runs
    # The same arithmetic, but an element may fall in a vector loop (fused multiply-adds) with one
    # layout and in the scalar tail with the other: equal up to rounding.
    tol = _tol(w.dtype)
    np.testing.assert_allclose(w2, w1, **tol)
    if buf is not None:
        np.testing.assert_allclose(b2, b1, **tol)
    if want_pruned:
        np.testing.assert_allclose(p2, p1, **tol)
        assert not p2[~mask].any()
    rel = 1e-5 if w.dtype == np.float32 else 1e-12  # sums may be taken in another order
    assert o2 == pytest.approx(o1, rel=rel, abs=1e-30) and n2 == pytest.approx(n1, rel=rel, abs=1e-30)


@pytest.mark.parametrize("n", [1, 4, 7, 8, 9, 12, 4100, 70_003])
def test_packed_mask_odd_lengths_float64(backend, n):
    # float64 vectors hold 4 elements, half a mask byte: the tails must start on a byte.
    rng = np.random.default_rng(n)
    w, g = rng.standard_normal(n), rng.standard_normal(n)
    mask = rng.random(n) < 0.4
    kw = dict(lr=0.1, weight_decay=5e-4, lam=0.01, p=2, momentum=0.9)
    w_ref, buf_ref, pr_ref = w.copy(), np.zeros(n), np.empty(n)
    reference.masked_ef_step(w_ref, g, mask, momentum_buffer=buf_ref, pruned_out=pr_ref, norm=None, **kw)
    buf, pr = np.zeros(n), np.empty(n)
    fk.masked_ef_step(w, g, mask_bits=fk.pack_mask(mask), momentum_buffer=buf, pruned_out=pr, backend=backend, **kw)
    np.testing.assert_allclose(w, w_ref, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(pr, pr_ref, rtol=1e-12, atol=1e-13)
    assert not pr[~mask].any()


def test_packed_mask_errors():
    w = np.ones(10, np.float32)
    with pytest.raises(ValueError, match="not both"):
        fk.masked_ef_step(w, w, np.ones(10, bool), lr=0.1, mask_bits=np.zeros(2, np.uint8))
    with pytest.raises(ValueError, match="2 expected"):
        fk.masked_ef_step(w, w, lr=0.1, mask_bits=np.zeros(3, np.uint8))
    with pytest.raises(TypeError, match="uint8"):
        fk.masked_norm(w, mask_bits=np.zeros(2, np.int32))


def test_large_multithreaded_matches_reference(backend):
    rng = np.random.default_rng(3)
    n = 1_000_003
    w, g = rng.standard_normal(n).astype(np.float32), rng.standard_normal(n).astype(np.float32)
    mask, buf = rng.random(n) < 0.1, rng.standard_normal(n).astype(np.float32)
    kw = dict(lr=0.05, weight_decay=5e-4, lam=0.01, p=2, momentum=0.9)
    w_ref, buf_ref, pr_ref = w.copy(), buf.copy(), np.empty_like(w)
    out_ref = reference.masked_ef_step(w_ref, g, mask, momentum_buffer=buf_ref, pruned_out=pr_ref, norm=None, **kw)
    pr = np.empty_like(w)
    out = fk.masked_ef_step(w, g, mask, momentum_buffer=buf, pruned_out=pr, backend=backend, **kw)
    np.testing.assert_allclose(w, w_ref, rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(pr, pr_ref, rtol=2e-5, atol=2e-6)
    assert out == pytest.approx(out_ref, rel=1e-5)
    assert fk.masked_norm(w, mask, backend=backend) == pytest.approx(out, rel=1e-6)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("offset", [0, 1, 3])
def test_unaligned_outputs(backend, offset, dtype):
    # Arrays that start off a 16-byte boundary: the kernels' aligned (streaming) stores must not be
    # used on them blindly.
    rng = np.random.default_rng(offset)
    n = 5000
    store = np.zeros((4, n + offset), dtype=dtype)
    w, buf, pr = (store[i, offset:] for i in range(3))
    w[...] = rng.standard_normal(n)
    g, mask = rng.standard_normal(n).astype(dtype), rng.random(n) < 0.3
    kw = dict(lr=0.05, weight_decay=5e-4, lam=0.01, p=1 + offset % 2, momentum=0.9)
    w_ref, buf_ref, pr_ref = w.copy(), buf.copy(), np.empty_like(w)
    reference.masked_ef_step(w_ref, g, mask, momentum_buffer=buf_ref, pruned_out=pr_ref, norm=None, **kw)
    fk.masked_ef_step(w, g, mask, momentum_buffer=buf, pruned_out=pr, backend=backend, **kw)
    np.testing.assert_allclose(w, w_ref, rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(pr, pr_ref, rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(buf, buf_ref, rtol=2e-5, atol=2e-6)
    assert not store[3].any()  # nothing written past the end


def test_returned_norm_is_the_next_steps_norm(backend):
    rng = np.random.default_rng(0)
    w, g, m = rng.standard_normal(1000), rng.standard_normal(1000), rng.random(1000) < 0.5
    out = fk.masked_ef_step(w, g, m, lr=0.1, lam=0.1, backend=backend)
    assert out == pytest.approx(np.linalg.norm(w * m), rel=1e-12)
    out1 = fk.masked_ef_step(w, g, m, lr=0.1, lam=0.1, p=1, backend=backend)
    assert out1 == pytest.approx(np.abs(w * m).sum(), rel=1e-12)


@pytest.mark.parametrize(
    "dtype, tiny",
    [(np.float32, t) for t in (1e-45, 1e-30, 1e-20)] + [(np.float64, t) for t in (1e-45, 1e-200, 1e-310)],
)
def test_tiny_norms_are_exact_and_the_regulariser_bounded(backend, dtype, tiny):
    # Squares of such values underflow and lam / norm overflows the dtype; the norm must still be
    # exact and each regulariser term lam * w_i / norm at most lam (CI once found 1e-45 -> NaN).
    w0 = np.array([tiny, -tiny, 0.0, tiny], dtype=dtype)
    norm = fk.masked_norm(w0, backend=backend)
    assert norm == pytest.approx(float(w0[0]) * np.sqrt(3), rel=1e-6)
    assert norm == pytest.approx(reference.masked_norm(w0, None, p=2), rel=1e-6)
    for lr in (0.0, 0.1):
        w = w0.copy()
        after = fk.masked_ef_step(w, np.zeros_like(w), None, lr=lr, lam=0.5, backend=backend)
        assert after == pytest.approx(reference.masked_norm(w, None, p=2), rel=1e-6)  # exact after the step too
        expected = w0.astype(np.float64) - lr * 0.5 * np.sign(w0) / np.sqrt(3)
        np.testing.assert_allclose(w, expected, rtol=1e-5, atol=float(w0[0]) * 1e-3)


def test_zero_norm_gives_zero_regulariser(backend):
    w = np.zeros(10, np.float32)
    g = np.ones(10, np.float32)
    fk.masked_ef_step(w, g, lr=1.0, lam=5.0, backend=backend)
    np.testing.assert_array_equal(w, -np.ones(10, np.float32))


def test_bad_arguments(backend):
    w = np.ones(4, np.float32)
    with pytest.raises(ValueError, match="g must match"):
        fk.masked_ef_step(w, np.ones(3, np.float32), lr=0.1, backend=backend)
    with pytest.raises(ValueError, match="g must match"):
        fk.masked_ef_step(w, np.ones(4), lr=0.1, backend=backend)
    with pytest.raises(ValueError, match="mask has"):
        fk.masked_ef_step(w, w.copy(), np.ones(5, bool), lr=0.1, backend=backend)
    with pytest.raises(ValueError, match="momentum_buffer"):
        fk.masked_ef_step(w, w.copy(), lr=0.1, momentum=0.9, backend=backend)
    with pytest.raises(ValueError, match="p must be"):
        fk.masked_ef_step(w, w.copy(), lr=0.1, p=3, backend=backend)
    with pytest.raises(ValueError, match="lr must be"):
        fk.masked_ef_step(w, w.copy(), lr=float("nan"), backend=backend)
    with pytest.raises(ValueError, match="in place"):
        fk.masked_ef_step(np.ones((4, 4), np.float32)[:, 0], np.ones(4, np.float32), lr=0.1, backend=backend)
    ro = np.ones(4, np.float32)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="in place"):
        fk.masked_ef_step(ro, w, lr=0.1, backend=backend)
    with pytest.raises(TypeError, match="float32 or float64"):
        fk.masked_ef_step(np.ones(4, np.int64), np.ones(4, np.int64), lr=0.1, backend=backend)
    with pytest.raises(TypeError, match="pruned_out"):
        fk.masked_ef_step(w, w.copy(), lr=0.1, pruned_out=np.ones(4), backend=backend)


# The kernels change path at these sizes: the AVX2 tile (512), the parallel chunk (4096) and the
# threading threshold (65536); each side of each, in every backend, against the reference.
BOUNDARY_SIZES = [511, 512, 513, 4095, 4096, 4097, 65535, 65536, 65537]


@pytest.mark.parametrize("n", BOUNDARY_SIZES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("packed", [False, True])
def test_boundary_sizes_match_reference(backend, n, dtype, packed):
    rng = np.random.default_rng(n)
    w, g = rng.standard_normal(n).astype(dtype), rng.standard_normal(n).astype(dtype)
    mask, buf = rng.random(n) < 0.3, rng.standard_normal(n).astype(dtype)
    for p in (1, 2):
        kw = dict(lr=0.05, weight_decay=5e-4, lam=0.01, p=p, momentum=0.9)
        w_ref, buf_ref, pr_ref = w.copy(), buf.copy(), np.empty_like(w)
        out_ref = reference.masked_ef_step(w_ref, g, mask, momentum_buffer=buf_ref, pruned_out=pr_ref, norm=None, **kw)
        w_b, buf_b, pr_b = w.copy(), buf.copy(), np.empty_like(w)
        m = {"mask_bits": fk.pack_mask(mask)} if packed else {"mask": mask}
        out = fk.masked_ef_step(w_b, g, momentum_buffer=buf_b, pruned_out=pr_b, backend=backend, **m, **kw)
        tol = _tol(dtype)
        np.testing.assert_allclose(w_b, w_ref, **tol)
        np.testing.assert_allclose(buf_b, buf_ref, **tol)
        np.testing.assert_allclose(pr_b, pr_ref, **tol)
        rel = 1e-5 if dtype == np.float32 else 1e-12
        assert out == pytest.approx(out_ref, rel=rel, abs=0)
        assert fk.masked_norm(w_b, p=p, backend=backend, **m) == pytest.approx(
            reference.masked_norm(w_ref, mask, p=p), rel=rel, abs=0
        )


@pytest.mark.parametrize("dtype, big", [(np.float32, 3e19), (np.float32, 3e38), (np.float64, 1e200)])
def test_huge_weights_have_a_finite_norm(backend, dtype, big):
    # Squares of float32 weights of 3e19 overflow float32; the norm is accumulated in double (and
    # float64 squares beyond double's range are rescaled), as the docstring says.
    n = 5000  # more than one chunk
    w = np.full(n, big, dtype=dtype)
    expected = reference.masked_norm(w, None, p=2)
    assert np.isfinite(expected)
    assert fk.masked_norm(w, backend=backend) == pytest.approx(expected, rel=1e-6)
    assert fk.masked_norm(w, p=1, backend=backend) == pytest.approx(float(big) * n, rel=1e-6)
    after = fk.masked_ef_step(w, np.zeros_like(w), None, lr=0.0, lam=0.1, backend=backend)
    assert after == pytest.approx(expected, rel=1e-6)


def test_non_finite_norm_is_taken_and_drops_the_regulariser(backend):
    w = np.ones(8, np.float32)
    fk.masked_ef_step(w, np.zeros(8, np.float32), lr=1.0, lam=5.0, norm=float("nan"), backend=backend)
    np.testing.assert_array_equal(w, np.ones(8, np.float32))
    with pytest.raises(ValueError, match="norm must be"):
        fk.masked_ef_step(w, w.copy(), lr=0.1, norm=-1.0, backend=backend)


def test_overlapping_arrays_are_rejected(backend):
    store = np.zeros(300, np.float32)
    w, g, mask = store[:100], np.ones(100, np.float32), np.ones(100, bool)
    cases = {
        "pruned_out": dict(pruned_out=store[50:150]),
        "momentum_buffer": dict(momentum_buffer=store[99:199], momentum=0.9),
    }
    for _name, kw in cases.items():
        with pytest.raises(ValueError, match="share memory"):
            fk.masked_ef_step(w, g, mask, lr=0.1, backend=backend, **kw)
    with pytest.raises(ValueError, match="share memory"):
        fk.masked_ef_step(w, store[10:110], mask, lr=0.1, backend=backend)
    fk.masked_ef_step(w, g, mask, lr=0.1, pruned_out=store[100:200], momentum_buffer=store[200:], momentum=0.9,
                      backend=backend)  # adjacent is fine


def test_native_results_do_not_depend_on_the_thread_count():
    native = pytest.importorskip("feddip_kernels._core")
    rng = np.random.default_rng(9)
    n = 1 << 20
    w0, g = rng.standard_normal(n).astype(np.float32), rng.standard_normal(n).astype(np.float32)
    mask = rng.random(n) < 0.2
    runs = []
    for threads in (1, 2, 3):
        w, buf, pr = w0.copy(), np.zeros(n, np.float32), np.empty(n, np.float32)
        out = native.masked_ef_step(w, g, mask, momentum_buffer=buf, pruned_out=pr, lr=0.05, weight_decay=5e-4,
                                    lam=0.01, momentum=0.9, p=2, norm=None, n_threads=threads)
        norm = native.masked_norm(w, mask, p=2, n_threads=threads)
        th = native.magnitude_threshold([w0, g], 12345, n_threads=threads)
        masks = [np.zeros(n, bool), np.zeros(n, bool)]
        native.topk_masks([w0, g], masks, 12345, n_threads=threads)
        runs.append((w.tobytes(), buf.tobytes(), pr.tobytes(), out, norm, th, masks[0].tobytes(), masks[1].tobytes()))
    assert runs[0] == runs[1] == runs[2]


def test_set_num_threads_is_honoured_and_validated():
    rng = np.random.default_rng(4)
    w0, g = rng.standard_normal(1 << 18).astype(np.float32), rng.standard_normal(1 << 18).astype(np.float32)
    default = fk.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            fk.set_num_threads(n)
            core = fk._backend.native_module()
            assert fk.get_num_threads() == (n if core is not None and core.openmp else 1)
            w = w0.copy()
            norm = fk.masked_ef_step(w, g, w0 > 0, lr=0.1, lam=0.01)
            results.append((w.tobytes(), norm, fk.global_magnitude_threshold([w0, g], 999)))
        assert results[0] == results[1]  # the same bits whatever the thread count
        for bad in (-1, 1.5, True, "2", 2**31, 4097, 2**64):  # 2**31 raised TypeError from the binding
            with pytest.raises(ValueError, match="integer from 0 to 4096"):
                fk.set_num_threads(bad)
    finally:
        fk.set_num_threads(0)
    assert fk.get_num_threads() == default


def _model(rng, sizes, dtype, *, packed):
    """Layers of every kind at once: masked or not, with or without a buffer and a pruned copy, norm
    given or not (layer i takes the kinds from the bits of i)."""
    layers = []
    for i, n in enumerate(sizes):
        w = rng.standard_normal(n).astype(dtype)
        g = rng.standard_normal(n).astype(dtype)
        mask = rng.random(n) < 0.3 if i % 2 == 0 else None
        bits = None if mask is None else fk.pack_mask(mask)
        buf = rng.standard_normal(n).astype(dtype) if i % 4 < 2 else None
        pruned = np.full(n, 7, dtype) if i % 3 else None
        norm = reference.masked_norm(w, mask, p=2) if i % 5 else None
        layers.append(dict(w=w, g=g, mask=None if packed else mask, mask_bits=bits if packed else None, buf=buf,
                           pruned=pruned, norm=norm))
    return layers


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("p", [1, 2])
def test_many_layers_in_one_call_step_as_one_call_each(backend, packed, dtype, p):
    sizes = [0, 1, 7, 4095, 4096, 4097, 70_001, 9, 20_000, 3]
    kw = dict(lr=0.05, weight_decay=5e-4, lam=0.01, p=p, momentum=0.9)
    one = _model(np.random.default_rng(p), sizes, dtype, packed=packed)
    many = [{k: v.copy() if isinstance(v, np.ndarray) else v for k, v in layer.items()} for layer in one]
    want = [fk.masked_ef_step(L["w"], L["g"], L["mask"], mask_bits=L["mask_bits"], momentum_buffer=L["buf"],
                              pruned_out=L["pruned"], norm=L["norm"], backend=backend,
                              **dict(kw, momentum=kw["momentum"] if L["buf"] is not None else 0.0)) for L in one]
    # One momentum for all layers: layers without a buffer step without momentum in the loop above,
    # so the call below gives them momentum 0.9 and a buffer of zeros is the same (buf = d).
    for L in many:
        if L["buf"] is None:
            L["buf"] = np.zeros_like(L["w"])
    got = fk.masked_ef_step_many(
        [L["w"] for L in many], [L["g"] for L in many], None if packed else [L["mask"] for L in many],
        mask_bits=[L["mask_bits"] for L in many] if packed else None, momentum_buffers=[L["buf"] for L in many],
        pruned_outs=[L["pruned"] for L in many], norms=[L["norm"] for L in many], backend=backend, **kw)
    assert got == want  # the same bits: each layer's terms are added in the same order
    for a, b in zip(one, many):
        assert a["w"].tobytes() == b["w"].tobytes()
        if a["pruned"] is not None:
            assert a["pruned"].tobytes() == b["pruned"].tobytes()
        if a["buf"] is not None:
            assert a["buf"].tobytes() == b["buf"].tobytes()


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("offset", [0, 16, None])  # pruned copy 64-, 16- or one element past: each store path
def test_every_isa_steps_as_the_reference(isa, packed, dtype, p, offset):
    """Each vector path of the native step against the reference, and one call for all layers
    bit for bit as one call each (the norm's terms added in the same order on every path)."""
    sizes = [1, 15, 16, 17, 4095, 4097, 70_001, 100_003]
    kw = dict(lr=0.05, weight_decay=5e-4, lam=0.01, p=p, momentum=0.9)
    base = _model(np.random.default_rng(p + 7), sizes, dtype, packed=packed)
    offset = np.dtype(dtype).itemsize if offset is None else offset

    def copy():  # the layers anew, each pruned copy at `offset` bytes past a 64-byte boundary
        layers = []
        for L in base:
            room = np.empty(L["w"].size + 32, dtype)
            start = (-room.ctypes.data % 64 + offset) // room.itemsize
            layers.append(dict({k: v.copy() if isinstance(v, np.ndarray) else v for k, v in L.items()},
                               buf=np.zeros_like(L["w"]) if L["buf"] is None else L["buf"].copy(),
                               pruned=room[start : start + L["w"].size]))
        return layers

    ref, one, many = copy(), copy(), copy()
    assert all(L["pruned"].ctypes.data % 64 == offset for L in one if L["pruned"].size)
    want = [reference.masked_ef_step(
        L["w"], L["g"], fk.unpack_mask(L["mask_bits"], L["w"].size) if L["mask_bits"] is not None else L["mask"],
        momentum_buffer=L["buf"], pruned_out=L["pruned"], norm=L["norm"], **kw) for L in ref]
    single = [fk.masked_ef_step(L["w"], L["g"], L["mask"], mask_bits=L["mask_bits"], momentum_buffer=L["buf"],
                                pruned_out=L["pruned"], norm=L["norm"], backend="native", **kw) for L in one]
    for L, R in zip(one, ref):
        for key in ("w", "pruned", "buf"):
            np.testing.assert_allclose(L[key], R[key], **_tol(dtype))
    assert single == pytest.approx(want, rel=1e-5 if dtype == np.float32 else 1e-11)
    got = fk.masked_ef_step_many(
        [L["w"] for L in many], [L["g"] for L in many], None if packed else [L["mask"] for L in many],
        mask_bits=[L["mask_bits"] for L in many] if packed else None, momentum_buffers=[L["buf"] for L in many],
        pruned_outs=[L["pruned"] for L in many], norms=[L["norm"] for L in many], backend="native", **kw)
    assert got == single
    for a, b in zip(one, many):
        for key in ("w", "pruned", "buf"):
            assert a[key].tobytes() == b[key].tobytes()


@pytest.fixture
def step_ways():
    """The native step's settings for its stores and loop timing, set by the test and restored after
    it, and what the timing had learnt forgotten before."""
    native = pytest.importorskip("feddip_kernels._core")
    before = native._step_stores(), native._step_tuning()
    native._step_tuning_choices(forget=True)
    yield native
    native._step_stores(before[0])
    native._step_tuning(before[1])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("offset", [0, 16, None])  # pruned copy 64-, 16- or one element past a boundary
def test_every_way_of_running_the_step_gives_the_same_bits(isa, step_ways, dtype, offset):
    """Streaming stores or stores through the cache, the widest loop or the loop chosen by timing
    (the AVX-512 and AVX2 loops by turns until it chooses) give the same weights, buffers, copies and
    norms, step after step."""
    sizes = [3, 4097, 70_001, 100_003]
    kw = dict(lr=0.05, weight_decay=5e-4, lam=0.01, p=2, momentum=0.9)
    rng = np.random.default_rng(11)
    base = _model(rng, sizes, dtype, packed=True)
    for L in base:  # magnitudes over a wide range: the order the norm's terms are added in shows in its bits
        L["w"] *= np.exp2(rng.integers(-12, 13, L["w"].size)).astype(dtype)
    offset = np.dtype(dtype).itemsize if offset is None else offset
    runs = {}
    for stores, tuning in (("stream", False), ("cache", False), ("stream", True), ("cache", True)):
        step_ways._step_stores(stores)
        step_ways._step_tuning(tuning)
        step_ways._step_tuning_choices(forget=True)
        layers = []
        for L in base:
            room = np.empty(L["w"].size + 32, dtype)
            start = (-room.ctypes.data % 64 + offset) // room.itemsize
            layers.append(dict(w=L["w"].copy(), g=L["g"], bits=L["mask_bits"], buf=np.zeros_like(L["w"]),
                               pruned=room[start : start + L["w"].size]))
        norms = [None] * len(layers)
        trace = []
        for _ in range(1 + 2 * 4 + 2):  # past the untimed call and four timed calls of each loop
            norms = fk.masked_ef_step_many(
                [L["w"] for L in layers], [L["g"] for L in layers], mask_bits=[L["bits"] for L in layers],
                momentum_buffers=[L["buf"] for L in layers], pruned_outs=[L["pruned"] for L in layers], norms=norms,
                backend="native", **kw)
            trace.append((list(norms), *(b"".join(L[k].tobytes() for L in layers) for k in ("w", "buf", "pruned"))))
        runs[stores, tuning] = trace
        choices = step_ways._step_tuning_choices()
        if not (tuning and isa == "avx512" and dtype == np.float32):
            assert choices == []  # nothing to choose
            continue
        ((_, threads, chosen, avx512_s, avx2_s),) = choices
        assert threads == fk.get_num_threads() and chosen in ("avx512", "avx2")  # both loops timed, one kept
        assert 0 < min(avx512_s, avx2_s) and max(avx512_s, avx2_s) < np.inf
        assert (avx512_s, avx2_s)[chosen == "avx2"] == min(avx512_s, avx2_s)
    first, *rest = runs.values()
    assert all(r == first for r in rest)


def test_step_settings_are_checked_and_the_timing_forgotten(step_ways):
    with pytest.raises(ValueError, match="step stores must be stream or cache"):
        step_ways._step_stores("nontemporal")
    step_ways._step_tuning(True)
    assert step_ways._step_tuning_choices() == []
    w = np.ones(10, np.float32)
    fk.masked_ef_step(w, np.ones_like(w), None, pruned_out=np.empty_like(w), lr=0.1, backend="native")
    if step_ways._isa() != "avx512":
        assert step_ways._step_tuning_choices() == []  # one loop: nothing to time
        return
    (entry,) = step_ways._step_tuning_choices()
    # w read and written, g read, the copy written: 160 bytes; the first call is not timed
    assert entry == (int(np.log2(10 * 4 * 4)), 1, "open", np.inf, np.inf)
    assert step_ways._step_tuning(False) is True and step_ways._step_tuning() is False
    assert step_ways._step_stores("cache") == "stream" and step_ways._step_stores() == "cache"
    assert step_ways._step_tuning_choices(forget=True) == [entry]
    assert step_ways._step_tuning_choices() == []


def test_many_layers_native_matches_reference_and_every_thread_count():
    native = pytest.importorskip("feddip_kernels._core")
    layers = _model(np.random.default_rng(5), [70_000, 1, 300_000, 4096, 5], np.float32, packed=False)
    kw = dict(lr=0.05, weight_decay=5e-4, lam=0.01, p=2, momentum=0.9)
    results = []
    for be, threads in (("numpy", 0), ("native", 1), ("native", 2), ("native", 3)):
        ws = [L["w"].copy() for L in layers]
        bufs = [np.zeros_like(w) for w in ws]
        prs = [np.empty_like(w) for w in ws]
        args = (ws, [L["g"] for L in layers], [L["mask"] for L in layers])
        opts = dict(momentum_buffers=bufs, pruned_outs=prs, norms=[L["norm"] for L in layers], **kw)
        if be == "numpy":
            ref = (reference.masked_ef_step_many(*args, **opts), ws, prs)
            continue
        norms = native.masked_ef_step_many(*args, n_threads=threads, **opts)
        results.append((norms, b"".join(w.tobytes() for w in ws), b"".join(x.tobytes() for x in prs)))
        assert norms == pytest.approx(ref[0], rel=1e-5)
        for w, w_ref, x, x_ref in zip(ws, ref[1], prs, ref[2]):
            np.testing.assert_allclose(w, w_ref, **_tol(np.float32))
            np.testing.assert_allclose(x, x_ref, **_tol(np.float32))
    assert results[0] == results[1] == results[2]


def test_many_layers_bad_arguments(backend):
    w = [np.zeros(10, np.float32), np.zeros(5, np.float32)]
    g = [np.ones(10, np.float32), np.ones(5, np.float32)]
    with pytest.raises(ValueError, match="one entry per layer"):
        fk.masked_ef_step_many(w, g, [None], lr=0.1, backend=backend)
    with pytest.raises(ValueError, match="one entry per layer"):
        fk.masked_ef_step_many(w, g[:1], lr=0.1, backend=backend)
    with pytest.raises(ValueError, match="same way"):
        fk.masked_ef_step_many(w, g, [np.ones(10, bool), None], mask_bits=[None, fk.pack_mask(np.ones(5, bool))],
                               lr=0.1, backend=backend)
    with pytest.raises(ValueError, match="g must match w"):
        fk.masked_ef_step_many(w, g[::-1], lr=0.1, backend=backend)
    with pytest.raises(ValueError, match="momentum_buffer"):
        fk.masked_ef_step_many(w, g, lr=0.1, momentum=0.9, backend=backend)
    with pytest.raises(ValueError, match="lr"):
        fk.masked_ef_step_many(w, g, lr=-1.0, backend=backend)
    assert fk.masked_ef_step_many([], [], lr=0.1, backend=backend) == []


def _read_only(a: np.ndarray) -> np.ndarray:
    a.flags.writeable = False
    return a


def test_the_validator_passes_plain_arrays_as_they_are_and_checks_or_converts_the_rest(backend):
    """The step's one validator (update._check_layers): NumPy arrays that the host kernels take as
    they are pass through unchanged after a few checks (a small model's step makes many calls);
    anything else goes layer by layer through _host_layer, which converts it (torch CPU tensors to
    views of their memory, masks to bool, norms to float) or refuses it with the error that names
    the problem, before any kernel runs. Either way the public step gives the same bits."""
    from feddip_kernels import _backend, update

    rng = np.random.default_rng(3)
    sizes = [70_000, 5, 4096]
    kw = dict(lr=0.05, weight_decay=5e-4, lam=0.01, momentum=0.9, p=2)

    def layers():
        r = np.random.default_rng(4)
        ws = [r.standard_normal(n).astype(np.float32) for n in sizes]
        return ws, [np.zeros_like(w) for w in ws], [np.empty_like(w) for w in ws]

    gs = [rng.standard_normal(n).astype(np.float32) for n in sizes]
    bits = [fk.pack_mask(rng.random(n) < 0.2) for n in sizes]
    (ws, bufs, outs), (ws2, bufs2, outs2) = layers(), layers()
    k = _backend.kernels(backend)
    checked, packed = update._check_layers(k, ws, gs, None, bits, bufs, outs, [None, 1.0, None], 0.9)
    assert packed and all(a is b for a, b in zip(checked, (ws, gs, bits, bufs, outs)))  # the very lists
    masks = [rng.random(n) < 0.5 for n in sizes]
    checked, packed = update._check_layers(k, ws, gs, masks, None, None, None, None, 0.0)
    assert not packed and checked[2] is masks and checked[3] == [None] * 3
    fast = fk.masked_ef_step_many(ws, gs, mask_bits=bits, momentum_buffers=bufs, pruned_outs=outs,
                                  norms=[None, 1.0, None], backend=backend, **kw)
    torch = pytest.importorskip("torch")  # torch tensors are converted to views of their memory
    as_t = [torch.from_numpy(a) for a in ws2]
    converted = fk.masked_ef_step_many(as_t, gs, mask_bits=bits, momentum_buffers=bufs2, pruned_outs=outs2,
                                       norms=[None, 1, None], backend=backend, **kw)
    assert fast == converted
    assert all(a.tobytes() == b.tobytes() for a, b in zip(ws + bufs + outs, ws2 + bufs2 + outs2))
    w, g, buf = np.zeros(8, np.float32), np.ones(8, np.float32), np.zeros(8, np.float32)
    (tw,), _, (tm,), _, _, (tn,) = update._check_layers(k, [torch.from_numpy(w)], [g], [np.ones(8, np.uint8)], None,
                                                         [buf], None, [1], 0.9)[0]
    assert np.shares_memory(tw, w) and tm.dtype == bool and type(tn) is float
    refused = {
        "int8 bits": (dict(mask_bits=fk.pack_mask(np.ones(8, bool)).view(np.int8)), TypeError, "mask_bits has dtype"),
        "momentum without a buffer": (dict(momentum_buffer=None), ValueError, "needs a momentum_buffer"),
        "a negative norm": (dict(norm=-1.0), ValueError, "norm must be"),
        "a strided w": (dict(w=np.zeros(16, np.float32)[::2]), ValueError, "C-contiguous"),
        "a read-only w": (dict(w=_read_only(np.zeros(8, np.float32))), ValueError, "C-contiguous"),
        "a float16 gradient": (dict(g=g.astype(np.float16)), ValueError, "g must match w"),
        "a float64 buffer": (dict(momentum_buffer=np.zeros(8)), TypeError, "momentum_buffer has dtype float64"),
        "both masks": (dict(mask=np.ones(8, bool), mask_bits=fk.pack_mask(np.ones(8, bool))), ValueError, "not both"),
    }
    for _what, (change, error, message) in refused.items():
        args = dict(w=w, g=g, mask=None, mask_bits=None, momentum_buffer=buf, pruned_out=None, momentum=0.9, norm=None)
        args.update(change)
        with pytest.raises(error, match=message):
            update._host_layer(**args)
        with pytest.raises(error, match=message):
            fk.masked_ef_step(args.pop("w"), args.pop("g"), lr=0.1, backend=backend, **args)


def test_many_layers_sharing_memory_are_rejected(backend):
    store = np.zeros(300, np.float32)
    g = [np.ones(100, np.float32), np.ones(100, np.float32)]
    with pytest.raises(ValueError, match="share memory"):  # layer 1's w overlaps layer 0's w
        fk.masked_ef_step_many([store[:100], store[50:150]], g, lr=0.1, backend=backend)
    with pytest.raises(ValueError, match="share memory"):  # layer 1's pruned copy is layer 0's w
        fk.masked_ef_step_many([store[:100], store[100:200]], g, pruned_outs=[None, store[:100]], lr=0.1,
                               backend=backend)
    fk.masked_ef_step_many([store[:100], store[100:200]], g, pruned_outs=[store[200:], None], lr=0.1,
                           backend=backend)  # adjacent is fine


def test_layers_of_both_float_types_step_in_one_call_as_one_at_a_time(backend):
    """The native step refused float32 and float64 layers in one call, which numba and numpy took."""
    rng = np.random.default_rng(11)
    layers = [(n, dt) for n, dt in ((300, np.float32), (41, np.float64), (7, np.float32), (1000, np.float64))]
    many = [dict(w=rng.standard_normal(n).astype(dt), g=rng.standard_normal(n).astype(dt), m=rng.random(n) < 0.3,
                 buf=np.zeros(n, dt), out=np.zeros(n, dt)) for n, dt in layers]
    one = [{k: v.copy() for k, v in L.items()} for L in many]
    kw = dict(lr=0.1, weight_decay=1e-3, lam=0.01, momentum=0.9, backend=backend)
    norms = fk.masked_ef_step_many(
        [L["w"] for L in many],
        [L["g"] for L in many],
        [L["m"] for L in many],
        momentum_buffers=[L["buf"] for L in many],
        pruned_outs=[L["out"] for L in many],
        **kw,
    )
    want = [fk.masked_ef_step(L["w"], L["g"], L["m"], momentum_buffer=L["buf"], pruned_out=L["out"], **kw) for L in one]
    assert norms == want
    for a, b in zip(many, one):
        for k in ("w", "buf", "out"):
            assert a[k].dtype == b[k].dtype and a[k].tobytes() == b[k].tobytes()
