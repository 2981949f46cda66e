"""Flower integration (optional extra [flower]): our codecs on Flower's Message API.

- `encode_arrayrecord` / `decode_arrayrecord`: an ArrayRecord of float arrays <-> an ArrayRecord
  holding one Array of stype "feddip/v1" whose bytes are a feddip_kernels message.
- `feddip_mod`: a ClientApp mod. Incoming encoded ArrayRecords are decoded before the ClientApp
  sees them, and the positions received for the tensors the strategy lists under the config key
  "feddip-masked" are kept in the context state as the shared mask. Replies
  are encoded relative to that mask: values only, the reply pruned to the mask (as FedDIP clients
  upload), with the value codec named under "feddip-values" (raw when absent). Messages without
  encoded records pass through unchanged.
- `FedDIP`: a Message-API strategy (a FedAvg) that keeps the global mask: ERK masks at density
  1 - s0 in round 1, global magnitude top-k every `mask_every` rounds on the cubic sparsity
  schedule, the mask applied to the aggregate, and every model it sends encoded. It counts the
  encoded bytes each way in `bytes_down` / `bytes_up`.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Optional

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg

from .codecs import DEFAULT_MAX_BYTES, VALUES, CodecError, decode_model, encode_model
from .pruning import erk_densities, global_topk_masks, k_for_density
from .schedules import sparsity_schedule

STYPE = "feddip/v1"
ENCODED_KEY = "feddip"
_STATE_KEY = "feddip.mask"
MASKED_KEY = "feddip-masked"  # config entry: names of the tensors pruned by the shared mask
VALUES_KEY = "feddip-values"  # config entry: value codec for the replies (raw, fp16, bf16, int8)

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
    record: ArrayRecord, *, reference: Optional[dict[str, np.ndarray]] = None, max_bytes: int = DEFAULT_MAX_BYTES
) -> tuple[ArrayRecord, dict[str, np.ndarray]]:
    """(plain ArrayRecord, positions as bool masks) of an encoded record; raises CodecError on bad bytes."""
    decoded = decode_model(record[ENCODED_KEY].data, reference=reference, max_bytes=max_bytes)
    arrays = {k: Array(v) for k, v in decoded.tensors.items()}
    arrays.update({k: a for k, a in record.items() if k != ENCODED_KEY})
    return ArrayRecord(array_dict=arrays), decoded.masks


def _masks_to_record(masks: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord(array_dict={k: Array(m.astype(np.uint8)) for k, m in masks.items()})


def _record_to_masks(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: a.numpy().astype(bool) for k, a in record.items()}


def feddip_mod(msg: Message, ctxt: Context, call_next: Callable[[Message, Context], Message]) -> Message:
    """ClientApp mod: decode incoming feddip records, encode the reply's ArrayRecords relative to
    the mask received (sparse tensors) or losslessly with positions (dense ones)."""
    received: dict[str, np.ndarray] = {}
    values = "raw"
    if msg.has_content() and any(is_encoded(r) for r in msg.content.array_records.values()):
        # Only the tensors the strategy names are masked; zeros elsewhere are just zeros.
        masked: set[str] = set()
        for config in msg.content.config_records.values():
            masked.update(config.get(MASKED_KEY, []))
            values = str(config.get(VALUES_KEY, values))
        # A new RecordDict: the incoming one may be shared (e.g. one object for every node).
        content = RecordDict(dict(msg.content.items()))
        for key, record in msg.content.array_records.items():
            if is_encoded(record):
                plain, masks = decode_arrayrecord(record)
                content[key] = plain
                received.update({k: m for k, m in masks.items() if k in masked})
        msg.content = content
        if received:
            ctxt.state[_STATE_KEY] = _masks_to_record(received)
    reply = call_next(msg, ctxt)
    if reply.has_error() or not reply.has_content():
        return reply
    shared = _record_to_masks(ctxt.state[_STATE_KEY]) if _STATE_KEY in ctxt.state else {}
    for key, record in list(reply.content.array_records.items()):
        if not is_encoded(record):
            names = set(record.keys())
            masks = {k: m for k, m in shared.items() if k in names}
            reply.content[key] = encode_arrayrecord(record, masks=masks or None, reference=masks or None, values=values)
    return reply


class FedDIP(FedAvg):
    """FedAvg with FedDIP's server side: global mask, cubic sparsity schedule, top-k mask updates,
    encoded transfers. `prunable(name, array)` selects the pruned tensors (default: arrays with
    two or more dimensions, i.e. conv and linear weights). `values` is the value codec both ways:
    of the models sent, and, through the config, of the replies feddip_mod encodes."""

    def __init__(
        self,
        *,
        num_rounds: int,
        s0: float = 0.5,
        sp: float = 0.95,
        mask_every: int = 1,
        values: str = "raw",
        prunable: Optional[Callable[[str, np.ndarray], bool]] = None,
        seed: int = 0,
        **fedavg_kwargs: Any,
    ) -> None:
        if not (isinstance(num_rounds, int) and num_rounds >= 1):
            raise ValueError(f"num_rounds must be an integer >= 1, got {num_rounds!r}")
        if not (isinstance(mask_every, int) and mask_every >= 1):
            raise ValueError(f"mask_every must be an integer >= 1, got {mask_every!r}")
        if not 0.0 <= s0 <= sp < 1.0:
            raise ValueError(f"need 0 <= s0 <= sp < 1, got s0={s0}, sp={sp}")
        if values not in VALUES:
            raise ValueError(f"values must be one of {sorted(VALUES)}, got {values!r}")
        super().__init__(**fedavg_kwargs)
        self.num_rounds, self.s0, self.sp, self.mask_every = num_rounds, s0, sp, mask_every
        self.values, self.seed = values, seed
        self.prunable = prunable or (lambda name, a: a.ndim >= 2)
        self.masks: dict[str, np.ndarray] = {}
        self.bytes_down = 0
        self.bytes_up = 0
        self.rejected = 0  # replies dropped from aggregation because they did not decode

    def _init_masks(self, arrays: dict[str, np.ndarray]) -> None:
        names = [k for k, a in arrays.items() if a.dtype in _FLOATS and self.prunable(k, a)]
        dens = erk_densities([arrays[k].shape for k in names], 1.0 - self.s0)
        rng = np.random.default_rng(self.seed)
        for k, d in zip(names, dens):
            m = np.zeros(arrays[k].size, dtype=bool)
            m[rng.choice(arrays[k].size, k_for_density(arrays[k].size, d), replace=False)] = True
            self.masks[k] = m.reshape(arrays[k].shape)

    def _encode(self, arrays: ArrayRecord) -> ArrayRecord:
        plain = {k: a.numpy() for k, a in arrays.items()}
        if not self.masks:
            self._init_masks(plain)
        pruned = ArrayRecord(
            array_dict={k: Array(plain[k] * self.masks[k] if k in self.masks else plain[k]) for k in plain}
        )
        return encode_arrayrecord(pruned, masks=self.masks, values=self.values)

    def _configure(self, messages: Iterable[Message]) -> list[Message]:
        out = list(messages)
        for m in out:
            for record in m.content.array_records.values():
                self.bytes_down += encoded_size(record)
        return out

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Any) -> Iterable[Message]:
        encoded = self._encode(arrays)
        config[MASKED_KEY], config[VALUES_KEY] = list(self.masks), self.values
        return self._configure(super().configure_train(server_round, encoded, config, grid))

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Any) -> Iterable[Message]:
        encoded = self._encode(arrays)
        config[MASKED_KEY], config[VALUES_KEY] = list(self.masks), self.values
        return self._configure(super().configure_evaluate(server_round, encoded, config, grid))

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[Optional[ArrayRecord], Optional[MetricRecord]]:
        valid, rejected = [], 0
        for reply in replies:
            if reply.has_error() or not reply.has_content():
                valid.append(reply)  # FedAvg counts and skips these itself
                continue
            try:
                for key, record in list(reply.content.array_records.items()):
                    if is_encoded(record):
                        self.bytes_up += encoded_size(record)
                        reply.content[key] = decode_arrayrecord(record, reference=self.masks)[0]
            except CodecError:  # one bad reply must not abort the round: drop it, count it
                rejected += 1
                continue
            valid.append(reply)
        self.rejected += rejected
        arrays, metrics = super().aggregate_train(server_round, valid)
        if metrics is not None or rejected:
            metrics = MetricRecord({**(dict(metrics) if metrics is not None else {}), "feddip-rejected": rejected})
        if arrays is None:
            return arrays, metrics
        plain = {k: a.numpy() for k, a in arrays.items()}
        if self.masks and server_round % self.mask_every == 0:
            density = 1.0 - sparsity_schedule(server_round, self.num_rounds, self.s0, self.sp)
            names = list(self.masks)
            self.masks = dict(zip(names, global_topk_masks([plain[k] for k in names], density=density)))
        for k, m in self.masks.items():
            plain[k] = plain[k] * m
        return ArrayRecord(array_dict={k: Array(v) for k, v in plain.items()}), metrics
