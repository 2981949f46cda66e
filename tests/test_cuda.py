"""Every public function that takes CUDA tensors, against the same call on the CPU: masks,
thresholds and messages exactly, steps to float tolerance. Run on a device machine with
`pytest tests/test_cuda.py`. FEDDIP_TEST_DEVICE=cpu runs the same
comparisons on the host, which checks the tests themselves but compares nothing across devices.
Without a device they are left out of the run (conftest.py), as CI has none."""

import io
import os

import numpy as np
import pytest

import feddip_kernels as fk

torch = pytest.importorskip("torch")
from feddip_kernels.integrations.pytorch import FedDIPSGD  # noqa: E402

DEV = torch.device(os.environ.get("FEDDIP_TEST_DEVICE", "cuda"))
pytestmark = pytest.mark.cuda  # left out where there is no CUDA device (conftest.py)


def _layers(case: str, dtype: torch.dtype) -> list[torch.Tensor]:
    """Host tensors: an empty layer, small ones, and one large enough for the sampled bracket."""
    g = torch.Generator().manual_seed(0)
    shapes = [(0,), (7,), (40, 30), (3, 3, 8), (300_000,)]
    ws = [torch.randn(s, generator=g, dtype=dtype) for s in shapes]
    if case == "ties":  # few distinct magnitudes: the bracket misses and ties fall in list order
        ws = [torch.round(w * 2) / 2 for w in ws]
    elif case == "inf":
        ws[2][0, :5] = float("inf")
        ws[4][::1000] = -float("inf")
        ws[3][0] = -0.0
    elif case == "zeros":
        ws[4][: 250_000] = 0.0
    return ws


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", ["random", "ties", "inf", "zeros"])
def test_topk_masks_threshold_and_max_magnitude_match_the_cpu(case, dtype):
    host = _layers(case, dtype)
    dev = [w.to(DEV) for w in host]
    n = sum(w.numel() for w in host)
    for k in (0, 1, 17, n // 20, n // 2, n - 1, n):
        got = fk.global_topk_masks(dev, k)
        want = fk.global_topk_masks(host, k)
        assert all(m.device.type == DEV.type for m in got)
        for a, b in zip(got, want):
            assert a.dtype == torch.bool and torch.equal(a.cpu(), b)
        assert fk.global_magnitude_threshold(dev, k) == fk.global_magnitude_threshold(host, k)
    assert fk.max_magnitude(dev) == fk.max_magnitude(host)
    dev[3][1, 1, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        fk.global_topk_masks(dev, 5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
@pytest.mark.parametrize("p", [1, 2])
def test_masked_ef_step_matches_the_cpu(dtype, momentum, p):
    g = torch.Generator().manual_seed(1)
    w, grad = torch.randn(257, 33, generator=g, dtype=dtype), torch.randn(257, 33, generator=g, dtype=dtype)
    mask = torch.rand(257, 33, generator=g) < 0.1
    buf = torch.randn(257, 33, generator=g, dtype=dtype)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-13)
    runs = []
    for device in (torch.device("cpu"), DEV):
        tw, tbuf = w.clone().to(device), buf.clone().to(device)
        out = torch.empty_like(tw)
        norm = None
        for _ in range(3):  # each step hands its norm to the next, as FedDIPSGD does
            norm = fk.masked_ef_step(tw, grad.to(device), mask.to(device), lr=0.1, weight_decay=5e-4, lam=0.01, p=p,
                                     momentum=momentum, momentum_buffer=tbuf if momentum else None, pruned_out=out,
                                     norm=norm)
        runs.append((tw.cpu(), tbuf.cpu(), out.cpu(), norm))
    (w0, b0, o0, n0), (w1, b1, o1, n1) = runs
    torch.testing.assert_close(w1, w0, **tol)
    torch.testing.assert_close(b1, b0, **tol)
    torch.testing.assert_close(o1, o0, **tol)
    assert n1 == pytest.approx(n0, rel=1e-5 if dtype == torch.float32 else 1e-12)


def _train(device: torch.device, backend: str) -> list[torch.Tensor]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(8 * 6 * 6, 10)).double().to(device)
    x = torch.randn(16, 3, 8, 8, dtype=torch.float64).to(device)
    y = torch.randint(0, 10, (16,)).to(device)
    weights = [model[0].weight, model[3].weight]
    opt = FedDIPSGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4, lam=1e-3,
                    device_kernels=backend, compile=False)
    for t in range(5):
        masks = fk.global_topk_masks([opt.dense(w) for w in weights], density=0.3)  # masks found where w lives
        opt.set_masks(dict(zip(weights, masks)))
        opt.set_lambda(1e-3 * (t + 1))
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return [opt.dense(p).detach().cpu() for p in model.parameters()] + [p.detach().cpu() for p in model.parameters()]


@pytest.mark.parametrize("backend", ["auto", "torch"])  # on CUDA: the Triton kernel, the per-layer torch operations
def test_feddipsgd_trains_as_on_the_cpu(backend):
    """Five steps with masks recomputed on the device each step (float64, so that the convolution's
    summation order on either device stays far below the tolerance)."""
    for a, b in zip(_train(DEV, backend), _train(torch.device("cpu"), "auto")):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_encoded_messages_are_the_cpus_byte_for_byte(dtype):
    g = torch.Generator().manual_seed(2)
    host = {
        "conv": torch.randn(64, 3, 3, 3, generator=g, dtype=dtype),
        "fc": torch.randn(500_000, generator=g, dtype=dtype),
        "bias": torch.randn(10, generator=g, dtype=dtype),
        "empty": torch.zeros(0, dtype=dtype),
    }
    masks = fk.global_topk_masks([host["conv"], host["fc"]], density=0.05)
    host["conv"] *= masks[0]
    host["fc"] *= masks[1]
    dev = {k: v.to(DEV) for k, v in host.items()}
    assert fk.encode_model(dev) == fk.encode_model(host)
    for values in ("raw", "fp16", "bf16"):
        assert fk.encode_model(dev, values=values) == fk.encode_model(host, values=values)
    mask = {"conv": masks[0]}
    assert fk.encode_model(dev, masks={"conv": mask["conv"].to(DEV)}) == fk.encode_model(host, masks=mask)
    a, b = io.BytesIO(), io.BytesIO()
    assert fk.encode_stream(dev, a, chunk_elems=65_536) == fk.encode_stream(host, b, chunk_elems=65_536)
    assert a.getvalue() == b.getvalue()
    mixed = {**host, "f32": torch.randn(1001, generator=g), "f64": torch.randn(77, generator=g, dtype=torch.float64)}
    assert fk.encode_model({k: v.to(DEV) for k, v in mixed.items()}) == fk.encode_model(mixed)
    back = fk.decode_model(fk.encode_model(dev))
    for k, v in host.items():
        np.testing.assert_array_equal(back.tensors[k], v.numpy())


@pytest.mark.parametrize("values", ["raw", "int4-ans"])
def test_encode_model_decoded_from_device_tensors(values):
    """decoded=True from device tensors (positions sparsified there, -0.0 coded there as a Golomb
    stream and not fetched): what decode_model gives, bit for bit."""
    rng = np.random.default_rng(0)
    a = (rng.standard_normal(1 << 16) * (rng.random(1 << 16) < 0.5)).astype(np.float32)
    zeros = np.flatnonzero(a == 0)[:20]
    a[zeros] = -0.0
    b = rng.standard_normal(300).astype(np.float32) * (rng.random(300) < 0.05)
    tensors = {"a": torch.from_numpy(a).to(DEV), "b": torch.from_numpy(b).to(DEV)}
    msg, decoded = fk.encode_model(tensors, values=values, decoded=True)
    got = fk.decode_model(msg).tensors
    assert list(decoded) == list(got)
    assert all(np.array_equal(decoded[k].view(np.uint32), got[k].view(np.uint32)) for k in got)
