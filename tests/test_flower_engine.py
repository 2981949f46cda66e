"""--engine flower (fl.flower_engine): the experiment run through Flower's Simulation Runtime (Ray
actors, the FedDIP strategy and mod) gives the built-in loop's global models bit for bit and its
history rows, round by round, for every algorithm and both codings, sampled or all clients."""

import dataclasses
import json

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("flwr")
pytest.importorskip("ray", reason="Flower's simulation runtime needs ray: pip install 'flwr[simulation]'")

import torch  # noqa: E402

from feddip_kernels.fl.cli import main  # noqa: E402


@pytest.fixture(autouse=True)
def task_identity():
    # flwr's run_simulation sets the process's task identity; leave it as it was for other tests.
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


@pytest.fixture
def one_thread():
    # torch's reductions depend on its thread count: both engines train on one thread.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _recorded(monkeypatch, run):
    """(the global model after each round, as the server aggregates it, and run()'s state)."""
    from feddip_kernels.protocol import FedDIPServer

    weights = []
    aggregate = FedDIPServer.aggregate

    def recording(self, uploads):
        out = aggregate(self, uploads)
        weights.append({k: v.copy() for k, v in self.weights.items()})
        return out

    with monkeypatch.context() as m:
        m.setattr(FedDIPServer, "aggregate", recording)
        state = run()
    return weights, state


def _same_bits(a, b):
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and a[k].tobytes() == b[k].tobytes() for k in a)


def _without_times(row):
    return {k: v for k, v in row.items() if not k.startswith("time_")}


_BASE = dict(clients=4, rounds=3, horizon=3, local_epochs=1, batch_size=32, lr=0.05, s0=0.5, sp=0.9, mask_every=1,
             weighting="samples", seed=5)


@pytest.mark.parametrize("settings", [
    # 2 of 4 clients a round (clients 0 and 3 first), lossless values
    dict(algorithm="feddip", clients_per_round=2, values="raw"),
    # the compact coding, every client every round, its stochastic rounding seeded by the client's
    # index: on the strategy's side too, which sees client indices, not the runtime's node ids
    dict(algorithm="feddip-noef", clients_per_round=None, values="int4-ans", coding="compact", rounding="stochastic",
         weighting="equal"),
    # dense: the server does not prune, the clients train without a mask
    dict(algorithm="fedavg", clients_per_round=3, values="int8"),
], ids=["feddip-plain-sampled", "noef-compact-stochastic-all", "fedavg-int8-sampled"])
def test_flower_engine_gives_the_builtin_loops_global_models(monkeypatch, one_thread, settings):
    import ray

    from feddip_kernels.fl import iid_partition, synthetic_dataset
    from feddip_kernels.fl.flower_engine import run_flower
    from feddip_kernels.fl.simulation import SimulationConfig, run_simulation

    cfg = SimulationConfig(**dict(_BASE, **settings))
    train, test = synthetic_dataset(300, 60, seed=0)
    parts = iid_partition(len(train), cfg.clients, seed=0)
    expected, builtin = _recorded(monkeypatch, lambda: run_simulation(cfg, train, test, parts))
    rows = []
    got, flower = _recorded(monkeypatch, lambda: run_flower(cfg, train, test, parts, threads=1, actors=2,
                                                             on_round=rows.append))
    assert not ray.is_initialized()  # the run shut down the Ray it started
    assert len(got) == len(expected) == cfg.rounds
    for t, (a, b) in enumerate(zip(expected, got)):
        assert _same_bits(a, b), f"round {t}"
    assert _same_bits(builtin.weights, flower.weights) and _same_bits(builtin.masks, flower.masks)
    assert flower.round == cfg.rounds and rows == flower.history
    # Same rows but for the time split: accuracy, loss, sparsity, the bytes each way, the clients.
    assert [_without_times(r) for r in flower.history] == [_without_times(r) for r in builtin.history]
    assert list(flower.history[0]) == list(builtin.history[0])  # the same fields, in the same order
    assert [r["clients"] for r in flower.history] == [len(cfg.clients_in_round(t)) for t in range(cfg.rounds)]
    assert all(r["clients_failed"] == 0 for r in flower.history)
    assert flower.client_masks.keys() == builtin.client_masks.keys()
    assert all(_same_bits(flower.client_masks[c], builtin.client_masks[c]) for c in builtin.client_masks)
    if cfg.algorithm == "fedavg":
        assert not flower.masks and flower.history[-1]["sparsity_target"] is None


def test_flower_engine_refuses_what_it_cannot_run():
    from feddip_kernels.fl import iid_partition, synthetic_dataset
    from feddip_kernels.fl.flower_engine import run_flower
    from feddip_kernels.fl.simulation import SimulationConfig

    cfg = SimulationConfig(**dict(_BASE, algorithm="feddip", clients_per_round=None))
    train, test = synthetic_dataset(40, 10, seed=0)
    parts = iid_partition(len(train), cfg.clients, seed=0)
    with pytest.raises(ValueError, match="partition has 3 shards for 4 clients"):
        run_flower(cfg, train, test, parts[:3])
    with pytest.raises(ValueError, match=r"clients \[1\] hold no training examples"):
        run_flower(cfg, train, test, [parts[0], np.array([], np.int64), *parts[2:]])
    with pytest.raises(ValueError, match="threads and actors must be >= 1"):
        run_flower(cfg, train, test, parts, threads=1, actors=0)


_TINY = ["simulate", "--algorithm", "feddp", "--rounds", "2", "--clients", "3", "--synthetic-train", "240",
         "--synthetic-test", "60", "--threads", "1", "--quiet"]


def test_cli_engine_flower_writes_the_builtin_runs_results(tmp_path, capsys):
    # `feddip simulate --engine flower`: the quick preset's compact coding, every client each
    # round; the same rows as the built-in loop's for the same --threads, and the engine recorded.
    assert main(_TINY + ["--out", str(tmp_path / "builtin")]) == 0
    assert main(_TINY + ["--engine", "flower", "--out", str(tmp_path / "flower")]) == 0
    out = capsys.readouterr().out
    assert "engine flower" in out and "feddp: final accuracy" in out
    builtin = json.loads((tmp_path / "builtin" / "results.json").read_text())
    flower = json.loads((tmp_path / "flower" / "results.json").read_text())
    assert (builtin["engine"], flower["engine"]) == ("builtin", "flower")
    assert flower["fields"].keys() == builtin["fields"].keys()
    assert flower["fields"]["time_train"] != builtin["fields"]["time_train"]  # says what it measures here
    assert flower["runs"]["feddp"]["config"] == builtin["runs"]["feddp"]["config"]
    assert [_without_times(r) for r in flower["runs"]["feddp"]["history"]] == [
        _without_times(r) for r in builtin["runs"]["feddp"]["history"]]
    assert (tmp_path / "flower" / "results.png").exists()


@pytest.mark.parametrize("args, why", [
    (["--checkpoint"], "--checkpoint and --resume work with --engine builtin only"),
    (["--resume"], "--checkpoint and --resume work with --engine builtin only"),
    (["--engine", "ray"], None),  # argparse's own error (exit status 2)
])
def test_cli_engine_mistakes_are_caught_before_any_work(tmp_path, capsys, monkeypatch, args, why):
    from feddip_kernels.fl import flower_engine, simulation

    def never(*a, **k):
        raise AssertionError("a run started before every argument was checked")

    monkeypatch.setattr(simulation, "run_simulation", never)
    monkeypatch.setattr(flower_engine, "run_flower", never)
    out = tmp_path / "out"
    engine = [] if "--engine" in args else ["--engine", "flower"]
    if why is None:
        with pytest.raises(SystemExit) as exit_:
            main(_TINY + ["--out", str(out)] + engine + args)
        assert exit_.value.code == 2 and "invalid choice: 'ray'" in capsys.readouterr().err
    else:
        assert main(_TINY + ["--out", str(out)] + engine + args) == 2
        err = capsys.readouterr().err
        assert err.startswith("feddip simulate: error: ") and why in err, err
    assert not out.exists()


def test_cli_engine_flower_without_ray_says_what_to_install(tmp_path, capsys, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else find_spec(name, *a))
    assert main(_TINY + ["--engine", "flower", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "--engine flower needs Flower's simulation runtime: pip install 'flwr[simulation]'" in err
    assert not (tmp_path / "out").exists()


def test_flower_engine_config_is_the_simulations():
    # The strategy is configured from the SimulationConfig: its schedule, codec and coding.
    from feddip_kernels.fl.flower_engine import _Strategy
    from feddip_kernels.fl.simulation import SimulationConfig

    cfg = SimulationConfig(**dict(_BASE, algorithm="feddip", clients_per_round=2, values="int4-ans", coding="compact",
                                  rounding="stochastic", residual_feedback=False, lr_decay=0.99, lambda_max=2e-3))
    strategy = _Strategy(cfg, ["conv1.weight"])
    assert strategy.schedule == cfg.schedule
    assert (strategy.values, strategy.coding, strategy.rounding, strategy.residual_feedback, strategy.seed,
            strategy.weighting) == ("int4-ans", "compact", "stochastic", False, 5, "samples")
    assert strategy.compact and strategy.prune
    assert not _Strategy(dataclasses.replace(cfg, algorithm="fedavg"), []).prune
