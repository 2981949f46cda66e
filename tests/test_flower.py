"""Flower integration, in process: the mod inside a real flwr ClientApp and the FedDIP strategy
driving it for a few rounds through Flower's Message objects (no network)."""

import numpy as np
import pytest

flwr = pytest.importorskip("flwr")

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402

import feddip_kernels as fk  # noqa: E402
from feddip_kernels.flower import (  # noqa: E402
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
        seen.append({k: a.numpy().copy() for k, a in arrays.items()})
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
    strategy = FedDIP(num_rounds=rounds, s0=0.5, sp=0.9, values=values, min_available_nodes=2, min_train_nodes=2)
    seen = []
    app = _client_app(seen)
    contexts = {n: Context(run_id=1, node_id=n, node_config={}, state=RecordDict(), run_config={}) for n in (1, 2)}
    arrays = _record(_model())
    dense_bytes = arrays.count_bytes()
    for rnd in range(1, rounds + 1):
        messages = list(strategy.configure_train(rnd, arrays, ConfigRecord({}), _Grid()))
        assert len(messages) == 2 and all(is_encoded(m.content["arrays"]) for m in messages)
        replies = []
        for m in messages:
            reply = app(m, contexts[m.metadata.dst_node_id])
            assert is_encoded(reply.content["arrays"])
            assert encoded_size(reply.content["arrays"]) < dense_bytes / 1.5
            # The reply carries values in the codec the strategy asked for: fp16 values are exactly
            # representable in half precision, raw (trained) ones are not.
            sent = decode_arrayrecord(reply.content["arrays"], reference=strategy.masks)[0]
            in_half = all(np.array_equal(a.numpy(), a.numpy().astype(np.float16).astype(np.float32))
                          for a in sent.values())
            assert in_half == (values == "fp16")
            replies.append(reply)
        arrays, metrics = strategy.aggregate_train(rnd, replies)
        got = {k: a.numpy() for k, a in arrays.items()}
        prunable = ["conv.weight", "fc.weight"]
        zeros = sum(int((got[k] == 0).sum()) for k in prunable) / sum(got[k].size for k in prunable)
        expected = fk.sparsity_schedule(rnd, rounds, 0.5, 0.9)
        assert zeros == pytest.approx(expected, abs=2e-3)
        assert np.count_nonzero(got["fc.bias"]) == 10  # biases are never pruned: trained values all came back
    # What the clients received was the pruned global model; the bytes shrink with the sparsity.
    assert strategy.bytes_down > 0 and strategy.bytes_up > 0
    assert strategy.bytes_up < 3 * 2 * dense_bytes / 2


def test_strategy_validates_its_settings():
    with pytest.raises(ValueError, match="mask_every"):
        FedDIP(num_rounds=3, mask_every=0)
    with pytest.raises(ValueError, match="num_rounds"):
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
