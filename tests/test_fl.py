import gzip
import json
import os
import struct

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import deep_json  # noqa: E402
from deep_json import Deep  # noqa: E402

from feddip_kernels.codecs import CodecError, crc32c  # noqa: E402
from feddip_kernels.fl import (  # noqa: E402
    SimulationConfig,
    dirichlet_partition,
    iid_partition,
    load_idx_dataset,
    make_model,
    prunable_parameters,
    run_simulation,
    synthetic_dataset,
)
from feddip_kernels.fl.cli import main  # noqa: E402
from feddip_kernels.fl.data import read_idx  # noqa: E402
from feddip_kernels.fl.simulation import _train_client  # noqa: E402
from feddip_kernels.fl.state import initial_state  # noqa: E402

MNIST = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "mnist")


def test_model_sizes():
    lenet = make_model("lenet5", 1, 10)
    assert sum(p.numel() for p in lenet.parameters()) == 61_706
    assert set(prunable_parameters(lenet)) == {"features.0.weight", "features.3.weight", "classifier.1.weight",
                                                "classifier.3.weight", "classifier.5.weight"}
    resnet = make_model("resnet18", 3, 10)
    assert sum(p.numel() for p in prunable_parameters(resnet).values()) == 11_164_352
    alex = make_model("alexnet", 3, 10)
    assert alex(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    assert alex(torch.zeros(2, 3, 28, 28)).shape == (2, 10)  # other input sizes through the adaptive pool
    with pytest.raises(ValueError, match="unknown model"):
        make_model("vgg", 3, 10)


def _write_idx(path, arr, code=0x08):
    header = bytes([0, 0, code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(">u1").tobytes())


def test_idx_loader(tmp_path):
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 30), ("t10k", 10)):
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", rng.integers(0, 10, n))
    train, test = load_idx_dataset(str(tmp_path))
    assert train.x.shape == (30, 1, 28, 28) and test.x.shape == (10, 1, 28, 28)
    assert abs(float(train.x.mean())) < 1e-5
    with gzip.open(tmp_path / "bad.gz", "wb") as f:
        f.write(bytes([0, 0, 8, 1]) + struct.pack(">I", 100) + b"\x00" * 5)
    with pytest.raises(ValueError, match="header says"):
        read_idx(str(tmp_path / "bad.gz"))
    with pytest.raises(FileNotFoundError):
        load_idx_dataset(str(tmp_path / "missing"))


def test_partitions():
    parts = iid_partition(103, 5, seed=1)
    assert sorted(np.concatenate(parts).tolist()) == list(range(103))
    labels = np.random.default_rng(0).integers(0, 10, 2000)
    parts = dirichlet_partition(labels, 8, alpha=0.3, seed=2, min_size=20)
    assert sorted(np.concatenate(parts).tolist()) == list(range(2000))
    assert min(len(p) for p in parts) >= 20
    skew = [np.bincount(labels[p], minlength=10).max() / len(p) for p in parts]
    assert max(skew) > 0.3  # non-IID: some client dominated by a class


def _tiny(alg, rounds=3, **kw):
    train, test = synthetic_dataset(400, 200, seed=0)
    settings = dict(clients=4, clients_per_round=None, rounds=rounds, local_epochs=1, batch_size=32, lr=0.05, s0=0.5,
                    sp=0.9, mask_every=1, seed=3)
    cfg = SimulationConfig(algorithm=alg, **{**settings, **kw})
    return cfg, train, test, iid_partition(len(train), 4, seed=0)


def _strip_times(history):
    return [{k: v for k, v in r.items() if not k.startswith("time_")} for r in history]


@pytest.mark.parametrize("alg", ["feddip", "feddp", "feddip-noef", "fedavg"])
def test_simulation_runs_and_is_deterministic(alg):
    cfg, train, test, parts = _tiny(alg)
    a = run_simulation(cfg, train, test, parts)
    b = run_simulation(cfg, train, test, parts)
    assert _strip_times(a.history) == _strip_times(b.history)
    assert [r["round"] for r in a.history] == [1, 2, 3]
    assert all(r["bytes_up"] > 0 and r["bytes_down"] > 0 for r in a.history)
    totals = np.cumsum([r["bytes_up"] + r["bytes_down"] for r in a.history])
    assert [r["bytes_total"] for r in a.history] == totals.tolist()
    if alg == "fedavg":
        assert not a.masks and a.history[-1]["sparsity"] < 0.01
    else:
        sp = [r["sparsity"] for r in a.history]
        # s_t over the whole run (T = 3), pruned at every round t = 0, 1, 2 (R = 1)
        assert sp == pytest.approx([cfg.schedule.sparsity(t) for t in range(3)], abs=1e-4)
        for k, m in a.masks.items():
            assert not a.weights[k][~m].any()


@pytest.mark.parametrize("alg", ["feddip", "feddip-noef"])
def test_error_feedback_ablation(alg):
    # With error feedback the client's dense weights move outside its mask; without it they stay
    # zero. Either way the global masks are nested: pruned weights never return.
    cfg, train, test, parts = _tiny(alg, rounds=3)
    model = make_model(cfg.model, train.x.shape[1], train.num_classes)
    state = initial_state(cfg, model)
    masks = state.server.training_masks(0)
    local = _train_client(cfg, model, state.weights, masks, train, 0, 0)
    outside = sum(int(np.count_nonzero(local[k][~m])) for k, m in masks.items())
    assert (outside > 0) == (alg == "feddip")
    seen = []
    run_simulation(cfg, train, test, parts, on_round=lambda row: seen.append(row))
    assert len(seen) == 3


@pytest.mark.parametrize("model", ["alexnet", "resnet18"])
def test_larger_models_run_end_to_end(model):
    # ResNet-18's BatchNorm has integer buffers (num_batches_tracked) that the float codecs do not
    # carry; AlexNet takes the 1x28x28 synthetic images through its adaptive pool.
    train, test = synthetic_dataset(64, 32, seed=0)
    cfg = SimulationConfig(algorithm="feddip", model=model, clients=2, clients_per_round=None, rounds=1, local_epochs=1,
                           batch_size=32, seed=0)
    state = run_simulation(cfg, train, test, iid_partition(len(train), 2, seed=0))
    row = state.history[-1]
    assert row["bytes_up"] > 0 and row["bytes_down"] > 0 and row["sparsity"] > 0.4
    assert all(v.dtype.kind == "f" for v in state.weights.values())
    if model == "resnet18":
        assert "bn1.running_var" in state.weights and "bn1.num_batches_tracked" not in state.weights


def test_sparse_transfers_are_smaller_than_dense():
    dense = run_simulation(*_tiny("fedavg"))
    sparse = run_simulation(*_tiny("feddip", horizon=2))  # round 3 uploads under an 85%-sparse mask
    assert sparse.history[-1]["bytes_up"] * 5 < dense.history[-1]["bytes_up"]


def test_resume_after_a_crash_equals_uninterrupted(tmp_path):
    ckpt = str(tmp_path / "state.ckpt")
    cfg, train, test, parts = _tiny("feddip", rounds=3)
    straight = run_simulation(cfg, train, test, parts)

    def crash(row):
        if row["round"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_simulation(cfg, train, test, parts, checkpoint=ckpt, on_round=crash)
    resumed = run_simulation(cfg, train, test, parts, checkpoint=ckpt, resume=True)
    assert _strip_times(resumed.history) == _strip_times(straight.history)
    other, *_ = _tiny("feddp", rounds=3)
    with pytest.raises(ValueError, match="different configuration"):
        run_simulation(other, train, test, parts, checkpoint=ckpt, resume=True)


def test_resume_can_extend_a_run_with_a_fixed_horizon(tmp_path):
    # With a horizon set, 2 rounds then 2 more equal 4 rounds straight; without it the
    # schedule depends on the total, so the checkpoint is refused.
    train, test, parts = _tiny("feddip")[1:]
    straight = run_simulation(_tiny("feddip", rounds=4, horizon=3)[0], train, test, parts)
    ckpt = str(tmp_path / "state.ckpt")
    run_simulation(_tiny("feddip", rounds=2, horizon=3)[0], train, test, parts, checkpoint=ckpt)
    extended = run_simulation(_tiny("feddip", rounds=4, horizon=3)[0], train, test, parts, checkpoint=ckpt,
                              resume=True)
    assert _strip_times(extended.history) == _strip_times(straight.history)
    ckpt2 = str(tmp_path / "free.ckpt")
    run_simulation(_tiny("feddip", rounds=2)[0], train, test, parts, checkpoint=ckpt2)
    with pytest.raises(ValueError, match="different configuration"):
        run_simulation(_tiny("feddip", rounds=4)[0], train, test, parts, checkpoint=ckpt2, resume=True)


def test_cli_writes_json_and_plot(tmp_path):
    out = tmp_path / "run"
    rc = main(["simulate", "--algorithm", "feddip,fedavg", "--clients", "3", "--rounds", "2",
               "--synthetic-train", "300", "--synthetic-test", "100", "--out", str(out), "--quiet", "--checkpoint"])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert set(res["runs"]) == {"feddip", "fedavg"}
    assert res["runs"]["feddip"]["vs_fedavg"]["bytes_ratio"] > 1
    assert (out / "results.png").stat().st_size > 1000
    assert (out / "feddip.ckpt").exists()


def test_cli_values_per_algorithm(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["simulate", "--algorithm", "feddip,fedavg", "--clients", "2", "--rounds", "1", "--synthetic-train", "200",
            "--synthetic-test", "50", "--out", str(out), "--quiet"]
    assert main(args + ["--values", "feddip=fp16"]) == 0
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert runs["feddip"]["config"]["values"] == "fp16" and runs["fedavg"]["config"]["values"] == "raw"
    for bad in ("fp8", "feddp=fp16", "feddip=half"):
        assert main(args + ["--values", bad]) == 2
        assert "feddip simulate: error: --values: " in capsys.readouterr().err


def test_cli_reports_bad_settings_without_a_traceback(tmp_path, capsys):
    base = ["simulate", "--clients", "2", "--rounds", "1", "--synthetic-train", "100", "--synthetic-test", "20",
            "--quiet", "--out", str(tmp_path)]
    assert main(base + ["--algorithm", "fedprox"]) == 2
    assert "--algorithm: 'fedprox' is not one of" in capsys.readouterr().err
    assert main(base + ["--data", str(tmp_path / "missing")]) == 2
    assert "error" in capsys.readouterr().err
    assert main(base + ["--algorithm", "feddip", "--checkpoint"]) == 0
    assert main(base + ["--algorithm", "feddip", "--checkpoint", "--resume", "--lr", "0.5"]) == 2
    assert "different configuration" in capsys.readouterr().err


def test_cli_cifar_shaped_pairs_run_the_three_algorithms(tmp_path):
    # The short reproduction commands of the README, at a few samples: synthetic CIFAR-10/100
    # shapes with AlexNet and ResNet-18, FedDIP, FedDP and FedAvg in one results.json and plot.
    for model, data, _classes in (("alexnet", "synthetic-cifar10", 10), ("resnet18", "synthetic-cifar100", 100)):
        out = tmp_path / model
        assert main(["simulate", "--model", model, "--data", data, "--synthetic-train", "48",
                     "--synthetic-test", "16", "--clients", "2", "--rounds", "1", "--batch-size", "16",
                     "--algorithm", "feddip,feddp,fedavg", "--out", str(out), "--quiet"]) == 0
        res = json.loads((out / "results.json").read_text())
        assert set(res["runs"]) == {"feddip", "feddp", "fedavg"} and res["device"] == "cpu"
        assert res["data"] == data and (out / "results.png").stat().st_size > 1000
    train, test = synthetic_dataset(20, 10, 100, seed=1, shape=(3, 32, 32))
    assert train.x.shape == (20, 3, 32, 32) and train.y.max() < 100
    with pytest.raises(ValueError, match="multiples of 4"):
        synthetic_dataset(2, 2, shape=(3, 30, 30))


def test_cli_device_flag(tmp_path, capsys):
    import torch

    base = ["simulate", "--algorithm", "feddip", "--clients", "2", "--rounds", "1", "--synthetic-train", "60",
            "--synthetic-test", "20", "--quiet", "--out", str(tmp_path)]
    assert main(base + ["--device", "tpu"]) == 2
    assert "--device must be" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(base + ["--device", "cuda"]) == 2
        assert "no CUDA device" in capsys.readouterr().err
    assert main(base + ["--device", "auto"]) == 0
    want = "cuda" if torch.cuda.is_available() else "cpu"
    assert json.loads((tmp_path / "results.json").read_text())["device"] == want


@pytest.mark.skipif(not os.path.isdir(MNIST), reason="MNIST not found at ../shared/data/mnist")
def test_mnist_loads_and_trains():
    train, test = load_idx_dataset(MNIST)
    assert train.x.shape == (60_000, 1, 28, 28) and test.x.shape == (10_000, 1, 28, 28)
    assert train.num_classes == 10
    sub = type(train)(train.x[:4000], train.y[:4000])
    cfg = SimulationConfig(algorithm="feddip", clients=4, clients_per_round=None, rounds=3, local_epochs=2,
                           batch_size=32, lr=0.1, s0=0.5, sp=0.8, mask_every=1, seed=0)
    state = run_simulation(cfg, sub, type(test)(test.x[:1000], test.y[:1000]), iid_partition(4000, 4))
    assert state.history[-1]["accuracy"] > 0.5  # well above chance (0.1) after three short rounds


@pytest.mark.parametrize("lr", [0.01, 0.05, 0.1])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_feddip_does_not_blow_up_where_fedavg_does_not(lr, momentum):
    # Same optimiser settings for both; FedDIP prunes to 95% over the run. A loss above three
    # times its round-1 value is a blow-up (the old simulation's FedDIP reached 56x by round 4).
    train, test = synthetic_dataset(600, 200, seed=1)
    parts = iid_partition(len(train), 3, seed=1)
    peak = {}
    for alg in ("feddip", "fedavg"):
        cfg = SimulationConfig(
            algorithm=alg,
            clients=3,
            clients_per_round=None,
            rounds=5,
            local_epochs=1,
            batch_size=32,
            lr=lr,
            momentum=momentum,
            s0=0.5,
            sp=0.95,
            mask_every=1,
            seed=2,
        )
        losses = [r["loss"] for r in run_simulation(cfg, train, test, parts).history]
        assert all(np.isfinite(losses)), (alg, losses)
        peak[alg] = max(losses) / losses[0]
    assert peak["feddip"] <= 3 or peak["fedavg"] > 3, peak


_KILLED_RUN = r"""
import sys
from feddip_kernels.fl import iid_partition, synthetic_dataset
from feddip_kernels.fl.simulation import SimulationConfig, run_simulation
train, test = synthetic_dataset(400, 200, seed=0)
cfg = SimulationConfig(algorithm="feddip", clients=4, clients_per_round=2, rounds=6, local_epochs=2, batch_size=16,
                       lr=0.05, s0=0.5, sp=0.9, mask_every=2, seed=3)
run_simulation(cfg, train, test, iid_partition(len(train), 4, seed=0), checkpoint=sys.argv[1])
"""


def test_checkpoint_survives_sigkill_mid_round(tmp_path):
    # A run killed at an arbitrary moment (here while round 3 or later trains) resumes from its last
    # complete checkpoint and ends with exactly the uninterrupted run's history and weights.
    import signal
    import subprocess
    import sys
    import time

    from feddip_kernels.fl.checkpoint import MAGIC

    ckpt = tmp_path / "run.ckpt"
    script = tmp_path / "run.py"
    script.write_text(_KILLED_RUN)
    proc = subprocess.Popen([sys.executable, str(script), str(ckpt)])
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if ckpt.exists() and b'"round": 2' in ckpt.read_bytes()[:4096]:
                break
            time.sleep(0.01)
        assert proc.poll() is None, "the run ended before it could be killed"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert ckpt.read_bytes()[:4] == MAGIC
    train, test = synthetic_dataset(400, 200, seed=0)
    cfg = SimulationConfig(algorithm="feddip", clients=4, clients_per_round=2, rounds=6, local_epochs=2, batch_size=16,
                           lr=0.05, s0=0.5, sp=0.9, mask_every=2, seed=3)
    parts = iid_partition(len(train), 4, seed=0)
    resumed = run_simulation(cfg, train, test, parts, checkpoint=str(ckpt), resume=True)
    straight = run_simulation(cfg, train, test, parts)
    assert _strip_times(resumed.history) == _strip_times(straight.history)
    for k, v in straight.weights.items():
        assert resumed.weights[k].tobytes() == v.tobytes()
    for k, m in straight.masks.items():
        np.testing.assert_array_equal(resumed.masks[k], m)


def test_checkpoint_is_validated_not_unpickled(tmp_path):
    from feddip_kernels.fl.checkpoint import save_checkpoint

    cfg, train, test, parts = _tiny("feddip", rounds=2)
    ckpt = tmp_path / "run.ckpt"
    state = run_simulation(cfg, train, test, parts, checkpoint=str(ckpt))
    good = ckpt.read_bytes()
    for bad in (b"\x80\x04pickle", good[:20], good[:-5], good[:4] + b"\x04" + good[5:]):
        ckpt.write_bytes(bad)
        with pytest.raises(CodecError):
            run_simulation(cfg, train, test, parts, checkpoint=str(ckpt), resume=True)
    other = _tiny("feddip", rounds=2, model="alexnet")[0]
    ckpt.write_bytes(good)
    with pytest.raises(ValueError, match="configuration"):
        run_simulation(other, train, test, parts, checkpoint=str(ckpt), resume=True)
    save_checkpoint(str(ckpt), state)
    assert ckpt.read_bytes() == good


def test_cli_preset_paper_and_overrides(tmp_path):
    out = tmp_path / "run"
    rc = main(["simulate", "--preset", "paper", "--algorithm", "feddip", "--rounds", "2", "--clients", "4",
               "--clients-per-round", "2", "--local-epochs", "1", "--synthetic-train", "200", "--synthetic-test", "50",
               "--out", str(out), "--quiet"])
    assert rc == 0
    cfg = json.loads((out / "results.json").read_text())["runs"]["feddip"]["config"]
    assert (cfg["rounds"], cfg["clients"], cfg["clients_per_round"], cfg["local_epochs"]) == (2, 4, 2, 1)  # flags
    assert (cfg["batch_size"], cfg["lr"], cfg["momentum"], cfg["mask_every"], cfg["s0"], cfg["sp"]) == (
        128, 0.1, 0.0, 5, 0.5, 0.95)  # the paper's
    assert cfg["horizon"] is None and cfg["weighting"] == "equal"


def test_failing_clients_are_dropped_and_counted(monkeypatch):
    # A client whose training raises, and one whose upload does not decode, are left out of their
    # round's average and counted; the run goes on.
    from feddip_kernels.fl import simulation

    cfg, train, test, parts = _tiny("feddip", rounds=3)
    train_client, upload = simulation._train_client, simulation._upload

    def flaky_train(cfg, model, weights, masks, data, t, client):
        if (t, client) == (1, 1):
            raise RuntimeError("out of memory")
        return train_client(cfg, model, weights, masks, data, t, client)

    def flaky_upload(local, shared, values, client):
        msg = upload(local, shared, values, client)
        return msg[:-1] + bytes([msg[-1] ^ 1]) if client == 2 else msg

    monkeypatch.setattr(simulation, "_train_client", flaky_train)
    monkeypatch.setattr(simulation, "_upload", flaky_upload)
    state = run_simulation(cfg, train, test, parts)
    assert [r["clients_failed"] for r in state.history] == [1, 2, 1]
    assert "RuntimeError: out of memory" in state.history[1]["failures"][0]
    assert all("checksum" in f for r in state.history for f in r["failures"] if f.startswith("client 2"))
    assert np.isfinite(state.history[-1]["loss"])
    monkeypatch.setattr(simulation, "_train_client", lambda *a: (_ for _ in ()).throw(ValueError("broken")))
    with pytest.raises(RuntimeError, match="every client failed"):
        run_simulation(cfg, train, test, parts)


# ------------------------------------------------------------------ hostile checkpoints


def _dumps(obj):
    return deep_json.dumps(obj).encode()


def _ckpt_split(data):
    """(header, JSON, message) of a checkpoint. Format 1 had no checksum: the helpers follow the
    file's version, so these tests show what the code before the checksum accepted."""
    from feddip_kernels.fl import checkpoint

    version, json_len = data[4], checkpoint._HEADER.unpack_from(data)[3]
    start = checkpoint._HEADER.size
    return (
        data[:start],
        json.loads(data[start : start + json_len]),
        data[start + json_len : len(data) - 4 * (version >= 2)],
    )


_KEEP = object()


def _ckpt_reseal(data, meta=_KEEP, message=None):
    """The checkpoint with its JSON and message replaced where given, and a fresh checksum, so that
    the checks behind the checksum are reached."""
    header, old_meta, old_message = _ckpt_split(data)
    body = _dumps(old_meta if meta is _KEEP else meta)
    out = header[:8] + struct.pack("<I", len(body)) + body + (old_message if message is None else message)
    return out + (struct.pack("<I", crc32c(out)) if data[4] >= 2 else b"")


@pytest.fixture(scope="module")
def real_checkpoint(tmp_path_factory):
    # 4 rounds, 2 of 4 clients a round, a new mask every 2 rounds: clients hold the global mask
    # (-1) and an older one (set 0), and rows with and without a sparsity target.
    path = tmp_path_factory.mktemp("ckpt") / "run.ckpt"
    cfg, train, test, parts = _tiny("feddip", rounds=4, clients_per_round=2, mask_every=2)
    state = run_simulation(cfg, train, test, parts, checkpoint=str(path))
    data = path.read_bytes()
    assert sorted(set(_ckpt_split(data)[1]["client_masks"].values())) == [-1, 0]
    return cfg, make_model(cfg.model, train.x.shape[1], train.num_classes), data, state


def _load_bytes(tmp_path, cfg, model, data):
    from feddip_kernels.fl.checkpoint import load_checkpoint

    path = tmp_path / "mutated.ckpt"
    path.write_bytes(data)
    return load_checkpoint(str(path), cfg, model)


def _refusals(tmp_path, cfg, model, files):
    """The (label, outcome) of each file that load_checkpoint does not refuse with CodecError."""
    wrong = []
    for label, data in files:
        try:
            _load_bytes(tmp_path, cfg, model, data)
            wrong.append((label, "loaded"))
        except CodecError as e:
            if type(e) is not CodecError:
                wrong.append((label, repr(e)))
        except Exception as e:  # noqa: BLE001 - any other exception is what is tested against
            wrong.append((label, repr(e)))
    return wrong


def test_checkpoint_reseal_round_trips(tmp_path, real_checkpoint):
    # The helpers rebuild a loadable file (otherwise every mutation test below would pass for nothing).
    cfg, model, data, state = real_checkpoint
    assert _ckpt_reseal(data) == data
    loaded = _load_bytes(tmp_path, cfg, model, _ckpt_reseal(data))
    assert loaded.round == 4 and loaded.history == state.history
    assert set(loaded.client_masks) == set(state.client_masks)
    for k, v in state.weights.items():
        assert loaded.weights[k].tobytes() == v.tobytes()


def test_checkpoints_written_before_the_evaluate_and_round_times_still_load(tmp_path, real_checkpoint):
    cfg, model, data, state = real_checkpoint
    meta = _ckpt_split(data)[1]
    assert all({"time_evaluate", "time_round"} <= set(row) for row in meta["history"])
    for row in meta["history"]:
        del row["time_evaluate"], row["time_round"]
    loaded = _load_bytes(tmp_path, cfg, model, _ckpt_reseal(data, meta=meta))
    assert loaded.history == meta["history"]


def test_checkpoint_audit_cases_are_refused(tmp_path, real_checkpoint):
    # The audit's cases: before, the first three loaded silently (the third with its mask dropped),
    # the others raised AttributeError, TypeError, KeyError or RecursionError.
    cfg, model, data, _ = real_checkpoint
    meta = _ckpt_split(data)[1]
    cases = [
        ("round 5", {**meta, "round": 5}), ("round -7", {**meta, "round": -7}),
        ("has_mask false", {**meta, "has_mask": False}),
        ("client 99", {**meta, "client_masks": {**meta["client_masks"], "99": -1}}),
        ("json []", []), ("client_masks list", {**meta, "client_masks": [[1, 0]]}),
        ("history rows missing", {**meta, "history": []}),
        ("deep", {**meta, "history": Deep(100_000)}),
    ]
    files = [(label, _ckpt_reseal(data, meta=m)) for label, m in cases]
    assert _refusals(tmp_path, cfg, model, files) == []


_FREE_REALS = {"accuracy", "loss", "sparsity", "sparsity_target", "lr", "lambda", "time_train", "time_prune",
               "time_encode", "time_evaluate", "time_round"}
_WRONG_TYPES = [None, True, False, "x", [], {}, [[["deep"]]], {"a": {"b": {}}}, Deep(60), Deep(100_000)]
_WRONG_NUMBERS = [0, -7, 2**64, 1.5, float("nan"), 10**30]


def _paths(obj, path=()):
    yield path, obj
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, path + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, path + (i,))


def _mutated(meta, path, op, value=None):
    meta = json.loads(json.dumps(meta))
    *parent_path, last = path
    parent = meta
    for p in parent_path:
        parent = parent[p]
    if op == "delete":
        del parent[last]
    elif op == "append":
        parent[last].append(value)
    else:
        parent[last] = value
    return meta


@pytest.mark.parametrize("fixture", ["real_checkpoint", "compact_checkpoint"])
def test_every_single_field_mutation_of_a_checkpoint_is_refused(tmp_path, request, fixture):
    # Every field at every level (configuration, round, has_mask, prunable, client_masks, each
    # history row's fields, compact's): deleted, or set to each wrong type, nesting shallow and past
    # the parser's limit, and out-of-range or inconsistent numbers; unknown fields added at each
    # level; the whole JSON replaced. Each must raise CodecError, and nothing else.
    cfg, model, data, _ = request.getfixturevalue(fixture)[:4]
    meta = _ckpt_split(data)[1]
    files = [(f"json = {v!r}", _ckpt_reseal(data, meta=v)) for v in [[], "x", None, 1, Deep(100_000)]]
    for path, old in _paths(meta):
        if path:
            files.append((f"delete {path}", _ckpt_reseal(data, meta=_mutated(meta, path, "delete"))))
            free = path[-1] in _FREE_REALS and path[0] == "history"
            values = _WRONG_TYPES + ([-7.0] if free else _WRONG_NUMBERS)
            for v in values:
                if free and v is None and path[-1] == "sparsity_target":
                    continue  # None is a valid target (rounds that do not prune)
                if v == "x" and path[-2:-1] == ("failures",):
                    continue  # a failure's message is free text
                if _dumps(v) != _dumps(old):
                    files.append((f"{path} = {v!r}", _ckpt_reseal(data, meta=_mutated(meta, path, "set", v))))
        if isinstance(old, dict):
            extra = ["extra"] + (["99", "4", "01", "-1", " 1"] if path == ("client_masks",) else [])
            for key in extra:
                files.append((f"{path} + {key!r}", _ckpt_reseal(data, meta=_mutated(meta, path + (key,), "set", 0))))
        if isinstance(old, list) and old:
            files.append((f"{path} + copy of last", _ckpt_reseal(data, meta=_mutated(meta, path, "append", old[-1]))))
    assert len(files) > 1000
    assert _refusals(tmp_path, cfg, model, files) == []


def test_checkpoint_json_must_agree_with_the_run(tmp_path, real_checkpoint):
    # Well-typed values that another run, or no run, would write.
    cfg, model, data, _ = real_checkpoint
    meta = _ckpt_split(data)[1]
    clients = meta["client_masks"]
    holder = next(k for k, j in clients.items() if j == -1)
    row = meta["history"][1]
    cases = {
        "round 3 with 4 rows": {**meta, "round": 3},
        "a client that holds the global mask said to hold set 0": {**clients, holder: 0},
        "clients listed in another order": dict(reversed(list(clients.items()))),
        "a client left out": {k: j for k, j in clients.items() if k != holder},
        "bytes_total off by one": {**row, "bytes_total": row["bytes_total"] + 1},
        "one client more than sampled": {**row, "clients": 3},
        "a failure not counted": {**row, "failures": ["client 1: RuntimeError"]},
        "bytes_authors beyond the model": {**row, "bytes_authors": 8 * 2 * 10**6},
        "accuracy above 1": {**row, "accuracy": 1.5},
    }
    files = []
    for label, value in cases.items():
        if isinstance(value, dict) and "config" in value:
            m = value
        elif "round" in value:
            m = {**meta, "history": [meta["history"][0], value, *meta["history"][2:]]}
        else:
            m = {**meta, "client_masks": value}
        files.append((label, _ckpt_reseal(data, meta=m)))
    assert _refusals(tmp_path, cfg, model, files) == []


def test_checkpoint_message_must_agree_with_the_json(tmp_path, real_checkpoint):
    from feddip_kernels.codecs import decode_model, encode_model

    cfg, model, data, _ = real_checkpoint
    decoded = decode_model(_ckpt_split(data)[2])
    name = "classifier.1.weight"

    def message(edit):
        tensors, masks = dict(decoded.tensors), dict(decoded.masks)
        edit(tensors, masks)
        return encode_model(tensors, masks=masks, values="raw")

    def value_in_set(t, m):
        t[f"k0/{name}"] = t[f"k0/{name}"].copy()
        t[f"k0/{name}"][m[f"k0/{name}"]] = 1.0  # a stored mask set carries zeros only

    def set_missing_global(t, m):
        m[f"k0/{name}"] = m[f"k0/{name}"] & ~m[f"w/{name}"]  # an older mask always contains the current

    def tensor_missing(t, m):
        del t["w/features.0.bias"]

    def extra_set(t, m):
        t[f"k1/{name}"], m[f"k1/{name}"] = t[f"k0/{name}"], m[f"k0/{name}"]

    files = [(f.__name__, _ckpt_reseal(data, message=message(f)))
             for f in (value_in_set, set_missing_global, tensor_missing, extra_set)]
    assert _refusals(tmp_path, cfg, model, files) == []


def test_every_flipped_byte_of_a_checkpoint_is_refused(tmp_path, real_checkpoint):
    # The checksum covers the whole file: header, JSON, message and itself. Every byte of the
    # header, the JSON and the checksum, and a sample of the message's; truncations; a byte more.
    cfg, model, data, _ = real_checkpoint
    json_end = 12 + struct.unpack_from("<I", data, 8)[0]
    positions = [*range(json_end), *range(json_end, len(data) - 4, 97), *range(len(data) - 4, len(data))]
    files = []
    for i in positions:
        bad = bytearray(data)
        bad[i] ^= 1 << (i % 8)
        files.append((f"flip {i}", bytes(bad)))
    files += [(f"cut {n}", data[:n]) for n in (0, 11, 12, json_end, len(data) // 2, len(data) - 4, len(data) - 1)]
    files.append(("one byte more", data + b"\0"))
    assert _refusals(tmp_path, cfg, model, files) == []


def test_checkpoint_of_format_1_is_refused_saying_so(tmp_path, real_checkpoint):
    cfg, model, data, _ = real_checkpoint
    old = data[:4] + b"\x01" + data[5:-4]  # format 1: header, JSON, message, no checksum
    with pytest.raises(CodecError, match="format 1, which has no checksum"):
        _load_bytes(tmp_path, cfg, model, old)


# ------------------------------------------------------------------ the compact coding


def test_compact_coding_runs_and_moves_fewer_bytes():
    # Deltas against what each end holds, int8 and entropy-coded, against the plain coding with the
    # same values: round 0's downlink is an init frame a client (21 bytes), and the run sends less.
    cfg, train, test, parts = _tiny("feddip", coding="compact", values="int8-ans")
    assert cfg.compact
    compact = run_simulation(cfg, train, test, parts)
    plain = run_simulation(*_tiny("feddip", values="int8-ans"))
    rows = compact.history
    assert [r["round"] for r in rows] == [1, 2, 3] and rows[0]["bytes_down"] == 4 * 21
    assert all(r["bytes_up"] > 0 and r["clients_failed"] == 0 and np.isfinite(r["loss"]) for r in rows)
    assert [r["bytes_total"] for r in rows] == np.cumsum([r["bytes_up"] + r["bytes_down"] for r in rows]).tolist()
    assert [r["bytes_authors"] for r in rows] == [r["bytes_authors"] for r in plain.history]
    assert rows[-1]["bytes_total"] < 0.8 * plain.history[-1]["bytes_total"]
    for k, m in compact.masks.items():
        assert not compact.weights[k][~m].any()
    with pytest.raises(ValueError, match="stochastic rounding"):
        _tiny("feddip", rounding="stochastic")
    with pytest.raises(ValueError, match="coding"):
        _tiny("feddip", coding="sparse")


def test_compact_coding_leaves_lossless_runs_alone_and_drops_bad_replies(monkeypatch):
    # With raw values the compact coding sends what the plain one does (FedAvg's baseline bytes);
    # with lossy values a reply that does not decode drops its client, and the ends stay in sync.
    from feddip_kernels.fl import simulation

    plain = run_simulation(*_tiny("fedavg", rounds=2))
    same = run_simulation(*_tiny("fedavg", rounds=2, coding="compact"))
    assert _strip_times(same.history) == _strip_times(plain.history)
    reply = simulation._reply

    def flaky_reply(end, local, t):
        msg = reply(end, local, t)
        return msg[:-1] + bytes([msg[-1] ^ 1]) if (t, end.client) == (0, 2) else msg

    monkeypatch.setattr(simulation, "_reply", flaky_reply)
    state = run_simulation(*_tiny("fedavg", rounds=2, coding="compact", values="int8-ans"))
    assert [r["clients_failed"] for r in state.history] == [1, 0]
    assert "checksum" in state.history[0]["failures"][0]
    assert state.history[0]["bytes_down"] == 4 * 21 and state.history[1]["bytes_down"] < plain.history[1]["bytes_down"]


def test_cli_preset_compact(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["simulate", "--preset", "compact", "--algorithm", "feddip,fedavg", "--rounds", "1", "--clients", "3",
            "--clients-per-round", "2", "--local-epochs", "1", "--synthetic-train", "120", "--synthetic-test", "30",
            "--out", str(out), "--quiet"]
    assert main(args) == 0
    runs = json.loads((out / "results.json").read_text())["runs"]
    cfg = runs["feddip"]["config"]
    assert (cfg["coding"], cfg["values"], cfg["rounding"], cfg["horizon"]) == ("compact", "int4-ans", "nearest", 15)
    assert runs["fedavg"]["config"]["values"] == "raw" and runs["feddip"]["history"][0]["bytes_down"] == 2 * 21
    assert main(args + ["--values", "feddip=int6-ans", "--rounding", "stochastic"]) == 0
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert (runs["feddip"]["config"]["values"], runs["feddip"]["config"]["rounding"]) == ("int6-ans", "stochastic")
    assert (runs["fedavg"]["config"]["values"], runs["fedavg"]["config"]["rounding"]) == ("raw", "nearest")
    # Checkpoints hold the compact coding's state: 1 round, then 2 more, equal 3 straight (the
    # preset's horizon fixes the schedules, so a finished run can be extended).
    assert main(args + ["--algorithm", "feddip", "--checkpoint"]) == 0
    assert main(args + ["--algorithm", "feddip", "--checkpoint", "--resume", "--rounds", "3"]) == 0
    resumed = json.loads((out / "results.json").read_text())["runs"]["feddip"]["history"]
    assert main(args + ["--algorithm", "feddip", "--rounds", "3", "--out", str(tmp_path / "straight")]) == 0
    straight = json.loads((tmp_path / "straight" / "results.json").read_text())["runs"]["feddip"]["history"]
    assert len(resumed) == 3 and _strip_times(resumed) == _strip_times(straight)


def test_checkpoints_written_before_the_coding_settings_still_load(tmp_path, real_checkpoint):
    cfg, model, data, state = real_checkpoint
    meta = _ckpt_split(data)[1]
    for key in ("coding", "rounding", "residual_feedback"):
        del meta["config"][key]
    loaded = _load_bytes(tmp_path, cfg, model, _ckpt_reseal(data, meta=meta))
    assert loaded.round == 4 and loaded.history == state.history
    compact = SimulationConfig(**{**cfg.__dict__, "coding": "compact"})  # lossless: not the compact transport
    with pytest.raises(CodecError, match="different configuration"):
        _load_bytes(tmp_path, compact, model, _ckpt_reseal(data, meta=meta))


# ------------------------------------------------------------------ checkpoints of the compact coding


def _compact_tiny(alg="feddip", **kw):
    # 4 rounds, 2 of 4 clients a round (seed 0: clients 0 and 3, then 1 and 2, 0 and 2, 0 and 1), a
    # new mask every 2 rounds: client 3 holds the initial model from round 0 on, client 2 an older
    # mask than the global one after round 4.
    settings = dict(rounds=4, clients_per_round=2, mask_every=2, seed=0, coding="compact", values="int4-ans")
    return _tiny(alg, **{**settings, **kw})


def _initial_model(cfg, train, test):
    """The run's initial model, as run_simulation builds it (compact checkpoints check against it)."""
    from feddip_kernels.protocol import seed_for

    torch.manual_seed(seed_for(cfg.seed, 0))
    return make_model(cfg.model, train.x.shape[1], max(train.num_classes, test.num_classes))


def _flaky_compact(monkeypatch):
    """Client 3's training fails in round 0, its only contact (it keeps no residual), and client
    2's reply in round 2 does not decode (its residual moves on all the same)."""
    from feddip_kernels.fl import simulation

    train_client, reply = simulation._train_client, simulation._reply

    def flaky_train(cfg, model, weights, masks, data, t, client):
        if (t, client) == (0, 3):
            raise RuntimeError("out of memory")
        return train_client(cfg, model, weights, masks, data, t, client)

    def flaky_reply(end, local, t):
        msg = reply(end, local, t)
        return msg[:-1] + bytes([msg[-1] ^ 1]) if (t, end.client) == (2, 2) else msg

    monkeypatch.setattr(simulation, "_train_client", flaky_train)
    monkeypatch.setattr(simulation, "_reply", flaky_reply)


def _record_compact(monkeypatch):
    """The list to which each run's compact ends (simulation._Compact) are appended."""
    from feddip_kernels.fl import simulation

    made = []

    class Recorded(simulation._Compact):
        def __init__(self, *args):
            super().__init__(*args)
            made.append(self)

    monkeypatch.setattr(simulation, "_Compact", Recorded)
    return made


def _bits(tensors):
    return {k: (v.shape, v.dtype.str, v.tobytes()) for k, v in tensors.items()}


def _check_ends(ends, state):
    # What a checkpoint leaves out is what it can: each client's end shares the server's model
    # for it and holds its client_masks entry, bit for bit.
    assert list(ends.server.held) == list(ends.clients)
    for c, end in ends.clients.items():
        assert end.held is ends.server.held[c]
        assert _bits(end.masks) == _bits(state.client_masks.get(c, {}))


def _same_ends(a, b):
    assert a.server.frame == b.server.frame and _bits(a.server.init) == _bits(b.server.init)
    assert list(a.server.held) == list(b.server.held) and list(a.clients) == list(b.clients)
    for c, end in a.clients.items():
        assert _bits(end.held) == _bits(b.clients[c].held)
        assert _bits(end.masks) == _bits(b.clients[c].masks)
        assert _bits(end.residual) == _bits(b.clients[c].residual)


_COMPACT_VARIANTS = {
    "nearest": {}, "failures": {}, "stochastic": dict(rounding="stochastic"),
    "no residual feedback": dict(residual_feedback=False), "fedavg": dict(alg="fedavg", values="int8-ans"),
}


@pytest.mark.parametrize("variant", list(_COMPACT_VARIANTS))
def test_compact_run_resumed_after_each_round_equals_the_uninterrupted_run(tmp_path, monkeypatch, variant):
    # Stopped after rounds 1 (round 0 only: init frames), 2, 3 (after a pruning round) and resumed
    # each time: the same history, weights, masks, and both ends' state, bit for bit. "failures":
    # a client that fails to train, and one whose reply does not decode.
    from feddip_kernels.fl.checkpoint import read_checkpoint, save_checkpoint

    if variant == "failures":
        _flaky_compact(monkeypatch)
    made = _record_compact(monkeypatch)
    cfg, train, test, parts = _compact_tiny(**_COMPACT_VARIANTS[variant])
    straight = run_simulation(cfg, train, test, parts)
    _check_ends(made[-1], straight)
    if variant == "failures":
        assert [r["clients_failed"] for r in straight.history] == [1, 0, 1, 0]
        assert not made[-1].clients[3].residual and made[-1].clients[2].residual
    ckpt = tmp_path / "run.ckpt"
    for stop in range(1, cfg.rounds):
        def crash(row, stop=stop):
            if row["round"] == stop:
                raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):
            run_simulation(cfg, train, test, parts, checkpoint=str(ckpt), resume=True, on_round=crash)
        # What a resume reads is the stopped run's state, and saved again it makes the same bytes.
        state, compact = read_checkpoint(str(ckpt), cfg, _initial_model(cfg, train, test))
        ends = made[-1]
        _check_ends(ends, state)
        assert list(compact.held) == list(ends.server.held)
        assert all(_bits(compact.held[c]) == _bits(ends.server.held[c]) for c in ends.server.held)
        assert {c: _bits(r) for c, r in compact.residual.items()} == {
            c: _bits(end.residual) for c, end in ends.clients.items() if end.residual}
        save_checkpoint(str(tmp_path / "again.ckpt"), state, compact)
        assert (tmp_path / "again.ckpt").read_bytes() == ckpt.read_bytes()
    resumed = run_simulation(cfg, train, test, parts, checkpoint=str(ckpt), resume=True)
    assert _strip_times(resumed.history) == _strip_times(straight.history)
    assert _bits(resumed.weights) == _bits(straight.weights) and _bits(resumed.masks) == _bits(straight.masks)
    _same_ends(made[-1], made[0])
    if variant == "no residual feedback":
        assert not any(end.residual for end in made[-1].clients.values())


@pytest.fixture(scope="module")
def compact_checkpoint(tmp_path_factory):
    # _compact_tiny's run, with _flaky_compact's failures: after round 4 clients 0, 3, 1, 2 (in the
    # order first contacted) hold models, 3 the initial one and no mask; 0, 1 and 2 have residuals;
    # 0 and 1 hold the global mask, 2 an older one.
    path = tmp_path_factory.mktemp("compact") / "run.ckpt"
    cfg, train, test, parts = _compact_tiny()
    with pytest.MonkeyPatch.context() as mp:
        _flaky_compact(mp)
        state = run_simulation(cfg, train, test, parts, checkpoint=str(path))
    data = path.read_bytes()
    meta = _ckpt_split(data)[1]
    assert (meta["compact"]["held"], meta["compact"]["residual"]) == ([0, 3, 1, 2], [0, 1, 2])
    assert meta["client_masks"] == {"1": -1, "2": 0, "0": -1}
    return cfg, _initial_model(cfg, train, test), data, state


def _read_bytes(tmp_path, cfg, model, data):
    from feddip_kernels.fl.checkpoint import read_checkpoint

    path = tmp_path / "mutated.ckpt"
    path.write_bytes(data)
    return read_checkpoint(str(path), cfg, model)


def test_compact_checkpoint_holds_every_clients_state(tmp_path, compact_checkpoint):
    cfg, model, data, state = compact_checkpoint
    loaded, compact = _read_bytes(tmp_path, cfg, model, _ckpt_reseal(data))
    assert _ckpt_reseal(data) == data and data[4] == 3
    assert loaded.history == state.history and _bits(loaded.weights) == _bits(state.weights)
    assert list(compact.held) == [0, 3, 1, 2] and list(compact.residual) == [0, 1, 2]
    init = initial_state(cfg, model).weights
    assert _bits(compact.held[3]) == _bits(init)  # round 0 sent client 3 the init frame alone
    for c, m in loaded.client_masks.items():
        assert all(not compact.held[c][k][~mk].any() for k, mk in m.items())
    assert _load_bytes(tmp_path, cfg, model, data).round == 4  # load_checkpoint: the server's state alone


def test_inconsistent_compact_checkpoints_are_refused_naming_the_problem(tmp_path, compact_checkpoint):
    from feddip_kernels.codecs import decode_model, encode_model

    cfg, model, data, _ = compact_checkpoint
    meta = _ckpt_split(data)[1]
    saved = meta["compact"]
    decoded = decode_model(_ckpt_split(data)[2])
    name = "classifier.1.weight"  # prunable: under client 2's older mask

    def message(edit):
        tensors = dict(decoded.tensors)
        edit(tensors)
        masks = {k: m for k, m in decoded.masks.items() if k[0] in "wk" and k in tensors}
        return encode_model(tensors, masks=masks, values="auto")

    def outside_mask(t):
        t[f"h2/{name}"] = t[f"h2/{name}"].copy()
        t[f"h2/{name}"][~decoded.masks[f"k0/{name}"]] = 1.0

    def not_initial(t):
        t[f"h3/{name}"] = np.nextafter(t[f"h3/{name}"], np.float32(1))

    def wrong_shape(t):
        t[f"h0/{name}"] = t[f"h0/{name}"].reshape(-1)

    def wrong_dtype(t):
        t[f"r1/{name}"] = t[f"r1/{name}"].astype(np.float64)

    def residual_missing(t):
        for k in [k for k in t if k.startswith("r0/")]:
            del t[k]

    def residual_unlisted(t):
        t.update({f"r3/{k[3:]}": v for k, v in t.items() if k.startswith("r0/")})

    def compact(**kw):
        return _ckpt_reseal(data, meta={**meta, "compact": {**saved, **kw}})

    cases = {
        "compact null": (_ckpt_reseal(data, meta={**meta, "compact": None}), "compact is not an object"),
        "compact left out": (_ckpt_reseal(data, meta={k: v for k, v in meta.items() if k != "compact"}),
                             "exactly the fields"),
        "held in another order": (compact(held=[3, 0, 1, 2]), "compact.held is not the list"),
        "a client left out of held": (compact(held=[0, 3, 1]), "compact.held is not the list"),
        "a client not in the run": (compact(held=[0, 3, 1, 2, 7]), "compact.held is not the list"),
        "held as floats": (compact(held=[0.0, 3.0, 1.0, 2.0]), "compact.held is not the list"),
        "init_crc of another model": (compact(init_crc=saved["init_crc"] ^ 1), "initial model"),
        "residual of a client not contacted": (compact(residual=[0, 1, 2, 7]), "did not contact"),
        "residual listed twice": (compact(residual=[0, 1, 1, 2]), "twice"),
        "residual in another order": (compact(residual=[1, 0, 2]), "another order"),
        "residual ids as strings": (compact(residual=["0", "1", "2"]), "list of client ids"),
        "residual of a client that has none": (compact(residual=[0, 3, 1, 2]), "do not fit"),
        "held values outside the mask": (_ckpt_reseal(data, message=message(outside_mask)), "outside the mask"),
        "round 0's client not on the initial model": (_ckpt_reseal(data, message=message(not_initial)),
                                                      "holds another model than the initial one"),
        "a held tensor of the wrong shape": (_ckpt_reseal(data, message=message(wrong_shape)), "do not fit"),
        "a residual of the wrong dtype": (_ckpt_reseal(data, message=message(wrong_dtype)), "do not fit"),
        "a residual missing": (_ckpt_reseal(data, message=message(residual_missing)), "do not fit"),
        "a residual not listed": (_ckpt_reseal(data, message=message(residual_unlisted)), "do not fit"),
    }
    for label, (file, why) in cases.items():
        with pytest.raises(CodecError, match=why):
            _read_bytes(tmp_path, cfg, model, file)
        assert _refusals(tmp_path, cfg, model, [(label, file)]) == []
    # A run without residual feedback keeps no residuals.
    off = SimulationConfig(**{**cfg.__dict__, "residual_feedback": False})
    file = _ckpt_reseal(data, meta={**meta, "config": {**meta["config"], "residual_feedback": False}})
    with pytest.raises(CodecError, match="no residual feedback"):
        _read_bytes(tmp_path, off, model, file)
    # The compact state comes with the run's initial model, not just its architecture.
    with pytest.raises(CodecError, match="initial model"):
        _read_bytes(tmp_path, cfg, make_model(cfg.model, 1, 10), data)


def test_checkpoints_of_format_2_still_load(tmp_path, real_checkpoint, compact_checkpoint):
    # Format 2 is format 3 without "compact": runs without the compact coding still write it (so
    # that earlier releases read their files); no compact run wrote one, and none is read.
    cfg, model, data, state = real_checkpoint
    meta = _ckpt_split(data)[1]
    assert data[4] == 2 and "compact" not in meta
    loaded = _load_bytes(tmp_path, cfg, model, data)
    assert loaded.round == 4 and loaded.history == state.history and _bits(loaded.weights) == _bits(state.weights)
    assert set(loaded.client_masks) == set(state.client_masks)
    with pytest.raises(CodecError, match="exactly the fields"):
        _load_bytes(tmp_path, cfg, model, _ckpt_reseal(data, meta={**meta, "compact": None}))  # not format 2
    three = data[:4] + b"\x03" + data[5:]
    loaded = _load_bytes(tmp_path, cfg, model, _ckpt_reseal(three, meta={**meta, "compact": None}))
    assert _bits(loaded.weights) == _bits(state.weights)  # format 3 with "compact": null reads too
    cfg, model, data, _ = compact_checkpoint
    meta = _ckpt_split(data)[1]
    two = data[:4] + b"\x02" + data[5:]
    with pytest.raises(CodecError, match="format 2 holds no compact coding state"):
        _load_bytes(tmp_path, cfg, model, _ckpt_reseal(two, meta={k: v for k, v in meta.items() if k != "compact"}))


def test_evaluation_does_not_depend_on_the_batch():
    """evaluate's batch (256, for the CPU's caches) changes no logit: the same accuracy as one batch
    of everything, the loss to float32's summation."""
    from feddip_kernels.fl.simulation import evaluate

    train, test = synthetic_dataset(n_train=10, n_test=700, seed=3)
    torch.manual_seed(0)
    model = make_model("lenet5", test.x.shape[1], test.num_classes)
    acc, loss = evaluate(model, test)
    acc_1, loss_1 = evaluate(model, test, batch=len(test))
    assert acc == acc_1 and loss == pytest.approx(loss_1, rel=1e-5)
