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
  metrics) before anything changes; bad ones are dropped and counted. Training bytes each way:
  `bytes_down` / `bytes_up` (what `feddip simulate` counts); evaluation messages: `bytes_evaluate`.

Compact coding (`FedDIP(coding="compact")` with a lossy value codec, and a mod from
`make_feddip_mod(init_model)`): training messages carry protocol.transport's messages, the bytes
`feddip simulate` sends for the same round with coding="compact": the server sends each node the
difference between the global model and the model that node holds (an init frame at first
contact, from which the mod builds the initial model with `init_model(seed)`), and the node
replies with the difference between its trained model and the one it holds, plus the quantisation
error it carried from earlier replies. The payload is the one Array "feddip" of stype
"feddip-compact/v1" (COMPACT_STYPE); the model each node holds, its mask and residual live in the
node's context state. Evaluation messages keep the plain coding, with lossless values ("auto"):
the nodes score the global model itself, not a quantised copy.
"""

from __future__ import annotations

import math
import reprlib
from collections import Counter
from logging import WARNING
from typing import Any, Callable, Iterable, Mapping, Optional, cast

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp.strategy import FedAvg

from ..codecs import DEFAULT_MAX_BYTES, VALUE_CODECS, CodecError, decode_model, encode_model
from ..codecs.values import LOSSLESS, QUANTISED, ROUNDINGS
from ..protocol import ClientEnd, FedDIPServer, Schedule, ServerEnd, random_erk_masks, seed_for
from ..protocol.transport import INIT_MAGIC, model_crc

STYPE = "feddip/v1"
COMPACT_STYPE = "feddip-compact/v1"  # an Array "feddip" holding a protocol.transport message
ENCODED_KEY = "feddip"
_STATE_KEY = "feddip.mask"
# A node's end of the compact transport, in its context state: the model it holds, the global
# mask it holds (uint8) and its residual.
_HELD_STATE, _MASK_STATE, _RESIDUAL_STATE = "feddip.compact.held", "feddip.compact.mask", "feddip.compact.residual"
# Config entries the strategy sends with every model.
MASKED_KEY = "feddip-masked"  # names of the tensors whose positions are the global mask ([] before there is one)
PRUNABLE_KEY = "feddip-prunable"  # names of the pruned tensors
VALUES_KEY = "feddip-values"  # value codec for the replies (codecs.VALUE_CODECS)
ROUND_KEY, LR_KEY, LAMBDA_KEY = "feddip-round", "feddip-lr", "feddip-lambda"  # t, lr_t, lambda_t
S0_KEY, SEED_KEY = "feddip-s0", "feddip-seed"  # for each client's own round-0 ERK mask
MASKS_RECORD = "feddip-masks"  # the ArrayRecord the mod hands the ClientApp: the mask to train under
# Config entries of compact-coded training messages only (plain messages do not carry them).
CODING_KEY, ROUNDING_KEY = "feddip-coding", "feddip-rounding"  # "compact"; "nearest" | "stochastic"
INIT_SEED_KEY = "feddip-init-seed"  # the seed the initial model is built from (as in the init frame)
RESIDUAL_KEY = "feddip-residual-feedback"  # whether replies carry their quantisation error forward
CRC_KEY = "feddip-crc"  # model_crc of the model the node holds once it has decoded its message
CODINGS = ("plain", "compact")

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


def is_compact(record: ArrayRecord) -> bool:
    """Whether `record` carries a compact-coded message (protocol.transport).

    Parameters
    ----------
    record : any ArrayRecord.

    Returns
    -------
    bool : True when it holds an Array named "feddip" (ENCODED_KEY) of stype "feddip-compact/v1"
        (COMPACT_STYPE).
    """
    return ENCODED_KEY in record and record[ENCODED_KEY].stype == COMPACT_STYPE


def _compact_record(payload: bytes, others: Iterable[tuple[str, Array]] = ()) -> ArrayRecord:
    arrays = {ENCODED_KEY: Array(dtype="uint8", shape=(len(payload),), stype=COMPACT_STYPE, data=payload)}
    arrays.update(others)
    return ArrayRecord(array_dict=arrays)


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


def check_metrics(reply: Message, weighted_by_key: str) -> tuple[_MetricShape, float]:
    """(shape of the reply's metrics, its weight) after the checks flwr's FedAvg makes (one
    MetricRecord, holding `weighted_by_key` as a single number) and those its aggregation
    needs without checking (numbers only, finite in float64); the weight must lie in
    (0, MAX_WEIGHT]. _BadReply otherwise. Shared by FedDIP and flower_compress.Compressed."""
    records = reply.content.metric_records
    if len(records) != 1:
        raise _BadReply(f"reply has {len(records)} MetricRecords, expected exactly one")
    ((name, record),) = records.items()
    shape = []
    for key, value in record.items():
        if isinstance(value, list):
            if not all(_metric_number(v) for v in value):
                raise _BadReply(
                    f"metric {key!r} = {reprlib.repr(value)} holds a value that is not a finite int or float")
            shape.append((key, len(value)))
        elif _metric_number(value):
            shape.append((key, -1))
        else:
            raise _BadReply(f"metric {key!r} = {reprlib.repr(value)} is not a finite int or float (or a list of them)")
    weight = record.get(weighted_by_key)
    if weight is None or isinstance(weight, list) or not 0 < weight <= MAX_WEIGHT:
        raise _BadReply(f"metric {weighted_by_key!r} = {reprlib.repr(weight)} is not a number in (0, {MAX_WEIGHT:.0f}]")
    return (name, tuple(sorted(shape))), float(weight)


def _masks_to_record(masks: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord(array_dict={k: Array(m.astype(np.uint8)) for k, m in masks.items()})


def _record_to_masks(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: a.numpy().astype(bool) for k, a in record.items()}


Mod = Callable[[Message, Context, Callable[[Message, Context], Message]], Message]


def make_feddip_mod(init_model: Optional[Callable[[int], Mapping[str, np.ndarray]]] = None) -> Mod:
    """A ClientApp mod for FedDIP's messages, plain or compact-coded (`feddip_mod` is
    `make_feddip_mod()`).

    Parameters
    ----------
    init_model : seed -> the initial model (names to float arrays: every float tensor the strategy
        sends), optional; needed for the compact coding, whose first message to a node is an init
        frame naming the seed (the strategy's init_seed) from which the node builds the initial
        model itself (checked against the frame's CRC-32C). The simulation's clients build it as
        `torch.manual_seed(seed)` then the model's constructor.

    Returns
    -------
    Mod : the mod (see its documentation: `help(feddip_mod)`).
    """

    def feddip_mod(msg: Message, ctxt: Context, call_next: Callable[[Message, Context], Message]) -> Message:
        """ClientApp mod: decode incoming feddip records (relative to the global mask this node
        holds), give the ClientApp its training mask, encode the reply's ArrayRecords relative to
        the global mask.

        A compact-coded message (one Array of stype "feddip-compact/v1") is decoded by the node's
        end of protocol.transport, kept in the context state (the model the node holds, its
        global mask, its residual): the ClientApp gets the model held; the reply's ArrayRecord
        under the same key is sent back as ClientEnd.reply's message (the difference from the
        model held, plus the residual), its other ArrayRecords encoded as for plain messages.

        Parameters
        ----------
        msg : the incoming message; one without encoded ArrayRecords goes to `call_next` unchanged.
        ctxt : the node's context; its state keeps the global mask between rounds (and, with the
            compact coding, the model held and the residual).
        call_next : the next mod, or the ClientApp.

        Returns
        -------
        Message : the reply of `call_next`, its ArrayRecords (other than "feddip-masks" and those
            already encoded) encoded with the value codec the strategy named ("raw" when the
            incoming message carried no encoded record); replies with an error or without content
            unchanged.

        Raises
        ------
        CodecError : an incoming encoded record that does not decode (bad bytes, or coded relative
            to a mask this node does not hold); for the compact coding also an init frame without
            `init_model`, or whose model is not the one built, a message to a node that holds no
            model, or one after which the node holds another model than the server (CRC): the
            node's state is out of step (flwr then keeps the state it had and replies with an
            error; the strategy starts the node afresh at its next message).
        KeyError : a config that names prunable tensors in round 0 without "feddip-s0" and
            "feddip-seed", or tensors the message does not hold.
        ValueError : a reply that cannot be encoded: an array named "feddip", an unknown value
            codec, a tensor of another size than the global mask's, or (compact coding) a reply
            whose float arrays are not the model's.
        """
        if msg.has_content() and any(is_compact(r) for r in msg.content.array_records.values()):
            return _compact_mod(msg, ctxt, call_next, init_model)
        return _plain_mod(msg, ctxt, call_next)

    return feddip_mod


def _config(msg: Message) -> dict[str, Any]:
    """The message's config records, merged."""
    config: dict[str, Any] = {}
    for config_record in msg.content.config_records.values():
        config.update(config_record)
    return config


def _training_masks(
    ctxt: Context, config: dict[str, Any], masks: dict[str, np.ndarray], shapes: dict[str, tuple[int, ...]]
) -> Optional[ArrayRecord]:
    """The MASKS_RECORD the ClientApp gets: the global mask held, or in FedDIP's round 0, before
    there is one, a random ERK mask of this client's own; None when nothing is pruned."""
    if masks:
        return _masks_to_record(masks)
    prunable = list(config.get(PRUNABLE_KEY, []))
    if not prunable:
        return None
    rng = np.random.default_rng(seed_for(int(config[SEED_KEY]), 1, _client_index(ctxt)))
    return _masks_to_record(random_erk_masks({k: shapes[k] for k in prunable}, 1.0 - float(config[S0_KEY]), rng))


def _plain_mod(msg: Message, ctxt: Context, call_next: Callable[[Message, Context], Message]) -> Message:
    values = "raw"
    if msg.has_content() and any(is_encoded(r) for r in msg.content.array_records.values()):
        config = _config(msg)
        values = str(config.get(VALUES_KEY, values))
        masked = list(config.get(MASKED_KEY, []))
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
        training = _training_masks(ctxt, config, held if masked else {}, shapes)
        if training is not None:
            content[MASKS_RECORD] = training
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


def _compact_mod(
    msg: Message,
    ctxt: Context,
    call_next: Callable[[Message, Context], Message],
    init_model: Optional[Callable[[int], Mapping[str, np.ndarray]]],
) -> Message:
    """feddip_mod for a compact-coded message: ClientEnd.receive, the ClientApp, ClientEnd.reply."""
    config = _config(msg)
    keys = [k for k, r in msg.content.array_records.items() if is_compact(r)]
    if len(keys) != 1:
        raise CodecError(f"{len(keys)} compact-coded ArrayRecords in one message, expected one")
    (key,) = keys
    record = msg.content.array_records[key]
    data = record[ENCODED_KEY].data
    if data[: len(INIT_MAGIC)] == INIT_MAGIC and init_model is None:
        raise CodecError("a compact-coded message opening with an init frame, and no way to build the initial "
                         "model: use make_feddip_mod(init_model) as the ClientApp's mod")
    t, masked = int(config[ROUND_KEY]), list(config.get(MASKED_KEY, []))
    values = str(config[VALUES_KEY])
    # Servers before stochastic rounding was refused for codecs that do not round sent it with
    # fp16-ans and the like, where it meant nearest: read it so.
    rounding = str(config[ROUNDING_KEY]) if values in QUANTISED else "nearest"
    end = ClientEnd(_client_index(ctxt), values=values, rounding=rounding,
                    seed=int(config[SEED_KEY]), build=init_model, residual_feedback=bool(config[RESIDUAL_KEY]))
    _load_end(end, ctxt)
    held = end.receive(data, masked=masked)  # CodecError: bad bytes, or this node's state is out of step
    if CRC_KEY in config and model_crc(held) != int(config[CRC_KEY]):
        raise CodecError("the model decoded is not the one the server holds for this node (CRC-32C): the node's "
                         "compact state is out of step with the server's")
    content = RecordDict(dict(msg.content.items()))  # the incoming one may be shared
    plain = {k: Array(v) for k, v in held.items()}
    plain.update({k: a for k, a in record.items() if k != ENCODED_KEY})
    content[key] = ArrayRecord(array_dict=plain)
    training = _training_masks(ctxt, config, end.masks, {k: v.shape for k, v in held.items()})
    if training is not None:
        content[MASKS_RECORD] = training
    msg.content = content
    reply = call_next(msg, ctxt)
    if not reply.has_error() and reply.has_content():
        for rkey, rrecord in list(reply.content.array_records.items()):
            if rkey == key:  # the model: the difference from the one held, and the residual
                floats = {k: a.numpy() for k, a in rrecord.items() if a.dtype in _FLOATS}
                if floats.keys() != held.keys():
                    raise ValueError(f"the reply's float arrays {sorted(floats)} are not the model's {sorted(held)}")
                others = [(k, a) for k, a in rrecord.items() if a.dtype not in _FLOATS]
                if any(k == ENCODED_KEY for k, _ in others):
                    raise ValueError(f"array name {ENCODED_KEY!r} is reserved")
                reply.content[rkey] = _compact_record(end.reply(floats, t), others)
            elif rkey != MASKS_RECORD and not is_encoded(rrecord) and not is_compact(rrecord):
                names = set(rrecord.keys())
                masks = {k: m for k, m in end.masks.items() if k in names}
                reply.content[rkey] = encode_arrayrecord(rrecord, masks=masks or None, reference=masks or None,
                                                         values=end.values)
    _save_end(end, ctxt)
    return reply


def _load_end(end: ClientEnd, ctxt: Context) -> None:
    """The node's end of the compact transport as its context state holds it (nothing held: none)."""
    state = ctxt.state
    if _HELD_STATE not in state:
        return
    # ArrayRecords: this module alone writes these keys (_save_end)
    end.held = {k: a.numpy() for k, a in cast(ArrayRecord, state[_HELD_STATE]).items()}
    end.masks = _record_to_masks(cast(ArrayRecord, state[_MASK_STATE]))
    end.residual = {k: a.numpy() for k, a in cast(ArrayRecord, state[_RESIDUAL_STATE]).items()}


def _save_end(end: ClientEnd, ctxt: Context) -> None:
    assert end.held is not None
    ctxt.state[_HELD_STATE] = ArrayRecord(array_dict={k: Array(v) for k, v in end.held.items()})
    ctxt.state[_MASK_STATE] = _masks_to_record(end.masks)
    ctxt.state[_RESIDUAL_STATE] = ArrayRecord(array_dict={k: Array(v) for k, v in end.residual.items()})


feddip_mod = make_feddip_mod()


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
    seed : the run's seed, sent to the clients (SEED_KEY) to seed their round-0 ERK masks (and,
        with the compact coding, the stochastic rounding).
    coding : "plain" (each message carries the model itself) or "compact" (with a lossy `values`:
        protocol.transport's deltas against what the other end holds, the bytes `feddip simulate`
        sends with coding="compact"; the nodes need `make_feddip_mod(init_model)`). With lossless
        values "compact" sends what "plain" does. Evaluation messages always use the plain coding.
        The server keeps the model each node holds (one model a node, as the simulation); a node
        whose training reply failed or is missing may or may not hold what it was sent, and is
        started afresh: its next message opens with an init frame.
    rounding : of the compact coding's quantised values: "nearest" or "stochastic", seeded by
        `seed`, the round and the client's index: on the server the node id, in the mod the
        node's "partition-id" (else its node id); the simulation's where the two are its client
        index.
    init_seed : the seed the nodes build the initial model from (the init frame's; sent as
        INIT_SEED_KEY), an integer in [0, 2^63); None: seed_for(seed, 0), the simulation's.
    residual_feedback : compact coding: whether the nodes carry each reply's quantisation error to
        the next (RESIDUAL_KEY).
    **fedavg_kwargs : passed to flwr's FedAvg (fraction_train, min_available_nodes,
        weighted_by_key, arrayrecord_key, train_metrics_aggr_fn, ...).

    Raises
    ------
    ValueError : a schedule setting out of range (num_rounds, s0, sp, mask_every, horizon, lr,
        lr_decay), an unknown value codec, weighting, coding or rounding, stochastic rounding
        without the compact coding and an int2-ans .. int8-ans codec, or an init_seed out of range.
        lambda_max < 0 or lambda_segments < 2 is refused (ValueError) when the first model is
        configured, as lambda_t is computed then.
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
        coding: str = "plain",
        rounding: str = "nearest",
        init_seed: Optional[int] = None,
        residual_feedback: bool = True,
        **fedavg_kwargs: Any,
    ) -> None:
        self.schedule = Schedule(rounds=num_rounds, s0=s0, sp=sp, mask_every=mask_every, horizon=horizon, lr=lr,
                                 lr_decay=lr_decay, lambda_max=lambda_max, lambda_segments=lambda_segments)
        if values not in VALUE_CODECS:
            raise ValueError(f"values must be one of {sorted(VALUE_CODECS)}, got {values!r}")
        if weighting not in ("samples", "equal"):
            raise ValueError(f"weighting must be 'samples' or 'equal', got {weighting!r}")
        if coding not in CODINGS:
            raise ValueError(f"coding must be one of {CODINGS}, got {coding!r}")
        if rounding not in ROUNDINGS:
            raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
        if rounding != "nearest" and (coding != "compact" or values not in QUANTISED):
            raise ValueError("stochastic rounding needs the compact coding with int2-ans .. int8-ans values")
        init_seed = seed_for(seed, 0) if init_seed is None else init_seed
        if not (isinstance(init_seed, int) and 0 <= init_seed < 2**63):
            raise ValueError(f"init_seed must be an integer in [0, 2^63), got {init_seed!r}")
        super().__init__(**fedavg_kwargs)
        self.num_rounds, self.values, self.weighting, self.seed = num_rounds, values, weighting, seed
        self.prunable = prunable or (lambda name, a: a.ndim >= 2)
        self.server: Optional[FedDIPServer] = None
        self.node_masks: dict[int, dict[str, np.ndarray]] = {}  # the global mask each node last received
        self.coding, self.rounding, self.init_seed = coding, rounding, init_seed
        self.residual_feedback = bool(residual_feedback)
        # Compact coding: the server's end of protocol.transport (what each node holds, by node id)
        # and the global mask each node last received in a compact message.
        self.transport: Optional[ServerEnd] = None
        self.compact_masks: dict[int, dict[str, np.ndarray]] = {}
        self.bytes_down = 0  # training messages, as the simulation counts them
        self.bytes_up = 0
        self.bytes_evaluate = 0  # evaluation messages (down; their replies carry metrics)
        self.evaluated: set[int] = set()  # nodes sent this round's evaluation message
        self.rejected = 0  # replies dropped from aggregation: see aggregate_train for the checks
        self.rejected_evaluate = 0  # evaluation replies dropped: see aggregate_evaluate
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

    @property
    def compact(self) -> bool:
        """Whether training messages use the compact coding (coding="compact", lossy values).

        Returns
        -------
        bool : True for protocol.transport's messages, False for the plain coding.
        """
        return self.coding == "compact" and self.values not in LOSSLESS

    def _start(self, arrays: ArrayRecord) -> FedDIPServer:
        if self.server is None:
            plain = {k: a.numpy() for k, a in arrays.items() if a.dtype in _FLOATS}
            self.server = FedDIPServer(plain, [k for k, a in plain.items() if self.prunable(k, a)], self.schedule,
                                       seed=self.seed)
            if self.compact:  # every node starts from the initial model (as the simulation's clients)
                self.transport = ServerEnd(self.server.weights, values=self.values, rounding=self.rounding,
                                           seed=self.seed, init_seed=self.init_seed)
        return self.server

    def _messages(
        self, messages: Iterable[Message], server: FedDIPServer, config: ConfigRecord, compact: bool = False,
        evaluate: bool = False,
    ) -> list[Message]:
        """One message per node with the global model coded relative to the mask that node holds
        (`compact`: as the difference from the model it holds, protocol.transport; `evaluate`: the
        plain coding, lossless where the compact coding is used for training)."""
        values = "auto" if evaluate and self.compact else self.values
        t = server.round
        config[MASKED_KEY] = list(server.masks)
        config[PRUNABLE_KEY] = server.prunable
        config[VALUES_KEY], config[ROUND_KEY], config[S0_KEY], config[SEED_KEY] = (
            values,
            t,
            server.schedule.s0,
            self.seed,
        )
        config[LR_KEY], config[LAMBDA_KEY] = server.schedule.learning_rate(t), server.schedule.lam(t)
        if compact:
            return self._compact_messages(messages, server, config)
        model = ArrayRecord(array_dict={k: Array(v) for k, v in server.weights.items()})
        out = []
        for m in messages:
            node = m.metadata.dst_node_id
            known = self.node_masks.get(node) if server.masks else None
            encoded = encode_arrayrecord(model, masks=server.masks or None, reference=known, values=values)
            if server.masks:
                self.node_masks[node] = server.masks
            if evaluate:
                self.bytes_evaluate += encoded_size(encoded)
            else:
                self.bytes_down += encoded_size(encoded)
            content = RecordDict({self.arrayrecord_key: encoded, self.configrecord_key: config})
            out.append(Message(content=content, message_type=m.metadata.message_type, dst_node_id=node))
        return out

    def _compact_messages(
        self, messages: Iterable[Message], server: FedDIPServer, config: ConfigRecord
    ) -> list[Message]:
        """One message per node: ServerEnd.downlink's bytes (the difference from the model the node
        holds, an init frame first at the first contact), as the simulation sends in round t, with
        a config of the node's own that adds the CRC-32C of the model it holds once decoded."""
        transport = cast(ServerEnd, self.transport)  # _start set it up
        t, shared = server.round, server.masks or None
        config[CODING_KEY], config[ROUNDING_KEY], config[INIT_SEED_KEY] = "compact", self.rounding, self.init_seed
        config[RESIDUAL_KEY] = self.residual_feedback
        out = []
        for m in messages:
            node = m.metadata.dst_node_id
            known = self.compact_masks.get(node) if shared else None
            payload, held = transport.downlink(node, server.weights, shared, known, t)
            if shared:
                self.compact_masks[node] = server.masks
            self.bytes_down += len(payload)
            own = ConfigRecord({**config, CRC_KEY: model_crc(held)})
            content = RecordDict({self.arrayrecord_key: _compact_record(payload), self.configrecord_key: own})
            out.append(Message(content=content, message_type=m.metadata.message_type, dst_node_id=node))
        return out

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Any
    ) -> Iterable[Message]:
        """FedAvg's sampling of the training nodes, each sent the global model coded relative to the
        global mask it last received, with the FedDIP entries added to `config`. With the compact
        coding each node gets ServerEnd.downlink's message (the server's record of the model the
        node holds advances to what it decodes) and a copy of `config` with CRC_KEY added.

        Parameters
        ----------
        server_round : flwr's round r (the protocol's t = r - 1).
        arrays : the initial model: its float arrays start the protocol's server at the first call;
            later calls (and the messages) use the server's global model instead.
        config : the config sent with the model; the round's FedDIP entries (MASKED_KEY,
            PRUNABLE_KEY, VALUES_KEY, ROUND_KEY, S0_KEY, SEED_KEY, LR_KEY, LAMBDA_KEY; with the compact
            coding also CODING_KEY, ROUNDING_KEY, INIT_SEED_KEY, RESIDUAL_KEY) are written into it.
        grid : flwr's Grid, whose nodes FedAvg samples.

        Returns
        -------
        Iterable[Message] : one training message per sampled node (none when FedAvg samples none).

        Raises
        ------
        ValueError : lambda_max < 0 or lambda_segments < 2 (lambda_t is computed here).
        """
        server = self._start(arrays)
        messages = self._messages(super().configure_train(server_round, arrays, config, grid), server, config,
                                  compact=self.compact)
        self.sampled = {m.metadata.dst_node_id for m in messages}
        return messages

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Any
    ) -> Iterable[Message]:
        """FedAvg's sampling of the evaluation nodes, each sent the global model as configure_train
        sends it with the plain coding (whatever `coding`: the compact state is left as it is; with
        the compact coding the values are lossless, "auto", so that the nodes score the global model
        itself). Their bytes count in `bytes_evaluate`, not `bytes_down`.

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
        messages = self._messages(super().configure_evaluate(server_round, arrays, config, grid), server, config,
                                  evaluate=True)
        self.evaluated = {m.metadata.dst_node_id for m in messages}
        return messages

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> Optional[MetricRecord]:
        """FedAvg's aggregation of the evaluation metrics over the replies that pass the checks of
        aggregate_train's metrics (one MetricRecord of finite numbers, `weighted_by_key` in (0,
        MAX_WEIGHT], the shape most replies share): others are dropped, logged and counted in
        `rejected_evaluate`, rather than ending the run in flwr's consistency check. A node whose
        evaluation reply failed or is missing may or may not hold the global mask it was sent: the
        next message to it carries the mask whole (as after a failed training reply).

        Parameters
        ----------
        server_round : flwr's round.
        replies : the evaluation replies, with or without errors.

        Returns
        -------
        Optional[MetricRecord] : what flwr's FedAvg.aggregate_evaluate returns for the replies kept.
        """
        replies = list(replies)
        answered = {r.metadata.src_node_id for r in replies if not r.has_error() and r.has_content()}
        for node in self.evaluated - answered:
            self.node_masks.pop(node, None)
        self.evaluated = set()
        checked, reasons = [], {}
        for reply in replies:
            if reply.has_error() or not reply.has_content():
                continue
            try:
                checked.append((reply, self._check_metrics(reply)[0]))
            except _BadReply as e:
                reasons[reply.metadata.src_node_id] = str(e)
        shapes = Counter(shape for _, shape in checked)
        common = max(shapes, key=shapes.__getitem__) if shapes else None
        dropped = set()
        for reply, shape in checked:
            if shape != common:
                dropped.add(id(reply))
                reasons[reply.metadata.src_node_id] = (f"metrics {_describe(shape)} differ from the round's "
                                                       f"{_describe(common)}")
        dropped |= {id(r) for r in replies if r.has_content() and not r.has_error()
                    and r.metadata.src_node_id in reasons}
        kept = [r for r in replies if id(r) not in dropped]  # in the order they came
        for node, why in sorted(reasons.items()):
            log(WARNING, "FedDIP: evaluation reply from node %d dropped: %s", node, why)
        self.rejected_evaluate += len(reasons)
        return super().aggregate_evaluate(server_round, kept)

    def _reply_size(self, record: Optional[ArrayRecord]) -> int:
        """Bytes of the message a reply's record carries in this strategy's coding (0: none)."""
        if record is None or not (is_compact(record) if self.compact else is_encoded(record)):
            return 0
        return len(record[ENCODED_KEY].data)

    def _decode_reply(self, reply: Message, server: FedDIPServer) -> dict[str, np.ndarray]:
        """The reply's model, checked against the global model's schema (names, shapes, dtypes)
        before anything is allocated beyond the model's own size, inside the global mask, and
        finite; CodecError or _BadReply otherwise."""
        record = reply.content.array_records.get(self.arrayrecord_key)
        if self.compact:
            return self._rebuild_reply(reply, record, server)
        if record is None or not is_encoded(record):
            raise CodecError("reply carries no encoded model")
        schema = {k: (v.shape, v.dtype) for k, v in server.weights.items()}
        limit = sum(v.nbytes for v in server.weights.values())
        plain, positions = decode_arrayrecord(record, reference=server.masks or None, max_bytes=limit, expect=schema)
        for k, m in server.masks.items():
            if (positions[k] & ~m).any():
                raise CodecError(f"reply's {k!r} has values outside the global mask it was sent")
        model = {k: a.numpy() for k, a in plain.items()}
        _check_finite(model)
        return model

    def _rebuild_reply(
        self, reply: Message, record: Optional[ArrayRecord], server: FedDIPServer
    ) -> dict[str, np.ndarray]:
        """The compact coding's upload: the model the node holds, as the server recorded it, plus
        the decoded message (ServerEnd.uplink, the simulation's own rebuild, which checks the
        message against the model's layout before it allocates anything); zero outside the global
        mask (the base is masked, and the message's positions must lie inside it) and finite;
        CodecError, ValueError or _BadReply otherwise."""
        if record is None or not is_compact(record):
            raise CodecError("reply carries no compact-coded model")
        node = reply.metadata.src_node_id
        model = cast(ServerEnd, self.transport).uplink(node, record[ENCODED_KEY].data, server.masks or None)
        for k, m in server.masks.items():
            if np.count_nonzero(model[k][~m]):
                raise CodecError(f"reply's {k!r} has values outside the global mask it was sent")
        _check_finite(model)
        return model

    def _check_metrics(self, reply: Message) -> tuple[_MetricShape, float]:
        """check_metrics(reply, self.weighted_by_key)."""
        return check_metrics(reply, self.weighted_by_key)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[Optional[ArrayRecord], Optional[MetricRecord]]:
        """Aggregate the replies that pass every check, or leave the state as it was.

        With the compact coding the nodes that failed or are missing are started afresh (their
        next message opens with an init frame): flwr keeps a node's context as it was when its
        ClientApp raises, and a missing reply leaves unknown whether the node decoded its message.

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
            bytes_up += self._reply_size(reply.content.array_records.get(self.arrayrecord_key))
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
            if self.transport is not None:  # and so for the compact coding: start it afresh (an init frame)
                self.transport.held.pop(node, None)
                self.compact_masks.pop(node, None)
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


def _check_finite(model: dict[str, np.ndarray]) -> None:
    for k, a in model.items():
        if not np.isfinite(a).all():  # one NaN or inf would spread through the average
            raise _BadReply(f"reply's {k!r} holds non-finite values")


def _describe(shape: Optional[_MetricShape]) -> str:
    """A metric shape for messages: record 'metrics' {'loss': scalar, 'hist': list of 3}."""
    if shape is None:
        return "(none)"
    name, items = shape
    fields = ", ".join(f"{k!r}: {'scalar' if n < 0 else f'list of {n}'}" for k, n in items)
    return f"in record {name!r} {{{fields}}}"
