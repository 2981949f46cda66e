import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from feddip_kernels import available_backends  # noqa: E402
from feddip_kernels.integrations.pytorch import FedDIPSGD  # noqa: E402


# Every kernel backend, and "torch": the torch operations that step tensors on a CUDA device, here
# run on CPU tensors (the same operations on either device), as device_kernels="torch" asks.
@pytest.fixture(params=[*available_backends(), "torch"])
def backend(request):
    return request.param


def _kernels(backend):
    """FedDIPSGD's arguments for a `backend` fixture value: a host backend, or the device kernels."""
    return {"device_kernels": "torch"} if backend == "torch" else {"backend": backend}

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
    opt = FedDIPSGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=wd, lam=lam, p=p, **_kernels(backend))
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
        out = torch.func.functional_call(
            ref_model, dict(zip([n for n, _ in ref_model.named_parameters()], pruned)), (x,)
        )
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
    opt_a = FedDIPSGD(a.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4, **_kernels(backend))
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
    opt = FedDIPSGD(model.parameters(), lr=0.1, lam=0.01, **_kernels(backend))
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
from test_torch_optimizer import _data, _kernels, _masks, _model, _train

ckpt, order, out = sys.argv[2], sys.argv[3], sys.argv[4]
model = _model()
opt = FedDIPSGD(model.parameters(), lr=0.1, momentum=0.9, lam=0.01, **_kernels(sys.argv[5]))
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
        opt = FedDIPSGD(model.parameters(), lr=0.1, momentum=0.9, lam=0.01, **_kernels(backend))
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
    opt = FedDIPSGD([w], lr=0.0, lam=0.01, weight_decay=0.0, **_kernels(backend))
    opt.set_masks({w: torch.ones(5000, dtype=torch.bool)})
    w.grad = torch.zeros(5000)
    opt.step()
    assert opt.state[w]["norm"] == pytest.approx(3e19 * 5000**0.5, rel=1e-6)
    with torch.no_grad():
        opt.dense(w)[0] = float("nan")
    seen = opt._seen[w]  # keep the stale norm path out of it: the finite norm stays valid
    seen.norm_of = (seen.norm_of[0], opt.dense(w)._version, *seen.norm_of[2:])
    opt.step()
    assert np.isnan(float(opt.state[w]["norm"]))
    opt.step()  # takes the NaN norm, no "norm must be finite"
    assert np.isnan(float(opt.state[w]["norm"]))


@pytest.mark.parametrize("backend", available_backends())  # the host kernels: the device kernels keep no arrays
def test_prepared_host_arrays_step_as_fresh_ones(backend):
    """From its second step a host group reuses the NumPy views it prepared; every event that
    invalidates them (new masks, weights or masks written from outside, a parameter without a
    gradient, new hyperparameters, a restored state) must give the bits of views prepared anew
    for every step."""

    def run(fast):
        model = _model()
        opt = FedDIPSGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4, lam=0.01, backend=backend)
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
            if not fast:
                opt.__dict__.pop("_host_tables", None)
            before = getattr(opt, "_host_tables", {}).get(0)
            opt.step()
            taken += before is not None and opt._host_tables.get(0) is before  # not prepared again
        return [p.detach().clone() for p in model.parameters()] + [
            opt.dense(p).clone() for p in model.parameters()
        ], taken

    got, taken = run(True)
    want, _ = run(False)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    assert taken >= 4  # the prepared arrays did step most steps


def test_host_steps_go_through_the_public_steps_validator_and_call(monkeypatch):
    """FedDIPSGD steps host parameters through update.StepLayers, masked_ef_step_many's validator
    and its one call of the kernels (update._run), with the host backend it was given: no kernel
    call of its own."""
    from feddip_kernels import _backend, update

    calls = []
    real = update._run
    monkeypatch.setattr(update, "_run", lambda kernels, *a, **kw: calls.append(kernels) or real(kernels, *a, **kw))
    model = _model()
    opt = FedDIPSGD(model.parameters(), lr=0.05, momentum=0.9, lam=0.01, backend="numpy")
    opt.set_masks(_masks(model))
    _train(model, opt, 2)
    assert calls == [_backend.kernels("numpy")] * 4  # masked layers, then the others, each step


def test_device_kernels_and_the_deprecated_backend_spellings():
    model = _model()
    assert FedDIPSGD(model.parameters(), lr=0.1).device_kernels == "auto"
    for name in ("torch", "triton"):
        if name == "triton":
            from feddip_kernels import _backend

            if _backend.triton_step() is None:
                with pytest.raises(RuntimeError, match="needs Triton"), pytest.warns(DeprecationWarning):
                    FedDIPSGD(model.parameters(), lr=0.1, backend=name)
                continue
        with pytest.warns(DeprecationWarning, match=f'device_kernels="{name}"'):
            opt = FedDIPSGD(model.parameters(), lr=0.1, backend=name)
        assert (opt.backend, opt.device_kernels) == ("auto", name)
    with pytest.raises(ValueError, match="disagree"), pytest.warns(DeprecationWarning):
        FedDIPSGD(model.parameters(), lr=0.1, backend="torch", device_kernels="triton")
    with pytest.raises(ValueError, match="backend must be one of"):
        FedDIPSGD(model.parameters(), lr=0.1, backend="cuda")
    with pytest.raises(ValueError, match="device_kernels must be one of"):
        FedDIPSGD(model.parameters(), lr=0.1, device_kernels="native")
    # A pickle made before device_kernels existed, with backend="torch", steps in torch operations.
    opt = FedDIPSGD(model.parameters(), lr=0.1, device_kernels="torch")
    state = opt.__getstate__()
    state.pop("device_kernels")
    state["backend"] = "torch"
    old = FedDIPSGD.__new__(FedDIPSGD)
    old.__setstate__(state)
    assert (old.backend, old.device_kernels) == ("auto", "torch")


def test_triton_requested_without_triton_says_so(monkeypatch):
    """device_kernels="triton" where Triton does not import fails with a message that says so (it
    listed the host backends when "triton" was a backend)."""
    from feddip_kernels import _backend

    monkeypatch.setattr(_backend, "triton_step", lambda: None)
    model = _model()
    with pytest.raises(RuntimeError, match='device_kernels="triton"\\) needs Triton'):
        FedDIPSGD(model.parameters(), lr=0.1, device_kernels="triton")
    opt = FedDIPSGD(model.parameters(), lr=0.1)  # "auto": torch operations on a device, the host here
    _train(model, opt, 1)


def test_a_deep_copy_or_pickle_steps_as_the_original(backend):
    """copy.deepcopy and pickle keep the optimizer's settings (torch's optimizers keep only their
    state and groups), and the copy steps as the original does."""
    import pickle

    model = _model()
    opt = FedDIPSGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4, lam=0.01, **_kernels(backend))
    opt.set_masks(_masks(model))
    x, y = _data()

    def step(m, o):
        o.zero_grad()
        torch.nn.functional.cross_entropy(m(x), y).backward()
        o.step()

    step(model, opt)
    twin_model, twin = copy.deepcopy((model, opt))
    settings = (opt.backend, opt.device_kernels)
    assert settings == (("auto", "torch") if backend == "torch" else (backend, "auto"))
    for other in (twin, pickle.loads(pickle.dumps(opt))):
        assert (other.backend, other.device_kernels) == settings
    for _ in range(2):
        step(model, opt)
        step(twin_model, twin)
    for a, b in zip(model.parameters(), twin_model.parameters()):
        assert torch.equal(a, b) and torch.equal(opt.dense(a), twin.dense(b))


# --- Edits of the optimizer's state and of the parameters between steps (second audit) ----------
#
# torch.optim.SGD honours every edit of its state and groups between steps: a momentum buffer
# popped or replaced, hyperparameters changed, load_state_dict, add_param_group. FedDIPSGD must too,
# on every backend, whatever it keeps prepared between steps; and it must take new weights written
# into a parameter in any way torch lets a user write one.


def _sgd_reference_step(ref, groups):
    """One step of an independent reference: each parameter's dense weights, mask, momentum buffer
    and current value (the point its gradient is taken at), stepped by the NumPy reference."""
    import feddip_kernels as fk

    for r in ref:
        if not r["has_grad"]:
            continue
        hp = groups[r["group"]]
        g = r["coef"] + r["value"]  # the gradient of sum(coef * x) + 0.5 * sum(x^2) at the current value
        buf = None
        if hp["momentum"] != 0:
            if r["buf"] is None:
                r["buf"] = np.zeros_like(r["w"])
            buf = r["buf"]
        fk.masked_ef_step(r["w"], g, r["mask"], lr=hp["lr"], weight_decay=hp["weight_decay"],
                          lam=hp["lam"] if r["mask"] is not None else 0.0, p=hp["p"], momentum=hp["momentum"],
                          momentum_buffer=buf, backend="numpy")
        r["value"] = r["w"] * r["mask"] if r["mask"] is not None else r["w"].copy()


_EDITS = [
    "step",
    "pop_buf",
    "replace_buf",
    "buf_data",
    "reload_weights",
    "hyper",
    "reload_state",
    "add_group",
    "set_mask",
    "remove_mask",
    "assign_data",
    "copy_nograd",
    "data_copy_reload",
    "write_mask",
    "no_grad",
    "vector_to_parameters",
]


def _run_edits(backend, ops, seed):
    rng = np.random.default_rng(seed)
    hyper_choices = dict(lr=[0.0, 0.01, 0.05], momentum=[0.0, 0.5, 0.9], weight_decay=[0.0, 1e-3], lam=[0.0, 0.01, 0.1],
                         p=[1, 2])
    prms, ref = [], []

    def new_param(dtype, n, group):
        x = rng.standard_normal(n).astype(dtype)
        prms.append(torch.nn.Parameter(torch.from_numpy(x.copy())))
        ref.append(dict(w=x.copy(), value=x.copy(), mask=None, buf=None, group=group, has_grad=True,
                        coef=rng.standard_normal(n).astype(dtype)))

    new_param(np.float32, 40, 0)
    new_param(np.float64, 17, 0)  # a float64 layer beside float32 ones in one group
    new_param(np.float32, 300, 0)
    new_param(np.float32, 8, 0)
    opt = FedDIPSGD(prms, lr=0.05, momentum=0.9, weight_decay=1e-3, lam=0.01, **_kernels(backend))
    groups = [dict(lr=0.05, momentum=0.9, weight_decay=1e-3, lam=0.01, p=2)]

    def set_mask(i, m):
        opt.set_masks({prms[i]: None if m is None else torch.from_numpy(m.copy())})
        r = ref[i]
        r["mask"] = m
        r["value"] = r["w"] * m if m is not None else r["w"].copy()

    set_mask(0, rng.random(40) < 0.5)
    set_mask(2, rng.random(300) < 0.2)
    for op, at in ops:
        i = at % len(prms)
        r, prm = ref[i], prms[i]
        if op == "step":
            for x, rr in zip(prms, ref):
                x.grad = torch.from_numpy(rr["coef"] + x.detach().numpy()) if rr["has_grad"] else None
            opt.step()
            _sgd_reference_step(ref, groups)
            for rr in ref:
                rr["has_grad"] = True
        elif op == "pop_buf":
            opt.state[prm].pop("momentum_buffer", None)
            r["buf"] = None
        elif op == "replace_buf":
            b = rng.standard_normal(r["w"].size).astype(r["w"].dtype)
            opt.state[prm]["momentum_buffer"] = torch.from_numpy(b.copy())
            r["buf"] = b
        elif op == "buf_data":  # the buffer's memory replaced under the same tensor object
            buf = opt.state[prm].get("momentum_buffer")
            if buf is None:
                continue
            b = rng.standard_normal(r["w"].size).astype(r["w"].dtype)
            buf.data = torch.from_numpy(b.copy())
            r["buf"] = b
        elif op == "reload_weights":  # nothing written: the dense weights stay
            opt.reload_weights()
        elif op == "hyper":
            gi = at % len(groups)
            name = list(hyper_choices)[at % len(hyper_choices)]
            value = hyper_choices[name][int(rng.integers(len(hyper_choices[name])))]
            opt.param_groups[gi][name] = value
            groups[gi][name] = value
        elif op == "reload_state":  # state_dict takes weights written since the last step first
            opt.load_state_dict(copy.deepcopy(opt.state_dict()))
            for rr in ref:  # and load_state_dict rewrites each masked parameter as its pruned copy
                if rr["mask"] is not None:
                    rr["value"] = rr["w"] * rr["mask"]
        elif op == "add_group":
            dtype = (np.float32, np.float64)[at % 2]
            new_param(dtype, int(rng.integers(1, 50)), len(groups))
            hp = dict(lr=0.02, momentum=(0.0, 0.9)[at % 2], weight_decay=0.0, lam=0.05, p=1)
            opt.add_param_group(dict(params=[prms[-1]], **hp))
            groups.append(hp)
        elif op == "set_mask":
            set_mask(i, rng.random(r["w"].size) < 0.5)
        elif op == "remove_mask":
            set_mask(i, None)
        elif op in ("assign_data", "copy_nograd", "data_copy_reload", "vector_to_parameters"):
            new = rng.standard_normal(r["w"].size).astype(r["w"].dtype)
            if op == "assign_data":
                prm.data = torch.from_numpy(new.copy())
            elif op == "copy_nograd":
                with torch.no_grad():
                    prm.copy_(torch.from_numpy(new))
            elif op == "data_copy_reload":  # a write torch does not track, then the documented call
                prm.data.copy_(torch.from_numpy(new))
                opt.reload_weights([prm])
            else:  # torch's own utility, which assigns each parameter's .data a view into the vector
                if prm.dtype != torch.float32:
                    continue
                same = [x for x in prms if x.dtype == torch.float32]
                vec = torch.nn.utils.parameters_to_vector(same).clone()
                start = sum(x.numel() for x in same[: [id(x) for x in same].index(id(prm))])
                vec[start:start + prm.numel()] = torch.from_numpy(new)
                torch.nn.utils.vector_to_parameters(vec, same)
            r["w"], r["value"] = new.copy(), new.copy()
        elif op == "write_mask":
            if r["mask"] is None:
                continue
            j = int(rng.integers(r["w"].size))
            opt.state[prm]["mask"][j] = not bool(r["mask"][j])
            r["mask"] = r["mask"].copy()
            r["mask"][j] = not r["mask"][j]
        elif op == "no_grad":
            r["has_grad"] = False
    tol = dict(rtol=2e-4, atol=2e-5)
    for prm, r in zip(prms, ref):
        np.testing.assert_allclose(prm.detach().numpy(), r["value"], **tol)
        np.testing.assert_allclose(opt.dense(prm).numpy(), r["w"], **tol)
        state = opt.state[prm]
        if r["buf"] is not None:
            np.testing.assert_allclose(state["momentum_buffer"].numpy(), r["buf"], **tol)


from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402


@pytest.mark.parametrize("be", [*available_backends(), "torch"])
@settings(suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(st.tuples(st.sampled_from(_EDITS), st.integers(0, 1000)), max_size=14),
       seed=st.integers(0, 2**16))
def test_every_edit_between_steps_is_honoured_as_torch_sgd_honours_it(be, ops, seed):
    _run_edits(be, ops + [("step", 0), ("step", 1)], seed)


@pytest.mark.parametrize("edit", ["pop", "replace"])
def test_a_popped_or_replaced_momentum_buffer_is_taken_as_torch_sgd_takes_it(backend, edit):
    """The audit's case: the prepared host tables kept stepping the old buffer (auto: off by 6.5)."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(100))
    q = torch.nn.Parameter(p.detach().clone())
    opt = FedDIPSGD([p], lr=0.01, momentum=0.9, weight_decay=0, **_kernels(backend))
    ref = torch.optim.SGD([q], lr=0.01, momentum=0.9)
    for step in range(6):
        for o, x in ((opt, p), (ref, q)):
            o.zero_grad()
            (x * torch.arange(100.0)).sum().backward()
            o.step()
            if step == 2:
                if edit == "pop":
                    o.state[x].pop("momentum_buffer")
                else:
                    o.state[x]["momentum_buffer"] = torch.full((100,), 3.0)
    torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-5)
    assert "momentum_buffer" in opt.state[p]  # a checkpoint now holds it
    torch.testing.assert_close(opt.state[p]["momentum_buffer"], ref.state[q]["momentum_buffer"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("way", ["assign", "copy_reload"])
def test_weights_written_through_data_become_the_dense_weights(backend, way):
    """`.data = new` (new storage) is seen at the next step; `.data.copy_(new)`, which torch does not
    track, is taken with reload_weights. Either way the new weights are the dense weights."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(10, 4)
    opt = FedDIPSGD(lin.parameters(), lr=0.0, weight_decay=0, **_kernels(backend))
    opt.set_masks({lin.weight: torch.rand(4, 10) > 0.5})
    for _ in range(2):
        opt.zero_grad()
        lin(torch.randn(3, 10)).sum().backward()
        opt.step()
    new = torch.randn(4, 10)
    if way == "assign":
        lin.weight.data = new.clone()
    else:
        lin.weight.data.copy_(new)
        opt.reload_weights()
    opt.zero_grad()
    lin(torch.randn(3, 10)).sum().backward()
    opt.step()
    m = opt.state[lin.weight]["mask"]
    assert torch.equal(opt.dense(lin.weight), new) and torch.equal(lin.weight.detach(), new * m)


def test_a_parameter_reshaped_through_data_is_refused_until_its_mask_is_set_again():
    lin = torch.nn.Linear(10, 4)
    opt = FedDIPSGD(lin.parameters(), lr=0.1)
    opt.set_masks({lin.weight: torch.rand(4, 10) > 0.5})
    lin.weight.data = torch.randn(40)
    lin.weight.grad = torch.randn(40)
    with pytest.raises(ValueError, match="set its mask again"):
        opt.step()
    opt.set_masks({lin.weight: torch.ones(40, dtype=torch.bool)})  # taken as the new dense weights
    opt.step()


def test_mixed_float32_and_float64_layers_step_in_one_group(backend):
    """The native step refused a group of float32 and float64 layers that the constructor took."""
    torch.manual_seed(0)
    a, b = torch.nn.Parameter(torch.randn(30)), torch.nn.Parameter(torch.randn(20, dtype=torch.float64))
    ra, rb = (torch.nn.Parameter(x.detach().clone()) for x in (a, b))
    opt = FedDIPSGD([a, b], lr=0.1, momentum=0.9, weight_decay=1e-3, **_kernels(backend))
    ref = torch.optim.SGD([ra, rb], lr=0.1, momentum=0.9, weight_decay=1e-3)
    for _ in range(3):
        for o, (x, y) in ((opt, (a, b)), (ref, (ra, rb))):
            o.zero_grad()
            ((x * x).sum() + (y * y).sum() + x.sum()).backward()
            o.step()
    torch.testing.assert_close(a, ra, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b, rb, rtol=1e-12, atol=1e-12)


def test_add_param_group_checks_as_the_constructor_does():
    opt = FedDIPSGD([torch.nn.Parameter(torch.randn(3))], lr=0.1)
    with pytest.raises(TypeError, match="float32/float64"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(3, dtype=torch.float16))]})
    with pytest.raises(ValueError, match="contiguous"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(3, 4).t())]})
    with pytest.raises(ValueError, match="lr"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(3))], "lr": -1.0})
    with pytest.raises(ValueError, match="p must be"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(3))], "p": 3})
    assert len(opt.param_groups) == 1


def test_sgd_settings_it_does_not_implement_are_refused():
    p = torch.nn.Parameter(torch.randn(3))
    opt = FedDIPSGD([p], lr=0.1, momentum=0.9)
    opt.param_groups[0]["nesterov"] = True
    p.grad = torch.ones(3)
    with pytest.raises(ValueError, match="nesterov"):
        opt.step()


def test_groups_given_as_generators_keep_their_parameters():
    """add_param_group read a generator (model.parameters()) for its checks and left torch an empty one."""
    m = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    opt = FedDIPSGD([{"params": m[0].parameters()}], lr=0.1)
    opt.add_param_group({"params": m[1].parameters(), "lr": 0.5})
    assert [len(g["params"]) for g in opt.param_groups] == [2, 2]
    with pytest.raises(ValueError, match="lr must be"):
        FedDIPSGD(m.parameters(), lr=float("nan"))


def test_triton_on_cpu_tensors_says_when_it_cannot_run():
    """device_kernels="triton" on CPU parameters: an error where Triton does not import (at
    construction) or runs without its interpreter (at the step: no device to launch on), else
    (TRITON_INTERPRET=1) the Triton step."""
    import os

    from feddip_kernels import _backend

    model = _model()
    if _backend.triton_step() is None:
        with pytest.raises(RuntimeError, match="needs Triton"):
            FedDIPSGD(model.parameters(), lr=0.1, device_kernels="triton")
        return
    opt = FedDIPSGD(model.parameters(), lr=0.1, device_kernels="triton")
    if os.environ.get("TRITON_INTERPRET") == "1":
        _train(model, opt, 1)
        assert opt._triton_tables
        return
    with pytest.raises(ValueError, match="only under TRITON_INTERPRET=1"):
        _train(model, opt, 1)


def test_device_kernels_triton_refuses_a_group_the_kernel_cannot_take():
    # One Triton launch steps one device and dtype: "triton" says so instead of quietly stepping
    # such a group in torch operations (as "auto" does).
    a, b = torch.nn.Parameter(torch.ones(4)), torch.nn.Parameter(torch.ones(4, dtype=torch.float64))
    a.grad, b.grad = torch.ones(4), torch.ones(4, dtype=torch.float64)
    opt = FedDIPSGD([a, b], lr=0.1, device_kernels="triton")
    with pytest.raises(ValueError, match="share one device"):
        opt.step()
