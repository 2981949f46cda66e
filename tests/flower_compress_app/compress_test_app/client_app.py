"""The compression deployment's ClientApp: flwr's plain Message API with `sparse_update_mod`, and
a deterministic "training" (tests/test_flower_deployment.py recomputes it). The node config's
`fault` makes a node misbehave: "corrupt" flips a bit in every reply after sparse_update_mod coded
it (`corrupt_mod`, outside it in the mods), "hang" announces round 2 (a marker file next to the
report) and sleeps, so that the test can SIGKILL its SuperNode mid-round."""

import os
import time

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from feddip_kernels.integrations.flower_compress import is_compressed, sparse_update_mod


def corrupt_mod(msg: Message, ctxt: Context, call_next) -> Message:
    """On a node whose config says fault="corrupt": the training reply's coded bytes, one bit flipped."""
    reply = call_next(msg, ctxt)
    if (ctxt.node_config.get("fault") != "corrupt" or msg.metadata.message_type.split(".")[0] != MessageType.TRAIN
            or reply.has_error() or not reply.has_content()):
        return reply
    for key, record in list(reply.content.array_records.items()):
        if is_compressed(record):
            arrays = dict(record.items())
            coded = arrays["feddip"]
            data = bytearray(coded.data)
            data[len(data) // 2] ^= 0x10
            arrays["feddip"] = Array(dtype=coded.dtype, shape=tuple(coded.shape), stype=coded.stype, data=bytes(data))
            reply.content[key] = ArrayRecord(array_dict=arrays)
    return reply


# corrupt_mod first: the outermost mod, it sees the reply sparse_update_mod has coded.
app = ClientApp(mods=[corrupt_mod, sparse_update_mod])


def trained(arrays: dict, partition: int, t: int) -> dict:
    """What node `partition` returns in round `t` from the model it got (float32 arithmetic, seeded)."""
    rng = np.random.default_rng([partition, t])
    return {k: a + np.float32(0.05) * rng.standard_normal(a.shape).astype(a.dtype) for k, a in arrays.items()}


def examples(partition: int) -> int:
    return 10 * (partition + 1)


@app.train()
def train(msg: Message, context: Context) -> Message:
    partition = int(context.node_config.get("partition-id", 0))
    t = int(msg.content["config"]["server-round"])
    report = str(context.run_config.get("report", ""))
    if report:  # which node is which partition, for the test
        with open(report + f".node{partition}", "w") as f:
            f.write(str(context.node_id))
    if context.node_config.get("fault") == "hang" and t == 2:
        with open(report + f".hang{partition}", "w") as f:
            f.write(str(os.getpid()))
        time.sleep(float(context.run_config["stall"]))
    arrays = {k: a.numpy() for k, a in msg.content["arrays"].items()}
    record = ArrayRecord(array_dict={k: Array(v) for k, v in trained(arrays, partition, t).items()})
    metrics = MetricRecord({"num-examples": examples(partition)})
    return Message(content=RecordDict({"arrays": record, "metrics": metrics}), reply_to=msg)
