import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from feddip_kernels.flower import feddip_mod

app = ClientApp(mods=[feddip_mod])


@app.train()
def train(msg: Message, context: Context) -> Message:
    arrays = msg.content["arrays"]
    rng = np.random.default_rng(context.node_id % 1000)
    out = {k: a.numpy() + 0.01 * rng.standard_normal(a.shape).astype(a.numpy().dtype) for k, a in arrays.items()}
    content = RecordDict({"arrays": ArrayRecord(array_dict={k: Array(v) for k, v in out.items()}),
                          "metrics": MetricRecord({"num-examples": 10})})
    return Message(content=content, reply_to=msg)
