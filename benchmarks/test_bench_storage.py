"""Sparse models at rest: feddip_kernels.save/load of a 95%-sparse ResNet-18 (CIFAR-100) state dict
against torch.save/torch.load and safetensors, all in memory (BytesIO / bytes), in the same run.

The model is pruned globally by magnitude over its conv and linear weights, the pruned entries set
to +0.0 (assignment). extra_info carries each file's size and its ratio against torch.save's. The
"pruned by multiplication" rows hold the same model pruned as w * mask, which leaves -0.0 at about
half of the pruned places: stored exactly (default) and with signed_zeros=False."""

import io

import pytest

torch = pytest.importorskip("torch")
safetensors_torch = pytest.importorskip("safetensors.torch")

from feddip_kernels import storage  # noqa: E402
from feddip_kernels.fl.models import make_model  # noqa: E402

GROUP_SAVE = "save ResNet-18 state dict, 95% sparse"
GROUP_LOAD = "load ResNet-18 state dict, 95% sparse"


def pruned_state_dict(multiply: bool) -> dict:
    torch.manual_seed(0)
    sd = make_model("resnet18", 3, 100).state_dict()
    weights = [k for k, v in sd.items() if v.ndim > 1]
    threshold = torch.cat([sd[k].abs().reshape(-1) for k in weights]).quantile(0.95)
    with torch.no_grad():
        for k in weights:
            keep = sd[k].abs() > threshold
            if multiply:
                sd[k].mul_(keep)
            else:
                sd[k][~keep] = 0.0
    return sd


@pytest.fixture(scope="module")
def state():
    sd = pruned_state_dict(multiply=False)
    buf = io.BytesIO()
    torch.save(sd, buf)
    dense = sum(v.numel() * v.element_size() for v in sd.values())
    return sd, len(buf.getvalue()), dense


def _torch_save(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    return buf.getvalue()


def _feddip_save(sd, **kw):
    buf = io.BytesIO()
    storage.save(sd, buf, **kw)
    return buf.getvalue()


def test_save_torch(record, state):
    sd, ref, dense = state
    record(lambda: _torch_save(sd), group=GROUP_SAVE, name="torch.save", dense_bytes=dense, baseline=True,
           bytes=ref, ratio_vs_torch_save=1.0)


def test_save_safetensors(record, state):
    sd, ref, dense = state
    out = record(lambda: safetensors_torch.save(sd), group=GROUP_SAVE, name="safetensors.torch.save",
                 dense_bytes=dense, ratio_vs_torch_save=ref / len(safetensors_torch.save(sd)))
    assert len(out) > 0.9 * ref  # dense too: the same bytes as torch.save, give or take the framing


def test_save_feddip(record, state):
    # The default, values="auto": each entry's values entropy-coded where that is smaller.
    sd, ref, dense = state
    size = len(_feddip_save(sd))
    out = record(lambda: _feddip_save(sd), group=GROUP_SAVE, name="feddip_kernels.save", dense_bytes=dense,
                 bytes=size, ratio_vs_torch_save=ref / size)
    assert ref >= 20 * len(out)


def test_save_feddip_raw_values(record, state):
    sd, ref, dense = state
    size = len(_feddip_save(sd, values="raw"))
    out = record(lambda: _feddip_save(sd, values="raw"), group=GROUP_SAVE, name="feddip_kernels.save values=raw",
                 dense_bytes=dense, bytes=size, ratio_vs_torch_save=ref / size)
    assert ref >= 15 * len(out)


def test_save_feddip_multiplied_masks(record):
    sd = pruned_state_dict(multiply=True)
    ref = len(_torch_save(sd))
    dense = sum(v.numel() * v.element_size() for v in sd.values())
    exact = _feddip_save(sd)
    plain = record(lambda: _feddip_save(sd, signed_zeros=False), group=GROUP_SAVE,
                   name="feddip save, w*mask, signed_zeros=False", dense_bytes=dense,
                   ratio_vs_torch_save=ref / len(_feddip_save(sd, signed_zeros=False)),
                   ratio_vs_torch_save_exact=ref / len(exact))
    assert len(plain) < len(exact)


def test_load_torch(record, state):
    sd, ref, dense = state
    data = _torch_save(sd)
    record(lambda: torch.load(io.BytesIO(data), weights_only=True), group=GROUP_LOAD, name="torch.load(weights_only)",
           dense_bytes=dense, baseline=True, bytes=len(data))


def test_load_safetensors(record, state):
    sd, _, dense = state
    data = safetensors_torch.save(sd)
    record(lambda: safetensors_torch.load(data), group=GROUP_LOAD, name="safetensors.torch.load", dense_bytes=dense,
           bytes=len(data))


def test_load_feddip(record, state):
    sd, ref, dense = state
    data = _feddip_save(sd)
    out = record(lambda: storage.load(data), group=GROUP_LOAD, name="feddip_kernels.load", dense_bytes=dense,
                 bytes=len(data), ratio_vs_torch_save=ref / len(data))
    assert all(torch.equal(out[k], sd[k]) for k in sd)
