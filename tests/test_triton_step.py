"""FedDIPSGD's multi-layer Triton step (_triton_kernels) against its per-layer torch operations:
same weights, pruned copies, momentum buffers and norms over several steps, through the events
that invalidate the kernel's cached tables (new masks, weights written from outside, gradients
allocated again, new hyperparameters). Runs on a CUDA device, or on CPU tensors under
TRITON_INTERPRET=1; left out where Triton is not installed (CI)."""

import pytest

torch = pytest.importorskip("torch")

from feddip_kernels.integrations.pytorch import FedDIPSGD  # noqa: E402

# Left out where Triton is missing or has neither a device nor its interpreter (conftest.py).
pytestmark = pytest.mark.triton
DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _model(dtype):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                               torch.nn.Linear(6 * 6 * 6, 300), torch.nn.ReLU(),
                               torch.nn.Linear(300, 5)).to(dtype=dtype, device=DEV)


def _run(backend, dtype, p, momentum, steps=6):
    model = _model(dtype)
    opt = FedDIPSGD(model.parameters(), lr=0.05, momentum=momentum, weight_decay=5e-4, lam=1e-2, p=p,
                    device_kernels=backend)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(32, 3, 8, 8, generator=g, dtype=dtype).to(DEV)
    y = torch.randint(0, 5, (32,), generator=g).to(DEV)
    weights = [model[0].weight, model[3].weight, model[5].weight]
    norms = []
    for t in range(steps):
        if t in (0, 3):  # new masks (the dense weights stay)
            opt.set_masks({w: (torch.rand(w.shape, generator=g) < 0.3).to(DEV) for w in weights[:2 + (t == 3)]})
        if t == 4:
            with torch.no_grad():
                model[3].weight.mul_(0.5)  # written from outside: the new dense weights
            opt.set_lambda(2e-2)
        if t == 5:
            for group in opt.param_groups:
                group["lr"] = 0.02
        opt.zero_grad(set_to_none=t % 2 == 0)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        norms.append([float(opt.state[w]["norm"]) for w in weights if "mask" in opt.state[w]])
    out = [p.detach().cpu() for p in model.parameters()] + [opt.dense(p).cpu() for p in model.parameters()]
    if momentum:
        out += [opt.state[p]["momentum_buffer"].cpu() for p in model.parameters()]
    return out, norms


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_triton_step_matches_the_torch_operations(dtype, p, momentum):
    got, got_norms = _run("triton" if DEV.type == "cpu" else "auto", dtype, p, momentum)
    want, want_norms = _run("torch", dtype, p, momentum)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-11, atol=1e-12)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **tol)
    for a, b in zip(got_norms, want_norms):
        assert a == pytest.approx(b, rel=1e-5 if dtype == torch.float32 else 1e-11)


@pytest.mark.cuda
def test_cuda_parameters_take_the_triton_step():
    model = _model(torch.float32)
    opt = FedDIPSGD(model.parameters(), lr=0.1)
    opt.set_masks({model[3].weight: torch.rand(model[3].weight.shape, device=DEV) < 0.1})
    x, y = torch.randn(4, 3, 8, 8, device=DEV), torch.zeros(4, dtype=torch.long, device=DEV)
    for _ in range(3):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    (_, table, *_), = opt._triton_tables.values()
    assert table.graph_error is None and list(table.graphs) == [2]  # steps after the first replay a graph
