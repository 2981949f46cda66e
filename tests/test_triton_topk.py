"""The Triton radix select of the global top-k (_triton_topk) against the NumPy reference: the
threshold and the masks of float32 tensor lists, exactly, including ties (handed back to the
exact path), +-inf, zeros of both signs, subnormals and NaN. Runs on a CUDA device, or on CPU
tensors under TRITON_INTERPRET=1; left out where Triton is not installed (CI). The public
functions' routing to it on a device is checked in tests/test_cuda.py."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.extra import numpy as hnp

from feddip_kernels import reference

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.triton  # left out without Triton or a device or its interpreter (conftest.py)
DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _tt():
    from feddip_kernels import _triton_topk

    return _triton_topk


@st.composite
def lists(draw):
    count = draw(st.integers(1, 4))
    pool = [0.0, -0.0, 1.0, -1.0, 2.5, np.inf, -np.inf, 1e-45, -3e-40]
    values = st.sampled_from(pool) if draw(st.booleans()) else st.floats(-1e3, 1e3, width=32)
    arrays = [draw(hnp.arrays(np.float32, hnp.array_shapes(min_dims=1, max_dims=3, min_side=0, max_side=9),
                              elements=values)) for _ in range(count)]
    n = sum(a.size for a in arrays)
    if n < 2:
        arrays.append(np.array([0.5, -0.25], np.float32))
        n += 2
    return arrays, draw(st.integers(1, n - 1))


def _masks_or_none(arrays, k):
    ts = [torch.from_numpy(a.copy()).to(DEV) for a in arrays]
    return _tt().topk_masks(ts, k), ts


@settings(max_examples=40, deadline=None)
@given(lists())
def test_threshold_and_masks_equal_the_reference_or_hand_ties_back(case):
    arrays, k = case
    masks, ts = _masks_or_none(arrays, k)
    assert _tt().magnitude_threshold(ts, k) == reference.magnitude_threshold(arrays, k)
    mags = np.concatenate([np.abs(a).ravel() for a in arrays])
    tau = reference.magnitude_threshold(arrays, k)
    if masks is None:  # only where more elements equal the threshold than the k-th needs
        assert (mags >= tau).sum() > k
        return
    want = reference.topk_mask_list(arrays, k)
    assert [m.shape for m in masks] == [a.shape for a in arrays]
    for m, w in zip(masks, want):
        np.testing.assert_array_equal(m.cpu().numpy(), w)


def test_large_lists_cross_blocks_and_reuse_their_plan():
    """Tensors over several blocks (not multiples of one), the same list again after its weights
    changed in place (the recorded plan reads them where they are), and a new list."""
    g = np.random.default_rng(1)
    arrays = [g.standard_normal(s).astype(np.float32) for s in [(3, 3, 64), (9000,), (4097,), (1,)]]
    ts = [torch.from_numpy(a).to(DEV) for a in arrays]
    for k in (1, 700, sum(a.size for a in arrays) - 1):
        for _ in range(3):
            masks = _tt().topk_masks(ts, k)
            for m, w in zip(masks, reference.topk_mask_list([t.cpu().numpy() for t in ts], k)):
                np.testing.assert_array_equal(m.cpu().numpy(), w)
            with torch.no_grad():
                for t in ts:
                    t.mul_(-1.5).add_(0.25)
    first = _tt().topk_masks(ts, 50)
    again = _tt().topk_masks(ts, 50)
    assert first[1].data_ptr() != again[1].data_ptr()  # each call's masks are its own


def test_nan_raises_as_on_the_host():
    ts = [torch.tensor([1.0, float("nan"), 2.0], device=DEV), torch.ones(5, device=DEV)]
    with pytest.raises(ValueError, match="NaN"):
        _tt().topk_masks(ts, 2)
    with pytest.raises(ValueError, match="NaN"):
        _tt().magnitude_threshold(ts, 2)


def test_only_lists_it_can_read_are_taken():
    tt = _tt()
    x = torch.ones(8, device=DEV)
    assert not tt.usable([])
    assert not tt.usable([x.double()])
    assert not tt.usable([torch.ones(4, 4, device=DEV).t()])  # not contiguous
    assert not tt.usable([torch.empty(0, device=DEV)])


def test_a_triton_without_the_masked_histogram_leaves_the_list_to_torch(monkeypatch):
    tt = _tt()
    x = [torch.ones(8, device=DEV)]
    monkeypatch.setattr(tt, "TRITON_OK", False)  # Triton before 3.4 (torch 2.1-2.7)
    assert not tt.usable(x)
    monkeypatch.setattr(tt.triton, "__version__", "3.3.1")
    assert not tt._triton_at_least(3, 4)
    monkeypatch.setattr(tt.triton, "__version__", "3.4.0+git1a2b")
    assert tt._triton_at_least(3, 4)
