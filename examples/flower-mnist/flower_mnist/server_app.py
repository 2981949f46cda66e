"""flower-mnist: the ServerApp. FedAvg, plain or wrapped in feddip_kernels' Compressed, or FedDIP;
the global model is scored on MNIST's test set after every round, and the run's figures (accuracy,
bytes each way, times) go to a JSON file.

The bytes are counted the same way for every strategy, by the Grid the strategy sends through
(MeteredGrid): the bytes of every Array in the ArrayRecords of the messages sent and of the replies
received (`Array.data`: what the records carry; the ConfigRecords and MetricRecords, a few hundred
bytes a message, and the transport's framing are not counted)."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable
from logging import INFO
from typing import Any, Optional

import flwr
import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg, Strategy

import feddip_kernels
from feddip_kernels.integrations.flower import FedDIP
from feddip_kernels.integrations.flower_compress import Compressed
from flower_mnist import task

app = ServerApp()


def record_bytes(content: RecordDict) -> int:
    """Bytes of the Arrays in a message's ArrayRecords."""
    return sum(len(a.data) for record in content.array_records.values() for a in record.values())


class MeteredGrid(Grid):
    """A Grid that passes everything to `grid` and counts, by message type ("train", "evaluate"),
    the messages sent, the replies received, the bytes of their ArrayRecords (record_bytes) and
    the seconds spent waiting for the replies. `take()` returns the counts so far and starts afresh."""

    def __init__(self, grid: Grid) -> None:
        self.grid = grid
        self.counts: dict[str, float] = {}

    def _add(self, key: str, value: float) -> None:
        self.counts[key] = self.counts.get(key, 0) + value

    def take(self) -> dict[str, float]:
        counts, self.counts = self.counts, {}
        return counts

    def set_run(self, run: Any) -> None:
        self.grid.set_run(run)

    @property
    def run(self) -> Any:
        return self.grid.run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: Optional[float] = None) -> Message:
        return self.grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def get_nodes(self) -> Iterable[Any]:
        return self.grid.get_nodes()

    def _sent(self, messages: list[Message]) -> None:
        for m in messages:
            kind = m.metadata.message_type.split(".")[0]
            self._add(f"{kind}-messages", 1)
            self._add(f"{kind}-bytes-down", record_bytes(m.content) if m.has_content() else 0)

    def _received(self, replies: list[Message]) -> None:
        for r in replies:
            kind = r.metadata.message_type.split(".")[0]
            self._add(f"{kind}-replies", 1)
            self._add(f"{kind}-bytes-up", record_bytes(r.content) if r.has_content() else 0)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        self._sent(messages)
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        replies = list(self.grid.pull_messages(message_ids))
        self._received(replies)
        return replies

    def send_and_receive(self, messages: Iterable[Message], *, timeout: Optional[float] = None) -> Iterable[Message]:
        messages = list(messages)
        self._sent(messages)
        start = time.perf_counter()
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        if messages:
            self._add(f"{messages[0].metadata.message_type.split('.')[0]}-seconds", time.perf_counter() - start)
        self._received(replies)
        return replies


def make_strategy(run_config: dict[str, Any]) -> Strategy:
    """The run's strategy: FedAvg, Compressed(FedAvg) (compress = true) or FedDIP."""
    sampling = dict(fraction_train=float(run_config["fraction-train"]),
                    fraction_evaluate=float(run_config["fraction-evaluate"]))
    name = run_config["strategy"]
    if name == "fedavg":
        strategy: Strategy = FedAvg(**sampling)
        if run_config["compress"]:
            strategy = Compressed.from_run_config(strategy, run_config)
        return strategy
    if name == "feddip":
        rounds = int(run_config["num-server-rounds"])
        horizon = int(run_config["feddip-horizon"]) or None
        return FedDIP(
            num_rounds=rounds, s0=float(run_config["feddip-s0"]), sp=float(run_config["feddip-sp"]),
            mask_every=int(run_config["feddip-mask-every"]), horizon=horizon,
            lr=float(run_config["learning-rate"]), lr_decay=float(run_config["feddip-lr-decay"]),
            lambda_max=float(run_config["feddip-lambda-max"]),
            lambda_segments=int(run_config["feddip-lambda-segments"]), values=str(run_config["feddip-values"]),
            coding=str(run_config["feddip-coding"]), seed=int(run_config["seed"]), **sampling)
    raise ValueError(f"strategy must be 'fedavg' or 'feddip', got {name!r}")


def _describe(strategy: Strategy) -> str:
    if isinstance(strategy, Compressed):
        return (f"Compressed({type(strategy.strategy).__name__}, density={strategy.density}, "
                f"values={strategy.values!r}, error_feedback={strategy.error_feedback}, "
                f"downlink_values={strategy.downlink_values!r})")
    return type(strategy).__name__


def _sparsity(arrays: ArrayRecord) -> float:
    """The fraction of zeros in the weights of two or more dimensions (conv and linear: FedDIP's pruned ones)."""
    weights = [a.numpy() for a in arrays.values() if len(a.shape) >= 2]
    return float(sum(int((w == 0).sum()) for w in weights) / max(sum(w.size for w in weights), 1))


def _write(path: str, summary: dict[str, Any]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(summary, f, indent=1)
    os.replace(tmp, path)


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the strategy for num-server-rounds, scoring the global model centrally after each round."""
    run_config = dict(context.run_config)
    seed = int(run_config["seed"])
    rounds = int(run_config["num-server-rounds"])
    test_data = task.load_test_data(str(run_config["data-path"]), limit=int(run_config["test-examples"]))
    initial = task.initial_weights(task.init_seed(seed))
    arrays = ArrayRecord({k: Array(v) for k, v in initial.items()})
    strategy = make_strategy(run_config)
    metered = MeteredGrid(grid)
    results_path = str(run_config["results-path"])
    results_path = os.path.abspath(os.path.expanduser(results_path)) if results_path else ""

    summary: dict[str, Any] = {
        "strategy": _describe(strategy), "run_config": run_config,
        "parameters": int(sum(v.size for v in initial.values())),
        "model_bytes": sum(len(a.data) for a in arrays.values()), "test_examples": len(test_data),
        "versions": {"flwr": flwr.__version__, "torch": torch.__version__,
                     "feddip_kernels": feddip_kernels.__version__},
        "rounds": [],
    }
    last = [time.perf_counter()]

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        """Score the global model on the test set; note the round's figures."""
        round_seconds = time.perf_counter() - last[0]
        model = task.load_model()
        model.load_state_dict(arrays.to_torch_state_dict())
        accuracy, loss = task.test(model, test_data)
        counts = metered.take()
        row: dict[str, Any] = {"round": server_round, "accuracy": accuracy, "loss": loss,
                               "sparsity": _sparsity(arrays)}
        if server_round > 0:
            row.update({
                "bytes_down": int(counts.get("train-bytes-down", 0)), "bytes_up": int(counts.get("train-bytes-up", 0)),
                "messages": int(counts.get("train-messages", 0)), "replies": int(counts.get("train-replies", 0)),
                "evaluate_bytes_down": int(counts.get("evaluate-bytes-down", 0)),
                "seconds": round_seconds, "train_seconds": counts.get("train-seconds", 0.0),
            })
            log(INFO, "Round %d: test accuracy %.4f, %d bytes down, %d bytes up (training messages)", server_round,
                accuracy, row["bytes_down"], row["bytes_up"])
        summary["rounds"].append(row)
        if results_path:
            _write(results_path, summary)
        last[0] = time.perf_counter()
        return MetricRecord({"accuracy": accuracy, "loss": loss})

    result = strategy.start(grid=metered, initial_arrays=arrays, num_rounds=rounds,
                            train_config=ConfigRecord({"lr": float(run_config["learning-rate"])}),
                            evaluate_fn=evaluate_fn)

    # The strategy's own view of each round (Compressed: compress-bytes-*; FedDIP: feddip-* counts).
    for row in summary["rounds"][1:]:
        metrics = result.train_metrics_clientapp.get(row["round"])
        if metrics is not None:
            row["train_metrics"] = {k: v for k, v in metrics.items() if not isinstance(v, list)}
    rows = summary["rounds"][1:]
    down, up = sum(r["bytes_down"] for r in rows), sum(r["bytes_up"] for r in rows)
    summary.update({
        "bytes_down": down, "bytes_up": up, "final_accuracy": summary["rounds"][-1]["accuracy"],
        "final_sparsity": summary["rounds"][-1]["sparsity"],
        "seconds": float(np.sum([r["seconds"] for r in rows])) if rows else 0.0,
    })
    log(INFO, "Training messages: %d bytes down, %d bytes up; final test accuracy %.4f", down, up,
        summary["final_accuracy"])
    if results_path:
        _write(results_path, summary)
        log(INFO, "Results written to %s", results_path)
