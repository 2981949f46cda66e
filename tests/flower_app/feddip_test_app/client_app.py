"""The test deployment's ClientApp. Each node adds seeded noise to the model it receives; the
node config's `fault` makes it misbehave: 1 replies corrupt bytes, 2 replies a valid message for
another model, 3 stalls past the round's timeout, 4 announces round 2 (a marker file next to the
report) and hangs, so that the test can SIGKILL its SuperNode mid-round."""

import os
import time

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from feddip_kernels import encode_model
from feddip_kernels.integrations.flower import ROUND_KEY, feddip_mod

app = ClientApp(mods=[feddip_mod])


def update(arrays: dict, partition: int, t: int) -> dict:
    """What a well-behaved node sends back (tests/test_flower_deployment.py recomputes it)."""
    rng = np.random.default_rng([partition, t])
    return {k: a + np.float32(0.01) * rng.standard_normal(a.shape).astype(a.dtype) for k, a in arrays.items()}


@app.train()
def train(msg: Message, context: Context) -> Message:
    partition = int(context.node_config.get("partition-id", 0))
    fault = int(context.node_config.get("fault", 0))
    t = int(msg.content["config"][ROUND_KEY])
    arrays = {k: a.numpy() for k, a in msg.content["arrays"].items()}
    record = ArrayRecord(array_dict={k: Array(v) for k, v in update(arrays, partition, t).items()})
    if fault == 1:  # bytes that are not a message: already "encoded", so the mod passes them on
        record = ArrayRecord(
            array_dict={"feddip": Array(dtype="uint8", shape=(12,), stype="feddip/v1", data=b"FDKW" + bytes(8))}
        )
    elif fault == 2:  # a valid message, for a model with other shapes
        other = encode_model({k: np.zeros(v.size + 1, v.dtype) for k, v in arrays.items()})
        record = ArrayRecord(
            array_dict={"feddip": Array(dtype="uint8", shape=(len(other),), stype="feddip/v1", data=other)}
        )
    elif fault == 3:
        time.sleep(float(context.run_config["stall"]))
    elif fault == 4 and t == 1:
        marker = str(context.run_config["report"]) + f".round2-{partition}"
        with open(marker, "w") as f:
            f.write(str(os.getpid()))
        time.sleep(float(context.run_config["stall"]))
    content = RecordDict({"arrays": record, "metrics": MetricRecord({"num-examples": 10})})
    return Message(content=content, reply_to=msg)
