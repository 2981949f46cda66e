"""Global magnitude top-k on ResNet-18-sized weights (11.16M float32), k = 5%.

Baseline: torch.topk(k, sorted=False) on the already concatenated |w| (what a PyTorch FL server
runs, without the sort it does not need); also timed: torch.kthvalue (the same work as our
threshold: one order statistic), the sorted torch.topk, the full torch pipeline including the
concatenation, np.partition, and a plain streaming read of the same bytes (max |w|, the memory
roofline). A second group repeats the threshold on heavily tied weights (seven distinct values),
where the native kernel's sampled bracket cannot separate the k-th value and its radix fallback runs.

Two more groups hold the native kernels to the memory roofline at 1 and at 2 threads: the
roofline is `fk.max_magnitude` on the same tensors with the same threads (one streaming read with
the least work per element), and the summary prints each kernel's share of its read rate."""

import numpy as np
import pytest

import feddip_kernels as fk

from .conftest import NUMBA, resnet18_weights

GROUP = "topk ResNet-18 11.2M f32 k=5%"
TIED_GROUP = "topk ResNet-18 shapes, 7 tied values, k=5%"


@pytest.fixture(scope="module")
def weights():
    ws = resnet18_weights()
    n = sum(w.size for w in ws)
    return ws, n, int(0.05 * n)


@pytest.mark.parametrize("backend", ["native", NUMBA])
def test_threshold(record, weights, backend):
    ws, n, k = weights
    fk.global_magnitude_threshold(ws, k, backend=backend)  # JIT warm-up for numba
    record(
        lambda: fk.global_magnitude_threshold(ws, k, backend=backend),
        group=GROUP,
        name=f"threshold[{backend}]",
        dense_bytes=4 * n,
    )


def test_masks_native(record, weights):
    ws, n, k = weights
    masks = record(
        lambda: fk.global_topk_masks(ws, k, backend="native"), group=GROUP, name="masks[native]", dense_bytes=4 * n
    )
    assert sum(int(m.sum()) for m in masks) == k


@pytest.mark.parametrize("data", ["weights", "tied_weights"])
@pytest.mark.parametrize("kind", ["topk", "kthvalue"])
def test_torch_baselines(record, request, data, kind):
    torch = pytest.importorskip("torch")
    ws, n, k = request.getfixturevalue(data)
    flat = torch.cat([torch.from_numpy(w).abs().flatten() for w in ws])
    group = GROUP if data == "weights" else TIED_GROUP
    if kind == "topk":
        value = record(lambda: flat.topk(k, sorted=False).values.min().item(), group=group,
                       name="torch.topk(sorted=False) (concat |w|)", dense_bytes=4 * n, baseline=True)
    else:
        value = record(lambda: flat.kthvalue(n - k + 1).values.item(), group=group, name="torch.kthvalue (concat |w|)",
                       dense_bytes=4 * n)
    assert value == fk.global_magnitude_threshold(ws, k)


def test_torch_topk_sorted(record, weights):
    torch = pytest.importorskip("torch")
    ws, n, k = weights
    flat = torch.cat([torch.from_numpy(w).abs().flatten() for w in ws])
    record(
        lambda: flat.topk(k).values[-1].item(), group=GROUP, name="torch.topk sorted (concat |w|)", dense_bytes=4 * n
    )


def test_streaming_read(record, weights):
    # The memory roofline: one read of the same bytes with the least work per element.
    ws, n, k = weights
    record(lambda: fk.max_magnitude(ws, backend="native"), group=GROUP, name="read roofline: max |w| (native)",
           dense_bytes=4 * n, roofline=True)


@pytest.mark.parametrize("kernel", ["read roofline", "threshold", "masks"])
@pytest.mark.parametrize("threads", [1, 2])
def test_against_the_roofline(record, weights, threads, kernel):
    ws, n, k = weights
    fn = {"read roofline": lambda: fk.max_magnitude(ws, backend="native"),
          "threshold": lambda: fk.global_magnitude_threshold(ws, k, backend="native"),
          "masks": lambda: fk.global_topk_masks(ws, k, backend="native")}[kernel]
    fk.set_num_threads(threads)
    try:
        record(fn, group=f"topk vs the read roofline, {threads} thread(s)", name=f"{kernel}[native]",
               dense_bytes=4 * n, roofline=kernel == "read roofline")
    finally:
        fk.set_num_threads(0)



@pytest.fixture(scope="module")
def tied_weights():
    rng = np.random.default_rng(5)
    ws = [rng.integers(-3, 4, w.shape).astype(np.float32) for w in resnet18_weights()]
    n = sum(w.size for w in ws)
    return ws, n, int(0.05 * n)


def test_threshold_tied(record, tied_weights):
    ws, n, k = tied_weights
    record(lambda: fk.global_magnitude_threshold(ws, k, backend="native"), group=TIED_GROUP, name="threshold[native]",
           dense_bytes=4 * n)



def test_torch_cat_topk(record, weights):
    torch = pytest.importorskip("torch")
    ws, n, k = weights
    tw = [torch.from_numpy(w) for w in ws]
    record(
        lambda: torch.cat([t.abs().flatten() for t in tw]).topk(k).values[-1].item(),
        group=GROUP,
        name="torch cat+abs+topk",
        dense_bytes=4 * n,
    )


def test_numpy_partition(record, weights):
    ws, n, k = weights
    record(
        lambda: np.partition(np.abs(np.concatenate([w.ravel() for w in ws])), n - k)[n - k],
        group=GROUP,
        name="np.partition (concat |w|)",
        dense_bytes=4 * n,
    )
