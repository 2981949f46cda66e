"""Compact transport: FedDIP's transfers as quantised, entropy-coded *deltas* against what the
other end already holds, with the quantisation error carried to the next contact, in NumPy alone
(shared by `feddip simulate --preset compact` and the Flower integration's compact coding).

Downlink (ServerEnd): the server keeps, for every client c, `held[c]`, the model c holds as it
received it (the initial model before the first contact). It sends c the difference between the
global model and held[c] (restricted to the global mask for the masked tensors: held[c] is masked
by the current mask first), coded with encode_model under the shared mask, relative to the mask c
already holds; then sets held[c] = masked(held[c]) + decoded, exactly what the client computes
(`decoded`: what the message decodes to, which the encoder returns from its own quantised values,
bit for bit decode_model's, without decoding: encode_model's decoded=True). What quantisation
left out (global - held[c]) is thereby re-sent at the next contact, however stale the client:
the two ends never drift apart.

Uplink (ClientEnd): the client sends x = masked(local - held) + e, e its residual (the part of
earlier uploads that quantisation left out), coded under the shared mask, and keeps
e = x - decoded. The server, knowing held[c], rebuilds the upload as
held[c] + decoded: the same bits the client believes it sent.

First contact: the client holds nothing yet. The server sends an init frame, 21 bytes,

    "FDKI" | version u8 = 1 | seed u64 | CRC-32C u32 of the initial model | CRC-32C u32 of the frame

from which the client builds the initial model itself (the run's seed fixes it) and checks it;
the delta message, if any, follows the frame in the same bytes (none in the first round, when the
global model is the initial one and there is no mask yet).

Messages name tensors by their index in the model's name order and send them flat ("0", "1",
... with one dimension): both ends hold the model's layout (the init frame's CRC covers names,
dtypes and shapes), and a LeNet-5 message's names and shapes took 300 of its 4,000 bytes.

Every value either end adds to a model is a decoder's output, so both ends agree bit for bit.
Stochastic rounding draws from seed_for(seed, 6, t, client, direction) (0: down, 1: up).
"""

from __future__ import annotations

import struct
from typing import Any, Callable, Collection, Mapping, Optional, cast

import numpy as np

from ..codecs import CodecError, crc32c, decode_model, encode_model
from ..codecs.values import LOSSLESS, check_codec
from ..pruning import unpack_mask
from .server import apply_mask, seed_for

__all__ = ["INIT_FRAME_SIZE", "INIT_MAGIC", "ClientEnd", "ServerEnd", "init_frame", "model_crc", "read_init_frame"]

INIT_MAGIC = b"FDKI"
INIT_VERSION = 1
_INIT = struct.Struct("<4sBQI")
_CRC = struct.Struct("<I")
INIT_FRAME_SIZE = _INIT.size + _CRC.size  # 21 bytes
_PURPOSE = 6  # seed_for(seed, 6, t, client, direction): the transport's stochastic rounding
DOWN, UP = 0, 1

Model = Mapping[str, np.ndarray]


def model_crc(tensors: Model) -> int:
    """CRC-32C of a model: each tensor in name order, its name, dtype, shape and little-endian bytes."""
    crc = 0
    for name in sorted(tensors):
        a = np.asarray(tensors[name])
        a = np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<"))
        head = f"{name}\0{a.dtype.str}\0{a.shape}\0".encode()
        crc = crc32c(a.reshape(-1).view(np.uint8), crc32c(head, crc))
    return crc


def init_frame(seed: int, init: Model) -> bytes:
    """The 21-byte frame that tells a client to build the initial model from `seed` (and which
    model it must get)."""
    body = _INIT.pack(INIT_MAGIC, INIT_VERSION, seed, model_crc(init))
    return body + _CRC.pack(crc32c(body))


def read_init_frame(data: bytes) -> tuple[int, int]:
    """(seed, CRC-32C of the model) of an init frame at the start of `data`; CodecError if corrupt."""
    if len(data) < INIT_FRAME_SIZE:
        raise CodecError(f"init frame of {len(data)} bytes, {INIT_FRAME_SIZE} needed")
    magic, version, seed, crc = _INIT.unpack_from(data)
    if magic != INIT_MAGIC:
        raise CodecError(f"bad init frame magic {bytes(magic)!r}")
    if crc32c(data[: _INIT.size]) != _CRC.unpack_from(data, _INIT.size)[0]:
        raise CodecError("init frame checksum mismatch: the frame is corrupt")
    if version != INIT_VERSION:
        raise CodecError(f"unsupported init frame version {version} (this library reads {INIT_VERSION})")
    return seed, crc


def _check_lossy(values: str, rounding: str) -> None:
    check_codec(values, rounding)
    if values in LOSSLESS:
        raise ValueError(f"the compact transport codes deltas with lossy values, not {values!r}: lossless "
                         "values send the model itself (encode_model)")


def _base(held: Model, masks: Optional[Model]) -> dict[str, np.ndarray]:
    """`held` with its masked tensors restricted to `masks` (+0.0 outside)."""
    return {k: apply_mask(v, masks[k]) if masks and k in masks else v for k, v in held.items()}


def _added(base: Model, decoded: Model) -> dict[str, np.ndarray]:
    """base + decoded, tensor by tensor (both ends run this one sum)."""
    return {k: base[k] + decoded[k] for k in base}


def _wire(order: list[str], tensors: Optional[Model]) -> Optional[dict[str, np.ndarray]]:
    """Tensors as a message names them: by index in the model's order, flat."""
    if tensors is None:
        return None
    return {str(i): np.asarray(tensors[k]).reshape(-1) for i, k in enumerate(order) if k in tensors}


def _unwire(order: list[str], like: Model, tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A message's tensors back under their names and shapes (those of `like`)."""
    return {order[int(i)]: np.asarray(v).reshape(like[order[int(i)]].shape) for i, v in tensors.items()}


def _expect(order: list[str], model: Model) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    return {str(i): ((model[k].size,), model[k].dtype) for i, k in enumerate(order)}


def _rounding_seed(rounding: str, seed: int, t: int, client: int, direction: int) -> Optional[int]:
    """The seed of a message's stochastic rounding (none for nearest: SeedSequence takes 50 us)."""
    return seed_for(seed, _PURPOSE, t, client, direction) if rounding == "stochastic" else None


def _encode(order: list[str], tensors: Model, masks: Optional[Model], reference: Optional[Model], values: str,
             rounding: str, seed: Optional[int]) -> tuple[bytes, dict[str, np.ndarray]]:
    """(the message, what the other end decodes from it: the encoder's quantised values, bit for
    bit what decode_model gives)."""
    msg, decoded = encode_model(cast(dict, _wire(order, tensors)), masks=_wire(order, masks),
                                reference=_wire(order, reference), values=values, rounding=rounding, seed=seed,
                                decoded=True)
    return msg, _unwire(order, tensors, decoded)


def _decode(order: list[str], like: Model, data: Any, reference: Optional[Model]
            ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(tensors, their positions as packed bits) of a message to or from a model shaped as `like`."""
    got = decode_model(data, reference=_wire(order, reference), expect=_expect(order, like))
    return _unwire(order, like, got.tensors), {order[int(i)]: b for i, b in got.packed.items()}


class ServerEnd:
    """The server's end of the compact transport: what every client holds, and the messages.

    `init`: the initial model (name -> float array), which every client starts from; `init_seed`:
    the seed the clients build it from (sent in the init frame). `values`: a lossy codec
    ("int8-ans", "int4-ans", "fp16-ans", ...); `rounding`: "nearest" or "stochastic"; `seed`: the
    run's seed, from which the stochastic rounding's seeds derive.
    """

    def __init__(self, init: Model, *, values: str = "int8-ans", rounding: str = "nearest", seed: int = 0,
                 init_seed: int = 0) -> None:
        _check_lossy(values, rounding)
        self.init = {k: np.array(v, copy=True) for k, v in init.items()}
        self.order = sorted(self.init)
        self.values, self.rounding, self.seed = values, rounding, seed
        self.frame = init_frame(init_seed, self.init)
        self.held: dict[int, dict[str, np.ndarray]] = {}  # clients contacted: the model each holds

    def downlink(self, client: int, weights: Model, masks: Optional[Model], known: Optional[Model],
                 t: int) -> tuple[bytes, dict[str, np.ndarray]]:
        """(the message to `client` in round t, the model the client holds once it has decoded
        it). `weights`: the global model, zero outside `masks` (the global mask, None before the
        first); `known`: the mask the client already holds (None: none)."""
        first = client not in self.held
        held = self.init if first else self.held[client]
        if set(weights) != set(held):
            raise ValueError("weights do not hold the model's tensors")
        base = _base(held, masks)
        delta = {k: np.subtract(w, base[k], dtype=base[k].dtype) for k, w in weights.items()}
        if first and not masks and not any(d.any() for d in delta.values()):
            self.held[client] = held  # the initial model itself: the frame alone
            return self.frame, held
        msg, decoded = _encode(self.order, delta, masks or None, known or None, self.values, self.rounding,
                               _rounding_seed(self.rounding, self.seed, t, client, DOWN))
        self.held[client] = now = _added(base, decoded)
        return (self.frame + msg if first else msg), now

    def uplink(self, client: int, data: bytes, masks: Optional[Model]) -> dict[str, np.ndarray]:
        """The model `client` sent (its message of this round, coded under `masks`, the global mask
        it trained with): held + decoded. CodecError for bytes that do not decode to the model's
        tensors."""
        if client not in self.held:
            raise ValueError(f"client {client} has received no model: it cannot upload")
        held = self.held[client]
        decoded, _ = _decode(self.order, held, data, masks or None)
        return _added(_base(held, masks), decoded)


class ClientEnd:
    """A client's end of the compact transport: the model it holds as received, its masks and its
    residual. `build(seed)` makes the initial model from an init frame's seed (checked against
    the frame's CRC). `residual_feedback`: carry the uplink's quantisation error to the next
    upload (off: each upload's error is dropped)."""

    def __init__(self, client: int, *, values: str = "int8-ans", rounding: str = "nearest", seed: int = 0,
                 build: Optional[Callable[[int], Model]] = None, residual_feedback: bool = True) -> None:
        _check_lossy(values, rounding)
        self.client = client
        self.values, self.rounding, self.seed = values, rounding, seed
        self.build = build
        self.residual_feedback = residual_feedback
        self.held: Optional[dict[str, np.ndarray]] = None
        self.masks: dict[str, np.ndarray] = {}  # the global mask last received ({} before one)
        self.residual: dict[str, np.ndarray] = {}

    def receive(self, data: bytes, masked: Collection[str] = ()) -> dict[str, np.ndarray]:
        """The model held after the server's message `data`; `masked`: the tensors the message
        codes under the global mask (their positions become the mask held). CodecError for bytes
        that do not decode, or an init frame whose model is not the one built; the end is then as
        it was (nothing is taken from a message that fails)."""
        view = memoryview(data)
        held, known, fresh = self.held, self.masks, False
        if bytes(view[:4]) == INIT_MAGIC:
            seed, crc = read_init_frame(bytes(view[:INIT_FRAME_SIZE]))
            if self.build is None:
                raise CodecError("an init frame, and no way to build the initial model (build=None)")
            init = {k: np.array(v, copy=True) for k, v in self.build(seed).items()}
            if model_crc(init) != crc:
                raise CodecError("the initial model built from the init frame's seed is not the server's (CRC)")
            held, known, fresh = init, {}, True
            view = view[INIT_FRAME_SIZE:]
        elif held is None:
            raise CodecError("the first message to a client must open with an init frame")
        masks: dict[str, np.ndarray] = {}
        if len(view):
            order = sorted(held)
            tensors, positions = _decode(order, held, view, known or None)
            unknown = sorted(set(masked) - set(positions))
            if unknown:
                raise CodecError(f"the message holds no tensors {unknown} to take the global mask from")
            masks = {k: unpack_mask(positions[k], held[k].shape) for k in masked}
            held = _added(_base(held, masks), tensors)
        elif masked:
            raise CodecError("no message to take the global mask from")
        else:
            masks = known
        if fresh:  # a new start: nothing left to carry
            self.residual = {}
        self.held, self.masks = held, masks
        return held

    def reply(self, local: Model, t: int) -> bytes:
        """The message carrying `local` (the model trained in round t from the one held; the masked
        tensors' dense weights may hold values outside the mask, which are not sent)."""
        if self.held is None:
            raise ValueError("no model held: nothing to reply to")
        wrong = sorted(k for k, v in self.held.items() if k not in local or np.shape(local[k]) != v.shape)
        if wrong:
            raise ValueError(f"the trained model's tensors {wrong} are missing or not shaped as the model held")
        masks = self.masks
        x = {}
        for k, b in self.held.items():  # x is masked below: what held holds outside the mask does not matter
            d = np.subtract(local[k], b, dtype=b.dtype)
            e = self.residual.get(k)
            if e is not None:
                d += e
            x[k] = apply_mask(d, masks[k]) if k in masks else d  # e dropped outside a smaller mask too
        order = sorted(self.held)
        msg, decoded = _encode(order, x, masks or None, masks or None, self.values, self.rounding,
                               _rounding_seed(self.rounding, self.seed, t, self.client, UP))
        if self.residual_feedback:
            self.residual = {k: x[k] - decoded[k] for k in x}
        return msg
