"""FedDIP's server side (feddip_kernels.protocol) against docs/protocol.md; NumPy only."""

import numpy as np
import pytest

import feddip_kernels as fk
from feddip_kernels.protocol import FedDIPServer, Schedule, apply_mask, random_erk_masks

SHAPES = {"conv.weight": (6, 1, 5, 5), "conv.bias": (6,), "fc.weight": (10, 150), "fc.bias": (10,)}
PRUNABLE = ["conv.weight", "fc.weight"]


def _model(seed=0):
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}


def _server(rounds=12, mask_every=3, **kw):
    return FedDIPServer(
        _model(), PRUNABLE, Schedule(rounds=rounds, s0=0.5, sp=0.9, mask_every=mask_every, **kw), seed=4
    )


def _uploads(server, t, clients=3):
    """Clients' models: the global model moved by noise everywhere (error feedback moves pruned
    weights too), with unequal weights."""
    out = []
    for c in range(clients):
        rng = np.random.default_rng(100 * t + c)
        out.append(({k: v + rng.standard_normal(v.shape).astype(v.dtype) * 0.1 for k, v in server.weights.items()},
                    float(c + 1)))
    return out


def test_schedules_follow_the_protocol():
    s = Schedule(rounds=1000, s0=0.5, sp=0.95, mask_every=5, lambda_max=1e-3)
    assert s.sparsity(0) == 0.5 and s.sparsity(1000) == 0.95
    assert s.sparsity(500) == pytest.approx(0.95 - 0.45 * 0.5**3)
    assert [t for t in range(12) if s.updates_mask(t)] == [0, 5, 10]
    assert s.learning_rate(10) == pytest.approx(0.1 * 0.998**10)
    assert s.lam(0) == 0 and s.lam(49) == 0 and s.lam(50) == pytest.approx(5e-4) \
        and s.lam(999) == pytest.approx(5e-4 + 5e-4 * 18 / 19)  # (i - 1) / 19, as the protocol says
    assert Schedule(rounds=1000, horizon=100).sparsity(100) == 0.95  # a horizon shortens the ramp
    for bad in (dict(mask_every=0), dict(s0=0.9, sp=0.5), dict(horizon=0), dict(lr=0.0)):
        with pytest.raises(ValueError):
            Schedule(rounds=10, **bad)


def test_round_zero_masks_are_each_clients_own_erk_masks():
    server = _server()
    a, b = server.training_masks(0), server.training_masks(1)
    assert set(a) == set(PRUNABLE)
    assert any((a[k] != b[k]).any() for k in PRUNABLE)  # drawn per client
    np.testing.assert_array_equal(a["fc.weight"], server.training_masks(0)["fc.weight"])  # reproducible
    dens = fk.erk_densities([SHAPES[k] for k in PRUNABLE], 0.5)
    for k, d in zip(PRUNABLE, dens):
        assert a[k].sum() == fk.k_for_density(a[k].size, d)
    kept = sum(int(a[k].sum()) for k in PRUNABLE) / sum(a[k].size for k in PRUNABLE)
    assert kept == pytest.approx(0.5, abs=0.01)


def test_masks_are_nested_and_follow_the_schedule():
    server = _server()
    previous = None
    for t in range(12):
        if t > 0:
            assert server.training_masks(7) is server.masks  # after round 0: the global mask
        before = server.masks
        new = server.aggregate(_uploads(server, t))
        if server.schedule.updates_mask(t):
            assert server.sparsity() == pytest.approx(server.schedule.sparsity(t), abs=1e-3)
        else:
            assert server.masks is before
        for k, m in server.masks.items():
            assert not new[k][~m].any() and np.signbit(new[k][~m]).sum() == 0  # +0.0 off the mask
            if previous is not None:
                assert not (m & ~previous[k]).any()  # pruned weights never return
        for k in ("conv.bias", "fc.bias"):
            assert np.count_nonzero(new[k]) == new[k].size  # never pruned
        previous = server.masks
    assert server.round == 12


def test_masks_after_round_zero_come_from_the_averaged_model():
    server = _server(mask_every=1)
    uploads = _uploads(server, 0)
    total = sum(w for _, w in uploads)
    avg = {k: (sum(m[k].astype(np.float64) * w for m, w in uploads) / total).astype(np.float32) for k in PRUNABLE}
    server.aggregate(uploads)
    expected = fk.global_topk_masks([avg[k] for k in PRUNABLE], density=0.5)
    for k, e in zip(PRUNABLE, expected):
        np.testing.assert_array_equal(server.masks[k], e)


@pytest.mark.parametrize("mask_every", [1, 3])
def test_values_under_the_mask_aggregate_to_the_dense_uploads_bits(mask_every):
    # The authors upload dense models and the server zeroes what lies off the mask; this library
    # sends only the values under the shared mask. Both give the same global model, bit for bit.
    dense_server, sparse_server = _server(mask_every=mask_every), _server(mask_every=mask_every)
    for t in range(8):
        uploads = _uploads(dense_server, t)
        shared = sparse_server.masks or None
        carried = []
        for model, w in uploads:
            msg = fk.encode_model(model, masks=shared, reference=shared)
            carried.append((fk.decode_model(msg, reference=shared).tensors, w))
            if shared:
                assert len(msg) < 0.7 * len(fk.encode_model(model))
        a, b = dense_server.aggregate(uploads), sparse_server.aggregate(carried)
        for k in a:
            assert a[k].tobytes() == b[k].tobytes(), (t, k)
        for k in dense_server.masks:
            np.testing.assert_array_equal(dense_server.masks[k], sparse_server.masks[k])


def test_fedavg_never_prunes():
    server = FedDIPServer(_model(), PRUNABLE, Schedule(rounds=3), prune=False)
    assert server.training_masks(0) == {}
    for t in range(3):
        server.aggregate(_uploads(server, t))
    assert not server.masks and server.sparsity() == 0


def test_aggregate_rejects_bad_uploads():
    server = _server()
    with pytest.raises(ValueError, match="no uploads"):
        server.aggregate([])
    bad = {k: v for k, v in server.weights.items() if k != "fc.bias"}
    with pytest.raises(ValueError, match="fc.bias"):
        server.aggregate([(bad, 1.0)])
    with pytest.raises(ValueError, match="positive"):
        server.aggregate([(server.weights, 0.0)])
    with pytest.raises(ValueError, match="prunable"):
        FedDIPServer(_model(), ["missing.weight"], Schedule(rounds=3))


def test_helpers():
    w = np.array([-1.0, 2.0, -3.0], np.float32)
    out = apply_mask(w, np.array([False, True, False]))
    assert out.tolist() == [0.0, 2.0, 0.0] and not np.signbit(out).any()
    masks = random_erk_masks({"a": (4, 5)}, 0.25, np.random.default_rng(0))
    assert masks["a"].shape == (4, 5) and masks["a"].sum() == 5


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64, np.int32])
def test_apply_mask_is_where_bit_for_bit(dtype):
    """apply_mask (the float's bits times 0 or 1) keeps w's bits where m is set, NaN payloads, inf
    and -0.0 included, and +0.0 elsewhere: np.where's result, for any layout and broadcasting."""
    rng = np.random.default_rng(1)
    w = (rng.standard_normal((6, 7)) * 100).astype(dtype)
    if np.dtype(dtype).kind == "f":
        w.reshape(-1)[:4] = [np.inf, -np.inf, np.nan, -0.0]
        w.reshape(-1)[4:8] = -w.reshape(-1)[:4]
    m = rng.random((6, 7)) < 0.5
    m.reshape(-1)[:8] = [True, False] * 4
    for a, b in ((w, m), (w.T, m.T), (w[:, ::2], m[:, ::2]), (w, m[0])):
        got, want = apply_mask(a, b), np.where(b, a, np.zeros((), dtype=a.dtype))
        assert got.dtype == want.dtype and got.shape == want.shape
        assert np.array_equal(got.view(f"u{got.itemsize}"), want.view(f"u{want.itemsize}"))


def test_apply_mask_takes_what_np_where_takes():
    """A list or Python bool for a mask, a non-native byte order, a 0-d weight: np.where's result."""
    w = np.array([1.5, -2.0, np.nan], dtype=">f4")
    for m in ([True, False, True], True, np.array([1, 0, 2])):
        got, want = apply_mask(w, m), np.where(m, w, np.zeros((), dtype=w.dtype))
        assert got.dtype == want.dtype and np.array_equal(got, want, equal_nan=True)
    assert apply_mask(np.float32(-0.0), np.bool_(False)).tobytes() == np.float32(0.0).tobytes()
