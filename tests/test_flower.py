"""Flower integration, in process: the mod inside a real flwr ClientApp and the FedDIP strategy
driving it for a few rounds through Flower's Message objects (no network)."""

import copy
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings, strategies as st

flwr = pytest.importorskip("flwr")

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.serverapp.strategy.strategy_utils import validate_message_reply_consistency  # noqa: E402

import feddip_kernels as fk  # noqa: E402
from feddip_kernels.integrations.flower import (  # noqa: E402
    MASKS_RECORD,
    MAX_WEIGHT,
    FedDIP,
    decode_arrayrecord,
    encode_arrayrecord,
    encoded_size,
    feddip_mod,
    is_compact,
    is_encoded,
)


def _model(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "conv.weight": rng.standard_normal((16, 8, 3, 3)).astype(np.float32),
        "fc.weight": rng.standard_normal((10, 400)).astype(np.float32),
        "fc.bias": np.zeros(10, np.float32),  # all zeros, as initialised: not a masked tensor
    }


def _record(arrays):
    return ArrayRecord(array_dict={k: Array(v) for k, v in arrays.items()})


def test_arrayrecord_round_trip_and_bad_bytes():
    rec = _record(_model())
    enc = encode_arrayrecord(rec)
    assert is_encoded(enc) and encoded_size(enc) > 0
    dec, masks = decode_arrayrecord(enc)
    for k in rec:
        np.testing.assert_array_equal(dec[k].numpy(), rec[k].numpy())
    broken = Array(dtype="uint8", shape=(4,), stype="feddip/v1", data=b"FDKW")
    with pytest.raises(fk.CodecError):
        decode_arrayrecord(ArrayRecord(array_dict={"feddip": broken}))


def _client_app(seen):
    app = ClientApp(mods=[feddip_mod])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        arrays = msg.content["arrays"]
        assert not is_encoded(arrays)  # the mod decoded it
        seen.append({"model": {k: a.numpy().copy() for k, a in arrays.items()},
                     "masks": {k: a.numpy().astype(bool) for k, a in msg.content[MASKS_RECORD].items()}})
        rng = np.random.default_rng(context.node_id)
        trained = {k: a.numpy() + 0.01 * rng.standard_normal(a.shape).astype(np.float32) for k, a in arrays.items()}
        content = RecordDict(
            {"arrays": _record(trained), "metrics": MetricRecord({"num-examples": 10 * context.node_id})}
        )
        return Message(content=content, reply_to=msg)

    return app


class _Grid:
    """The part of flwr's Grid that strategies use to sample nodes."""

    run = None

    def get_node_ids(self):
        return [1, 2]


@pytest.fixture
def task_identity():
    # Outside a deployment nothing sets the process's task identity, which Message creation reads.
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


@pytest.mark.parametrize("values", ["raw", "fp16"])
def test_strategy_and_mod_for_three_rounds(task_identity, values):
    rounds = 3
    strategy = FedDIP(num_rounds=rounds, s0=0.5, sp=0.9, mask_every=1, values=values, min_available_nodes=2,
                      min_train_nodes=2)
    seen = []
    app = _client_app(seen)
    contexts = {n: Context(run_id=1, node_id=n, node_config={"partition-id": n - 1}, state=RecordDict(), run_config={})
                for n in (1, 2)}
    arrays = _record(_model())
    dense_bytes = arrays.count_bytes()
    prunable = ["conv.weight", "fc.weight"]
    for rnd in range(1, rounds + 1):
        messages = list(strategy.configure_train(rnd, arrays, ConfigRecord({}), _Grid()))
        assert len(messages) == 2 and all(is_encoded(m.content["arrays"]) for m in messages)
        replies = []
        for m in messages:
            reply = app(m, contexts[m.metadata.dst_node_id])
            assert is_encoded(reply.content["arrays"])
            if rnd == 1:  # no global mask yet: clients train under their own ERK masks, upload everything
                assert encoded_size(reply.content["arrays"]) > 0.45 * dense_bytes * (0.5 if values == "fp16" else 1)
            else:  # the values under the global mask
                assert encoded_size(reply.content["arrays"]) < dense_bytes / 1.5
            # The reply carries values in the codec the strategy asked for: fp16 values are exactly
            # representable in half precision, raw (trained) ones are not.
            sent = decode_arrayrecord(reply.content["arrays"], reference=strategy.masks or None)[0]
            in_half = all(np.array_equal(a.numpy(), a.numpy().astype(np.float16).astype(np.float32))
                          for a in sent.values())
            assert in_half == (values == "fp16")
            replies.append(reply)
        used = seen[-2:]
        if rnd == 1:  # each client's own ERK mask at density 1 - s0
            assert any((used[0]["masks"][k] != used[1]["masks"][k]).any() for k in prunable)
            for u in used:
                kept = sum(int(u["masks"][k].sum()) for k in prunable) / sum(u["masks"][k].size for k in prunable)
                assert kept == pytest.approx(0.5, abs=0.01)
        else:  # the global mask, the same for both
            for u in used:
                for k in prunable:
                    np.testing.assert_array_equal(u["masks"][k], strategy.masks[k])
        before = {k: m.copy() for k, m in strategy.masks.items()}
        arrays, metrics = strategy.aggregate_train(rnd, replies)
        got = {k: a.numpy() for k, a in arrays.items()}
        zeros = sum(int((got[k] == 0).sum()) for k in prunable) / sum(got[k].size for k in prunable)
        assert zeros == pytest.approx(strategy.schedule.sparsity(rnd - 1), abs=2e-3)
        for k, m in before.items():
            assert not (strategy.masks[k] & ~m).any()  # nested
        assert np.count_nonzero(got["fc.bias"]) == 10  # biases are never pruned: trained values all came back
        assert metrics["feddip-rejected"] == 0
    assert strategy.bytes_down > 0 and strategy.bytes_up > 0


def test_strategy_validates_its_settings():
    with pytest.raises(ValueError, match="mask_every"):
        FedDIP(num_rounds=3, mask_every=0)
    with pytest.raises(ValueError, match="rounds must be"):
        FedDIP(num_rounds=0)
    with pytest.raises(ValueError, match="s0"):
        FedDIP(num_rounds=3, s0=0.9, sp=0.5)
    with pytest.raises(ValueError, match="values"):
        FedDIP(num_rounds=3, values="fp8")
    with pytest.raises(ValueError, match="coding"):
        FedDIP(num_rounds=3, coding="dense")
    with pytest.raises(ValueError, match="rounding must be"):
        FedDIP(num_rounds=3, values="int8-ans", coding="compact", rounding="up")
    # stochastic rounding: the compact coding with values that round (int*-ans)
    for values, coding in (("int8-ans", "plain"), ("raw", "compact"), ("fp16-ans", "compact"), ("int8", "compact")):
        with pytest.raises(ValueError, match="stochastic"):
            FedDIP(num_rounds=3, values=values, coding=coding, rounding="stochastic")
    with pytest.raises(ValueError, match="init_seed"):
        FedDIP(num_rounds=3, values="int8-ans", coding="compact", init_seed=-1)
    assert not FedDIP(num_rounds=3, values="ans", coding="compact").compact  # lossless: the plain coding


def _one_round(strategy, corrupt_node=None):
    app = _client_app([])
    contexts = {n: Context(run_id=1, node_id=n, node_config={}, state=RecordDict(), run_config={}) for n in (1, 2)}
    messages = list(strategy.configure_train(1, _record(_model()), ConfigRecord({}), _Grid()))
    replies = [app(m, contexts[m.metadata.dst_node_id]) for m in messages]
    for r in replies:
        if r.metadata.src_node_id == corrupt_node:
            broken = Array(dtype="uint8", shape=(8,), stype="feddip/v1", data=b"FDKW\x01\x00\x00\x00")
            r.content["arrays"] = ArrayRecord(array_dict={"feddip": broken})
    return replies


def test_a_corrupt_reply_is_dropped_and_counted(task_identity):
    strategy = FedDIP(num_rounds=3, s0=0.5, sp=0.9, min_available_nodes=2, min_train_nodes=1)
    replies = _one_round(strategy, corrupt_node=2)
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert metrics["feddip-rejected"] == 1 and strategy.rejected == 1
    # The same as aggregating the valid reply alone.
    alone = FedDIP(num_rounds=3, s0=0.5, sp=0.9, min_available_nodes=2, min_train_nodes=1)
    valid = [r for r in _one_round(alone) if r.metadata.src_node_id == 1]
    expected, _ = alone.aggregate_train(1, valid)
    for k in expected:
        np.testing.assert_array_equal(arrays[k].numpy(), expected[k].numpy())


def test_evaluate_path_sends_the_pruned_model(task_identity):
    strategy = FedDIP(num_rounds=2, s0=0.5, sp=0.9, min_available_nodes=2, min_evaluate_nodes=2)
    seen = []
    app = ClientApp(mods=[feddip_mod])

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        arrays = msg.content["arrays"]
        assert not is_encoded(arrays)
        seen.append({k: a.numpy().copy() for k, a in arrays.items()})
        metrics = MetricRecord({"num-examples": 5, "accuracy": 0.5 + 0.1 * context.node_id})
        return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)

    model = _model()
    contexts = {n: Context(run_id=1, node_id=n, node_config={}, state=RecordDict(), run_config={}) for n in (1, 2)}
    messages = list(strategy.configure_evaluate(1, _record(model), ConfigRecord({}), _Grid()))
    assert len(messages) == 2 and all(is_encoded(m.content["arrays"]) for m in messages)
    replies = [app(m, contexts[m.metadata.dst_node_id]) for m in messages]
    metrics = strategy.aggregate_evaluate(1, replies)
    assert metrics["accuracy"] == pytest.approx(0.65)
    for got in seen:
        for k, m in strategy.masks.items():
            np.testing.assert_array_equal(got[k], model[k] * m)
        np.testing.assert_array_equal(got["fc.bias"], model["fc.bias"])
    assert strategy.bytes_evaluate > 0 and strategy.bytes_down == 0  # evaluation counts apart


class _GridOf:
    run = None

    def __init__(self, nodes):
        self.nodes = list(nodes)

    def get_node_ids(self):
        return self.nodes


def _simulate(cfg, train, test, parts, monkeypatch):
    """The simulation's global model after each round (recorded as its server aggregates), and
    its history."""
    from feddip_kernels.fl.simulation import run_simulation
    from feddip_kernels.protocol import FedDIPServer

    weights = []
    aggregate = FedDIPServer.aggregate

    def recording(self, uploads):
        out = aggregate(self, uploads)
        weights.append({k: v.copy() for k, v in self.weights.items()})
        return out

    with monkeypatch.context() as m:
        m.setattr(FedDIPServer, "aggregate", recording)
        state = run_simulation(cfg, train, test, parts)
    return weights, state.history


def _flower_as_simulate(cfg, monkeypatch, node_of=lambda c: c + 1, evaluate=False, **coding):
    """Run the Flower strategy and the mod in a ClientApp whose clients train as `feddip simulate`'s
    do, the round's nodes those the simulation samples, and check it against the simulation: the
    global model bit for bit and the bytes each way, round for round. Returns the strategy and, for
    every round, the training messages as sent: (node, ArrayRecord, ConfigRecord)."""
    pytest.importorskip("torch")
    import dataclasses

    import torch

    from feddip_kernels.fl import iid_partition, make_model, synthetic_dataset
    from feddip_kernels.fl.data import Dataset
    from feddip_kernels.fl.simulation import _train_client
    from feddip_kernels.fl.state import float_state
    from feddip_kernels.integrations.flower import LAMBDA_KEY, LR_KEY, ROUND_KEY, make_feddip_mod
    from feddip_kernels.protocol import seed_for

    train, test = synthetic_dataset(300, 60, seed=0)
    parts = iid_partition(len(train), cfg.clients, seed=0)
    shards = [Dataset(train.x[p], train.y[p]) for p in parts]
    expected, history = _simulate(dataclasses.replace(cfg, **coding), train, test, parts, monkeypatch)
    assert len(expected) == len(history) == cfg.rounds

    def init_model(seed):  # what a client runs to build the initial model (the simulation's)
        torch.manual_seed(seed)
        return {k: v.numpy() for k, v in float_state(make_model(cfg.model, 1, 10)).items()}

    app = ClientApp(mods=[make_feddip_mod(init_model)])

    @app.train()
    def train_fn(msg: Message, context: Context) -> Message:
        c = int(context.node_config["partition-id"])
        config = msg.content["config"]
        t = int(config[ROUND_KEY])
        assert config[LR_KEY] == cfg.schedule.learning_rate(t) and config[LAMBDA_KEY] == cfg.schedule.lam(t)
        weights = {k: a.numpy() for k, a in msg.content["arrays"].items()}
        masks = {k: a.numpy().astype(bool) for k, a in msg.content[MASKS_RECORD].items()}
        local = _train_client(cfg, make_model(cfg.model, 1, 10), weights, masks, shards[c], t, c)
        content = RecordDict(
            {
                "arrays": _record({k: v.numpy() for k, v in local.items()}),
                "metrics": MetricRecord({"num-examples": len(shards[c])}),
            }
        )
        return Message(content=content, reply_to=msg)

    @app.evaluate()
    def evaluate_fn(msg: Message, context: Context) -> Message:
        assert not is_encoded(msg.content["arrays"]) and not is_compact(msg.content["arrays"])
        return Message(content=RecordDict({"metrics": MetricRecord({"num-examples": 1, "accuracy": 0.5})}),
                       reply_to=msg)

    torch.manual_seed(seed_for(cfg.seed, 0))
    arrays = _record({k: v.numpy().copy() for k, v in float_state(make_model(cfg.model, 1, 10)).items()})
    strategy = FedDIP(num_rounds=cfg.rounds, s0=cfg.s0, sp=cfg.sp, mask_every=cfg.mask_every, horizon=cfg.horizon,
                      lr=cfg.lr, seed=cfg.seed, weighting=cfg.weighting, min_available_nodes=1, min_train_nodes=1,
                      min_evaluate_nodes=1, **coding)
    nodes = [node_of(c) for c in range(cfg.clients)]
    contexts = {node_of(c): Context(run_id=1, node_id=node_of(c), node_config={"partition-id": c}, state=RecordDict(),
                                    run_config={}) for c in range(cfg.clients)}
    sent = []
    for rnd in range(1, cfg.rounds + 1):
        chosen = [node_of(c) for c in cfg.clients_in_round(rnd - 1)]
        down, up = strategy.bytes_down, strategy.bytes_up
        messages = list(strategy.configure_train(rnd, arrays, ConfigRecord({}), _GridOf(chosen)))
        assert sorted(m.metadata.dst_node_id for m in messages) == sorted(chosen)
        sent.append([(m.metadata.dst_node_id, m.content["arrays"], m.content["config"]) for m in messages])
        replies = [app(m, contexts[m.metadata.dst_node_id]) for m in reversed(messages)]  # any order
        arrays, _ = strategy.aggregate_train(rnd, replies)
        row = history[rnd - 1]
        assert (strategy.bytes_down - down, strategy.bytes_up - up) == (row["bytes_down"], row["bytes_up"]), rnd
        for k, v in expected[rnd - 1].items():
            assert arrays[k].numpy().tobytes() == v.tobytes(), (rnd, k)
        if evaluate:  # the plain coding to every node, between training rounds: nothing of it reaches training
            evaluation = list(strategy.configure_evaluate(rnd, arrays, ConfigRecord({}), _GridOf(nodes)))
            assert len(evaluation) == len(nodes) and all(is_encoded(m.content["arrays"]) for m in evaluation)
            strategy.aggregate_evaluate(rnd, [app(m, contexts[m.metadata.dst_node_id]) for m in evaluation])
    return strategy, sent


_SIMULATION = dict(algorithm="feddip", clients=3, clients_per_round=None, rounds=3, horizon=3, local_epochs=1,
                   batch_size=32, lr=0.05, s0=0.5, sp=0.9, mask_every=1, weighting="samples", seed=5)


@pytest.mark.parametrize("values", ["raw", "int4-ans"])
def test_flower_strategy_and_simulate_give_the_same_global_models(task_identity, monkeypatch, values):
    # One server-side implementation: the Flower strategy with clients that train as `feddip
    # simulate`'s do gets the simulation's global model, bit for bit, round for round. The plain
    # coding's messages are those it always was (the same bytes as the simulation's plain ones).
    from feddip_kernels.fl.simulation import SimulationConfig
    from feddip_kernels.integrations.flower import CODING_KEY, CRC_KEY, INIT_SEED_KEY, ROUNDING_KEY

    cfg = SimulationConfig(**_SIMULATION)
    strategy, sent = _flower_as_simulate(cfg, monkeypatch, values=values)
    assert not strategy.compact and strategy.transport is None
    for _, record, config in (m for messages in sent for m in messages):
        assert is_encoded(record) and list(record.keys()) == ["feddip"]
        assert not {CODING_KEY, ROUNDING_KEY, INIT_SEED_KEY, CRC_KEY} & set(config.keys())


@pytest.mark.parametrize(
    "rounding, clients_per_round, node_of, evaluate",
    [
        ("nearest", None, lambda c: c + 1, True),  # all clients every round, evaluations in between
        ("nearest", 2, lambda c: c + 1, False),  # client 0 first in round 1, client 2 skips it
        # Stochastic rounding draws from the client's index: on the server, the node id.
        ("stochastic", 2, lambda c: c, False),
    ],
    ids=["nearest-all", "nearest-sampled", "stochastic-sampled"],
)
def test_flower_compact_coding_sends_the_simulations_bytes(task_identity, monkeypatch, rounding, clients_per_round,
                                                          node_of, evaluate):
    # coding="compact": the same messages as `feddip simulate --coding compact` sends, byte for
    # byte (per-round bytes each way), and the same global models, bit for bit.
    from feddip_kernels.fl.simulation import SimulationConfig
    from feddip_kernels.integrations.flower import CODING_KEY, CRC_KEY, ROUNDING_KEY
    from feddip_kernels.protocol.transport import INIT_FRAME_SIZE, INIT_MAGIC

    cfg = SimulationConfig(**dict(_SIMULATION, clients_per_round=clients_per_round))
    strategy, sent = _flower_as_simulate(cfg, monkeypatch, node_of=node_of, evaluate=evaluate, values="int4-ans",
                                         coding="compact", rounding=rounding)
    assert strategy.compact
    first = set()
    for messages in sent:
        for node, record, config in messages:
            assert is_compact(record) and not is_encoded(record)
            assert config[CODING_KEY] == "compact" and config[ROUNDING_KEY] == rounding and CRC_KEY in config
            data = record["feddip"].data
            assert (data[:4] == INIT_MAGIC) == (node not in first)  # an init frame at first contact only
            if node not in first and messages is sent[0]:
                assert len(data) == INIT_FRAME_SIZE  # round 1: the initial model, the frame alone
            first.add(node)
    assert len(first) == cfg.clients


def _compact_app(fail):
    """A ClientApp with the compact coding's mod (the initial model: _model()) whose training adds
    noise, and raises for the nodes in `fail`."""
    from feddip_kernels.integrations.flower import make_feddip_mod

    app = ClientApp(mods=[make_feddip_mod(lambda seed: _model())])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        if context.node_id in fail:
            raise RuntimeError("training failed")
        arrays = msg.content["arrays"]
        rng = np.random.default_rng(context.node_id)
        trained = {k: a.numpy() + 0.01 * rng.standard_normal(a.shape).astype(np.float32) for k, a in arrays.items()}
        content = RecordDict({"arrays": _record(trained), "metrics": MetricRecord({"num-examples": 10})})
        return Message(content=content, reply_to=msg)

    return app


def _held_by(context):
    return {k: a.numpy() for k, a in context.state["feddip.compact.held"].items()}


def test_compact_coding_starts_afresh_the_nodes_whose_state_is_unknown(task_identity):
    # A node that failed (flwr keeps the context it had when the ClientApp raises) or whose reply
    # is missing (its message or its reply lost) may or may not hold what it was sent: its next
    # message opens with an init frame. A rejected reply leaves the node as it was; a node out of
    # step (here: its context state restored from an earlier round) fails and starts afresh.
    from feddip_kernels.protocol.transport import INIT_MAGIC

    nodes = (1, 2, 3, 4)
    strategy = FedDIP(num_rounds=10, s0=0.5, sp=0.9, mask_every=1, values="int4-ans", coding="compact",
                      min_available_nodes=4, min_train_nodes=1)
    fail = set()
    app = _compact_app(fail)
    contexts = {n: Context(run_id=1, node_id=n, node_config={}, state=RecordDict(), run_config={}) for n in nodes}
    saved = {}

    def round_(rnd, failing=(), lost=(), corrupt=()):
        fail.clear()
        fail.update(failing)
        messages = sorted(strategy.configure_train(rnd, _record(_model()), ConfigRecord({}), _GridOf(nodes)),
                          key=lambda m: m.metadata.dst_node_id)
        opens = {m.metadata.dst_node_id: m.content["arrays"]["feddip"].data[:4] == INIT_MAGIC for m in messages}
        replies = []
        for m in messages:
            node = m.metadata.dst_node_id
            try:
                reply = app(m, contexts[node])
            except Exception as e:  # as flwr reports it (and keeps the node's context as it was)
                reply = Message(Error(code=2, reason=f"{type(e)}:<'{e}'>"), reply_to=m)
            if node in corrupt:
                data = bytearray(reply.content["arrays"]["feddip"].data)
                data[len(data) // 2] ^= 0xFF
                reply.content["arrays"]["feddip"].data = bytes(data)
            if node not in lost:
                replies.append(reply)
        arrays, metrics = strategy.aggregate_train(rnd, replies)
        assert arrays is not None
        return opens, strategy.rounds[-1]

    opens, seen = round_(1)
    assert all(opens.values()) and seen["aggregated"] == [1, 2, 3, 4]
    saved = copy.deepcopy(contexts[1].state)
    opens, seen = round_(2, failing=[2], lost=[3], corrupt=[4])
    assert not any(opens.values())
    assert (seen["aggregated"], seen["failed"], seen["missing"], seen["rejected"]) == ([1], [2], [3], [4])
    assert set(strategy.transport.held) == {1, 4}  # 2 and 3: unknown, dropped
    opens, seen = round_(3)
    assert opens == {1: False, 2: True, 3: True, 4: False} and seen["aggregated"] == [1, 2, 3, 4]
    for n in nodes:  # every node holds the model the server believes it holds, bit for bit
        held = _held_by(contexts[n])
        assert all(held[k].tobytes() == v.tobytes() for k, v in strategy.transport.held[n].items())
    contexts[1].state = saved  # node 1 out of step: it holds round 1's model
    opens, seen = round_(4)
    assert not any(opens.values()) and seen["failed"] == [1] and seen["aggregated"] == [2, 3, 4]
    opens, seen = round_(5)
    assert opens == {1: True, 2: False, 3: False, 4: False} and seen["aggregated"] == [1, 2, 3, 4]


def test_compact_evaluation_sends_the_global_model_itself(task_identity):
    # Training messages carry int4-coded deltas; evaluation messages the global model, losslessly
    # (the nodes score that model, not a quantised copy), counted in bytes_evaluate alone.
    nodes = (1, 2)
    strategy = FedDIP(num_rounds=5, s0=0.5, sp=0.9, mask_every=1, values="int4-ans", coding="compact",
                      min_available_nodes=2, min_train_nodes=2, min_evaluate_nodes=2)
    app = _compact_app(set())
    scored = {}

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        scored[context.node_id] = {k: a.numpy().copy() for k, a in msg.content["arrays"].items()}
        return Message(content=RecordDict({"metrics": MetricRecord({"num-examples": 5, "accuracy": 0.5})}),
                       reply_to=msg)

    contexts = {n: Context(run_id=1, node_id=n, node_config={}, state=RecordDict(), run_config={}) for n in nodes}
    arrays = _record(_model())
    for rnd in (1, 2, 3):
        messages = list(strategy.configure_train(rnd, arrays, ConfigRecord({}), _GridOf(nodes)))
        arrays, _ = strategy.aggregate_train(rnd, [app(m, contexts[m.metadata.dst_node_id]) for m in messages])
        down, up, held = strategy.bytes_down, strategy.bytes_up, copy.deepcopy(strategy.transport.held)
        before = strategy.bytes_evaluate
        evaluation = list(strategy.configure_evaluate(rnd, arrays, ConfigRecord({}), _GridOf(nodes)))
        assert all(is_encoded(m.content["arrays"]) for m in evaluation)
        size = sum(encoded_size(m.content["arrays"]) for m in evaluation)
        metrics = strategy.aggregate_evaluate(rnd, [app(m, contexts[m.metadata.dst_node_id]) for m in evaluation])
        assert metrics["accuracy"] == pytest.approx(0.5)
        assert (strategy.bytes_down, strategy.bytes_up) == (down, up) and size > 0
        assert strategy.bytes_evaluate - before == size
        for n in nodes:
            assert set(scored[n]) == set(strategy.server.weights)
            for k, v in strategy.server.weights.items():
                assert scored[n][k].tobytes() == v.tobytes(), (rnd, n, k)
            # the compact state is untouched: each node still holds what the server believes
            assert all(_held_by(contexts[n])[k].tobytes() == v.tobytes() for k, v in held[n].items())


def test_a_failed_evaluation_resends_the_mask_whole(task_identity):
    # An evaluation message coded relative to the mask a node holds; one node's evaluation fails
    # (lost, or its context reset): its next message carries the mask whole, the other's does not.
    strategy = FedDIP(num_rounds=5, s0=0.5, sp=0.9, mask_every=1, min_available_nodes=2, min_train_nodes=2,
                      min_evaluate_nodes=2)
    app = _client_app([])
    contexts = {n: Context(run_id=1, node_id=n, node_config={}, state=RecordDict(), run_config={}) for n in (1, 2)}
    messages = list(strategy.configure_train(1, _record(_model()), ConfigRecord({}), _Grid()))
    arrays, _ = strategy.aggregate_train(1, [app(m, contexts[m.metadata.dst_node_id]) for m in messages])
    evaluation = list(strategy.configure_evaluate(1, arrays, ConfigRecord({}), _Grid()))
    assert set(strategy.node_masks) == {1, 2}
    replies = []
    for m in evaluation:
        if m.metadata.dst_node_id == 2:
            replies.append(Message(Error(code=2, reason="lost"), reply_to=m))
        else:
            replies.append(Message(content=RecordDict({"metrics": MetricRecord({"num-examples": 5})}), reply_to=m))
    strategy.aggregate_evaluate(1, replies)
    assert set(strategy.node_masks) == {1}
    messages = {m.metadata.dst_node_id: m for m in strategy.configure_train(2, arrays, ConfigRecord({}), _Grid())}
    decode_arrayrecord(messages[2].content["arrays"])  # whole: it decodes without a reference mask
    with pytest.raises(fk.CodecError):
        decode_arrayrecord(messages[1].content["arrays"])  # relative to the mask node 1 holds


def test_bad_evaluation_replies_are_dropped_not_fatal(task_identity):
    # flwr's FedAvg raises on evaluation replies whose metrics differ (ending the run): FedDIP drops
    # and counts them as it does training replies.
    strategy = FedDIP(num_rounds=2, s0=0.5, sp=0.9, min_available_nodes=2, min_evaluate_nodes=1)
    messages = list(strategy.configure_evaluate(1, _record(_model()), ConfigRecord({}), _GridOf([1, 2, 3])))

    def reply(m, metrics):
        return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=m)

    by_node = {m.metadata.dst_node_id: m for m in messages}
    replies = [reply(by_node[1], {"num-examples": 5, "accuracy": 0.5}),
               reply(by_node[2], {"num-examples": 5, "accuracy": 0.7}),
               reply(by_node[3], {"accuracy": 0.1})]  # no num-examples
    metrics = strategy.aggregate_evaluate(1, replies)
    assert metrics["accuracy"] == pytest.approx(0.6) and strategy.rejected_evaluate == 1
    replies[2] = reply(by_node[3], {"num-examples": 5, "loss": 0.1})  # another metric shape
    assert strategy.aggregate_evaluate(1, replies)["accuracy"] == pytest.approx(0.6)
    assert strategy.rejected_evaluate == 2


def test_the_mod_reads_stochastic_rounding_of_a_codec_that_does_not_round_as_nearest(task_identity):
    # Servers before the setting was refused sent it with fp16-ans (where it meant nearest).
    from feddip_kernels.integrations.flower import ROUNDING_KEY

    strategy = FedDIP(num_rounds=3, values="fp16-ans", coding="compact", min_available_nodes=2, min_train_nodes=2)
    app = _compact_app(set())
    contexts = {n: Context(run_id=1, node_id=n, node_config={}, state=RecordDict(), run_config={}) for n in (1, 2)}
    messages = list(strategy.configure_train(1, _record(_model()), ConfigRecord({}), _Grid()))
    for m in messages:
        m.content["config"][ROUNDING_KEY] = "stochastic"
    replies = [app(m, contexts[m.metadata.dst_node_id]) for m in messages]
    assert not any(r.has_error() for r in replies)
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert arrays is not None and metrics["feddip-aggregated"] == 2


def test_a_compact_reply_outside_the_global_mask_is_rejected(task_identity):
    from feddip_kernels.integrations.flower import ROUND_KEY
    from feddip_kernels.protocol import ClientEnd

    strategy = FedDIP(num_rounds=10, s0=0.5, sp=0.9, mask_every=5, values="int8-ans", coding="compact",
                      min_available_nodes=2, min_train_nodes=2)
    app, nodes = _compact_app(set()), (1, 2)
    contexts = {n: Context(run_id=1, node_id=n, node_config={}, state=RecordDict(), run_config={}) for n in nodes}
    for rnd in (1, 2):
        messages = list(strategy.configure_train(rnd, _record(_model()), ConfigRecord({}), _GridOf(nodes)))
        replies = sorted((app(m, contexts[m.metadata.dst_node_id]) for m in messages),
                         key=lambda r: r.metadata.src_node_id)
        if rnd == 2:  # node 2 sends its whole model (as if it held no mask): values where the global mask has none
            end = ClientEnd(2, values="int8-ans", seed=0)
            end.held = strategy.transport.held[2]
            local = {k: v + 0.5 for k, v in end.held.items()}
            data = end.reply(local, int(messages[0].content["config"][ROUND_KEY]))
            replies[1].content["arrays"]["feddip"].data = data
        arrays, metrics = strategy.aggregate_train(rnd, replies)
    assert metrics["feddip-rejected"] == 1 and "outside the global mask" in strategy.reasons[-1][2]
    assert metrics["feddip-aggregated"] == 1 and 2 in strategy.transport.held  # rejected: it holds what it was sent
    for k, m in strategy.masks.items():
        assert not arrays[k].numpy()[~m].any()


def test_compact_coding_needs_the_initial_model(task_identity):
    app = ClientApp(mods=[feddip_mod])  # make_feddip_mod() without init_model
    app.train()(lambda msg, context: Message(content=RecordDict(), reply_to=msg))
    strategy = FedDIP(num_rounds=3, values="int8-ans", coding="compact", min_available_nodes=2, min_train_nodes=2)
    (m, _) = strategy.configure_train(1, _record(_model()), ConfigRecord({}), _Grid())
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    with pytest.raises(fk.CodecError, match="make_feddip_mod"):
        app(m, context)
    # A mod whose initial model is another: the init frame's CRC-32C tells.
    from feddip_kernels.integrations.flower import make_feddip_mod

    other = ClientApp(mods=[make_feddip_mod(lambda seed: _model(1))])
    other.train()(lambda msg, context: Message(content=RecordDict(), reply_to=msg))
    with pytest.raises(fk.CodecError, match="CRC"):
        other(m, context)


def test_reply_outside_the_global_mask_is_rejected(task_identity):
    strategy = FedDIP(num_rounds=3, s0=0.5, sp=0.9, mask_every=1, min_available_nodes=2, min_train_nodes=1)
    strategy.aggregate_train(1, _one_round(strategy))  # round 1 makes the global mask
    messages = list(strategy.configure_train(2, _record(_model()), ConfigRecord({}), _Grid()))
    dense = encode_arrayrecord(_record(_model(3)))  # positions everywhere, not relative to the mask
    replies = [Message(content=RecordDict({"arrays": dense, "metrics": MetricRecord({"num-examples": 10})}),
                       reply_to=m) for m in messages]
    arrays, metrics = strategy.aggregate_train(2, replies)
    assert arrays is None and metrics["feddip-rejected"] == 2


# Replies that would poison or abort a round (issue 23, item 4). Round 2 of a strategy with
# mask_every=5 does not prune: what a reply brings reaches the global model unfiltered.


def _past_round_one(nodes=(1, 2), **kwargs):
    """A strategy after a clean round 1 (t = 0, which makes the global mask), its ClientApp and
    the nodes' contexts (which hold that mask)."""
    strategy = FedDIP(num_rounds=10, s0=0.5, sp=0.9, mask_every=5, min_available_nodes=len(nodes),
                      min_train_nodes=len(nodes), **kwargs)
    app = _client_app([])
    contexts = {n: Context(run_id=1, node_id=n, node_config={}, state=RecordDict(), run_config={}) for n in nodes}
    arrays, _ = strategy.aggregate_train(1, _train_replies(strategy, 1, app, contexts))
    assert arrays is not None and strategy.server.round == 1
    return strategy, app, contexts


def _train_replies(strategy, rnd, app, contexts):
    messages = list(strategy.configure_train(rnd, _record(_model()), ConfigRecord({}), _GridOf(sorted(contexts))))
    return sorted((app(m, contexts[m.metadata.dst_node_id]) for m in messages), key=lambda r: r.metadata.src_node_id)


def _server_state(strategy):
    s = strategy.server
    return s.round, {k: v.copy() for k, v in s.weights.items()}, {k: m.copy() for k, m in s.masks.items()}


def _assert_state_is(strategy, state):
    rnd, weights, masks = state
    assert strategy.server.round == rnd
    assert weights.keys() == strategy.server.weights.keys() and masks.keys() == strategy.masks.keys()
    for k, v in weights.items():
        assert strategy.server.weights[k].tobytes() == v.tobytes(), k
    for k, m in masks.items():
        np.testing.assert_array_equal(strategy.masks[k], m)


def _set_metric(reply, key, value):
    """Store any value under `key` in the reply's MetricRecord, as a reply from any client could
    carry (MetricRecord's own type check bypassed)."""
    next(iter(reply.content.metric_records.values())).__dict__["_data"][key] = value


@pytest.mark.parametrize("weight", [math.inf, 10**400], ids=["inf", "int-past-float64"])
def test_a_weight_that_is_not_a_finite_number_drops_that_reply(task_identity, weight):
    strategy, app, contexts = _past_round_one()
    replies = _train_replies(strategy, 2, app, contexts)
    alone = copy.deepcopy(strategy)  # the same round with node 1's reply alone
    _set_metric(replies[1], "num-examples", weight)
    arrays, metrics = strategy.aggregate_train(2, replies)
    assert metrics["feddip-rejected"] == 1 and metrics["feddip-aggregated"] == 1 and strategy.rejected == 1
    assert "'num-examples'" in strategy.reasons[-1][2]
    expected, _ = alone.aggregate_train(2, replies[:1])
    for k in expected:
        assert np.isfinite(arrays[k].numpy()).all()
        np.testing.assert_array_equal(arrays[k].numpy(), expected[k].numpy())
    assert strategy.server.round == 2


def test_weights_whose_sum_overflows_are_dropped_and_the_state_stays(task_identity):
    strategy, app, contexts = _past_round_one()
    replies = _train_replies(strategy, 2, app, contexts)
    for r in replies:
        _set_metric(r, "num-examples", 1e308)  # each finite, their sum is not
    state = _server_state(strategy)
    arrays, metrics = strategy.aggregate_train(2, replies)
    assert arrays is None and metrics["feddip-rejected"] == 2 and metrics["feddip-aggregated"] == 0
    assert all("(0, 9007199254740992]" in why for why in strategy.reasons[-1].values())
    _assert_state_is(strategy, state)
    # The largest weight allowed, from every reply, aggregates.
    replies = _train_replies(strategy, 2, app, contexts)
    for r in replies:
        _set_metric(r, "num-examples", MAX_WEIGHT)
    arrays, metrics = strategy.aggregate_train(2, replies)
    assert metrics["feddip-aggregated"] == 2 and all(np.isfinite(a.numpy()).all() for a in arrays.values())


@pytest.mark.parametrize("odd", ["list-for-scalar", "list-length", "missing-key", "extra-key", "record-name"])
def test_metrics_of_another_shape_drop_that_reply_before_the_round_moves_on(task_identity, odd):
    strategy, app, contexts = _past_round_one(nodes=(1, 2, 3))
    replies = _train_replies(strategy, 2, app, contexts)
    for r in replies:
        r.content["metrics"]["loss"] = 0.25 * r.metadata.src_node_id
        r.content["metrics"]["hist"] = [1.0, 2.0]
    first = replies[0]  # the odd one out is node 1, the first in node order: the majority wins
    if odd == "list-for-scalar":
        first.content["metrics"]["loss"] = [0.5, 0.5]
    elif odd == "list-length":
        first.content["metrics"]["hist"] = [1.0, 2.0, 3.0]
    elif odd == "missing-key":
        del first.content["metrics"]["loss"]
    elif odd == "extra-key":
        first.content["metrics"]["accuracy"] = 0.9
    else:
        first.content["other"] = first.content.pop("metrics")
    arrays, metrics = strategy.aggregate_train(2, replies)
    assert strategy.rounds[-1]["aggregated"] == [2, 3] and strategy.rounds[-1]["rejected"] == [1]
    assert "differ from the round's" in strategy.reasons[-1][1]
    # The metrics and the model are those of nodes 2 and 3 (20 and 30 examples).
    assert metrics["loss"] == pytest.approx((0.5 * 20 + 0.75 * 30) / 50)
    assert metrics["hist"] == pytest.approx([1.0, 2.0]) and metrics["feddip-rejected"] == 1
    assert strategy.server.round == 2 and all(np.isfinite(a.numpy()).all() for a in arrays.values())


def test_two_replies_with_different_metrics_keep_the_first_in_node_order(task_identity):
    strategy, app, contexts = _past_round_one()
    replies = _train_replies(strategy, 2, app, contexts)
    replies[1].content["metrics"]["loss"] = [0.1, 0.2]
    replies[0].content["metrics"]["loss"] = 0.1
    arrays, metrics = strategy.aggregate_train(2, replies)
    assert strategy.rounds[-1]["aggregated"] == [1] and strategy.rounds[-1]["rejected"] == [2]
    assert metrics["loss"] == pytest.approx(0.1)


def test_a_failing_metrics_function_leaves_the_state_as_it_was(task_identity):
    def fails(contents, key):
        raise RuntimeError("custom metrics aggregation failed")

    strategy, app, contexts = _past_round_one()
    strategy.train_metrics_aggr_fn = fails
    replies = _train_replies(strategy, 2, app, contexts)
    state, rounds, up = _server_state(strategy), len(strategy.rounds), strategy.bytes_up
    with pytest.raises(RuntimeError, match="custom metrics"):
        strategy.aggregate_train(2, replies)
    _assert_state_is(strategy, state)
    assert len(strategy.rounds) == rounds and strategy.bytes_up == up


def test_a_model_with_non_finite_values_is_dropped(task_identity):
    strategy, app, contexts = _past_round_one()
    replies = _train_replies(strategy, 2, app, contexts)
    poisoned = {k: v.copy() for k, v in strategy.server.weights.items()}
    poisoned["fc.weight"][np.nonzero(strategy.masks["fc.weight"])[0][0], :] = np.nan  # under the mask: sent
    replies[1].content["arrays"] = encode_arrayrecord(_record(poisoned), masks=strategy.masks, reference=strategy.masks)
    arrays, metrics = strategy.aggregate_train(2, replies)
    assert metrics["feddip-rejected"] == 1 and "non-finite" in strategy.reasons[-1][2]
    assert all(np.isfinite(a.numpy()).all() for a in arrays.values())


@pytest.mark.parametrize("signs", [(1, 1), (1, -1)], ids=["inf", "inf-minus-inf"])
def test_an_average_past_float64s_range_is_not_taken(task_identity, signs):
    # float64 values near float64's maximum, each finite: their weighted sum is not.
    big = np.finfo(np.float64).max / 1.5
    model = {"w": np.ones((4, 4)), "b": np.zeros(4)}
    strategy = FedDIP(num_rounds=3, s0=0.5, sp=0.9, min_available_nodes=2, min_train_nodes=2)
    messages = list(strategy.configure_train(1, _record(model), ConfigRecord({}), _Grid()))
    state = _server_state(strategy)
    replies = [
        Message(
            content=RecordDict(
                {
                    "arrays": encode_arrayrecord(_record({"w": np.full((4, 4), sign * big), "b": np.zeros(4)})),
                    "metrics": MetricRecord({"num-examples": 2}),
                }
            ),
            reply_to=m,
        )
        for m, sign in zip(messages, signs)
    ]
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert arrays is None and metrics["feddip-rejected"] == 2 and metrics["feddip-aggregated"] == 0
    assert all("float64" in why for why in strategy.reasons[-1].values())
    _assert_state_is(strategy, state)


# Any reply: hypothesis picks, for each of three nodes, what its reply carries (half are left as the
# client sent them, so that many rounds complete; the rest change any of these, mostly one or two).
_SCALARS = st.one_of(
    st.integers(min_value=-(2**1100), max_value=2**1100), st.floats(), st.booleans(), st.none(),
    st.text(max_size=3), st.binary(max_size=3), st.just(np.float32(1.5)), st.just(np.int64(3)), st.just(1 + 2j),
)
_NUMBERS = st.one_of(st.integers(-100, 100), st.floats(-10, 10), st.lists(st.floats(-10, 10), max_size=3))
_VALUES = st.one_of(_NUMBERS, _SCALARS, st.lists(_SCALARS, max_size=3))
_UNCHANGED = {"weight": "keep", "metrics": {}, "record": "metrics", "metric_records": 1, "arrays": "keep",
              "config_record": False, "error": False}


def _often(value, *others):
    """`value` three times in four, else one of `others`."""
    return st.one_of(st.just(value), st.just(value), st.just(value), st.one_of(*others))


_REPLY = st.one_of(st.just(_UNCHANGED), st.fixed_dictionaries({
    "weight": _often("keep", st.just("delete"), _VALUES),
    "metrics": _often({}, st.dictionaries(st.sampled_from(["loss", "acc", "hist"]), _VALUES, max_size=3)),
    "record": _often("metrics", st.just("other")),
    "metric_records": _often(1, st.sampled_from([0, 2])),  # how many MetricRecords the reply has
    "arrays": _often("keep", st.sampled_from(["missing", "nan", "extra-record"])),
    "config_record": st.booleans(),
    "error": _often(False, st.just(True)),
}))


def _is_number(v):
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    try:
        return math.isfinite(float(v))
    except OverflowError:
        return False


def _apply(reply, spec, strategy):
    """The reply as `spec` says; whether the reply on its own (not against the others) is bad."""
    metrics = reply.content.pop("metrics")
    data = metrics.__dict__["_data"]
    if spec["weight"] == "delete":
        del data["num-examples"]
    elif spec["weight"] != "keep":
        data["num-examples"] = spec["weight"]
    data.update(spec["metrics"])
    for i in range(spec["metric_records"]):
        reply.content[spec["record"] if i == 0 else f"more-{i}"] = metrics if i == 0 else MetricRecord({"x": 1.0})
    if spec["arrays"] == "missing":
        del reply.content["arrays"]
    elif spec["arrays"] == "nan":
        poisoned = {k: v.copy() for k, v in strategy.server.weights.items()}
        poisoned["fc.bias"][0] = np.nan
        reply.content["arrays"] = encode_arrayrecord(_record(poisoned), masks=strategy.masks, reference=strategy.masks)
    elif spec["arrays"] == "extra-record":
        reply.content["extra"] = _record({"z": np.ones(3, np.float32)})
    if spec["config_record"]:
        reply.content["config"] = ConfigRecord({"anything": "goes"})
    weight = data.get("num-examples")
    values_ok = all(all(map(_is_number, v)) if isinstance(v, list) else _is_number(v) for v in data.values())
    bad = (spec["metric_records"] != 1 or spec["arrays"] in ("missing", "nan") or not values_ok
           or not (_is_number(weight) and 0 < weight <= MAX_WEIGHT))
    return reply, bad


@settings(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(specs=st.lists(_REPLY, min_size=3, max_size=3))
def test_any_reply_is_aggregated_or_dropped_and_a_round_completes_or_changes_nothing(task_identity, specs):
    strategy, app, contexts = _past_round_one(nodes=(1, 2, 3))
    messages = sorted(strategy.configure_train(2, _record(_model()), ConfigRecord({}), _GridOf([1, 2, 3])),
                      key=lambda m: m.metadata.dst_node_id)
    replies, bad = [], set()
    for m, spec in zip(messages, specs):
        if spec["error"]:
            replies.append(Message(Error(code=1, reason="client failed"), reply_to=m))
            continue
        reply, is_bad = _apply(app(m, contexts[m.metadata.dst_node_id]), spec, strategy)
        replies.append(reply)
        if is_bad:
            bad.add(m.metadata.dst_node_id)
    state, rejected = _server_state(strategy), strategy.rejected
    arrays, metrics = strategy.aggregate_train(2, replies)  # never raises
    seen = strategy.rounds[-1]
    event(f"{len(seen['aggregated'])} aggregated, {len(seen['rejected'])} rejected")  # --hypothesis-show-statistics
    assert sorted(seen["aggregated"] + seen["rejected"] + seen["failed"] + seen["missing"]) == [1, 2, 3]
    assert seen["failed"] == [n for n, spec in zip((1, 2, 3), specs) if spec["error"]]
    assert bad <= set(seen["rejected"])  # every bad reply is dropped and counted
    for node in set(seen["rejected"]) - bad:  # a good reply only for metrics unlike the round's others
        assert "differ from the round's" in strategy.reasons[-1][node]
    assert strategy.rejected == rejected + len(seen["rejected"]) == rejected + metrics["feddip-rejected"]
    assert set(strategy.reasons[-1]) == set(seen["rejected"])
    if arrays is None:  # the round did not happen
        assert not seen["aggregated"]
        _assert_state_is(strategy, state)
    else:
        assert seen["aggregated"] and strategy.server.round == state[0] + 1
        assert all(np.isfinite(a.numpy()).all() for a in arrays.values())
        # What was aggregated passes flwr's own FedAvg checks on metrics.
        kept = [r.content for r in replies if r.metadata.src_node_id in seen["aggregated"]]
        validate_message_reply_consistency(kept, "num-examples", check_arrayrecord=False)
