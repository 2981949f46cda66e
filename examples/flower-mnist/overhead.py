"""The per-round cost of this app's compression: feddip_kernels' `Compressed` wrapper on the
server and `sparse_update_mod` on each node, against the same steps uncompressed.

Each node's update is real: LeNet-5 trained one epoch on its IID shard of MNIST from the initial
model (trained once, then replayed every round: the ClientApp's training is left out, being the same
with and without compression). A round is then run in process, with the app's Compressed settings
(pyproject.toml's run config, or --run-config): the strategy's configure_train, each node's
message through the mod (the ClientApp inside it adds the node's update to the model it received),
the strategy's aggregate_train; and the same round with flwr's FedAvg and no mod. The two alternate,
`--repeats` times over `--rounds` rounds each, and the medians are reported:

- wrapper: configure_train + aggregate_train, Compressed(FedAvg) minus FedAvg (ms per round, all nodes;
  configure_train codes the model for each node, aggregate_train decodes the replies);
- mod: sparse_update_mod's own time per node (decoding the model before the ClientApp, coding the
  reply after it; the ClientApp's time inside it is excluded; ms per node per round).

Round 1 (first contact: each node gets the whole model) is reported apart from the later rounds
(the model goes down as the difference from the copy the node holds).

    python overhead.py --data-path /path/to/mnist [--results results.json] [--out overhead.json]

--results: a results JSON of the app (its median round time gives the shares)."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from flower_mnist import task
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.common.config import get_fused_config_from_dir, parse_config_args
from flwr.serverapp.strategy import FedAvg, Strategy
from flwr.supercore.task_identity import TaskIdentity

from feddip_kernels.integrations.flower_compress import Compressed, sparse_update_mod
from feddip_kernels.protocol import seed_for

HERE = Path(__file__).resolve().parent
Weights = dict[str, np.ndarray]


class _Grid:
    """The part of flwr's Grid that FedAvg's sampling uses."""

    def __init__(self, nodes: list[int]) -> None:
        self.nodes = nodes

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)


def node_updates(run_config: dict[str, Any], nodes: int) -> tuple[Weights, list[Weights], list[int]]:
    """(the initial model, each node's update after one local epoch from it, each node's examples)."""
    seed = int(run_config["seed"])
    initial = task.initial_weights(task.init_seed(seed))
    updates, sizes = [], []
    for p in range(nodes):
        data = task.load_data(str(run_config["data-path"]), p, nodes, seed=seed,
                              limit=int(run_config["train-examples"]))
        model = task.load_model()
        task.set_weights(model, initial)
        trained, _ = task.train(model, data, epochs=int(run_config["local-epochs"]),
                                batch_size=int(run_config["batch-size"]), lr=float(run_config["learning-rate"]),
                                weight_decay=float(run_config["weight-decay"]), seed=seed_for(seed, 2, 1, p))
        updates.append({k: trained[k] - initial[k] for k in initial})
        sizes.append(len(data))
    return initial, updates, sizes


def run_rounds(strategy: Strategy, mod: Optional[Callable[..., Message]], initial: Weights, updates: list[Weights],
               sizes: list[int], rounds: int) -> list[dict[str, float]]:
    """`rounds` rounds of `strategy` (nodes 1..N), each node's message through `mod` (None: straight to the
    ClientApp); the seconds of each round's strategy calls and of the mod on each node."""
    nodes = list(range(1, len(updates) + 1))
    grid = _Grid(nodes)
    contexts = {n: Context(run_id=1, node_id=n, node_config={"partition-id": n - 1, "num-partitions": len(nodes)},
                           state=RecordDict(), run_config={}) for n in nodes}
    arrays: ArrayRecord = ArrayRecord({k: Array(v) for k, v in initial.items()})
    inside = [0.0]  # the ClientApp's seconds within the mod
    stamps: dict[str, float] = {}

    def client_app(msg: Message, context: Context) -> Message:
        start = time.perf_counter()
        stamps["enter"] = start
        node = context.node_id
        received = msg.content["arrays"]
        trained = {k: received[k].numpy() + updates[node - 1][k] for k in received.keys()}
        content = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in trained.items()}),
                              "metrics": MetricRecord({"num-examples": sizes[node - 1]})})
        reply = Message(content=content, reply_to=msg)
        stamps["leave"] = time.perf_counter()
        inside[0] += stamps["leave"] - start
        return reply

    out = []
    for rnd in range(1, rounds + 1):
        t0 = time.perf_counter()
        messages = list(strategy.configure_train(rnd, arrays, ConfigRecord({"lr": 0.1}), grid))
        t1 = time.perf_counter()
        replies, decode, encode = [], [], []
        for m in messages:
            context = contexts[m.metadata.dst_node_id]
            if mod is None:
                replies.append(client_app(m, context))
                decode.append(0.0)
                encode.append(0.0)
                continue
            start = time.perf_counter()
            replies.append(mod(m, context, client_app))
            end = time.perf_counter()
            decode.append(stamps["enter"] - start)
            encode.append(end - stamps["leave"])
        t2 = time.perf_counter()
        new, _ = strategy.aggregate_train(rnd, replies)
        t3 = time.perf_counter()
        if new is not None:
            arrays = new
        out.append({"server": (t1 - t0) + (t3 - t2), "configure": t1 - t0, "aggregate": t3 - t2,
                    "mod": float(np.mean(np.add(decode, encode))), "decode": float(np.mean(decode)),
                    "encode": float(np.mean(encode))})
    return out


def _median(runs: list[list[dict[str, float]]], key: str, rounds: slice) -> float:
    return statistics.median(r[key] for run in runs for r in run[rounds])


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-path", required=True, help="MNIST's IDX files")
    parser.add_argument("--run-config", action="append", default=[],
                        help="run config overrides, as flwr run takes them (\"compress-density=0.1 ...\")")
    parser.add_argument("--nodes", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--results", help="a results JSON of the app: its median round time gives the shares")
    parser.add_argument("--out", help="write the figures here (JSON)")
    args = parser.parse_args(argv)
    overrides = parse_config_args(args.run_config) if args.run_config else {}
    run_config = dict(get_fused_config_from_dir(HERE, {**overrides, "data-path": args.data_path}))
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0  # Message() reads them

    initial, updates, sizes = node_updates(run_config, args.nodes)
    plain: list[list[dict[str, float]]] = []
    coded: list[list[dict[str, float]]] = []
    for _ in range(args.repeats):  # alternate, so that both see the same load
        plain.append(run_rounds(FedAvg(), None, initial, updates, sizes, args.rounds))
        wrapper = Compressed.from_run_config(FedAvg(), run_config)
        coded.append(run_rounds(wrapper, sparse_update_mod, initial, updates, sizes, args.rounds))

    figures: dict[str, Any] = {
        "settings": {k: run_config[k] for k in sorted(run_config) if k.startswith("compress-")},
        "nodes": args.nodes, "rounds": args.rounds, "repeats": args.repeats, "threads": torch.get_num_threads(),
    }
    for name, rounds in (("first_round", slice(0, 1)), ("later_rounds", slice(1, None))):
        ms = {
            "server_uncompressed_ms": 1e3 * _median(plain, "server", rounds),
            "server_compressed_ms": 1e3 * _median(coded, "server", rounds),
            "mod_ms_per_node": 1e3 * _median(coded, "mod", rounds),
            "mod_decode_ms_per_node": 1e3 * _median(coded, "decode", rounds),
            "mod_encode_ms_per_node": 1e3 * _median(coded, "encode", rounds),
        }
        ms["wrapper_ms"] = ms["server_compressed_ms"] - ms["server_uncompressed_ms"]
        for step in ("configure", "aggregate"):  # the wrapper's share of each strategy call
            ms[f"wrapper_{step}_ms"] = 1e3 * (_median(coded, step, rounds) - _median(plain, step, rounds))
        figures[name] = ms
    if args.results:
        with open(args.results) as f:
            rows = [r for r in json.load(f)["rounds"] if "seconds" in r]
        round_s = statistics.median(r["seconds"] for r in rows)
        later = figures["later_rounds"]
        added = later["wrapper_ms"] + args.nodes * later["mod_ms_per_node"]  # the nodes one after another
        figures["round_seconds"] = round_s
        figures["share_of_round"] = {
            "wrapper": later["wrapper_ms"] / 1e3 / round_s,
            "mod_all_nodes": args.nodes * later["mod_ms_per_node"] / 1e3 / round_s,
            "total": added / 1e3 / round_s,
        }
    print(json.dumps(figures, indent=1))
    if args.out:
        with open(os.path.expanduser(args.out), "w") as f:
            json.dump(figures, f, indent=1)
    return figures


if __name__ == "__main__":
    main()
