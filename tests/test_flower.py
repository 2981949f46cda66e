"""Flower integration, in process: the mod inside a real flwr ClientApp and the FedDIP strategy
driving it for a few rounds through Flower's Message objects (no network)."""

import numpy as np
import pytest

flwr = pytest.importorskip("flwr")

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402

import feddip_kernels as fk  # noqa: E402
from feddip_kernels.integrations.flower import (  # noqa: E402
    MASKS_RECORD,
    FedDIP,
    decode_arrayrecord,
    encode_arrayrecord,
    encoded_size,
    feddip_mod,
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
        content = RecordDict({"arrays": _record(trained), "metrics": MetricRecord({"num-examples": 10 * context.node_id})})
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
    assert strategy.bytes_down > 0


class _GridOf:
    run = None

    def __init__(self, nodes):
        self.nodes = list(nodes)

    def get_node_ids(self):
        return self.nodes


def test_flower_strategy_and_simulate_give_the_same_global_models(task_identity):
    # One server-side implementation: the Flower strategy with clients that train as `feddip
    # simulate`'s do gets the simulation's global model, bit for bit, round for round.
    pytest.importorskip("torch")
    import dataclasses

    import torch

    from feddip_kernels.fl import iid_partition, make_model, synthetic_dataset
    from feddip_kernels.fl.data import Dataset
    from feddip_kernels.fl.simulation import SimulationConfig, _float_state, _train_client, run_simulation
    from feddip_kernels.integrations.flower import LAMBDA_KEY, LR_KEY, ROUND_KEY
    from feddip_kernels.server import seed_for

    train, test = synthetic_dataset(300, 60, seed=0)
    parts = iid_partition(len(train), 3, seed=0)
    shards = [Dataset(train.x[p], train.y[p]) for p in parts]
    cfg = SimulationConfig(algorithm="feddip", clients=3, clients_per_round=None, rounds=3, horizon=3, local_epochs=1,
                           batch_size=32, lr=0.05, s0=0.5, sp=0.9, mask_every=1, weighting="samples", seed=5)
    expected = [run_simulation(dataclasses.replace(cfg, rounds=r), train, test, parts).weights for r in (1, 2, 3)]

    app = ClientApp(mods=[feddip_mod])

    @app.train()
    def train_fn(msg: Message, context: Context) -> Message:
        c = int(context.node_config["partition-id"])
        config = msg.content["config"]
        t = int(config[ROUND_KEY])
        assert config[LR_KEY] == cfg.schedule.learning_rate(t) and config[LAMBDA_KEY] == cfg.schedule.lam(t)
        weights = {k: a.numpy() for k, a in msg.content["arrays"].items()}
        masks = {k: a.numpy().astype(bool) for k, a in msg.content[MASKS_RECORD].items()}
        local = _train_client(cfg, make_model(cfg.model, 1, 10), weights, masks, shards[c], t, c)
        content = RecordDict({"arrays": _record({k: v.numpy() for k, v in local.items()}), "metrics": MetricRecord({"num-examples": len(shards[c])})})
        return Message(content=content, reply_to=msg)

    torch.manual_seed(seed_for(cfg.seed, 0))
    arrays = _record({k: v.numpy().copy() for k, v in _float_state(make_model(cfg.model, 1, 10)).items()})
    strategy = FedDIP(num_rounds=3, s0=0.5, sp=0.9, mask_every=1, horizon=3, lr=0.05, seed=5, weighting="samples",
                      min_available_nodes=3, min_train_nodes=3)
    contexts = {n: Context(run_id=1, node_id=n, node_config={"partition-id": n - 1}, state=RecordDict(), run_config={})
                for n in (1, 2, 3)}
    for rnd in (1, 2, 3):
        messages = list(strategy.configure_train(rnd, arrays, ConfigRecord({}), _GridOf([1, 2, 3])))
        replies = [app(m, contexts[m.metadata.dst_node_id]) for m in reversed(messages)]  # any order
        arrays, _ = strategy.aggregate_train(rnd, replies)
        for k, v in expected[rnd - 1].items():
            assert arrays[k].numpy().tobytes() == v.tobytes(), (rnd, k)


def test_reply_outside_the_global_mask_is_rejected(task_identity):
    strategy = FedDIP(num_rounds=3, s0=0.5, sp=0.9, mask_every=1, min_available_nodes=2, min_train_nodes=1)
    strategy.aggregate_train(1, _one_round(strategy))  # round 1 makes the global mask
    messages = list(strategy.configure_train(2, _record(_model()), ConfigRecord({}), _Grid()))
    dense = encode_arrayrecord(_record(_model(3)))  # positions everywhere, not relative to the mask
    replies = [Message(content=RecordDict({"arrays": dense, "metrics": MetricRecord({"num-examples": 10})}),
                       reply_to=m) for m in messages]
    arrays, metrics = strategy.aggregate_train(2, replies)
    assert arrays is None and metrics["feddip-rejected"] == 2
