"""The test deployment's ServerApp: waits for `nodes` SuperNodes, runs FedDIP for
`num-server-rounds` with a per-round `timeout`, and writes a JSON report (bytes, per-round node
outcomes) and the final model (a feddip_kernels message) next to it."""

import json
import time

import numpy as np
from flwr.app import Array, ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp

from feddip_kernels import encode_model
from feddip_kernels.integrations.flower import FedDIP

app = ServerApp()


def initial_model() -> dict:
    rng = np.random.default_rng(0)
    return {
        "conv.weight": rng.standard_normal((32, 16, 3, 3)).astype(np.float32),
        "fc.weight": rng.standard_normal((10, 2000)).astype(np.float32),
        "fc.bias": np.zeros(10, np.float32),
    }


@app.main()
def main(grid: Grid, context: Context) -> None:
    rounds = int(context.run_config["num-server-rounds"])
    nodes = int(context.run_config["nodes"])
    deadline = time.monotonic() + 60
    while len(list(grid.get_node_ids())) < nodes and time.monotonic() < deadline:
        time.sleep(0.2)
    model = initial_model()
    arrays = ArrayRecord(array_dict={k: Array(v) for k, v in model.items()})
    strategy = FedDIP(num_rounds=rounds, s0=0.5, sp=0.9, mask_every=1, fraction_evaluate=0.0, min_available_nodes=1,
                      min_train_nodes=1)
    result = strategy.start(grid=grid, initial_arrays=arrays, num_rounds=rounds,
                            timeout=float(context.run_config["timeout"]))
    final = {k: a.numpy() for k, a in result.arrays.items()}
    report = str(context.run_config["report"])
    with open(report + ".model", "wb") as f:
        f.write(encode_model(final))
    partitions = {}  # node id -> partition, from the node ids the strategy saw
    summary = {"bytes_down": strategy.bytes_down, "bytes_up": strategy.bytes_up,
               "dense_bytes": arrays.count_bytes(), "sparsity": float(np.mean(final["fc.weight"] == 0)),
               "rounds": strategy.rounds, "rejected": strategy.rejected, "partitions": partitions}
    with open(report, "w") as f:
        json.dump(summary, f)
