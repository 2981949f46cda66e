"""The torch kernels that run where CUDA tensors are (_torch_kernels, the device kernels), checked
on CPU tensors against the NumPy reference: the same torch operations run on either device. The
public entry points route to them for tensors on a device (_backend.kernels_for, and the codecs'
per-tensor `on_device`); `on_device` is patched here so that the routing itself is exercised on
the CPU."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.extra import numpy as hnp

import feddip_kernels as fk
from feddip_kernels import _backend, codecs, reference

torch = pytest.importorskip("torch")
from feddip_kernels import _torch_golomb as tg, _torch_kernels as tk  # noqa: E402


@st.composite
def tensor_lists(draw):
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    count = draw(st.integers(1, 4))
    values = st.sampled_from([0.0, -0.0, 1.0, -1.0, 2.5, np.inf, -np.inf]) if draw(st.booleans()) else st.floats(
        -1e3, 1e3, width=32)
    arrays = [draw(hnp.arrays(dtype, hnp.array_shapes(min_dims=1, max_dims=3, min_side=0, max_side=7), elements=values))
              for _ in range(count)]
    n = sum(a.size for a in arrays)
    k = draw(st.integers(0, n))
    return arrays, k


@given(tensor_lists())
def test_topk_masks_and_threshold_match_the_reference(case):
    arrays, k = case
    before = [a.copy() for a in arrays]
    masks = tk.topk_masks([torch.from_numpy(a) for a in arrays], k)
    for a, b in zip(arrays, before):  # the inputs are read, never written (one tensor's flat copy is a view)
        np.testing.assert_array_equal(a, b)
    for got, want in zip(masks, reference.topk_mask_list(arrays, k)):
        np.testing.assert_array_equal(got.numpy(), want)
    assert tk.magnitude_threshold([torch.from_numpy(a) for a in arrays], k) == reference.magnitude_threshold(arrays, k)


def test_topk_on_large_inputs_takes_the_sampled_bracket_and_its_fallback():
    rng = np.random.default_rng(0)
    untied = [rng.standard_normal(s).astype(np.float32) for s in (300_000, 7, 120_000)]
    tied = [np.repeat(rng.standard_normal(50).astype(np.float32), 4000)]  # the bracket misses: fallback
    for arrays in (untied, tied):
        n = sum(a.size for a in arrays)
        for k in (1, 17, n // 20, n // 2, n - 1, n):
            ts = [torch.from_numpy(a) for a in arrays]
            for got, want in zip(tk.topk_masks(ts, k), reference.topk_mask_list(arrays, k)):
                np.testing.assert_array_equal(got.numpy(), want)


def test_topk_rejects_nan_and_mixed_dtypes(routed):
    with pytest.raises(ValueError, match="input contains NaN"):  # the host kernels' message
        tk.topk_masks([torch.tensor([1.0, float("nan")])], 1)
    with pytest.raises(TypeError, match="one dtype"):  # the public layer's validator, as for host arrays
        fk.global_topk_masks([torch.zeros(2), torch.zeros(2, dtype=torch.float64)], 1)


@given(hnp.arrays(st.sampled_from([np.float32, np.float64]), hnp.array_shapes(min_dims=0, max_dims=3, max_side=9),
                  elements=st.sampled_from([0.0, -0.0, 1.5, -2.0, np.inf, np.nan])),
       st.booleans(), st.integers(0, 2**32 - 1))
def test_sparsify_matches_the_reference(a, with_mask, seed):
    """The codecs' device step (DeviceSparse) finds the positions and values that the host does."""
    mask = np.asarray(np.random.default_rng(seed).random(a.shape) < 0.5) if with_mask else None
    sparse = tk.DeviceSparse([(torch.from_numpy(a), None if mask is None else torch.from_numpy(mask), False)], None)
    (got,) = sparse.fetch([tk.Plan([0], True, 0, False)])
    want_bits, want_vals = reference.sparsify(a, mask)
    np.testing.assert_array_equal(got.bits, want_bits)
    assert got.vals.dtype == a.dtype and got.vals.tobytes() == np.ascontiguousarray(want_vals).tobytes()


@settings(deadline=None)
@given(st.sampled_from([np.float32, np.float64]), st.integers(0, 300), st.sampled_from([1, 2]),
       st.sampled_from([0.0, 0.9]), st.booleans(), st.booleans(), st.integers(0, 2**32 - 1))
def test_ef_step_matches_the_reference(dtype, n, p, momentum, masked, given_norm, seed):
    rng = np.random.default_rng(seed)
    w, g = rng.standard_normal(n).astype(dtype), rng.standard_normal(n).astype(dtype)
    buf = rng.standard_normal(n).astype(dtype) if momentum else None
    m = rng.random(n) < 0.4 if masked else None
    norm = reference.masked_norm(w, m, p=p) if given_norm else None
    kw = dict(lr=0.1, weight_decay=5e-4, lam=0.01, p=p, momentum=momentum)
    tw, tbuf, tout = (
        torch.from_numpy(w.copy()),
        None if buf is None else torch.from_numpy(buf.copy()),
        torch.empty(n, dtype=torch.from_numpy(w).dtype),
    )
    hp = tk.hyper(kw["lr"], kw["weight_decay"], kw["lam"], momentum, tw.device)
    prev = None if norm is None else torch.tensor(norm, dtype=torch.float64)
    got = tk.ef_step(tw, torch.from_numpy(g), None if m is None else torch.from_numpy(m), tbuf, tout, hp, p, prev)
    out = np.empty_like(w)
    want = reference.masked_ef_step(w, g, m, momentum_buffer=buf, pruned_out=out, norm=norm, **kw)
    tol = dict(rtol=1e-6, atol=1e-7) if dtype == np.float32 else dict(rtol=1e-13, atol=1e-14)
    np.testing.assert_allclose(tw.numpy(), w, **tol)
    np.testing.assert_allclose(tout.numpy(), out, **tol)
    if buf is not None:
        np.testing.assert_allclose(tbuf.numpy(), buf, **tol)
    np.testing.assert_allclose(float(got), want, rtol=1e-6 if dtype == np.float32 else 1e-12)


@pytest.fixture
def routed(monkeypatch):
    """CPU torch tensors take the device paths of the public functions: the one decision point
    (_backend.kernels_for) and the codecs' per-tensor split."""
    on = lambda *xs: any(isinstance(x, torch.Tensor) for x in xs)  # noqa: E731
    for mod in (_backend, codecs.model, codecs.stream):
        monkeypatch.setattr(mod, "on_device", on)


def test_public_functions_route_device_tensors_to_the_torch_kernels(routed):
    rng = np.random.default_rng(1)
    ws = [rng.standard_normal(s).astype(np.float32) for s in ((40, 30), (500,), (3, 3, 8))]
    ts = [torch.from_numpy(w) for w in ws]
    for got, want in zip(fk.global_topk_masks(ts, density=0.1), reference.topk_mask_list(ws, round(0.1 * 1772))):
        assert isinstance(got, torch.Tensor)
        np.testing.assert_array_equal(got.numpy(), want)
    assert fk.global_magnitude_threshold(ts, 9) == reference.magnitude_threshold(ws, 9)
    sparse = {f"t{i}": w * (rng.random(w.shape) < 0.1) for i, w in enumerate(ws)}
    masks = {"t0": rng.random(ws[0].shape) < 0.3}
    host = fk.encode_model(sparse, masks=masks)
    device = fk.encode_model({k: torch.from_numpy(v) for k, v in sparse.items()},
                             masks={"t0": torch.from_numpy(masks["t0"])})
    assert device == host  # the same message, byte for byte
    mixed = {"a": sparse["t1"], "b": sparse["t0"].astype(np.float64), "c": np.zeros(0, np.float32), "d": ws[2]}
    assert fk.encode_model({k: torch.from_numpy(v) for k, v in mixed.items()}) == fk.encode_model(mixed)
    w, g, m = ws[0].copy(), rng.standard_normal(ws[0].shape).astype(np.float32), masks["t0"]
    tw = torch.from_numpy(w.copy())
    got = fk.masked_ef_step(tw, torch.from_numpy(g), torch.from_numpy(m), lr=0.1, lam=0.01, weight_decay=1e-4)
    want = fk.masked_ef_step(w, g, m, lr=0.1, lam=0.01, weight_decay=1e-4, backend="numpy")
    np.testing.assert_allclose(tw.numpy(), w, rtol=1e-6, atol=1e-7)
    assert got == pytest.approx(want, rel=1e-6)
    assert _backend.kernels_for(tw) is tk and _backend.is_device(tk)
    ws = [torch.from_numpy(w.copy()), torch.from_numpy(ws[1].copy())]
    hosts = [w.copy(), ws[1].numpy().copy()]
    kw = dict(lr=0.1, lam=0.01, weight_decay=1e-4, momentum=0.9)
    got = fk.masked_ef_step_many(ws, [torch.from_numpy(g), torch.ones(500)], [torch.from_numpy(m), None],
                                 momentum_buffers=[torch.zeros(1200), torch.zeros(500)], **kw)
    want = fk.masked_ef_step_many(hosts, [g, np.ones(500, np.float32)], [m, None],
                                  momentum_buffers=[np.zeros(1200, np.float32), np.zeros(500, np.float32)],
                                  backend="numpy", **kw)
    assert got == pytest.approx(want, rel=1e-6)
    for a, b in zip(ws, hosts):
        np.testing.assert_allclose(a.numpy(), b, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="mask_bits"):
        fk.masked_ef_step(tw, torch.from_numpy(g), lr=0.1, mask_bits=fk.pack_mask(m))
    with pytest.raises(ValueError, match="must match w"):
        fk.masked_ef_step(tw, torch.zeros(3), lr=0.1)
    with pytest.raises(TypeError, match="float8_e4m3fn, which encode_model does not carry"):
        fk.encode_model({"x": torch.zeros(3, dtype=torch.float8_e4m3fn)})


def test_compiled_step_matches_the_uncompiled_one():
    """torch.compile fuses the step into one kernel (C++ here, Triton on CUDA): same results."""
    torch.manual_seed(0)
    x, y = torch.randn(32, 12), torch.randint(0, 4, (32,))
    runs = []
    for compile in (False, True):
        torch.manual_seed(1)
        model = torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
        opt = FedDIPSGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4, lam=0.01,
                        device_kernels="torch", compile=compile)
        opt.set_masks({model[0].weight: torch.rand(16, 12) < 0.3, model[2].weight: torch.rand(4, 16) < 0.5})
        for t in range(4):
            opt.set_lambda(0.01 * (t + 1))  # new scalars do not recompile (they travel as a tensor)
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        runs.append(
            [opt.dense(p).clone() for p in model.parameters()] + [p.detach().clone() for p in model.parameters()]
        )
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


from feddip_kernels.integrations.pytorch import FedDIPSGD  # noqa: E402


def test_pack_bits_of_every_byte_pattern_offset_and_stride():
    """The device's bit packing (one multiply an int64 word) against NumPy's packbits."""
    import itertools

    patterns = np.array(list(itertools.product([0, 1], repeat=8)), dtype=bool).reshape(-1)
    np.testing.assert_array_equal(tg.pack_bits(torch.from_numpy(patterns)).numpy(),
                                  np.packbits(patterns, bitorder="little"))
    rng = np.random.default_rng(1)
    for n in (0, 1, 7, 8, 9, 63, 64, 65, 1001):
        b = rng.random(n) < 0.5
        want = np.packbits(b, bitorder="little")
        for offset in (0, 1, 3, 8):  # views at any byte of a word
            base = torch.from_numpy(np.concatenate([np.zeros(offset, bool), b]))
            np.testing.assert_array_equal(tg.pack_bits(base[offset:]).numpy(), want)
        np.testing.assert_array_equal(tg.pack_bits(torch.from_numpy(np.repeat(b, 2))[::2]).numpy(), want)
