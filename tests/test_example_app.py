"""The Flower example app (examples/flower-mnist): its pyproject.toml names components that exist and
a run config the apps read, and its ServerApp and ClientApp run two rounds in process on a slice of
MNIST, uncompressed, compressed (Compressed(FedAvg) with sparse_update_mod) and FedDIP, writing the
results JSON the README's figures come from."""

import json
import math
import os
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("flwr")

from flwr.app import Context, Error, Message, RecordDict  # noqa: E402
from flwr.cli.config_utils import load_and_validate  # noqa: E402
from flwr.common.config import get_fused_config_from_dir  # noqa: E402

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "flower-mnist"
MNIST = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "mnist")
needs_mnist = pytest.mark.skipif(not os.path.isdir(MNIST), reason="MNIST not found at ../shared/data/mnist")
NODES = 4
MODES = {
    "uncompressed": {"compress": False},
    "compressed": {"compress": True},
    "feddip": {"strategy": "feddip"},
}


@pytest.fixture(scope="module")
def example():
    """The example's package importable (as flwr imports it from the app's directory)."""
    sys.path.insert(0, str(EXAMPLE))
    try:
        yield
    finally:
        sys.path.remove(str(EXAMPLE))
        for name in [m for m in sys.modules if m == "flower_mnist" or m.startswith("flower_mnist.")]:
            del sys.modules[name]


def test_pyproject_names_components_that_exist(example):
    from flwr.clientapp import ClientApp
    from flwr.serverapp import ServerApp

    from feddip_kernels.integrations.flower_compress import RUN_CONFIG_KEYS, Compressed

    config, _ = load_and_validate(EXAMPLE / "pyproject.toml", check_module=True)  # imports the components
    app = config["tool"]["flwr"]["app"]
    assert set(app["components"]) == {"serverapp", "clientapp"}
    import importlib

    objects = {}
    for kind, ref in app["components"].items():
        module, attr = ref.split(":")
        objects[kind] = getattr(importlib.import_module(module), attr)
    assert isinstance(objects["serverapp"], ServerApp) and isinstance(objects["clientapp"], ClientApp)
    run_config = get_fused_config_from_dir(EXAMPLE, {})
    assert {k for k in run_config if k.startswith("compress-")} == set(RUN_CONFIG_KEYS)
    assert run_config["strategy"] in ("fedavg", "feddip") and isinstance(run_config["compress"], bool)
    from flower_mnist.server_app import make_strategy

    # Every run config key the apps read is declared (flwr run --run-config can only override those).
    wrapper = make_strategy(dict(run_config))
    assert isinstance(wrapper, Compressed) and wrapper.density == run_config["compress-density"]
    assert type(make_strategy({**run_config, "strategy": "feddip"})).__name__ == "FedDIP"
    with pytest.raises(ValueError, match="strategy must be"):
        make_strategy({**run_config, "strategy": "fedsgd"})


def test_a_missing_data_path_says_how_to_give_one(example):
    from flower_mnist import task

    with pytest.raises(FileNotFoundError, match="data-path"):
        task.load_test_data("")


class _Grid:
    """The part of flwr's Grid the strategies use, in process: every message goes through the
    ClientApp of its node (an exception becomes an error reply, as in a deployment)."""

    run = None

    def __init__(self, app, run_config, nodes):
        self.app = app
        self.contexts = {
            n + 1: Context(run_id=1, node_id=n + 1, node_config={"partition-id": n, "num-partitions": nodes},
                           state=RecordDict(), run_config=run_config)
            for n in range(nodes)
        }

    def get_node_ids(self):
        return list(self.contexts)

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for m in messages:
            try:
                replies.append(self.app(m, self.contexts[m.metadata.dst_node_id]))
            except Exception as e:  # as flwr's runtime
                replies.append(Message(Error(code=1, reason=f"{type(e).__name__}: {e}"), reply_to=m))
        return replies


@pytest.fixture(scope="module")
def runs(example, tmp_path_factory):
    """Each mode's results JSON after two rounds on 4 nodes and 2,000 training examples."""
    import torch
    from flower_mnist.client_app import app as client_app
    from flower_mnist.server_app import app as server_app
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id, torch.get_num_threads())
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0  # Message() reads them
    torch.set_num_threads(1)  # small batches: more threads only wait for each other on a busy machine
    out = tmp_path_factory.mktemp("flower-mnist")
    results = {}
    try:
        for mode, overrides in MODES.items():
            path = out / f"{mode}.json"
            run_config = dict(get_fused_config_from_dir(EXAMPLE, {
                "data-path": os.path.abspath(MNIST), "results-path": str(path), "num-server-rounds": 2,
                "train-examples": 2000, "test-examples": 500, **overrides}))
            context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config)
            server_app(_Grid(client_app, run_config, NODES), context)
            results[mode] = json.loads(path.read_text())
    finally:
        TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved[:3]
        torch.set_num_threads(saved[3])
    return results


def _check_rounds(summary):
    rows = summary["rounds"]
    assert [r["round"] for r in rows] == [0, 1, 2]
    for r in rows:
        assert 0 <= r["accuracy"] <= 1 and math.isfinite(r["loss"])
    for r in rows[1:]:
        assert r["messages"] == r["replies"] == NODES
        assert r["bytes_down"] > 0 and r["bytes_up"] > 0
    assert summary["bytes_down"] == sum(r["bytes_down"] for r in rows[1:])
    assert summary["bytes_up"] == sum(r["bytes_up"] for r in rows[1:])
    return rows


@needs_mnist
def test_uncompressed_run_counts_the_models_flower_sends(runs):
    summary = runs["uncompressed"]
    rows = _check_rounds(summary)
    assert summary["strategy"] == "FedAvg" and summary["parameters"] == 61_706
    assert summary["model_bytes"] >= 4 * 61_706  # float32 arrays (and Flower's .npy headers)
    for r in rows[1:]:  # every node gets the model and sends one back
        assert r["bytes_down"] == r["bytes_up"] == NODES * summary["model_bytes"]
    assert rows[2]["accuracy"] > 0.2  # learning: chance is 0.1


@needs_mnist
def test_compressed_run_sends_far_fewer_bytes(runs):
    plain, summary = runs["uncompressed"], runs["compressed"]
    rows = _check_rounds(summary)
    assert summary["strategy"].startswith("Compressed(FedAvg, density=0.05")
    for r in rows[1:]:
        # The Grid's count is the wrapper's own (the coded models' bytes each way).
        metrics = r["train_metrics"]
        assert (metrics["compress-bytes-down"], metrics["compress-bytes-up"]) == (r["bytes_down"], r["bytes_up"])
        assert metrics["compress-aggregated"] == NODES and metrics["compress-rejected"] == 0
        assert r["bytes_up"] * 20 < NODES * plain["model_bytes"]  # top-5% int4 updates
    assert (summary["bytes_down"] + summary["bytes_up"]) * 8 < plain["bytes_down"] + plain["bytes_up"]
    assert rows[2]["accuracy"] > 0.2


@needs_mnist
def test_feddip_run_prunes_and_codes_compactly(runs):
    plain, summary = runs["uncompressed"], runs["feddip"]
    rows = _check_rounds(summary)
    assert summary["strategy"] == "FedDIP"
    assert [r["train_metrics"]["feddip-aggregated"] for r in rows[1:]] == [NODES, NODES]
    assert rows[1]["sparsity"] == pytest.approx(0.5, abs=0.01)  # s0, pruned at t = 0
    assert rows[1]["bytes_down"] < 100 * NODES  # round 1: init frames, the nodes build the model from a seed
    assert summary["bytes_up"] * 4 < plain["bytes_up"]
