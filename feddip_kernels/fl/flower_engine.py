"""Flower as the engine of `feddip simulate` (`--engine flower`): the experiment the built-in loop
runs (a SimulationConfig, the data, its partition), run by Flower's Simulation Runtime instead, so
that a user can move it to Flower's multi-machine runtimes without changing the experiment.

`run_flower` builds a ServerApp whose strategy is `integrations.flower.FedDIP` (the server side is
feddip_kernels.protocol, the code the built-in loop runs), configured from the SimulationConfig,
and a ClientApp behind the FedDIP mod (`make_feddip_mod`: the plain or the compact coding) whose
clients train as the built-in loop's do (`simulation._train_client`), and runs them with
`flwr.simulation.run_simulation` on Ray. For the same configuration, data, seed and torch thread
count it gives the built-in loop's global models bit for bit, round for round, and the same history
rows (accuracy, loss, sparsity, the bytes each way: tests/test_flower_engine.py); only the time
split differs (see `run_flower`).

How it maps the experiment onto Flower:

- Clients. The runtime gives its nodes random node ids and each a node config with its
  "partition-id" (0 .. clients-1), which the server does not see. Before the first round the
  ServerApp sends every node a query message; the ClientApp answers with its partition-id. From
  then on the strategy sees client indices as node ids (the ServerApp translates each training
  message's destination to the node, and each reply's source back to the client index), so that
  everything it derives from a node id is what the built-in loop derives from the client index:
  the order uploads are summed in (client order), the compact coding's stochastic-rounding seeds,
  the ClientApp's round-0 ERK mask (the mod seeds it by partition-id). The same ServerApp works
  with a deployment whose SuperNodes are started with `--node-config "partition-id=N"`.
- Sampling. Round t trains exactly `cfg.clients_in_round(t)`: the strategy samples from those
  clients only (FedAvg's sampling, fraction 1, of a node list that holds just them).
- Algorithms. feddip, feddp and feddip-noef share the server (aggregation, magnitude pruning);
  their clients differ, and train from the SimulationConfig as the built-in loop's do (lambda 0 for
  feddp, no error feedback for feddip-noef). fedavg runs the same strategy with its server's
  pruning off (protocol.FedDIPServer(prune=False), as the built-in loop's): dense models each way,
  coded with the run's value codec; its clients ignore the round-0 mask the mod hands them.
- Evaluation. Centrally, on the test set, after every round, as the built-in loop does (the
  strategy sends no evaluation messages).
- Data. The training shards go once into Ray's object store; the ClientApp (which the runtime
  sends with every message) carries only the reference, and each actor process fetches the shards
  once (zero-copy, read-only arrays) and keeps them, with one model, for the run.
- Threads. Each client actor reserves `threads` CPUs and trains on `threads` torch threads (and as
  many threads of the library's kernels): give the built-in loop's thread count for its bits.

Needs Flower with its simulation extra (`pip install 'flwr[simulation]'`, which brings Ray).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import logging
import os
import re
import sys
import time
import uuid
import warnings
from typing import Any, Callable, Iterator, Optional, cast

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from ..integrations.flower import MASKS_RECORD, ROUND_KEY, FedDIP, make_feddip_mod
from ..protocol import FedDIPServer, seed_for
from .dataset import Dataset
from .models import make_model, prunable_parameters
from .simulation import _history_row, _kept, _load, _train_client, evaluate
from .state import ServerState, SimulationConfig, float_state

__all__ = ["run_flower"]

PARTITION_ID, NUM_PARTITIONS = "partition-id", "num-partitions"  # the runtime's node config keys
ARRAYS, CONFIG, METRICS = "arrays", "config", "metrics"  # FedDIP's (FedAvg's) record names


# --- client side (runs in the runtime's actors) ---------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _ClientSpec:
    """What the ClientApp needs, small enough to travel with every message: the shards stay in
    Ray's object store (`shards`: the ObjectRef of [(x, y), ...] by client index)."""

    run: str  # unique per run_flower call: an actor keeps one run's shards and model
    cfg: SimulationConfig
    shards: Any
    augment: bool
    in_channels: int
    num_classes: int
    threads: int
    device: str


# One run's shards and model in this (actor) process.
_PROCESS: dict[str, Any] = {}


def _shards_and_model(spec: _ClientSpec) -> tuple[list[Dataset], torch.nn.Module]:
    if _PROCESS.get("run") != spec.run:
        shards = importlib.import_module("ray").get(spec.shards)  # once; the arrays come zero-copy
        model = make_model(spec.cfg.model, spec.in_channels, spec.num_classes).to(spec.device)
        _PROCESS.clear()
        _PROCESS.update(run=spec.run, shards=[Dataset(x, y, augment=spec.augment) for x, y in shards], model=model)
    return _PROCESS["shards"], _PROCESS["model"]


def _initial_model(model: str, in_channels: int, num_classes: int, seed: int) -> dict[str, np.ndarray]:
    """The initial model a client builds from the compact coding's init frame: the built-in loop's."""
    torch.manual_seed(seed)
    return {k: v.numpy() for k, v in float_state(make_model(model, in_channels, num_classes)).items()}


def _train(spec: _ClientSpec, msg: Message, context: Context) -> Message:
    """One client's round: the built-in loop's local training (simulation._train_client) from the
    model and the mask the mod decoded, its client index the node's partition-id."""
    from .. import _backend

    torch.set_num_threads(spec.threads)
    _backend.set_num_threads(spec.threads)
    cfg = spec.cfg
    c = int(context.node_config[PARTITION_ID])
    shards, model = _shards_and_model(spec)
    t = int(cast(int, msg.content.config_records[CONFIG][ROUND_KEY]))
    weights = {k: a.numpy() for k, a in msg.content.array_records[ARRAYS].items()}
    masks: dict[str, np.ndarray] = {}
    if cfg.algorithm != "fedavg" and MASKS_RECORD in msg.content.array_records:  # fedavg trains dense
        masks = {k: a.numpy().astype(bool) for k, a in msg.content.array_records[MASKS_RECORD].items()}
    with warnings.catch_warnings():  # the shards are read-only views of the object store; never written
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        local = _train_client(cfg, model, weights, masks, shards[c], t, c)
    content = RecordDict({
        ARRAYS: ArrayRecord(array_dict={k: Array(v.detach().cpu().numpy()) for k, v in local.items()}),
        METRICS: MetricRecord({"num-examples": len(shards[c])}),
    })
    return Message(content=content, reply_to=msg)


def _query(msg: Message, context: Context) -> Message:
    """The node's partition-id (its client index) and the partition count, for the ServerApp."""
    config = ConfigRecord({PARTITION_ID: int(context.node_config[PARTITION_ID]),
                           NUM_PARTITIONS: int(context.node_config.get(NUM_PARTITIONS, -1))})
    return Message(content=RecordDict({CONFIG: config}), reply_to=msg)


def _client_app(spec: _ClientSpec) -> ClientApp:
    init = _InitialModel(spec.cfg.model, spec.in_channels, spec.num_classes)
    app = ClientApp(mods=[make_feddip_mod(init)])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return _train(spec, msg, context)

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        return _query(msg, context)

    return app


@dataclasses.dataclass(frozen=True)
class _InitialModel:
    """init_model for make_feddip_mod (a picklable callable: seed -> the initial model)."""

    model: str
    in_channels: int
    num_classes: int

    def __call__(self, seed: int) -> dict[str, np.ndarray]:
        return _initial_model(self.model, self.in_channels, self.num_classes, seed)


# --- server side (the ServerApp runs in a thread of this process) ---------------------------------


class _Server(FedDIPServer):
    """protocol.FedDIPServer, timing its aggregation (and pruning) for the rows' time_prune."""

    seconds = 0.0

    def aggregate(self, uploads: Any) -> dict[str, np.ndarray]:
        t0 = time.perf_counter()
        try:
            return super().aggregate(uploads)
        finally:
            self.seconds += time.perf_counter() - t0


class _Strategy(FedDIP):
    """FedDIP configured from a SimulationConfig; fedavg: the server does not prune."""

    def __init__(self, cfg: SimulationConfig, prunable: list[str]) -> None:
        names = set(prunable)
        super().__init__(
            num_rounds=cfg.rounds, s0=cfg.s0, sp=cfg.sp, mask_every=cfg.mask_every, horizon=cfg.horizon, lr=cfg.lr,
            lr_decay=cfg.lr_decay, lambda_max=cfg.lambda_max, lambda_segments=cfg.lambda_segments, values=cfg.values,
            weighting=cfg.weighting, prunable=lambda name, _: name in names, seed=cfg.seed, coding=cfg.coding,
            rounding=cfg.rounding, residual_feedback=cfg.residual_feedback,
            # every client handed to configure_train trains; no evaluation messages (central evaluation)
            fraction_train=1.0, fraction_evaluate=0.0, min_available_nodes=1, min_train_nodes=1,
            min_evaluate_nodes=1,
        )
        self.prune = cfg.algorithm != "fedavg"

    def _start(self, arrays: ArrayRecord) -> FedDIPServer:
        if self.server is None:
            built = super()._start(arrays)  # the protocol's server (and the compact coding's end)
            self.server = _Server(built.weights, built.prunable, built.schedule, prune=self.prune, seed=built.seed)
        return self.server


class _Nodes:
    """The grid FedDIP samples from: the round's clients (by index), nothing else."""

    def __init__(self, clients: list[int]) -> None:
        self.clients = clients

    def get_node_ids(self) -> list[int]:
        return list(self.clients)


def _short(reason: str) -> str:
    """The first exception a ClientApp error's reason names, as "IndexError: ..." (the built-in
    loop's form), out of the traceback the runtime sends; else its last line."""
    found = re.search(r"^([A-Za-z_][\w.]*): (.+)$", reason, re.MULTILINE)
    if found:
        return f"{found.group(1).rsplit('.', 1)[-1]}: {found.group(2)}"
    lines = [line for line in reason.strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else reason


def _wait_for_nodes(grid: Grid, count: int, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while len(nodes := sorted(grid.get_node_ids())) < count:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{len(nodes)} of the {count} nodes connected within {timeout:g} s")
        time.sleep(0.1)
    return nodes


def _partition_ids(grid: Grid, clients: int, timeout: float) -> dict[int, int]:
    """node id -> client index: a query message to every node, answered with its partition-id."""
    nodes = _wait_for_nodes(grid, clients, timeout)
    messages = [Message(content=RecordDict({CONFIG: ConfigRecord({})}), dst_node_id=n,
                        message_type=MessageType.QUERY) for n in nodes]
    index: dict[int, int] = {}
    for reply in grid.send_and_receive(messages, timeout=timeout):
        node = reply.metadata.src_node_id
        if reply.has_error():
            raise RuntimeError(f"node {node} did not say its partition-id: {reply.error.reason}")
        index[node] = int(cast(int, reply.content.config_records[CONFIG][PARTITION_ID]))
    if sorted(index) != nodes or sorted(index.values()) != list(range(clients)):
        raise RuntimeError(f"the nodes' partition-ids {sorted(index.values())} (of {len(index)} replies from "
                           f"{len(nodes)} nodes) are not 0 .. {clients - 1}, one a node")
    return index


class _ServerRun:
    """The ServerApp's work: the query for the clients' indices, then the rounds, each evaluated
    centrally and recorded as the built-in loop records it."""

    def __init__(self, cfg: SimulationConfig, test: Dataset, model: torch.nn.Module, init: dict[str, np.ndarray],
                 on_round: Optional[Callable[[dict], None]], timeout: float) -> None:
        self.cfg, self.test, self.model, self.init = cfg, test, model, init
        self.on_round, self.timeout = on_round, timeout
        self.strategy = _Strategy(cfg, list(prunable_parameters(model)))
        self.history: list[dict] = []
        self.error: Optional[BaseException] = None

    def main(self, grid: Grid, context: Context) -> None:
        try:
            self._rounds(grid)
        except BaseException as e:  # noqa: B036 - kept for run_flower to raise, then passed on to flwr
            self.error = e
            raise

    def _rounds(self, grid: Grid) -> None:
        cfg, strategy = self.cfg, self.strategy
        index = _partition_ids(grid, cfg.clients, self.timeout)
        node_of = {c: node for node, c in index.items()}
        arrays = ArrayRecord(array_dict={k: Array(v) for k, v in self.init.items()})
        schedule = cfg.schedule
        for t in range(cfg.rounds):
            round_start = time.perf_counter()
            chosen = cfg.clients_in_round(t)
            weights = strategy.server.weights if strategy.server else self.init
            masks = strategy.masks
            kept = _kept(weights, masks)
            down, up = strategy.bytes_down, strategy.bytes_up
            t0 = time.perf_counter()
            messages = list(strategy.configure_train(t + 1, arrays, ConfigRecord(), _Nodes(chosen)))
            server = self.strategy.server
            assert isinstance(server, _Server) and server.round == t
            server.seconds = 0.0
            client_of = {}
            for m in messages:  # the strategy addresses client indices; the runtime, its nodes
                client_of[id(m)] = m.metadata.dst_node_id
                m.metadata.dst_node_id = node_of[m.metadata.dst_node_id]
            t1 = time.perf_counter()
            replies = list(grid.send_and_receive(messages, timeout=self.timeout))
            t2 = time.perf_counter()
            sent = {m.metadata.message_id: m for m in messages}
            errors: dict[int, str] = {}
            seen = []
            for r in replies:
                to = sent.get(r.metadata.reply_to_message_id)
                if to is None:  # not a reply to this round's messages
                    continue
                to.metadata.dst_node_id = c = client_of[id(to)]  # the reply, as from client c
                if r.has_error():
                    errors[c] = _short(r.error.reason or f"error code {r.error.code}")
                    seen.append(Message(r.error, reply_to=to))
                else:
                    seen.append(Message(r.content, reply_to=to))
            t3 = time.perf_counter()
            aggregated, _ = strategy.aggregate_train(t + 1, seen)
            t4 = time.perf_counter()
            outcome, reasons = strategy.rounds[-1], strategy.reasons[-1]
            failures = sorted(
                [(c, f"client {c}: {errors.get(c, 'failed')}") for c in outcome["failed"]]
                + [(c, f"client {c}: reply dropped: {reasons[c]}") for c in outcome["rejected"]]
                + [(c, f"client {c}: no reply within {self.timeout:g} s") for c in outcome["missing"]]
            )
            if aggregated is None:
                raise RuntimeError(f"round {t}: every client failed: {[f for _, f in failures]}")
            arrays = aggregated
            times = {"train": t2 - t1, "prune": server.seconds,
                     "encode": (t1 - t0) + (t4 - t3) - server.seconds}
            t0 = time.perf_counter()
            _load(self.model, server.weights)
            acc, loss = evaluate(self.model, self.test)
            times["evaluate"] = time.perf_counter() - t0
            times["round"] = time.perf_counter() - round_start
            bytes_up, bytes_down = strategy.bytes_up - up, strategy.bytes_down - down
            row = _history_row(cfg, schedule, server, t, acc, loss, bytes_up, bytes_down, self.history, len(chosen),
                               kept, [f for _, f in failures], times)
            self.history.append(row)
            if self.on_round:
                self.on_round(row)


# --- the run --------------------------------------------------------------------------------------


class _DropNotices(logging.Filter):
    """flwr's notices about what the engine does on purpose, which its users need not read every
    run: flwr deprecates its Python run_simulation for `flwr run` of a packaged app, and FedAvg
    warns that it sends no evaluation messages (the engine evaluates centrally)."""

    NOTICES = ("run_simulation` function is deprecated", "Federated evaluation will be skipped")

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(n in message for n in self.NOTICES)


@contextlib.contextmanager
def _flwr_logging(verbose: bool) -> Iterator[None]:
    logger = logging.getLogger("flwr")
    level, drop = logger.level, _DropNotices()
    logger.addFilter(drop)
    if not verbose:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)
        logger.removeFilter(drop)


@contextlib.contextmanager
def _pythonpath() -> Iterator[None]:
    """This process's import path in PYTHONPATH while Ray starts (its workers inherit the
    environment Ray starts with), as flwr gives it when it starts Ray (a runtime_env would cost an
    agent's start-up)."""
    before = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(sys.path + ([before] if before else []))
    try:
        yield
    finally:
        if before is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = before


def _ray() -> Any:
    try:
        return importlib.import_module("ray")
    except ImportError as e:
        raise ImportError("the Flower engine needs Flower's simulation runtime (Ray): pip install "
                          "'flwr[simulation]'") from e


def run_flower(
    cfg: SimulationConfig,
    train: Dataset,
    test: Dataset,
    partition: list[np.ndarray],
    *,
    on_round: Optional[Callable[[dict], None]] = None,
    device: str = "cpu",
    threads: Optional[int] = None,
    actors: Optional[int] = None,
    timeout: float = 3600.0,
    verbose: bool = False,
) -> ServerState:
    """Run the experiment `run_simulation(cfg, train, test, partition)` runs, through Flower's
    Simulation Runtime (Ray): a ServerApp with the FedDIP strategy, `cfg.clients` SuperNodes whose
    ClientApp trains as the built-in loop's clients do. Returns the final state as run_simulation
    does: the server (global model and mask), one history row a round with run_simulation's fields
    and values (accuracy, loss, sparsity, bytes each way from the strategy's counters, ...), and
    the global mask each client last received. For the same arguments, seed and `threads` (the
    built-in loop's torch threads) its global models are run_simulation's, bit for bit.

    The rows' time split: time_train is the wall time from sending the round's messages to the last
    reply (the clients train in parallel, one actor each, and decode and encode their messages
    there); time_encode the server's coding of the downlinks and decoding of the uploads;
    time_prune its aggregation and pruning; time_evaluate the central evaluation.

    Parameters
    ----------
    cfg, train, test, partition : as run_simulation's (every client needs one example at least:
        Flower's FedAvg weights replies by their example count).
    on_round : called with each round's row (in the ServerApp's thread).
    device : where the clients train ("cpu", or "cuda": each actor then reserves a share of a GPU)
        and the model is evaluated.
    threads : torch threads (and threads of the library's kernels) of each client, and CPUs each
        client actor reserves (default: this process's torch threads, the built-in loop's).
    actors : client actors, when this call starts Ray (default: as many as the cores hold, at most
        the clients a round trains). When Ray is already initialised (e.g. `ray.init(address=...)`
        to a cluster), its resources decide.
    timeout : seconds the server waits for the nodes, and for a round's replies.
    verbose : Flower's INFO log lines too (default: its warnings and errors only).

    Raises
    ------
    ValueError : a partition of another size than cfg.clients, an empty shard, threads or actors < 1, a
        CUDA device torch does not see.
    ImportError : Flower's simulation extra (Ray) is not installed.
    RuntimeError : a round in which every client failed (as run_simulation), or nodes that do not
        connect or answer the partition-id query.
    """
    if len(partition) != cfg.clients:
        raise ValueError(f"partition has {len(partition)} shards for {cfg.clients} clients")
    empty = [c for c, p in enumerate(partition) if len(p) == 0]
    if empty:
        raise ValueError(f"clients {empty} hold no training examples (Flower's FedAvg needs a positive count)")
    threads = torch.get_num_threads() if threads is None else threads
    per_round = cfg.clients_per_round or cfg.clients
    actors = max(1, min(per_round, (os.cpu_count() or 1) // threads)) if actors is None else actors
    if threads < 1 or actors < 1:
        raise ValueError(f"threads and actors must be >= 1, got {threads} and {actors}")
    gpu = device.startswith("cuda")
    if gpu and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: torch sees no CUDA device")
    ray = _ray()
    from flwr.simulation import run_simulation as flwr_run_simulation

    in_channels, num_classes = train.x.shape[1], max(train.num_classes, test.num_classes)
    torch.manual_seed(seed_for(cfg.seed, 0))  # the built-in loop's initial model
    model = make_model(cfg.model, in_channels, num_classes)
    init = {k: v.cpu().numpy().copy() for k, v in float_state(model).items()}
    model.to(device)
    started = not ray.is_initialized()
    with _flwr_logging(verbose):
        run = _ServerRun(cfg, test, model, init, on_round, timeout)
        server_app = ServerApp()
        server_app.main()(run.main)
        if started:
            with warnings.catch_warnings(), _pythonpath():
                warnings.simplefilter("ignore", FutureWarning)  # Ray's notice on accelerator variables
                ray.init(num_cpus=actors * threads, include_dashboard=False, logging_level=logging.WARNING,
                         log_to_driver=verbose)
        try:
            shards = ray.put([(train.x[p], train.y[p]) for p in partition])
            spec = _ClientSpec(run=uuid.uuid4().hex, cfg=cfg, shards=shards, augment=train.augment,
                               in_channels=in_channels, num_classes=num_classes, threads=threads,
                               device="cuda" if gpu else device)  # Ray shows an actor its GPU as cuda:0
            backend_config: Any = {"client_resources": {"num_cpus": threads, "num_gpus": 1.0 / actors if gpu else 0.0}}
            flwr_run_simulation(server_app=server_app, client_app=_client_app(spec), num_supernodes=cfg.clients,
                                backend_config=backend_config)
        finally:
            if started and ray.is_initialized():  # flwr shuts Ray down itself once its backend ran
                ray.shutdown()
    if run.error is not None:
        raise run.error
    if len(run.history) != cfg.rounds:
        raise RuntimeError(f"the Flower run ended after {len(run.history)} of {cfg.rounds} rounds")
    strategy = run.strategy
    server = strategy.server
    assert server is not None
    known = strategy.compact_masks if strategy.compact else strategy.node_masks
    return ServerState(cfg, server, run.history, client_masks=dict(known))
