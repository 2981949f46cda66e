"""Global magnitude top-k on ResNet-18-sized weights (11.16M float32), k = 5%.

Baseline: torch.topk on the already concatenated |w| (what a PyTorch FL server runs); also timed:
the full torch pipeline including the concatenation, and np.partition."""

import numpy as np
import pytest

import feddip_kernels as fk

from .conftest import resnet18_weights

GROUP = "topk ResNet-18 11.2M f32 k=5%"


@pytest.fixture(scope="module")
def weights():
    ws = resnet18_weights()
    n = sum(w.size for w in ws)
    return ws, n, int(0.05 * n)


@pytest.mark.parametrize("backend", ["native", "numba"])
def test_threshold(record, weights, backend):
    ws, n, k = weights
    fk.global_magnitude_threshold(ws, k, backend=backend)  # JIT warm-up for numba
    record(lambda: fk.global_magnitude_threshold(ws, k, backend=backend), group=GROUP, name=f"threshold[{backend}]", dense_bytes=4 * n)


def test_masks_native(record, weights):
    ws, n, k = weights
    masks = record(lambda: fk.global_topk_masks(ws, k, backend="native"), group=GROUP, name="masks[native]", dense_bytes=4 * n)
    assert sum(int(m.sum()) for m in masks) == k


def test_torch_topk_concatenated(record, weights):
    torch = pytest.importorskip("torch")
    ws, n, k = weights
    flat = torch.cat([torch.from_numpy(w).abs().flatten() for w in ws])
    value = record(lambda: flat.topk(k).values[-1].item(), group=GROUP, name="torch.topk (concatenated |w|)", dense_bytes=4 * n, baseline=True)
    assert value == fk.global_magnitude_threshold(ws, k)


def test_torch_cat_topk(record, weights):
    torch = pytest.importorskip("torch")
    ws, n, k = weights
    tw = [torch.from_numpy(w) for w in ws]
    record(lambda: torch.cat([t.abs().flatten() for t in tw]).topk(k).values[-1].item(), group=GROUP, name="torch cat+abs+topk", dense_bytes=4 * n)


def test_numpy_partition(record, weights):
    ws, n, k = weights
    record(lambda: np.partition(np.abs(np.concatenate([w.ravel() for w in ws])), n - k)[n - k], group=GROUP, name="np.partition (concat |w|)", dense_bytes=4 * n)
