"""FedDIP's local step on ResNet-18-sized weights (11.16M float32 in 21 layers): momentum 0.9,
weight decay 5e-4, lambda = 1e-3 (p = 2), 10% density mask, pruned copy refreshed.

Baseline: torch.optim.SGD(fused=True), which does less (no mask, no regulariser, no pruned copy).
Also timed: the eager masked step in torch (regulariser gradient, SGD on the dense weights, then the
pruned copy w * m), i.e. what FedDIP client code runs without our kernel."""

import numpy as np
import pytest

import feddip_kernels as fk

from .conftest import resnet18_weights

GROUP = "EF step ResNet-18 11.2M f32"
LR, MOM, WD, LAM = 0.01, 0.9, 5e-4, 1e-3


@pytest.fixture(scope="module")
def setup():
    ws = resnet18_weights(1)
    rng = np.random.default_rng(2)
    gs = [rng.standard_normal(w.shape, dtype=np.float32) * np.float32(1e-3) for w in ws]
    masks = [rng.random(w.shape) < 0.1 for w in ws]
    return ws, gs, masks, sum(w.size for w in ws)


@pytest.mark.parametrize("backend", ["native", "numba"])
def test_fused_step(record, setup, backend):
    ws, gs, masks, n = setup
    ws = [w.copy() for w in ws]
    bufs = [np.zeros_like(w) for w in ws]
    pruned = [np.empty_like(w) for w in ws]
    norms = [fk.masked_norm(w, m) for w, m in zip(ws, masks)]

    def step():
        for i, (w, g, m) in enumerate(zip(ws, gs, masks)):
            norms[i] = fk.masked_ef_step(w, g, m, lr=LR, weight_decay=WD, lam=LAM, momentum=MOM,
                                         momentum_buffer=bufs[i], pruned_out=pruned[i], norm=norms[i], backend=backend)

    step()  # warm-up (numba compiles here)
    record(step, group=GROUP, name=f"masked_ef_step[{backend}]", dense_bytes=4 * n)


def _torch_params(setup):
    torch = pytest.importorskip("torch")
    ws, gs, masks, n = setup
    params = [torch.nn.Parameter(torch.from_numpy(w.copy())) for w in ws]
    for p, g in zip(params, gs):
        p.grad = torch.from_numpy(g)
    return torch, params, [torch.from_numpy(m) for m in masks], n


def test_torch_sgd_fused(record, setup):
    torch, params, _, n = _torch_params(setup)
    opt = torch.optim.SGD(params, lr=LR, momentum=MOM, weight_decay=WD, fused=True)
    record(opt.step, group=GROUP, name="torch SGD(fused=True)", dense_bytes=4 * n, baseline=True)


def test_torch_sgd_foreach(record, setup):
    torch, params, _, n = _torch_params(setup)
    opt = torch.optim.SGD(params, lr=LR, momentum=MOM, weight_decay=WD)
    record(opt.step, group=GROUP, name="torch SGD (default, foreach)", dense_bytes=4 * n)


def test_torch_eager_masked_step(record, setup):
    torch, params, masks, n = _torch_params(setup)
    grads = [p.grad for p in params]
    opt = torch.optim.SGD(params, lr=LR, momentum=MOM, weight_decay=WD)
    pruned = [torch.empty_like(p) for p in params]

    @torch.no_grad()
    def step():
        for p, m, g in zip(params, masks, grads):
            wp = p * m
            p.grad = g + LAM * m * wp / wp.norm()
        opt.step()
        for p, m, out in zip(params, masks, pruned):
            torch.mul(p, m, out=out)

    record(step, group=GROUP, name="torch eager masked step", dense_bytes=4 * n)
