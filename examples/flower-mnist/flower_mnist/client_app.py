"""flower-mnist: the ClientApp. Each node trains LeNet-5 on its IID shard of MNIST.

Its one mod is feddip_kernels' for the run's strategy: `sparse_update_mod` with FedAvg (it decodes
the model a `Compressed` strategy sends and codes the training reply; messages of an uncompressed
FedAvg pass through it unchanged), the FedDIP mod with FedDIP (it decodes the model, hands the
ClientApp the mask to train under as the ArrayRecord "feddip-masks", and codes the reply)."""

from __future__ import annotations

from typing import Callable

from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from feddip_kernels.integrations.flower import LAMBDA_KEY, LR_KEY, MASKS_RECORD, make_feddip_mod
from feddip_kernels.integrations.flower_compress import sparse_update_mod
from feddip_kernels.protocol import seed_for
from flower_mnist import task

# FedDIP's compact coding opens with an init frame naming a seed: the node builds the initial model
# from it (as the server did, task.initial_weights) instead of receiving it.
feddip_mod = make_feddip_mod(task.initial_weights)


def compression_mod(msg: Message, context: Context, call_next: Callable[[Message, Context], Message]) -> Message:
    """The mod of the run's strategy (run config "strategy"): FedDIP's, or Compressed's."""
    if context.run_config["strategy"] == "feddip":
        return feddip_mod(msg, context, call_next)
    return sparse_update_mod(msg, context, call_next)


app = ClientApp(mods=[compression_mod])


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received model on this node's shard; reply with the trained model."""
    run_config = context.run_config
    partition_id = int(context.node_config["partition-id"])
    num_partitions = int(context.node_config["num-partitions"])
    seed = int(run_config["seed"])
    data = task.load_data(str(run_config["data-path"]), partition_id, num_partitions, seed=seed,
                          limit=int(run_config["train-examples"]))

    model = task.load_model()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    config = msg.content["config"]
    server_round = int(config["server-round"])
    if MASKS_RECORD in msg.content:  # FedDIP: the mask to train under, lr_t and lambda_t of round t
        masks = {k: a.numpy().astype(bool) for k, a in msg.content[MASKS_RECORD].items()}
        lr, lam = float(config[LR_KEY]), float(config[LAMBDA_KEY])
    else:
        masks, lr, lam = None, float(config["lr"]), 0.0
    weights, train_loss = task.train(
        model, data, epochs=int(run_config["local-epochs"]), batch_size=int(run_config["batch-size"]), lr=lr,
        weight_decay=float(run_config["weight-decay"]), seed=seed_for(seed, 2, server_round, partition_id),
        masks=masks, lam=lam)

    content = RecordDict({
        "arrays": ArrayRecord({k: Array(v) for k, v in weights.items()}),
        "metrics": MetricRecord({"train_loss": train_loss, "num-examples": len(data)}),
    })
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Score the received model on this node's shard of the test set."""
    run_config = context.run_config
    data = task.load_data(str(run_config["data-path"]), int(context.node_config["partition-id"]),
                          int(context.node_config["num-partitions"]), seed=int(run_config["seed"]),
                          limit=int(run_config["test-examples"]), split="test")
    model = task.load_model()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    accuracy, loss = task.test(model, data)
    metrics = MetricRecord({"eval_loss": loss, "eval_acc": accuracy, "num-examples": len(data)})
    return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)
