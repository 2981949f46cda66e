import json

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from feddip_kernels.flower import FedDIP

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    rounds = int(context.run_config["num-server-rounds"])
    rng = np.random.default_rng(0)
    arrays = ArrayRecord(array_dict={
        "conv.weight": Array(rng.standard_normal((32, 16, 3, 3)).astype(np.float32)),
        "fc.weight": Array(rng.standard_normal((10, 2000)).astype(np.float32)),
        "fc.bias": Array(np.zeros(10, np.float32)),
    })
    strategy = FedDIP(num_rounds=rounds, s0=0.5, sp=0.9, mask_every=1, fraction_evaluate=0.0)
    result = strategy.start(grid=grid, initial_arrays=arrays, num_rounds=rounds)
    final = {k: a.numpy() for k, a in result.arrays.items()}
    report = {"bytes_down": strategy.bytes_down, "bytes_up": strategy.bytes_up, "dense_bytes": arrays.count_bytes(),
              "sparsity": float(np.mean(final["fc.weight"] == 0))}
    with open(str(context.run_config["report"]), "w") as f:
        json.dump(report, f)
