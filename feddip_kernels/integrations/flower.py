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
- `FedDIP`: a Message-API strategy (a FedAvg) whose server side is feddip_kernels.server, the
  same code `feddip simulate` runs: aggregation, the global mask pruned by magnitude every
  `mask_every` rounds on the cubic schedule, nested masks. Each node gets the model coded relative
  to the global mask it last received. Replies that do not decode against the global model's
  schema are dropped and counted. Bytes each way: `bytes_down` / `bytes_up`.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Optional

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg

from ..codecs import DEFAULT_MAX_BYTES, VALUES, CodecError, decode_model, encode_model
from ..server import FedDIPServer, Schedule, random_erk_masks, seed_for

STYPE = "feddip/v1"
ENCODED_KEY = "feddip"
_STATE_KEY = "feddip.mask"
# Config entries the strategy sends with every model.
MASKED_KEY = "feddip-masked"  # names of the tensors whose positions are the global mask ([] before there is one)
PRUNABLE_KEY = "feddip-prunable"  # names of the pruned tensors
VALUES_KEY = "feddip-values"  # value codec for the replies (raw, fp16, bf16, int8)
ROUND_KEY, LR_KEY, LAMBDA_KEY = "feddip-round", "feddip-lr", "feddip-lambda"  # t, lr_t, lambda_t
S0_KEY, SEED_KEY = "feddip-s0", "feddip-seed"  # for each client's own round-0 ERK mask
MASKS_RECORD = "feddip-masks"  # the ArrayRecord the mod hands the ClientApp: the mask to train under

_FLOATS = ("float32", "float64")


def is_encoded(record: ArrayRecord) -> bool:
    return ENCODED_KEY in record and record[ENCODED_KEY].stype == STYPE


def encoded_size(record: ArrayRecord) -> int:
    """Bytes of the encoded payload (0 when the record is not encoded)."""
    return len(record[ENCODED_KEY].data) if is_encoded(record) else 0


def encode_arrayrecord(
    record: ArrayRecord,
    *,
    masks: Optional[dict[str, np.ndarray]] = None,
    reference: Optional[dict[str, np.ndarray]] = None,
    values: str = "raw",
) -> ArrayRecord:
    """One Array of stype feddip/v1 carrying every float32/float64 array of `record` (zeros off
    the positions cost nothing); other arrays are passed along as they are."""
    floats, others = {}, {}
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
    bytes, or (with `expect`, name -> (shape, dtype)) on a message for another model."""
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
    give the ClientApp its training mask, encode the reply's ArrayRecords relative to the global mask."""
    values = "raw"
    if msg.has_content() and any(is_encoded(r) for r in msg.content.array_records.values()):
        config: dict[str, Any] = {}
        for record in msg.content.config_records.values():
            config.update(record)
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
    return _record_to_masks(ctxt.state[_STATE_KEY]) if _STATE_KEY in ctxt.state else {}


def _client_index(ctxt: Context) -> int:
    """The client's index for seeds: its node config's partition-id, else its node id."""
    return int(ctxt.node_config.get("partition-id", ctxt.node_id))


class FedDIP(FedAvg):
    """FedAvg with FedDIP's server side (feddip_kernels.server: the protocol of
    ../shared/feddip-protocol.md): clients train under their own ERK mask in round 1 (t = 0) and
    under the global mask after; the server averages (by "num-examples" with weighting="samples",
    equally with "equal"), re-applies the mask, and prunes by global magnitude to s_t when
    t % mask_every == 0; masks are nested. Flower's round r is the protocol's t = r - 1.
    `prunable(name, array)` selects the pruned tensors (default: two or more dimensions, i.e. conv
    and linear weights). `values` is the value codec both ways. The config sent with each model
    carries lr_t and lambda_t (LR_KEY, LAMBDA_KEY) for the clients' optimiser."""

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
        if values not in VALUES:
            raise ValueError(f"values must be one of {sorted(VALUES)}, got {values!r}")
        if weighting not in ("samples", "equal"):
            raise ValueError(f"weighting must be 'samples' or 'equal', got {weighting!r}")
        super().__init__(**fedavg_kwargs)
        self.num_rounds, self.values, self.weighting, self.seed = num_rounds, values, weighting, seed
        self.prunable = prunable or (lambda name, a: a.ndim >= 2)
        self.server: Optional[FedDIPServer] = None
        self.node_masks: dict[int, dict[str, np.ndarray]] = {}  # the global mask each node last received
        self.bytes_down = 0
        self.bytes_up = 0
        self.rejected = 0  # replies dropped from aggregation because they did not decode to the model
        self.sampled: set[int] = set()  # nodes sent this round's training message
        # One entry a training round: nodes whose replies were aggregated, rejected, failed (error
        # replies) and missing (no reply within the round's timeout: crashed, stalled, cut off).
        self.rounds: list[dict[str, list[int]]] = []

    @property
    def masks(self) -> dict[str, np.ndarray]:
        """The global mask (empty before round 1's aggregation)."""
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
        config[VALUES_KEY], config[ROUND_KEY], config[S0_KEY], config[SEED_KEY] = self.values, t, server.schedule.s0, self.seed
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

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Any) -> Iterable[Message]:
        server = self._start(arrays)
        messages = self._messages(super().configure_train(server_round, arrays, config, grid), server, config)
        self.sampled = {m.metadata.dst_node_id for m in messages}
        return messages

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Any) -> Iterable[Message]:
        server = self._start(arrays)
        return self._messages(super().configure_evaluate(server_round, arrays, config, grid), server, config)

    def _decode_reply(self, reply: Message, server: FedDIPServer) -> dict[str, np.ndarray]:
        """The reply's model, checked against the global model's schema (names, shapes, dtypes)
        before anything is allocated beyond the model's own size; CodecError otherwise."""
        record = reply.content.array_records.get(self.arrayrecord_key)
        if record is None or not is_encoded(record):
            raise CodecError("reply carries no encoded model")
        self.bytes_up += encoded_size(record)
        schema = {k: (v.shape, v.dtype) for k, v in server.weights.items()}
        limit = sum(v.nbytes for v in server.weights.values())
        plain, positions = decode_arrayrecord(record, reference=server.masks or None, max_bytes=limit, expect=schema)
        for k, m in server.masks.items():
            if (positions[k] & ~m).any():
                raise CodecError(f"reply's {k!r} has values outside the global mask it was sent")
        return {k: a.numpy() for k, a in plain.items()}

    def _num_examples(self, reply: Message) -> float:
        for record in reply.content.metric_records.values():
            if self.weighted_by_key in record:
                n = float(record[self.weighted_by_key])
                if n > 0:
                    return n
        raise KeyError(f"reply has no positive {self.weighted_by_key!r} metric")

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[Optional[ArrayRecord], Optional[MetricRecord]]:
        server = self.server
        valid, uploads = [], []
        seen = {"aggregated": [], "rejected": [], "failed": [], "missing": []}
        # In node order, so that the average is summed in a reproducible order.
        for reply in sorted(replies, key=lambda r: r.metadata.src_node_id):
            node = reply.metadata.src_node_id
            if reply.has_error() or not reply.has_content():
                self.node_masks.pop(node, None)  # its state is unknown now
                seen["failed"].append(node)
                continue
            try:
                model = self._decode_reply(reply, server)
                weight = self._num_examples(reply) if self.weighting == "samples" else 1.0
            except (CodecError, KeyError, TypeError, ValueError):
                seen["rejected"].append(node)  # one bad reply must not abort the round: drop it, count it
                continue
            valid.append(reply)
            uploads.append((model, weight))
            seen["aggregated"].append(node)
        answered = set(seen["aggregated"] + seen["rejected"] + seen["failed"])
        seen["missing"] = sorted(self.sampled - answered)
        for node in seen["missing"]:
            self.node_masks.pop(node, None)  # it may or may not have received the last model
        self.rounds.append(seen)
        self.rejected += len(seen["rejected"])
        counts = {f"feddip-{k}": len(v) for k, v in seen.items()}
        if not uploads:  # nothing to aggregate: the global model stays, the round is not counted
            return None, MetricRecord(counts)
        server.aggregate(uploads)
        metrics = self.train_metrics_aggr_fn([r.content for r in valid], self.weighted_by_key)
        metrics = MetricRecord({**(dict(metrics) if metrics is not None else {}), **counts})
        return ArrayRecord(array_dict={k: Array(v) for k, v in server.weights.items()}), metrics
