"""The compression deployment's ServerApp: waits for `nodes` SuperNodes, runs flwr's stock FedAvg
wrapped in Compressed (settings from the run config's compress-* keys) for `num-server-rounds`
with a per-round `timeout`, and writes a JSON report (settings, per-round node outcomes, reasons
and metrics) and the final model (report + ".npz")."""

import json
import os
import time

import numpy as np
from flwr.app import Array, ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from feddip_kernels.integrations.flower_compress import Compressed

app = ServerApp()


def initial_model() -> dict:
    rng = np.random.default_rng(0)
    return {
        "fc1.weight": rng.standard_normal((64, 100)).astype(np.float32),
        "fc1.bias": np.zeros(64, np.float32),
        "fc2.weight": rng.standard_normal((10, 64)).astype(np.float32),
        "scale": rng.standard_normal(5),  # float64
    }


def fedavg() -> FedAvg:
    return FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_available_nodes=1, min_train_nodes=1)


@app.main()
def main(grid: Grid, context: Context) -> None:
    rounds = int(context.run_config["num-server-rounds"])
    nodes = int(context.run_config["nodes"])
    deadline = time.monotonic() + 60
    while len(list(grid.get_node_ids())) < nodes and time.monotonic() < deadline:
        time.sleep(0.2)
    strategy = Compressed.from_run_config(fedavg(), context.run_config)
    arrays = ArrayRecord(array_dict={k: Array(v) for k, v in initial_model().items()})
    result = strategy.start(grid=grid, initial_arrays=arrays, num_rounds=rounds,
                            timeout=float(context.run_config["timeout"]))
    report = str(context.run_config["report"])
    np.savez(report + ".npz", **{k: a.numpy() for k, a in result.arrays.items()})
    summary = {
        "settings": {"density": strategy.density, "values": strategy.values,
                     "error_feedback": strategy.error_feedback, "downlink_values": strategy.downlink_values},
        "rounds": strategy.rounds,
        "reasons": [{str(n): why for n, why in r.items()} for r in strategy.reasons],
        "metrics": {str(t): dict(m) for t, m in result.train_metrics_clientapp.items()},
        "bytes_down": strategy.bytes_down, "bytes_up": strategy.bytes_up, "rejected": strategy.rejected,
        "dense_bytes": arrays.count_bytes(),
    }
    with open(report + ".part", "w") as f:
        json.dump(summary, f)
    os.replace(report + ".part", report)  # whole or absent: the test waits for it
