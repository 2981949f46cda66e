"""Compression for any Flower app, in process: `Compressed` around flwr's own strategies (FedAvg,
FedProx, FedAdam, FedAvgM, the DP wrappers) driving a real ClientApp with `sparse_update_mod`
through Flower's Message objects and a fake Grid (no network)."""

import numpy as np
import pytest

flwr = pytest.importorskip("flwr")

from flwr.app import (  # noqa: E402
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.clientapp.mod import LocalDpMod, fixedclipping_mod  # noqa: E402
from flwr.serverapp.strategy import (  # noqa: E402
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedProx,
    Strategy,
)
from flwr.supercore.differential_privacy import compute_clip_model_update  # noqa: E402

import feddip_kernels as fk  # noqa: E402
from feddip_kernels.integrations.flower_compress import (  # noqa: E402
    CONFIG_RECORD,
    DELTA_STYPE,
    STYPE,
    UPDATE_STYPE,
    Compressed,
    is_compressed,
    make_sparse_update_mod,
    sparse_update_mod,
)

NODES = (1, 2, 3)


@pytest.fixture(autouse=True)
def task_identity():
    # Outside a deployment nothing sets the process's task identity, which Message creation reads.
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


def _model(seed=0, floats_only=False):
    rng = np.random.default_rng(seed)
    model = {
        "conv.weight": rng.standard_normal((8, 4, 3, 3)).astype(np.float32),
        "fc.weight": rng.standard_normal((10, 60)).astype(np.float32),
        "fc.bias": np.array([-0.0, 0.0, 1.5, -2.0, 0, 0, 0, 0, 0, 0], np.float32),  # signed zeros travel too
        "scale": rng.standard_normal(7),  # float64
    }
    if not floats_only:
        model["steps"] = np.array(0, np.int64)  # as a BatchNorm's num_batches_tracked: not sparsified
    return model


def _record(arrays):
    return ArrayRecord(array_dict={k: Array(np.asarray(v)) for k, v in arrays.items()})


def _numpy(record):
    return {k: a.numpy() for k, a in record.items()}


def _train(arrays, node, rnd, mu=0.0):
    """A deterministic local 'training': the same inputs give the same bits."""
    rng = np.random.default_rng([node, rnd])
    out = {}
    for k, a in arrays.items():
        if a.dtype.kind == "f":
            step = (rng.standard_normal(a.shape) * (0.05 / (1.0 + mu))).astype(a.dtype)
            out[k] = a if k == "fc.bias" and node == 3 else a - step  # node 3 leaves its bias as it got it
        else:
            out[k] = a + 1
    return out


def _app(mods, fail=lambda node, rnd: False, seen=None):
    app = ClientApp(mods=mods)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        assert set(msg.content.keys()) == {"arrays", "config"}  # as the strategy built it: no "compress" record
        config = msg.content["config"]
        rnd = int(config["server-round"])
        if fail(context.node_id, rnd):
            raise RuntimeError("this node fails this round")
        arrays = _numpy(msg.content["arrays"])
        if seen is not None:
            seen.append((context.node_id, rnd, arrays))
        trained = _train(arrays, context.node_id, rnd, float(config.get("proximal-mu", 0.0)))
        metrics = MetricRecord({"num-examples": 10 * context.node_id, "loss": 1.0 / rnd + context.node_id})
        return Message(content=RecordDict({"arrays": _record(trained), "metrics": metrics}), reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        arrays = _numpy(msg.content["arrays"])
        accuracy = float(sum(float(np.abs(a).sum()) for a in arrays.values() if a.dtype.kind == "f"))
        metrics = MetricRecord({"num-examples": 5, "accuracy": accuracy})
        return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)

    return app


class _Grid:
    """The part of flwr's Grid that Strategy.start and the strategies use: every message goes
    through the ClientApp (in node order), an exception becomes an error reply as in a deployment."""

    run = None

    def __init__(self, app, nodes=NODES, drop=()):
        self.app = app
        self.nodes = list(nodes)
        self.drop = set(drop)  # nodes whose replies never come back
        self.contexts = {n: Context(run_id=1, node_id=n, node_config={}, state=RecordDict(), run_config={})
                         for n in self.nodes}
        self.sent = []  # every message sent, in order

    def get_node_ids(self):
        return list(self.nodes)

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for m in sorted(messages, key=lambda m: m.metadata.dst_node_id):
            self.sent.append(m)
            node = m.metadata.dst_node_id
            try:
                reply = self.app(m, self.contexts[node])
            except Exception as e:  # as flwr's runtime: an error reply
                reply = Message(Error(code=1, reason=f"{type(e).__name__}: {e}"), reply_to=m)
            if node not in self.drop:
                replies.append(reply)
        return replies


def _bits(record):
    return {k: (a.dtype, tuple(a.shape), a.numpy().tobytes()) for k, a in record.items()}


STRATEGIES = {
    "FedAvg": lambda: FedAvg(min_available_nodes=3, min_train_nodes=3, min_evaluate_nodes=3),
    "FedProx": lambda: FedProx(min_available_nodes=3, min_train_nodes=3, min_evaluate_nodes=3, proximal_mu=0.5),
    "FedAdam": lambda: FedAdam(min_available_nodes=3, min_train_nodes=3, min_evaluate_nodes=3, eta=0.05),
    "FedAvgM": lambda: FedAvgM(min_available_nodes=3, min_train_nodes=3, min_evaluate_nodes=3, server_momentum=0.9),
}


def _start(strategy, app, rounds=3):
    """Strategy.start through the fake grid; the global model after every round."""
    models = []

    def record(rnd, arrays):
        models.append(_bits(arrays))

    result = strategy.start(grid=_Grid(app), initial_arrays=_record(_model()), num_rounds=rounds, evaluate_fn=record)
    return models, result


@pytest.mark.parametrize("values", ["raw", "auto"])
@pytest.mark.parametrize("name", list(STRATEGIES))
def test_lossless_compression_is_bit_for_bit_the_unwrapped_strategy(name, values):
    make = STRATEGIES[name]
    expected, plain = _start(make(), _app([]))
    wrapped = Compressed(make(), values=values, downlink_values=values)
    got, result = _start(wrapped, _app([sparse_update_mod]))
    assert got == expected  # every round's global model, bit for bit (Compressed.start is flwr's)
    for rnd in (1, 2, 3):
        train = result.train_metrics_clientapp[rnd]
        assert {k: v for k, v in train.items() if not k.startswith("compress-")} == plain.train_metrics_clientapp[rnd]
        assert train["compress-aggregated"] == 3 and train["compress-rejected"] == 0
        assert train["compress-bytes-down"] > 0 and train["compress-bytes-up"] > 0
        assert result.evaluate_metrics_clientapp[rnd] == plain.evaluate_metrics_clientapp[rnd]
    assert wrapped.bytes_down > 0 and wrapped.bytes_up > 0 and wrapped.bytes_evaluate > 0 and wrapped.rejected == 0
    if name == "FedProx":
        assert wrapped.proximal_mu == 0.5  # the wrapped strategy's attributes, through the wrapper


def _decoded(reply, sent, message):
    """`reply` (to `message`) as the wrapped strategy should get it, decoded here from its bytes:
    the trained model, or the model sent plus the decoded update."""
    ((key, record),) = reply.content.array_records.items()
    array = record["feddip"]
    decoded = fk.decode_model(array.data).tensors
    if array.stype == UPDATE_STYPE:
        decoded = {k: sent[k] + d if d.dtype.kind == "f" else d for k, d in decoded.items()}
    content = RecordDict({key: _record(decoded), **dict(reply.content.metric_records.items())})
    return Message(content=content, reply_to=message)


def _run_against_reference(wrapped, reference, app, rounds=4, floats_only=False, check=None):
    """Run `wrapped` for some rounds through the ClientApp; every round, run `reference` (a fresh
    copy of the wrapped strategy) on the replies decoded here, and compare the global models bit
    for bit. Returns the grid."""
    grid = _Grid(app)
    arrays = _record(_model(floats_only=floats_only))
    for rnd in range(1, rounds + 1):
        sent = _numpy(arrays)
        messages = list(wrapped.configure_train(rnd, arrays, ConfigRecord({}), grid))
        assert all(is_compressed(m.content["arrays"]) and CONFIG_RECORD in m.content for m in messages)
        list(reference.configure_train(rnd, arrays, ConfigRecord({}), grid))  # FedAdam, FedAvgM keep the model
        to = {m.metadata.dst_node_id: m for m in messages}
        replies = grid.send_and_receive(messages)
        assert all(not r.has_error() for r in replies), [r.error.reason for r in replies if r.has_error()]
        expected_replies = [_decoded(r, sent, to[r.metadata.src_node_id]) for r in replies]
        if check is not None:
            check(rnd, sent, replies, grid)
        got, metrics = wrapped.aggregate_train(rnd, replies)
        expected, _ = reference.aggregate_train(rnd, expected_replies)
        assert _bits(got) == _bits(expected)
        assert metrics["compress-aggregated"] == 3 and metrics["compress-rejected"] == 0
        arrays = got
    return grid


def _top_k(x, density):
    """Global top-k by magnitude over float tensors, here with NumPy alone (ties: first in order)."""
    names = list(x)
    flat = np.concatenate([np.abs(x[k]).astype(np.float64).ravel() for k in names])
    keep = np.zeros(flat.size, bool)
    keep[np.argsort(-flat, kind="stable")[: fk.k_for_density(flat.size, density)]] = True
    out, at = {}, 0
    for k in names:
        out[k] = keep[at : at + x[k].size].reshape(x[k].shape)
        at += x[k].size
    return out


@pytest.mark.parametrize("values", ["raw", "ans"])
@pytest.mark.parametrize("name", list(STRATEGIES))
def test_sparse_updates_with_error_feedback(name, values):
    """density 0.1 with error feedback: the global model is the wrapped strategy's on the decoded
    updates, bit for bit; and each node's update and residual are those computed here
    independently (top-k of update + residual, residual = what was not sent)."""
    make = STRATEGIES[name]
    residuals = {n: None for n in NODES}
    mu = 0.5 if name == "FedProx" else 0.0

    def check(rnd, sent, replies, grid):
        for reply in replies:
            node = reply.metadata.src_node_id
            array = reply.content["arrays"]["feddip"]
            assert array.stype == UPDATE_STYPE
            trained = _train(sent, node, rnd, mu)
            floats = [k for k in sent if sent[k].dtype.kind == "f"]
            x = {k: np.subtract(trained[k], sent[k]) for k in floats}
            if residuals[node] is not None:
                old = residuals[node]  # a tensor that became float64 (FedAdam) keeps its residual, as float64
                x = {k: x[k] + old[k].astype(x[k].dtype) if k in old else x[k] for k in floats}
            mask = _top_k(x, 0.1)
            update = fk.decode_model(array.data).tensors
            for k in floats:
                np.testing.assert_array_equal(update[k], np.where(mask[k], x[k], 0))
            for k in set(sent) - set(floats):  # other dtypes: their value, whole (FedAvg turns ints into float64)
                assert update[k] == trained[k]
            residuals[node] = {k: x[k] - update[k] for k in floats}
            state = _numpy(grid.contexts[node].state["compress.residual"])
            assert _bits(_record(state)) == _bits(_record(residuals[node]))

    _run_against_reference(Compressed(make(), density=0.1, values=values), make(), _app([sparse_update_mod]),
                           check=check)


@pytest.mark.parametrize("values", ["int8-ans", "fp16", "int4-ans"])
def test_lossy_updates_aggregate_as_decoded(values):
    wrapped = Compressed(FedAvg(min_available_nodes=3, min_train_nodes=3), density=0.25, values=values)
    seen = []

    def check(rnd, sent, replies, grid):
        dense = sum(a.nbytes for a in sent.values())
        for reply in replies:
            assert reply.content["arrays"]["feddip"].stype == UPDATE_STYPE
            assert len(reply.content["arrays"]["feddip"].data) < dense / 3
            seen.append(reply.metadata.src_node_id)

    _run_against_reference(wrapped, FedAvg(min_available_nodes=3, min_train_nodes=3), _app([sparse_update_mod]),
                           check=check)
    assert len(seen) == 12


def test_lossy_values_without_sparsification_send_updates():
    """No density but a lossy codec: the update (with the quantisation error carried over) is sent."""
    wrapped = Compressed(FedAvg(min_available_nodes=3, min_train_nodes=3), values="int8-ans")
    grid = _run_against_reference(wrapped, FedAvg(min_available_nodes=3, min_train_nodes=3),
                                  _app([sparse_update_mod]), rounds=2)
    residual = _numpy(grid.contexts[1].state["compress.residual"])
    assert 0 < max(float(np.abs(r).max()) for r in residual.values()) < 1e-3


def test_the_mod_settings_override_the_servers():
    app = _app([make_sparse_update_mod(density=0.02, values="fp16", error_feedback=False)])

    def check(rnd, sent, replies, grid):
        n = sum(a.size for a in sent.values() if a.dtype.kind == "f")
        for reply in replies:
            update = fk.decode_model(reply.content["arrays"]["feddip"].data)
            assert sum(int(m.sum()) for m in update.masks.values()) == fk.k_for_density(n, 0.02)
            assert "compress.residual" not in grid.contexts[reply.metadata.src_node_id].state

    _run_against_reference(Compressed(FedAvg(min_available_nodes=3, min_train_nodes=3)),
                           FedAvg(min_available_nodes=3, min_train_nodes=3), app, rounds=2, check=check)


def _round(strategy, app, nodes, drop=()):
    grid = _Grid(app, nodes=nodes, drop=drop)
    messages = list(strategy.configure_train(1, _record(_model()), ConfigRecord({}), grid))
    return grid, messages, grid.send_and_receive(messages)


def _coded(tensors, stype):
    payload = fk.encode_model(tensors)
    return ArrayRecord(array_dict={"feddip": Array(dtype="uint8", shape=(len(payload),), stype=stype, data=payload)})


def test_bad_replies_are_dropped_and_counted():
    nodes = list(range(1, 11))
    make = lambda: FedAvg(min_available_nodes=10, min_train_nodes=10)  # noqa: E731
    strategy = Compressed(make(), density=0.5)
    _, messages, replies = _round(strategy, _app([sparse_update_mod], fail=lambda n, r: n == 8), nodes, drop=[9])
    model = _model()
    by_node = {r.metadata.src_node_id: r for r in replies}
    data = bytearray(by_node[2].content["arrays"]["feddip"].data)
    data[len(data) // 2] ^= 0x10  # corrupt bytes
    by_node[2].content["arrays"] = ArrayRecord(array_dict={
        "feddip": Array(dtype="uint8", shape=(len(data),), stype=UPDATE_STYPE, data=bytes(data))})
    wrong = dict(model, **{"fc.weight": np.zeros((10, 61), np.float32)})
    by_node[3].content["arrays"] = _coded(wrong, UPDATE_STYPE)  # another model's shapes
    nan = {k: np.zeros_like(v) for k, v in model.items()}
    nan["scale"][3] = np.nan
    by_node[4].content["arrays"] = _coded(nan, UPDATE_STYPE)  # a NaN in its update
    del by_node[5].content["metrics"]  # no metrics
    by_node[6].content["arrays"] = _record(model)  # not compressed
    by_node[7].content["metrics"] = MetricRecord({"num-examples": 0, "loss": 1.0})  # weight 0
    by_node[10].content["metrics"] = MetricRecord({"num-examples": 100, "accuracy": 1.0})  # other keys
    to_1 = next(m for m in messages if m.metadata.dst_node_id == 1)
    good = _decoded(by_node[1], model, to_1)  # node 1's, as the wrapped strategy should get it
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert (metrics["compress-aggregated"], metrics["compress-rejected"], metrics["compress-failed"],
            metrics["compress-missing"]) == (1, 7, 1, 1)
    assert strategy.rounds[-1] == {"aggregated": [1], "rejected": [2, 3, 4, 5, 6, 7, 10], "failed": [8],
                                   "missing": [9]}
    reasons = strategy.reasons[-1]
    assert "checksum" in reasons[2] and "non-finite" in reasons[4] and "MetricRecords" in reasons[5]
    assert "not compressed" in reasons[6] and "num-examples" in reasons[7] and "differ" in reasons[10]
    assert strategy.rejected == 7
    # The same as flwr's FedAvg on node 1's reply alone.
    alone = make()
    alone.configure_train(1, _record(model), ConfigRecord({}), _Grid(_app([]), nodes=nodes))
    expected, _ = alone.aggregate_train(1, [good])
    assert _bits(arrays) == _bits(expected)


def test_a_round_with_no_usable_reply_returns_the_counts():
    strategy = Compressed(FedAvg(min_available_nodes=3, min_train_nodes=3))
    _, _, replies = _round(strategy, _app([sparse_update_mod]), NODES)
    for r in replies:
        r.content["arrays"] = _record(_model())  # none compressed
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert arrays is None and metrics["compress-rejected"] == 3 and metrics["compress-aggregated"] == 0


def test_replies_from_strangers_or_twice_are_dropped():
    make = lambda: Compressed(FedAvg(min_available_nodes=3, min_train_nodes=3))  # noqa: E731
    strategy = make()
    _, _, replies = _round(strategy, _app([sparse_update_mod]), NODES)
    _, _, more = _round(Compressed(FedAvg(min_available_nodes=4, min_train_nodes=4)), _app([sparse_update_mod]),
                        (1, 2, 3, 4))
    stranger = [r for r in more if r.metadata.src_node_id == 4]  # node 4 was sent nothing
    arrays, metrics = strategy.aggregate_train(1, [*replies, replies[0], *stranger])
    assert metrics["compress-aggregated"] == 3 and metrics["compress-rejected"] == 2
    assert sorted(strategy.reasons[-1]) == [1, 4] and "no training message" in strategy.reasons[-1][4]
    reference = make()
    expected, _ = reference.aggregate_train(1, _round(reference, _app([sparse_update_mod]), NODES)[2])
    assert _bits(arrays) == _bits(expected)


def test_lossy_downlink_sends_differences_to_what_each_node_holds():
    """Lossy models down: the whole model at first contact, then the difference to the model the node
    holds (its copy checked by CRC-32C); a node whose reply failed, or that lost its state, gets the
    whole model again; what nodes hold stays within the codec's error of the global model."""
    seen = []
    fail = lambda node, rnd: node == 2 and rnd == 2  # noqa: E731
    app = _app([sparse_update_mod], fail=fail, seen=seen)
    strategy = Compressed(FedAvg(min_available_nodes=3, min_train_nodes=3), density=0.2, values="int8-ans",
                          downlink_values="fp16-ans")
    grid = _Grid(app)
    arrays = _record(_model())
    stypes = []
    for rnd in range(1, 6):
        if rnd == 4:
            grid.contexts[3].state = RecordDict()  # node 3 lost its state
        messages = list(strategy.configure_train(rnd, arrays, ConfigRecord({}), grid))
        stypes.append({m.metadata.dst_node_id: m.content["arrays"]["feddip"].stype for m in messages})
        replies = grid.send_and_receive(messages)
        global_model = _numpy(arrays)
        for got in [g for _, r, g in seen if r == rnd]:
            for k, a in got.items():
                if a.dtype.kind == "f":  # fp16 precision, not accumulating over rounds
                    np.testing.assert_allclose(a, global_model[k], rtol=1e-3, atol=1e-4)
                else:
                    assert a == global_model[k]
        new, metrics = strategy.aggregate_train(rnd, replies)
        arrays = new
        if rnd == 2:
            assert metrics["compress-failed"] == 1
        if rnd == 4:
            assert metrics["compress-failed"] == 1  # node 3: a difference to a model it no longer holds
    F, D = STYPE, DELTA_STYPE
    # Round 2: whole again, flwr's FedAvg having turned "steps" (int64) into float64; round 3: node 2,
    # whose reply failed; round 5: node 3, which had lost its state.
    assert stypes == [{1: F, 2: F, 3: F}, {1: F, 2: F, 3: F}, {1: D, 2: F, 3: D}, {1: D, 2: D, 3: D},
                      {1: D, 2: D, 3: F}]
    dense = sum(a.nbytes for a in _model().values()) * 3 * 5
    assert strategy.bytes_down < 0.6 * dense


def test_evaluation_messages_carry_the_model_losslessly():
    strategy = Compressed(FedAvg(min_available_nodes=3, min_evaluate_nodes=3), downlink_values="int8-ans")
    seen = []
    app = ClientApp(mods=[sparse_update_mod])

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        seen.append(_numpy(msg.content["arrays"]))
        return Message(content=RecordDict({"metrics": MetricRecord({"num-examples": 1, "x": 1.0})}), reply_to=msg)

    model = _model()
    grid = _Grid(app)
    messages = list(strategy.configure_evaluate(1, _record(model), ConfigRecord({}), grid))
    assert all(m.content["arrays"]["feddip"].stype == STYPE for m in messages)
    metrics = strategy.aggregate_evaluate(1, grid.send_and_receive(messages))
    assert metrics["x"] == 1.0 and len(seen) == 3 and strategy.bytes_evaluate > 0 and strategy.bytes_down == 0
    for got in seen:
        assert _bits(_record(got)) == _bits(_record(model))
    assert all("compress.held" not in c.state for c in grid.contexts.values())


def test_the_mod_passes_other_messages_through():
    """Messages of a strategy without the wrapper (or SecAgg+'s stages) carry no compressed model:
    the mod hands them on, and their replies back, untouched."""
    strategy = FedAvg(min_available_nodes=3, min_train_nodes=3)
    messages = list(strategy.configure_train(1, _record(_model()), ConfigRecord({}), _Grid(_app([]))))
    plain = _Grid(_app([])).send_and_receive(messages)
    modded = _Grid(_app([sparse_update_mod])).send_and_receive(messages)
    for a, b in zip(plain, modded):
        assert not is_compressed(b.content["arrays"])
        assert _bits(a.content["arrays"]) == _bits(b.content["arrays"])


def _dp_client_side(noise=0.0):
    return DifferentialPrivacyClientSideFixedClipping(FedAvg(min_available_nodes=3, min_train_nodes=3),
                                                      noise_multiplier=noise, clipping_norm=0.5, num_sampled_clients=3)


def test_dp_client_side_fixed_clipping_composes_without_error_feedback():
    """mods=[sparse_update_mod, fixedclipping_mod]: clipping sees the plain model and update, the
    mod sparsifies the clipped update: what is sent is top-k of it, its norm within the clipping
    norm; the aggregate is the DP wrapper's on the decoded replies."""

    def check(rnd, sent, replies, grid):
        for reply in replies:
            node = reply.metadata.src_node_id
            trained = _train(sent, node, rnd)
            names = list(sent)
            clipped = [trained[k] for k in names]
            compute_clip_model_update(clipped, [sent[k] for k in names], 0.5)
            x = {k: np.subtract(c, sent[k]) for k, c in zip(names, clipped)}
            mask = _top_k(x, 0.1)
            update = fk.decode_model(reply.content["arrays"]["feddip"].data).tensors
            for k in names:
                np.testing.assert_array_equal(update[k], np.where(mask[k], x[k], 0))
            norm = np.sqrt(sum(float(np.sum(np.square(u, dtype=np.float64))) for u in update.values()))
            assert norm <= 0.5 * (1 + 1e-6)

    strategy = Compressed(_dp_client_side(), density=0.1, error_feedback=False, values="raw")
    _run_against_reference(strategy, _dp_client_side(), _app([sparse_update_mod, fixedclipping_mod]),
                           floats_only=True, check=check)


def test_dp_client_side_clipping_refuses_error_feedback():
    with pytest.raises(ValueError, match="error feedback"):
        Compressed(_dp_client_side(), density=0.1)
    # A mod that asks for it itself fails on the node (an error reply, counted as failed).
    strategy = Compressed(_dp_client_side(), density=0.1, error_feedback=False)
    app = _app([make_sparse_update_mod(error_feedback=True), fixedclipping_mod])
    grid = _Grid(app)
    messages = list(strategy.configure_train(1, _record(_model(floats_only=True)), ConfigRecord({}), grid))
    replies = grid.send_and_receive(messages)
    assert all(r.has_error() and "clipping" in r.error.reason for r in replies)
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert arrays is None and metrics["compress-failed"] == 3


def test_dp_mods_in_the_wrong_order_fail_loudly():
    """mods=[fixedclipping_mod, sparse_update_mod] would clip the coded bytes: fixedclipping_mod
    refuses the message (two ConfigRecords), every node replies with an error."""
    strategy = Compressed(_dp_client_side(), density=0.1, error_feedback=False)
    grid = _Grid(_app([fixedclipping_mod, sparse_update_mod]))
    messages = list(strategy.configure_train(1, _record(_model(floats_only=True)), ConfigRecord({}), grid))
    replies = grid.send_and_receive(messages)
    assert all(r.has_error() and "ConfigRecord" in r.error.reason for r in replies)


def test_dp_server_side_fixed_clipping_composes_with_error_feedback():
    def dp():
        return DifferentialPrivacyServerSideFixedClipping(FedAvg(min_available_nodes=3, min_train_nodes=3),
                                                          noise_multiplier=0.0, clipping_norm=0.5,
                                                          num_sampled_clients=3)

    _run_against_reference(Compressed(dp(), density=0.1), dp(), _app([sparse_update_mod]), floats_only=True)


def test_local_dp_mod_composes():
    """mods=[sparse_update_mod, LocalDpMod(...)]: the node clips and noises its model, the mod
    sparsifies the noised update (post-processing: error feedback keeps local DP)."""
    np.random.seed(0)
    local = LocalDpMod(clipping_norm=1.0, sensitivity=1.0, epsilon=10.0, delta=1e-5)
    strategy = Compressed(FedAvg(min_available_nodes=3, min_train_nodes=3), density=0.1)
    grid = _Grid(_app([sparse_update_mod, local]))
    arrays = _record(_model(floats_only=True))
    for rnd in (1, 2):
        replies = grid.send_and_receive(list(strategy.configure_train(rnd, arrays, ConfigRecord({}), grid)))
        arrays, metrics = strategy.aggregate_train(rnd, replies)
        assert metrics["compress-aggregated"] == 3


def test_settings_and_run_config():
    with pytest.raises(ValueError, match="density"):
        Compressed(FedAvg(), density=0.0)
    with pytest.raises(ValueError, match="density"):
        Compressed(FedAvg(), density=1.5)
    with pytest.raises(ValueError, match="values"):
        Compressed(FedAvg(), values="fp8")
    with pytest.raises(ValueError, match="downlink_values"):
        Compressed(FedAvg(), downlink_values="fp8")
    with pytest.raises(TypeError, match="Strategy"):
        Compressed(object())
    with pytest.raises(ValueError, match="density"):
        make_sparse_update_mod(density=-1)
    assert Compressed(FedAvg(), density=1.0).density is None  # keeps everything: no sparsification
    strategy = Compressed.from_run_config(FedAvg(), {"compress-density": 0.05, "compress-values": "int8-ans",
                                                     "compress-error-feedback": False, "lr": 0.1})
    assert (strategy.density, strategy.values, strategy.error_feedback, strategy.downlink_values) == (
        0.05, "int8-ans", False, "auto")
    with pytest.raises(ValueError, match="compress-densty"):
        Compressed.from_run_config(FedAvg(), {"compress-densty": 0.05})
    assert repr(Compressed(FedAvg())).startswith("Compressed(")


def test_a_model_with_an_array_named_feddip_is_refused():
    strategy = Compressed(FedAvg(min_available_nodes=3, min_train_nodes=3))
    with pytest.raises(ValueError, match="reserved"):
        strategy.configure_train(1, _record({"feddip": np.zeros(3, np.float32)}), ConfigRecord({}), _Grid(_app([])))


class _SpyFedAvg(FedAvg):
    """flwr's FedAvg, keeping the replies each aggregation is handed."""

    def __init__(self, nodes):
        super().__init__(min_available_nodes=nodes, min_train_nodes=nodes, min_evaluate_nodes=nodes)
        self.handed = []

    def aggregate_train(self, server_round, replies):
        self.handed.append(list(replies))
        return super().aggregate_train(server_round, self.handed[-1])

    def aggregate_evaluate(self, server_round, replies):
        self.handed.append(list(replies))
        return super().aggregate_evaluate(server_round, self.handed[-1])


def _reply(message, arrays, metrics=None):
    metrics = MetricRecord(metrics or {"num-examples": 10})
    return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=message)


def test_non_finite_float16_and_complex_values_are_refused():
    """float16 and complex tensors travel whole: a NaN or inf in them is refused as in float32."""
    model = {"w": np.ones((4, 5), np.float32), "h": np.ones(3, np.float16), "c": np.ones(2, np.complex64)}
    strategy = Compressed(_SpyFedAvg(3))
    messages = list(strategy.configure_train(1, _record(model), ConfigRecord({}), _Grid(_app([]))))

    def update(**bad):
        tensors = {"w": np.zeros((4, 5), np.float32), "h": np.full(3, 2, np.float16),
                   "c": np.full(2, 1 + 1j, np.complex64)}
        return _coded({**tensors, **bad}, UPDATE_STYPE)

    replies = [_reply(messages[0], update(h=np.array([1, np.nan, 1], np.float16))),
               _reply(messages[1], update(c=np.array([1, complex(np.inf, 0)], np.complex64))),
               _reply(messages[2], update())]
    arrays, metrics = strategy.aggregate_train(1, replies)
    bad = sorted(m.metadata.dst_node_id for m in messages[:2])
    assert metrics["compress-aggregated"] == 1 and strategy.rounds[-1]["rejected"] == bad
    assert all("non-finite" in strategy.reasons[-1][n] for n in bad)
    got = _numpy(arrays)
    assert (got["h"] == 2).all() and (got["c"] == 1 + 1j).all() and (got["w"] == 1).all()


@pytest.mark.skipif(np.dtype(np.longdouble).itemsize != 16, reason="needs an 80/128-bit long double")
def test_arrays_beside_the_coded_message_are_checked():
    """Arrays the codec does not carry (here a long double) travel beside the coded message: one that
    is not the array sent (length, a .npy of another dtype, garbage that np.load would refuse or
    take for pickled data) or holds NaN is dropped, not handed to FedAvg (which would raise or
    average the NaN in)."""
    nodes = (1, 2, 3, 4, 5)
    model = {"w": np.ones((4, 5), np.float32), "q": np.ones(3, np.longdouble)}
    strategy = Compressed(_SpyFedAvg(5))
    messages = list(strategy.configure_train(1, _record(model), ConfigRecord({}), _Grid(_app([]), nodes=nodes)))
    assert list(messages[0].content["arrays"]) == ["feddip", "q"]  # q travels beside, as it is
    good = Array(np.full(3, 2, np.longdouble))

    def raw(data):
        return Array(dtype=good.dtype, shape=tuple(good.shape), stype=good.stype, data=data)

    other = Array(np.ones(6, np.float64)).data  # a .npy of another dtype and shape, as long
    assert len(other) == len(good.data)
    beside = {1: Array(np.array([1, np.nan, 1], np.longdouble)), 2: raw(b"\0" * len(good.data)),
              3: raw(b"garbage"), 4: raw(other), 5: good}
    replies = []
    for m in messages:
        record = _coded({"w": np.zeros((4, 5), np.float32)}, UPDATE_STYPE)
        record["q"] = beside[m.metadata.dst_node_id]
        replies.append(_reply(m, record))
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert strategy.rounds[-1]["aggregated"] == [5] and strategy.rounds[-1]["rejected"] == [1, 2, 3, 4]
    reasons = strategy.reasons[-1]
    assert "non-finite" in reasons[1] and "'q'" in reasons[2] and "bytes" in reasons[3] and "float64" in reasons[4]
    got = _numpy(arrays)
    assert got["q"].dtype == np.longdouble and (got["q"] == 2).all() and (got["w"] == 1).all()


def test_evaluation_replies_with_inconsistent_metrics_are_dropped():
    """One evaluation reply whose metrics flwr's FedAvg would refuse (it raises, ending the run) is
    dropped and counted; the error reply and the good ones go on, in their order."""
    spy = _SpyFedAvg(5)
    strategy = Compressed(spy)
    grid = _Grid(_app([]), nodes=(1, 2, 3, 4, 5))
    to = {m.metadata.dst_node_id: m for m in strategy.configure_evaluate(1, _record(_model()), ConfigRecord({}), grid)}

    def reply(node, metrics):
        return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=to[node])

    replies = [reply(3, {"num-examples": 5, "accuracy": 0.5}),
               reply(1, {"num-examples": 5, "histogram": [1.0, 2.0]}),  # other keys
               Message(Error(code=1, reason="failed"), reply_to=to[5]),
               reply(2, {"num-examples": 0, "accuracy": 1.0}),  # weight 0
               reply(4, {"num-examples": 15, "accuracy": 0.9})]
    metrics = strategy.aggregate_evaluate(1, replies)
    assert metrics["accuracy"] == pytest.approx((5 * 0.5 + 15 * 0.9) / 20)
    assert [r.metadata.src_node_id for r in spy.handed[-1]] == [3, 5, 4]
    assert strategy.rejected_evaluate == 2 and sorted(strategy.reasons_evaluate[-1]) == [1, 2]
    assert "differ" in strategy.reasons_evaluate[-1][1] and "num-examples" in strategy.reasons_evaluate[-1][2]


def test_the_clientapp_gets_the_arrays_in_the_strategys_order():
    """An array sent beside the coded message, between coded ones: the ClientApp (training and
    evaluation) sees the record in the order the strategy built it."""
    custom = Array(dtype="float32", shape=(2,), stype="custom/v1", data=b"\0" * 8)  # not NumPy: travels beside
    record = ArrayRecord(array_dict={"a": Array(np.ones(2, np.float32)), "x": custom,
                                     "z": Array(np.ones(3, np.float32))})
    seen = []
    app = ClientApp(mods=[sparse_update_mod])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        assert set(msg.content.keys()) == {"arrays", "config"}
        seen.append(list(msg.content["arrays"].keys()))
        metrics = MetricRecord({"num-examples": 1})
        return Message(RecordDict({"arrays": msg.content["arrays"], "metrics": metrics}), reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        assert set(msg.content.keys()) == {"arrays", "config"}
        seen.append(list(msg.content["arrays"].keys()))
        return Message(RecordDict({"metrics": MetricRecord({"num-examples": 1})}), reply_to=msg)

    strategy = Compressed(FedAvg(min_available_nodes=1, min_train_nodes=1, min_evaluate_nodes=1))
    grid = _Grid(app, nodes=(1,))
    replies = grid.send_and_receive(list(strategy.configure_train(1, record, ConfigRecord({}), grid)))
    assert not replies[0].has_error(), replies[0].error.reason
    replies = grid.send_and_receive(list(strategy.configure_evaluate(1, record, ConfigRecord({}), grid)))
    assert not replies[0].has_error(), replies[0].error.reason
    assert seen == [["a", "x", "z"], ["a", "x", "z"]]


def test_error_replies_from_strangers_or_twice_are_dropped():
    """Only one error reply a node sent a training message reaches the wrapped strategy (as one
    failure); an error reply after the node's reply, a second one, or one from a node sent nothing
    is dropped and counted."""
    spy = _SpyFedAvg(3)
    strategy = Compressed(spy)
    _, messages, replies = _round(strategy, _app([sparse_update_mod], fail=lambda n, r: n == 2), NODES)
    assert [r.has_error() for r in replies] == [False, True, False]
    other = Compressed(FedAvg(min_available_nodes=4, min_train_nodes=4))
    more = other.configure_train(1, _record(_model()), ConfigRecord({}), _Grid(_app([]), nodes=(1, 2, 3, 4)))
    to_4 = next(m for m in more if m.metadata.dst_node_id == 4)  # node 4 was sent nothing by `strategy`
    to_1 = next(m for m in messages if m.metadata.dst_node_id == 1)
    late = Message(Error(code=1, reason="late"), reply_to=to_1)
    stranger = Message(Error(code=1, reason="stranger"), reply_to=to_4)
    arrays, metrics = strategy.aggregate_train(1, [*replies, late, replies[1], stranger])
    assert (metrics["compress-aggregated"], metrics["compress-failed"], metrics["compress-rejected"]) == (2, 1, 3)
    assert sorted(strategy.reasons[-1]) == [1, 2, 4]
    assert spy.handed[-1] == [replies[0], replies[1], replies[2]]
    assert arrays is not None


class _Last(Strategy):
    """A strategy of one's own, not of flwr's FedAvg family: the last reply's model is the new one."""

    def __init__(self):
        super().__init__()
        self.handed = []

    def configure_train(self, server_round, arrays, config, grid):
        return [Message(RecordDict({"arrays": arrays, "config": config}), dst_node_id=n,
                        message_type=MessageType.TRAIN) for n in grid.get_node_ids()]

    def aggregate_train(self, server_round, replies):
        self.handed = list(replies)
        return self.handed[-1].content["arrays"], None

    def configure_evaluate(self, server_round, arrays, config, grid):
        return []

    def aggregate_evaluate(self, server_round, replies):
        return None

    def summary(self):
        pass


def test_a_strategy_of_ones_own_gets_the_other_records_as_they_came():
    """Without flwr's FedAvg constraints (no `weighted_by_key`) a reply's other ArrayRecords and
    records pass through, and its metrics (here none) are not checked."""
    app = ClientApp(mods=[sparse_update_mod])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        trained = _train(_numpy(msg.content["arrays"]), context.node_id, 1)
        extra = ArrayRecord(array_dict={"seen": Array(np.ones(2, np.float32))})
        return Message(RecordDict({"arrays": _record(trained), "extra": extra, "info": ConfigRecord({"x": 1})}),
                       reply_to=msg)

    strategy = Compressed(_Last())
    grid = _Grid(app)
    replies = grid.send_and_receive(list(strategy.configure_train(1, _record(_model()), ConfigRecord({}), grid)))
    assert all(is_compressed(r.content["arrays"]) for r in replies)
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert metrics["compress-aggregated"] == 3 and metrics["compress-rejected"] == 0
    assert _bits(arrays) == _bits(_record(_train(_model(), 3, 1)))  # lossless: the trained model, bit for bit
    assert all(set(r.content.keys()) == {"arrays", "extra", "info"} for r in strategy.strategy.handed)
