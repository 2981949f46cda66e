import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from feddip_kernels.integrations.pytorch import FedDIPSGD  # noqa: E402

from feddip_kernels import available_backends  # noqa: E402


# Every kernel backend, and "torch": the torch operations that step tensors on a CUDA device, here
# run on CPU tensors (the same operations on either device).
@pytest.fixture(params=[*available_backends(), "torch"])
def backend(request):
    return request.param

TOL = dict(rtol=1e-5, atol=1e-6)  # float32; the fused kernel rounds differently from torch's eager ops


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(20, 32), torch.nn.ReLU(), torch.nn.Linear(32, 5))


def _masks(model, density=0.3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {p: torch.rand(p.shape, generator=g) < density for n, p in model.named_parameters() if n.endswith("weight")}


def _data(seed=2):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(64, 20, generator=g), torch.randint(0, 5, (64,), generator=g)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_matches_straightforward_torch(backend, p, momentum, dtype):
    lr, wd, lam, steps = 0.05, 5e-4, 0.01, 6
    tol = TOL if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-13)
    x, y = _data()
    x = x.to(dtype)
    # Ours: parameters hold w*m, the optimizer keeps dense w.
    model = _model().to(dtype)
    ref_dense = [t.detach().clone() for t in model.parameters()]
    opt = FedDIPSGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=wd, lam=lam, p=p, backend=backend)
    masks = _masks(model)
    opt.set_masks(masks)
    mask_list = [masks.get(t) for t in model.parameters()]
    # Reference: dense tensors, forward at w*m via autograd, gradient w.r.t. the pruned point applied
    # to the dense weights by torch.optim.SGD.
    ref_model = _model().to(dtype)
    dense = [torch.nn.Parameter(t) for t in ref_dense]
    ref_opt = torch.optim.SGD(dense, lr=lr, momentum=momentum, weight_decay=wd)
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()

        ref_opt.zero_grad()
        pruned = [(d * m if m is not None else d).detach().requires_grad_() for d, m in zip(dense, mask_list)]
        out = torch.func.functional_call(ref_model, dict(zip([n for n, _ in ref_model.named_parameters()], pruned)), (x,))
        ref_loss = torch.nn.functional.cross_entropy(out, y)
        reg = sum(t.norm(p=p) for t, m in zip(pruned, mask_list) if m is not None)
        (ref_loss + lam * reg).backward()
        for d, t in zip(dense, pruned):
            d.grad = t.grad
        ref_opt.step()
        assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-5)

    for prm, d, m in zip(model.parameters(), dense, mask_list):
        assert prm.dtype == dtype
        np.testing.assert_allclose(opt.dense(prm).numpy(), d.detach().numpy(), **tol)
        expected = d.detach() * m if m is not None else d.detach()
        np.testing.assert_allclose(prm.detach().numpy(), expected.numpy(), **tol)


def test_without_masks_equals_sgd(backend):
    x, y = _data()
    a, b = _model(), _model()
    opt_a = FedDIPSGD(a.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4, backend=backend)
    opt_b = torch.optim.SGD(b.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    for _ in range(4):
        for m, o in ((a, opt_a), (b, opt_b)):
            o.zero_grad()
            torch.nn.functional.cross_entropy(m(x), y).backward()
            o.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        np.testing.assert_allclose(pa.detach().numpy(), pb.detach().numpy(), **TOL)


def test_loading_weights_resets_dense(backend):
    model = _model()
    opt = FedDIPSGD(model.parameters(), lr=0.1, lam=0.01, backend=backend)
    masks = _masks(model)
    opt.set_masks(masks)
    new = copy.deepcopy(_model(seed=5).state_dict())
    model.load_state_dict(new)  # param.copy_ under no_grad: becomes the dense weights
    x, y = _data()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    w = model[0].weight
    g = w.grad.clone()
    opt.step()
    dense = opt.dense(w)
    m = masks[w]
    reg = 0.01 * (new["0.weight"] * m) / (new["0.weight"] * m).norm()
    expected = new["0.weight"] - 0.1 * (g + 5e-4 * new["0.weight"] + reg)
    np.testing.assert_allclose(dense.numpy(), expected.numpy(), **TOL)
    np.testing.assert_allclose(w.detach().numpy(), (expected * m).numpy(), **TOL)


def test_set_masks_validates():
    model = _model()
    opt = FedDIPSGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="shape"):
        opt.set_masks({model[0].weight: torch.ones(3, 3, dtype=torch.bool)})
    with pytest.raises(ValueError):
        FedDIPSGD(model.parameters(), lr=0.1, p=3)
    opt.set_masks({model[0].weight: torch.zeros(32, 20, dtype=torch.bool)})
    assert not model[0].weight.any()
    opt.set_masks({model[0].weight: None})
    assert model[0].weight.any()  # dense weights restored


_RESTORE_SCRIPT = r"""
import sys, torch
from feddip_kernels.integrations.pytorch import FedDIPSGD
sys.path.insert(0, sys.argv[1])
from test_torch_optimizer import _data, _masks, _model, _train

ckpt, order, out = sys.argv[2], sys.argv[3], sys.argv[4]
model = _model()
opt = FedDIPSGD(model.parameters(), lr=0.1, momentum=0.9, lam=0.01, backend=sys.argv[5])
opt.set_masks(_masks(model))
saved = torch.load(ckpt, weights_only=True)
if order == "model-twice-first":  # bumps the parameters' version counters by two before the optimizer's load
    model.load_state_dict(saved["model"]); model.load_state_dict(saved["model"]); opt.load_state_dict(saved["opt"])
else:  # the optimizer first, then the model's (pruned) weights written over the parameters
    opt.load_state_dict(saved["opt"]); model.load_state_dict(saved["model"])
_train(model, opt, 3)
torch.save({"model": model.state_dict(), "dense": [opt.dense(p).clone() for p in model.parameters()]}, out)
"""


def _train(model, opt, steps):
    x, y = _data()
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


@pytest.mark.parametrize("order", ["model-twice-first", "optimizer-first"])
def test_state_restored_in_a_new_process_continues_the_run(backend, order, tmp_path):
    # The dense weights (error feedback) must survive a save and a restore in another process,
    # whatever torch's version counters of the parameters are there.
    import os
    import subprocess
    import sys

    def fresh():
        model = _model()
        opt = FedDIPSGD(model.parameters(), lr=0.1, momentum=0.9, lam=0.01, backend=backend)
        opt.set_masks(_masks(model))
        return model, opt

    model, opt = fresh()
    _train(model, opt, 3)
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, tmp_path / "ckpt.pt")
    _train(model, opt, 3)  # the uninterrupted run
    script = tmp_path / "restore.py"
    script.write_text(_RESTORE_SCRIPT)
    here = os.path.dirname(os.path.abspath(__file__))
    subprocess.run(
        [sys.executable, str(script), here, str(tmp_path / "ckpt.pt"), order, str(tmp_path / "out.pt"), backend],
        check=True,
    )
    resumed = torch.load(tmp_path / "out.pt", weights_only=True)
    for (name, value), dense, prm in zip(resumed["model"].items(), resumed["dense"], model.parameters()):
        torch.testing.assert_close(value, model.state_dict()[name], rtol=0, atol=0)
        torch.testing.assert_close(dense, opt.dense(prm), rtol=0, atol=0)


def test_huge_float32_weights_keep_a_finite_norm_and_propagate_nan(backend):
    # A norm of float32 weights of 3e19 is finite (accumulated in double); a layer holding NaN
    # has a NaN norm, which the next step takes (the regulariser drops out) instead of raising.
    w = torch.nn.Parameter(torch.full((5000,), 3e19))
    opt = FedDIPSGD([w], lr=0.0, lam=0.01, weight_decay=0.0, backend=backend)
    opt.set_masks({w: torch.ones(5000, dtype=torch.bool)})
    w.grad = torch.zeros(5000)
    opt.step()
    assert opt.state[w]["norm"] == pytest.approx(3e19 * 5000**0.5, rel=1e-6)
    with torch.no_grad():
        opt.dense(w)[0] = float("nan")
    opt.state[w]["dense_version"] = opt.dense(w)._version  # keep the stale norm path out of it
    opt.step()
    assert np.isnan(float(opt.state[w]["norm"]))
    opt.step()  # takes the NaN norm, no "norm must be finite"
    assert np.isnan(float(opt.state[w]["norm"]))


def test_prepared_host_arrays_step_as_the_checked_path(monkeypatch):
    """From its second step a host group reuses the arrays it was checked with; every event that
    invalidates them (new masks, weights or masks written from outside, a parameter without a
    gradient, new hyperparameters, a restored state) must give the bits of the checked path."""
    pytest.importorskip("feddip_kernels._core")

    def run(fast):
        if not fast:
            monkeypatch.setattr(FedDIPSGD, "_host_fast", lambda self, gi, group: False)
        model = _model()
        opt = FedDIPSGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4, lam=0.01)
        x, y = _data()
        taken = 0
        for t in range(10):
            if t in (0, 4):
                opt.set_masks(_masks(model, seed=t + 1))
            if t == 2:
                with torch.no_grad():
                    model[0].weight.mul_(0.5)  # new dense weights from outside
            if t == 3:
                opt.state[model[2].weight]["mask"][0, :5] = True  # a mask written in place
            if t == 5:
                opt.set_lambda(0.02)
                opt.param_groups[0]["lr"] = 0.02
            if t == 7:
                opt.load_state_dict(copy.deepcopy(opt.state_dict()))
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            if t == 6:
                model[0].bias.grad = None  # this step without one parameter
            before = getattr(opt, "_host_tables", {}).get(0)
            opt.step()
            taken += before is not None and opt._host_tables.get(0) is before  # not prepared again
        monkeypatch.undo()
        return [p.detach().clone() for p in model.parameters()] + [opt.dense(p).clone() for p in model.parameters()], taken

    got, taken = run(True)
    want, _ = run(False)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    assert taken >= 4  # the prepared arrays did step most steps


def test_a_deep_copy_or_pickle_steps_as_the_original(backend):
    """copy.deepcopy and pickle keep the optimizer's settings (torch's optimizers keep only their
    state and groups), and the copy steps as the original does."""
    import pickle

    model = _model()
    opt = FedDIPSGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4, lam=0.01, backend=backend)
    opt.set_masks(_masks(model))
    x, y = _data()

    def step(m, o):
        o.zero_grad()
        torch.nn.functional.cross_entropy(m(x), y).backward()
        o.step()

    step(model, opt)
    twin_model, twin = copy.deepcopy((model, opt))
    assert twin.backend == backend and pickle.loads(pickle.dumps(opt)).backend == backend
    for _ in range(2):
        step(model, opt)
        step(twin_model, twin)
    for a, b in zip(model.parameters(), twin_model.parameters()):
        assert torch.equal(a, b) and torch.equal(opt.dense(a), twin.dense(b))
