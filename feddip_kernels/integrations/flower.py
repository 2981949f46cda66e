"""Flower integration (optional extra [flower]): our codecs on Flower's Message API.

- `encode_arrayrecord` / `decode_arrayrecord`: an ArrayRecord of float arrays <-> an ArrayRecord
  holding one Array of stype "feddip/v1" whose bytes are a feddip_kernels message.
- `feddip_mod`: a ClientApp mod. Incoming encoded ArrayRecords are decoded before the ClientApp
  sees them. The positions received for the tensors the strategy lists under "feddip-masked" are
  the global mask: the mod keeps it in the context state (later models come coded relative to it)
  and hands the ClientApp the mask to train under as the ArrayRecord "feddip-masks" (uint8): the
  global mask, or in FedDIP's round 0, before there is one, a random ERK mask of this client's own
  (seeded by the run's seed and the node's "partition-id"). Replies are encoded relative to the
  global mask: the values under it (as FedDIP clients upload), with the value codec named under
  "feddip-values". Messages without encoded records pass through unchanged.
- `FedDIP`: a Message-API strategy (a FedAvg) whose server side is feddip_kernels.protocol, the
  same code `feddip simulate` runs: aggregation, the global mask pruned by magnitude every
  `mask_every` rounds on the cubic schedule, nested masks. Each node gets the model coded relative
  to the global mask it last received. Training replies are validated whole (model, weight,
  metrics) before anything changes; bad ones are dropped and counted. Bytes each way:
  `bytes_down` / `bytes_up`.
"""

from __future__ import annotations

import math
import reprlib
from collections import Counter
from logging import WARNING
from typing import Any, Callable, Iterable, Optional, cast

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp.strategy import FedAvg

from ..codecs import DEFAULT_MAX_BYTES, VALUE_CODECS, CodecError, decode_model, encode_model
from ..protocol import FedDIPServer, Schedule, random_erk_masks, seed_for

STYPE = "feddip/v1"
ENCODED_KEY = "feddip"
_STATE_KEY = "feddip.mask"
# Config entries the strategy sends with every model.
MASKED_KEY = "feddip-masked"  # names of the tensors whose positions are the global mask ([] before there is one)
PRUNABLE_KEY = "feddip-prunable"  # names of the pruned tensors
VALUES_KEY = "feddip-values"  # value codec for the replies (codecs.VALUE_CODECS)
ROUND_KEY, LR_KEY, LAMBDA_KEY = "feddip-round", "feddip-lr", "feddip-lambda"  # t, lr_t, lambda_t
S0_KEY, SEED_KEY = "feddip-s0", "feddip-seed"  # for each client's own round-0 ERK mask
MASKS_RECORD = "feddip-masks"  # the ArrayRecord the mod hands the ClientApp: the mask to train under

_FLOATS = ("float32", "float64")
# The largest weight a reply may carry: a count of examples, exact in float64, and small enough
# that the weights of any number of replies sum to a finite float (two 1e308 would not).
MAX_WEIGHT = float(2**53)

# A reply's metrics as flwr's metric aggregation sees them: (MetricRecord name, ((key, -1 for a
# scalar or the list's length), ...) sorted by key).
_MetricShape = tuple[str, tuple[tuple[str, int], ...]]


class _BadReply(ValueError):
    """What is wrong with one training reply (it is dropped and counted, the round goes on)."""


def _metric_number(value: object) -> bool:
    """A value flwr's metric aggregation can weight and sum: an int (not a bool) or a float,
    finite in float64 (an int too large to convert would raise OverflowError there)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def is_encoded(record: ArrayRecord) -> bool:
    """Whether `record` is one encode_arrayrecord made.

    Parameters
    ----------
    record : any ArrayRecord.

    Returns
    -------
    bool : True when it holds an Array named "feddip" (ENCODED_KEY) of stype "feddip/v1" (STYPE).
    """
    return ENCODED_KEY in record and record[ENCODED_KEY].stype == STYPE


def encoded_size(record: ArrayRecord) -> int:
    """Bytes of the encoded payload (0 when the record is not encoded).

    Parameters
    ----------
    record : any ArrayRecord.

    Returns
    -------
    int : the length of the feddip message it carries, 0 when `is_encoded` is False.
    """
    return len(record[ENCODED_KEY].data) if is_encoded(record) else 0


def encode_arrayrecord(
    record: ArrayRecord,
    *,
    masks: Optional[dict[str, np.ndarray]] = None,
    reference: Optional[dict[str, np.ndarray]] = None,
    values: str = "raw",
) -> ArrayRecord:
    """One Array of stype feddip/v1 carrying every float32/float64 array of `record` (zeros off
    the positions cost nothing); other arrays are passed along as they are.

    Parameters
    ----------
    record : the arrays to send.
    masks : names to masks of the positions sent (non-zero = kept), optional; the float arrays
        without one send their non-zeros.
    reference : names to masks the receiver already holds, optional (positions equal to, or a
        subset of, such a mask are coded relative to it).
    values : the value codec, one of codecs.VALUE_CODECS: "raw", "ans" or "auto" (lossless), or a lossy one.

    Returns
    -------
    ArrayRecord : an Array "feddip" (uint8, stype "feddip/v1") holding the message of the float
        arrays, followed by the other arrays of `record`.

    Raises
    ------
    ValueError : an array of `record` named "feddip", an unknown value codec, or a mask of another
        size than its array.
    """
    floats: dict[str, Array] = {}
    others: dict[str, Array] = {}
    for name, arr in record.items():
        (floats if arr.dtype in _FLOATS else others)[name] = arr
    if ENCODED_KEY in floats or ENCODED_KEY in others:
        raise ValueError(f"array name {ENCODED_KEY!r} is reserved")
    payload = encode_model({k: a.numpy() for k, a in floats.items()}, masks=masks, reference=reference, values=values)
    out = {ENCODED_KEY: Array(dtype="uint8", shape=(len(payload),), stype=STYPE, data=payload)}
    out.update(others)
    return ArrayRecord(array_dict=out)


def decode_arrayrecord(
    record: ArrayRecord,
    *,
    reference: Optional[dict[str, np.ndarray]] = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
    expect: Optional[dict[str, tuple[tuple[int, ...], Any]]] = None,
) -> tuple[ArrayRecord, dict[str, np.ndarray]]:
    """(plain ArrayRecord, positions as bool masks) of an encoded record; raises CodecError on bad
    bytes, or (with `expect`, name -> (shape, dtype)) on a message for another model.

    Parameters
    ----------
    record : an encoded record (encode_arrayrecord's).
    reference : names to the masks the sender coded positions relative to, optional.
    max_bytes : the most bytes the decoded arrays may take; a larger message is refused before
        anything is allocated.
    expect : names to (shape, dtype) the message must hold exactly, optional.

    Returns
    -------
    tuple[ArrayRecord, dict[str, numpy.ndarray]] : the decoded arrays with the record's other
        arrays, and each decoded tensor's positions as a bool mask.

    Raises
    ------
    KeyError : a record without the "feddip" Array.
    CodecError : bytes that are not a valid message, a message over max_bytes, other tensors than
        `expect` names, or a tensor coded relative to a mask `reference` lacks.
    """
    decoded = decode_model(record[ENCODED_KEY].data, reference=reference, max_bytes=max_bytes, expect=expect)
    arrays = {k: Array(v) for k, v in decoded.tensors.items()}
    arrays.update({k: a for k, a in record.items() if k != ENCODED_KEY})
    return ArrayRecord(array_dict=arrays), decoded.masks


def _masks_to_record(masks: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord(array_dict={k: Array(m.astype(np.uint8)) for k, m in masks.items()})


def _record_to_masks(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: a.numpy().astype(bool) for k, a in record.items()}


def feddip_mod(msg: Message, ctxt: Context, call_next: Callable[[Message, Context], Message]) -> Message:
    """ClientApp mod: decode incoming feddip records (relative to the global mask this node holds),
    give the ClientApp its training mask, encode the reply's ArrayRecords relative to the global mask.

    Parameters
    ----------
    msg : the incoming message; one without encoded ArrayRecords goes to `call_next` unchanged.
    ctxt : the node's context; its state keeps the global mask between rounds.
    call_next : the next mod, or the ClientApp.

    Returns
    -------
    Message : the reply of `call_next`, its ArrayRecords (other than "feddip-masks" and those
        already encoded) encoded with the value codec the strategy named ("raw" when the incoming
        message carried no encoded record); replies with an error or without content unchanged.

    Raises
    ------
    CodecError : an incoming encoded record that does not decode (bad bytes, or coded relative to
        a mask this node does not hold).
    KeyError : a config that names prunable tensors in round 0 without "feddip-s0" and
        "feddip-seed", or tensors the message does not hold.
    ValueError : a reply that cannot be encoded: an array named "feddip", an unknown value codec,
        or a tensor of another size than the global mask's.
    """
    values = "raw"
    if msg.has_content() and any(is_encoded(r) for r in msg.content.array_records.values()):
        config: dict[str, Any] = {}
        for config_record in msg.content.config_records.values():
            config.update(config_record)
        values = str(config.get(VALUES_KEY, values))
        masked, prunable = list(config.get(MASKED_KEY, [])), list(config.get(PRUNABLE_KEY, []))
        held = _held_masks(ctxt)
        # A new RecordDict: the incoming one may be shared (e.g. one object for every node).
        content = RecordDict(dict(msg.content.items()))
        shapes: dict[str, tuple[int, ...]] = {}
        for key, record in msg.content.array_records.items():
            if is_encoded(record):
                plain, masks = decode_arrayrecord(record, reference=held or None)
                content[key] = plain
                shapes.update({k: a.shape for k, a in plain.items()})
                held.update({k: m for k, m in masks.items() if k in masked})
        if masked:
            held = {k: held[k] for k in masked}
            ctxt.state[_STATE_KEY] = _masks_to_record(held)
            content[MASKS_RECORD] = _masks_to_record(held)
        elif prunable:  # FedDIP's round 0: a random ERK mask of this client's own
            rng = np.random.default_rng(seed_for(int(config[SEED_KEY]), 1, _client_index(ctxt)))
            own = random_erk_masks({k: shapes[k] for k in prunable}, 1.0 - float(config[S0_KEY]), rng)
            content[MASKS_RECORD] = _masks_to_record(own)
        msg.content = content
    reply = call_next(msg, ctxt)
    if reply.has_error() or not reply.has_content():
        return reply
    shared = _held_masks(ctxt)
    for key, record in list(reply.content.array_records.items()):
        if key != MASKS_RECORD and not is_encoded(record):
            names = set(record.keys())
            masks = {k: m for k, m in shared.items() if k in names}
            reply.content[key] = encode_arrayrecord(record, masks=masks or None, reference=masks or None, values=values)
    return reply


def _held_masks(ctxt: Context) -> dict[str, np.ndarray]:
    """The global mask this node last received (kept in its context state), or {}."""
    # an ArrayRecord: this module alone writes the key (_masks_to_record)
    return _record_to_masks(cast(ArrayRecord, ctxt.state[_STATE_KEY])) if _STATE_KEY in ctxt.state else {}


def _client_index(ctxt: Context) -> int:
    """The client's index for seeds: its node config's partition-id, else its node id."""
    return int(ctxt.node_config.get("partition-id", ctxt.node_id))


class FedDIP(FedAvg):
    """FedAvg with FedDIP's server side (feddip_kernels.protocol: the protocol of
    docs/protocol.md): clients train under their own ERK mask in round 1 (t = 0) and
    under the global mask after; the server averages (by "num-examples" with weighting="samples",
    equally with "equal"), re-applies the mask, and prunes by global magnitude to s_t when
    t % mask_every == 0; masks are nested. Flower's round r is the protocol's t = r - 1.
    `prunable(name, array)` selects the pruned tensors (default: two or more dimensions, i.e. conv
    and linear weights). `values` is the value codec both ways. The config sent with each model
    carries lr_t and lambda_t (LR_KEY, LAMBDA_KEY) for the clients' optimiser.

    Parameters
    ----------
    num_rounds : the rounds of the run (integer >= 1), and the T of the schedules unless
        `horizon` is set.
    s0 : the initial sparsity: the clients' round-0 ERK masks have density 1 - s0, and the
        sparsity schedule s_t = sp + (s0 - sp) (1 - t/T)^3 starts there.
    sp : the final sparsity, reached at t >= T; 0 <= s0 <= sp < 1.
    mask_every : R, integer >= 1: the global mask is pruned in the rounds with t % R == 0.
    horizon : the T of the sparsity and lambda schedules, integer >= 1 (None: num_rounds).
    lr : the clients' learning rate in round 0, > 0 and finite: lr_t = lr * lr_decay^t.
    lr_decay : the learning rate's decay a round, in (0, 1].
    lambda_max : the regulariser's largest strength, >= 0: rounds [0, T) fall in lambda_segments
        equal segments, segment 0 with lambda_t = 0, segment i >= 1 with lambda_min + (lambda_max -
        lambda_min) (i - 1) / (lambda_segments - 1), lambda_min = 5e-4; later rounds stay in the
        last segment.
    lambda_segments : the number of those segments, >= 2.
    values : the value codec both ways, one of codecs.VALUE_CODECS: "raw", "ans" or "auto" (lossless),
        or a lossy one ("fp16", "bf16", "int8", their "-ans" forms, "int2-ans" .. "int7-ans").
    weighting : "samples" (replies weighted by their `weighted_by_key` metric, "num-examples" by
        default) or "equal".
    prunable : (name, array) -> whether the tensor is pruned, optional (default: two or more
        dimensions).
    seed : the run's seed, sent to the clients (SEED_KEY) to seed their round-0 ERK masks.
    **fedavg_kwargs : passed to flwr's FedAvg (fraction_train, min_available_nodes,
        weighted_by_key, arrayrecord_key, train_metrics_aggr_fn, ...).

    Raises
    ------
    ValueError : a schedule setting out of range (num_rounds, s0, sp, mask_every, horizon, lr,
        lr_decay), an unknown value codec or weighting. lambda_max < 0 or lambda_segments < 2 is
        refused (ValueError) when the first model is configured, as lambda_t is computed then.
    """

    def __init__(
        self,
        *,
        num_rounds: int,
        s0: float = 0.5,
        sp: float = 0.95,
        mask_every: int = 5,
        horizon: Optional[int] = None,
        lr: float = 0.1,
        lr_decay: float = 0.998,
        lambda_max: float = 1e-3,
        lambda_segments: int = 20,
        values: str = "raw",
        weighting: str = "samples",
        prunable: Optional[Callable[[str, np.ndarray], bool]] = None,
        seed: int = 0,
        **fedavg_kwargs: Any,
    ) -> None:
        self.schedule = Schedule(rounds=num_rounds, s0=s0, sp=sp, mask_every=mask_every, horizon=horizon, lr=lr,
                                 lr_decay=lr_decay, lambda_max=lambda_max, lambda_segments=lambda_segments)
        if values not in VALUE_CODECS:
            raise ValueError(f"values must be one of {sorted(VALUE_CODECS)}, got {values!r}")
        if weighting not in ("samples", "equal"):
            raise ValueError(f"weighting must be 'samples' or 'equal', got {weighting!r}")
        super().__init__(**fedavg_kwargs)
        self.num_rounds, self.values, self.weighting, self.seed = num_rounds, values, weighting, seed
        self.prunable = prunable or (lambda name, a: a.ndim >= 2)
        self.server: Optional[FedDIPServer] = None
        self.node_masks: dict[int, dict[str, np.ndarray]] = {}  # the global mask each node last received
        self.bytes_down = 0
        self.bytes_up = 0
        self.rejected = 0  # replies dropped from aggregation: see aggregate_train for the checks
        self.sampled: set[int] = set()  # nodes sent this round's training message
        # One entry a training round: nodes whose replies were aggregated, rejected, failed (error
        # replies) and missing (no reply within the round's timeout: crashed, stalled, cut off).
        self.rounds: list[dict[str, list[int]]] = []
        self.reasons: list[dict[int, str]] = []  # one entry a training round: rejected node -> why

    @property
    def masks(self) -> dict[str, np.ndarray]:
        """The global mask (empty before round 1's aggregation).

        Returns
        -------
        dict[str, numpy.ndarray] : the pruned tensors' names to their bool masks.
        """
        return self.server.masks if self.server is not None else {}

    def _start(self, arrays: ArrayRecord) -> FedDIPServer:
        if self.server is None:
            plain = {k: a.numpy() for k, a in arrays.items() if a.dtype in _FLOATS}
            self.server = FedDIPServer(plain, [k for k, a in plain.items() if self.prunable(k, a)], self.schedule,
                                       seed=self.seed)
        return self.server

    def _messages(self, messages: Iterable[Message], server: FedDIPServer, config: ConfigRecord) -> list[Message]:
        """One message per node with the global model coded relative to the mask that node holds."""
        t = server.round
        config[MASKED_KEY] = list(server.masks)
        config[PRUNABLE_KEY] = server.prunable
        config[VALUES_KEY], config[ROUND_KEY], config[S0_KEY], config[SEED_KEY] = (
            self.values,
            t,
            server.schedule.s0,
            self.seed,
        )
        config[LR_KEY], config[LAMBDA_KEY] = server.schedule.learning_rate(t), server.schedule.lam(t)
        model = ArrayRecord(array_dict={k: Array(v) for k, v in server.weights.items()})
        out = []
        for m in messages:
            node = m.metadata.dst_node_id
            known = self.node_masks.get(node) if server.masks else None
            encoded = encode_arrayrecord(model, masks=server.masks or None, reference=known, values=self.values)
            if server.masks:
                self.node_masks[node] = server.masks
            self.bytes_down += encoded_size(encoded)
            content = RecordDict({self.arrayrecord_key: encoded, self.configrecord_key: config})
            out.append(Message(content=content, message_type=m.metadata.message_type, dst_node_id=node))
        return out

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Any
    ) -> Iterable[Message]:
        """FedAvg's sampling of the training nodes, each sent the global model coded relative to the
        global mask it last received, with the FedDIP entries added to `config`.

        Parameters
        ----------
        server_round : flwr's round r (the protocol's t = r - 1).
        arrays : the initial model: its float arrays start the protocol's server at the first call;
            later calls (and the messages) use the server's global model instead.
        config : the config sent with the model; the round's FedDIP entries (MASKED_KEY,
            PRUNABLE_KEY, VALUES_KEY, ROUND_KEY, S0_KEY, SEED_KEY, LR_KEY, LAMBDA_KEY) are written
            into it.
        grid : flwr's Grid, whose nodes FedAvg samples.

        Returns
        -------
        Iterable[Message] : one training message per sampled node (none when FedAvg samples none).

        Raises
        ------
        ValueError : lambda_max < 0 or lambda_segments < 2 (lambda_t is computed here).
        """
        server = self._start(arrays)
        messages = self._messages(super().configure_train(server_round, arrays, config, grid), server, config)
        self.sampled = {m.metadata.dst_node_id for m in messages}
        return messages

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Any
    ) -> Iterable[Message]:
        """FedAvg's sampling of the evaluation nodes, each sent the global model as configure_train
        sends it.

        Parameters
        ----------
        server_round : flwr's round.
        arrays : the initial model, used only when no training round has started the server.
        config : the config sent with the model; the FedDIP entries are written into it.
        grid : flwr's Grid, whose nodes FedAvg samples.

        Returns
        -------
        Iterable[Message] : one evaluation message per sampled node.

        Raises
        ------
        ValueError : lambda_max < 0 or lambda_segments < 2.
        """
        server = self._start(arrays)
        return self._messages(super().configure_evaluate(server_round, arrays, config, grid), server, config)

    def _decode_reply(self, reply: Message, server: FedDIPServer) -> dict[str, np.ndarray]:
        """The reply's model, checked against the global model's schema (names, shapes, dtypes)
        before anything is allocated beyond the model's own size, inside the global mask, and
        finite; CodecError or _BadReply otherwise."""
        record = reply.content.array_records.get(self.arrayrecord_key)
        if record is None or not is_encoded(record):
            raise CodecError("reply carries no encoded model")
        schema = {k: (v.shape, v.dtype) for k, v in server.weights.items()}
        limit = sum(v.nbytes for v in server.weights.values())
        plain, positions = decode_arrayrecord(record, reference=server.masks or None, max_bytes=limit, expect=schema)
        for k, m in server.masks.items():
            if (positions[k] & ~m).any():
                raise CodecError(f"reply's {k!r} has values outside the global mask it was sent")
        model = {k: a.numpy() for k, a in plain.items()}
        for k, a in model.items():
            if not np.isfinite(a).all():  # one NaN or inf would spread through the average
                raise _BadReply(f"reply's {k!r} holds non-finite values")
        return model

    def _check_metrics(self, reply: Message) -> tuple[_MetricShape, float]:
        """(shape of the reply's metrics, its weight) after the checks flwr's FedAvg makes (one
        MetricRecord, holding `weighted_by_key` as a single number) and those its aggregation
        needs without checking (numbers only, finite in float64); the weight must lie in
        (0, MAX_WEIGHT]. _BadReply otherwise."""
        records = reply.content.metric_records
        if len(records) != 1:
            raise _BadReply(f"reply has {len(records)} MetricRecords, expected exactly one")
        ((name, record),) = records.items()
        shape = []
        for key, value in record.items():
            if isinstance(value, list):
                if not all(_metric_number(v) for v in value):
                    raise _BadReply(
                        f"metric {key!r} = {reprlib.repr(value)} holds a value that is not a finite int or float"
                    )
                shape.append((key, len(value)))
            elif _metric_number(value):
                shape.append((key, -1))
            else:
                raise _BadReply(
                    f"metric {key!r} = {reprlib.repr(value)} is not a finite int or float (or a list of them)"
                )
        weight = record.get(self.weighted_by_key)
        if weight is None or isinstance(weight, list) or not 0 < weight <= MAX_WEIGHT:
            raise _BadReply(
                f"metric {self.weighted_by_key!r} = {reprlib.repr(weight)} is not a number in (0, {MAX_WEIGHT:.0f}]"
            )
        return (name, tuple(sorted(shape))), float(weight)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[Optional[ArrayRecord], Optional[MetricRecord]]:
        """Aggregate the replies that pass every check, or leave the state as it was.

        A reply is dropped and counted as rejected (`feddip-rejected`, `rejected`; why, in
        `reasons`) when its model does not decode to the global model's tensors, shapes and dtypes,
        has values outside the global mask or non-finite ones, or when its metrics are not what
        flwr's FedAvg and its metric aggregation require: exactly one MetricRecord of ints, floats
        and lists of them, all finite, holding `weighted_by_key` as a number in (0, MAX_WEIGHT]
        (required with either weighting: flwr's metric aggregation weights by it), and of the same
        record name, keys and list lengths as the round's other replies (the shape most replies
        share wins, a tie goes to the lowest node id). ArrayRecords other than `arrayrecord_key`
        and ConfigRecords are ignored. Nothing changes until all replies are checked and the
        metrics aggregated: a round either aggregates and advances the server, or returns (None,
        the counts) with the global model, mask and round as they were: when no reply is usable, or
        when the average leaves float64's range (float64 tensors only; its replies are then counted
        as rejected). Bad replies never raise; only an exception from a custom
        `train_metrics_aggr_fn` propagates, with the state unchanged.

        Parameters
        ----------
        server_round : flwr's round (not used: the server counts its own rounds).
        replies : the training replies, with or without errors.

        Returns
        -------
        tuple[Optional[ArrayRecord], Optional[MetricRecord]] : the new global model, or None when
            the round is not taken; the aggregated metrics with the counts "feddip-aggregated",
            "feddip-rejected", "feddip-failed" and "feddip-missing" (the counts alone when the
            round is not taken).

        Raises
        ------
        Exception : whatever a custom `train_metrics_aggr_fn` raises (the state is left unchanged).
        """
        server = cast(FedDIPServer, self.server)  # configure_train, which flwr calls first, set it up
        seen: dict[str, list[int]] = {"aggregated": [], "rejected": [], "failed": [], "missing": []}
        reasons: dict[int, str] = {}
        checked: list[tuple[Message, dict[str, np.ndarray], float, _MetricShape]] = []
        bytes_up = 0
        # In node order, so that the average is summed in a reproducible order.
        for reply in sorted(replies, key=lambda r: r.metadata.src_node_id):
            node = reply.metadata.src_node_id
            if reply.has_error() or not reply.has_content():
                seen["failed"].append(node)
                continue
            record = reply.content.array_records.get(self.arrayrecord_key)
            bytes_up += encoded_size(record) if record is not None else 0
            try:
                model = self._decode_reply(reply, server)
                shape, weight = self._check_metrics(reply)
            except (CodecError, KeyError, TypeError, ValueError) as e:  # _BadReply is a ValueError
                reasons[node] = str(e)  # one bad reply must not abort the round: drop it, count it
                continue
            checked.append((reply, model, weight if self.weighting == "samples" else 1.0, shape))
        # flwr's metric aggregation fails on replies whose metrics differ in keys or shapes (and its
        # FedAvg refuses them): keep the shape most replies share, drop the rest.
        shapes = Counter(shape for *_, shape in checked)
        common = max(shapes, key=shapes.__getitem__) if shapes else None  # the first of equals: node order
        valid, uploads = [], []
        for reply, model, weight, shape in checked:
            node = reply.metadata.src_node_id
            if shape != common:
                reasons[node] = f"metrics {_describe(shape)} differ from the round's {_describe(common)}"
                continue
            valid.append(reply)
            uploads.append((model, weight))
            seen["aggregated"].append(node)
        seen["rejected"] = sorted(reasons)
        metrics = self.train_metrics_aggr_fn([r.content for r in valid], self.weighted_by_key) if valid else None
        if uploads:
            saved = (server.weights, server.masks, server.round)  # aggregate rebinds these, never mutates them
            # Weights <= MAX_WEIGHT and finite float32 values cannot overflow the float64 sum; float64
            # values near float64's maximum can (inf, or NaN from inf - inf, which pruning refuses):
            # then the round is not taken.
            try:
                with np.errstate(over="ignore", invalid="ignore"):  # caught here: no warning
                    finite = all(np.isfinite(v).all() for v in server.aggregate(uploads).values())
            except ValueError:
                finite = False
            if not finite:
                server.weights, server.masks, server.round = saved
                for node in seen["aggregated"]:
                    reasons[node] = "the weighted average overflows float64"
                seen["aggregated"], seen["rejected"], uploads = [], sorted(reasons), []
        # Everything checked and aggregated: only now the bookkeeping changes.
        answered = set(seen["aggregated"] + seen["rejected"] + seen["failed"])
        seen["missing"] = sorted(self.sampled - answered)
        for node in seen["failed"] + seen["missing"]:
            self.node_masks.pop(node, None)  # it may or may not hold the last model we sent it
        for node, why in reasons.items():
            log(WARNING, "FedDIP: reply from node %d dropped: %s", node, why)
        self.bytes_up += bytes_up
        self.rounds.append(seen)
        self.reasons.append(reasons)
        self.rejected += len(seen["rejected"])
        counts: dict[str, Any] = {f"feddip-{k}": len(v) for k, v in seen.items()}
        if not uploads:  # nothing to aggregate: the global model stays, the round is not counted
            return None, MetricRecord(counts)
        metrics = MetricRecord({**(dict(metrics) if metrics is not None else {}), **counts})
        return ArrayRecord(array_dict={k: Array(v) for k, v in server.weights.items()}), metrics


def _describe(shape: Optional[_MetricShape]) -> str:
    """A metric shape for messages: record 'metrics' {'loss': scalar, 'hist': list of 3}."""
    if shape is None:
        return "(none)"
    name, items = shape
    fields = ", ".join(f"{k!r}: {'scalar' if n < 0 else f'list of {n}'}" for k, n in items)
    return f"in record {name!r} {{{fields}}}"
