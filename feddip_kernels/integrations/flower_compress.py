"""Compression for any Flower app (Message API): a client mod and a wrapper around any flwr Strategy.

    from flwr.serverapp.strategy import FedAvg
    from feddip_kernels.integrations.flower_compress import Compressed, sparse_update_mod

    strategy = Compressed(FedAvg(), density=0.1)   # ServerApp: global top-k 10%, error feedback
    app = ClientApp(mods=[sparse_update_mod])      # ClientApp: settings come from the server

- `Compressed(strategy, ...)`: a Strategy that wraps another (FedAvg, FedProx, FedAdam, FedAvgM,
  a DP wrapper around one, ...) whose model travels in one ArrayRecord each way; with flwr's FedAvg
  family (a strategy with a `weighted_by_key`) each training reply must carry exactly one
  ArrayRecord and one MetricRecord, as FedAvg needs (see the class). configure_train /
  configure_evaluate call the wrapped strategy and replace the model in each message (the
  ArrayRecord under `arrayrecord_key`) by its coded form, adding the upload settings as a
  ConfigRecord of their own ("compress", CONFIG_RECORD).
  aggregate_train decodes each reply into the plain ArrayRecord of a trained model, checks it
  (schema before allocation, finite values, metrics) and hands the wrapped strategy's
  aggregate_train the replies it would have got without compression; bad ones are dropped and
  counted. The wrapped strategy is untouched: FedAdam's and FedAvgM's server state, FedProx's
  "proximal-mu" work as they do without the wrapper.
- `sparse_update_mod` (= `make_sparse_update_mod()`): decodes the incoming model, hands the
  ClientApp exactly the message the wrapped strategy built (the model plain, the "compress" record
  removed), and codes the training reply: the *update* (trained minus received) plus the residual
  the node kept from earlier rounds (error feedback, in its context state), sparsified by global
  top-k over all float tensors and coded with the value codec; or, with no sparsification,
  lossless values and a lossless downlink, the trained model itself (bit for bit).

Wire: an ArrayRecord holding one Array "feddip" (uint8) whose bytes are a feddip_kernels message of
all the record's NumPy arrays (float32/float64 sparse-coded, the other dtypes whole), of stype
"feddip/v1" (a model, as flower.py's encode_arrayrecord), "feddip-update/v1" (float tensors: an
update to add to the model the node was sent; the others: their values) or "feddip-delta/v1"
(downlink: the difference from the model the node holds). Arrays the codec does not carry (another
stype or dtype) travel beside it, as they are; where one sits between coded ones, the message's
"compress" ConfigRecord carries the names in the strategy's order (ORDER_KEY) and the mod rebuilds
the record in it.
"""

from __future__ import annotations

import reprlib
from collections import Counter
from io import BytesIO
from logging import INFO, WARNING
from typing import Any, Callable, Iterable, Mapping, Optional, cast

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideAdaptiveClipping,
    DifferentialPrivacyClientSideFixedClipping,
    Strategy,
)
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM
from numpy.lib import format as npy_format

from ..codecs import VALUE_CODECS, CodecError, decode_model, encode_model
from ..codecs.values import LOSSLESS
from ..protocol.transport import model_crc
from ..pruning import global_topk_masks
from .flower import ENCODED_KEY, STYPE, _BadReply, _describe, _MetricShape, check_metrics

__all__ = [
    "CONFIG_RECORD",
    "DELTA_STYPE",
    "DENSITY_KEY",
    "DOWNLINK_VALUES_KEY",
    "ERROR_FEEDBACK_KEY",
    "HELD_CRC_KEY",
    "ORDER_KEY",
    "RUN_CONFIG_KEYS",
    "STYPE",
    "UPDATE_STYPE",
    "VALUES_KEY",
    "Compressed",
    "is_compressed",
    "is_update",
    "make_sparse_update_mod",
    "sparse_update_mod",
]

UPDATE_STYPE = "feddip-update/v1"  # upload: float tensors are an update to the model sent
DELTA_STYPE = "feddip-delta/v1"  # download: float tensors are the difference from the model held
_STYPES = (STYPE, UPDATE_STYPE, DELTA_STYPE)
# The ConfigRecord of the settings, in every training message (the mod removes it before the
# ClientApp, or any mod after it, sees the message).
CONFIG_RECORD = "compress"
DENSITY_KEY = "compress-density"  # float in (0, 1]; 1.0: no sparsification
VALUES_KEY = "compress-values"  # the replies' value codec (codecs.VALUE_CODECS)
ERROR_FEEDBACK_KEY = "compress-error-feedback"  # bool: carry what was not sent to the next reply
HELD_CRC_KEY = "compress-held-crc"  # lossy downlink: model_crc of the model the node holds once decoded
# list[str]: the model's array names in the strategy's order, sent (training and evaluation messages)
# only where arrays travelling beside the coded message sit between coded ones.
ORDER_KEY = "compress-order"
DOWNLINK_VALUES_KEY = "compress-downlink-values"  # run config only: Compressed's downlink_values
# The run config entries Compressed.from_run_config reads ([tool.flwr.app.config] in pyproject.toml).
RUN_CONFIG_KEYS = (DENSITY_KEY, VALUES_KEY, ERROR_FEEDBACK_KEY, DOWNLINK_VALUES_KEY)
# The node's context state: its residual (error feedback) and, with a lossy downlink, the model it holds.
_RESIDUAL_STATE, _HELD_STATE = "compress.residual", "compress.held"

_FLOATS = ("float32", "float64")
_NUMPY = "numpy.ndarray"
# The dtypes a feddip_kernels message carries (the float ones sparse-coded, the others whole).
_CODED = frozenset(
    {"float32", "float64", "float16", "bool", "int8", "uint8", "int16", "uint16", "int32", "uint32", "int64",
     "uint64", "complex64", "complex128"}
)
# Client-side clipping for central DP: the clipped update must be what is sent (see Compressed).
_CLIENT_SIDE_CLIPPING = (DifferentialPrivacyClientSideFixedClipping, DifferentialPrivacyClientSideAdaptiveClipping)

Model = dict[str, np.ndarray]
Mod = Callable[[Message, Context, Callable[[Message, Context], Message]], Message]


def is_compressed(record: ArrayRecord) -> bool:
    """Whether `record` is one this module (or flower.py's encode_arrayrecord) coded.

    Parameters
    ----------
    record : any ArrayRecord.

    Returns
    -------
    bool : True when it holds an Array "feddip" of stype "feddip/v1", "feddip-update/v1" or
        "feddip-delta/v1".
    """
    return ENCODED_KEY in record and record[ENCODED_KEY].stype in _STYPES


def is_update(record: ArrayRecord) -> bool:
    """Whether `record` is a training reply coded as an update rather than as the trained model.

    Parameters
    ----------
    record : any ArrayRecord.

    Returns
    -------
    bool : True when it holds an Array "feddip" of stype "feddip-update/v1" (UPDATE_STYPE).
    """
    return ENCODED_KEY in record and record[ENCODED_KEY].stype == UPDATE_STYPE


def _size(record: ArrayRecord) -> int:
    """Bytes of a record's arrays (what it weighs in a message, less the framing)."""
    return sum(len(a.data) for a in record.values())


def _split(record: ArrayRecord) -> tuple[Model, dict[str, Array]]:
    """(the arrays a message carries, as NumPy, in record order; the other Arrays, left as they are)."""
    coded: Model = {}
    beside: dict[str, Array] = {}
    for name, a in record.items():
        if name == ENCODED_KEY:
            raise ValueError(f"array name {ENCODED_KEY!r} is reserved")
        if a.stype == _NUMPY and a.dtype in _CODED:
            coded[name] = a.numpy()
        else:
            beside[name] = a
    return coded, beside


def _pack(payload: bytes, stype: str, beside: Mapping[str, Array]) -> ArrayRecord:
    arrays = {ENCODED_KEY: Array(dtype="uint8", shape=(len(payload),), stype=stype, data=payload)}
    arrays.update(beside)
    return ArrayRecord(array_dict=arrays)


def _plain(model: Mapping[str, np.ndarray], beside: Mapping[str, Array], order: Iterable[str]) -> ArrayRecord:
    """An ArrayRecord of `model` and `beside`, in `order`."""
    return ArrayRecord(array_dict={k: beside[k] if k in beside else Array(np.asarray(model[k])) for k in order})


def _schema(model: Mapping[str, np.ndarray]) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    return {k: (a.shape, a.dtype) for k, a in model.items()}


def _is_float(a: np.ndarray) -> bool:
    return a.dtype.name in _FLOATS


def _is_inexact(a: np.ndarray) -> bool:
    """Floating or complex, of any width: what may hold NaN or inf."""
    return a.dtype.kind in "fc"


def _order(model: Mapping[str, np.ndarray], beside: Mapping[str, Array], order: list[str]) -> Optional[list[str]]:
    """`order` where rebuilding the record as the coded arrays then those beside would not give it
    back (an array beside the coded message sits between coded ones); None otherwise."""
    return order if order != [*model, *beside] else None


def _check_beside(name: str, got: Array, sent: Array) -> None:
    """_BadReply unless `got`, an array a reply carries beside the coded message, is one the
    strategy can take in place of `sent`: the same stype, dtype, shape and data length, and for
    NumPy arrays a .npy of that dtype and shape (its header read before anything is allocated,
    without pickle) holding finite values where it is floating or complex."""
    if (got.stype, got.dtype, tuple(got.shape), len(got.data)) != (
            sent.stype, sent.dtype, tuple(sent.shape), len(sent.data)):
        raise _BadReply(f"reply's {name!r} (beside the coded message) is not the array sent: "
                        f"{got.stype} {got.dtype}{list(got.shape)} in {len(got.data)} bytes, expected "
                        f"{sent.stype} {sent.dtype}{list(sent.shape)} in {len(sent.data)} bytes")
    if got.stype != _NUMPY:
        return  # a serialisation this module cannot read: the strategy's to check
    try:
        stream = BytesIO(got.data)
        version = npy_format.read_magic(stream)
        if version == (1, 0):
            shape, _, dtype = npy_format.read_array_header_1_0(stream)
        elif version == (2, 0):
            shape, _, dtype = npy_format.read_array_header_2_0(stream)
        else:
            raise ValueError(f".npy version {version} is not one np.save writes for this dtype")
        if str(dtype) != sent.dtype or tuple(shape) != tuple(sent.shape):
            raise ValueError(f"its .npy holds {dtype}{list(shape)}")
        array = np.load(BytesIO(got.data), allow_pickle=False)
        if not isinstance(array, np.ndarray) or str(array.dtype) != sent.dtype or array.shape != tuple(sent.shape):
            raise ValueError("its .npy does not load as the array sent")
    except Exception as e:  # garbage of any kind: numpy raises ValueError, EOFError, OSError, ...
        raise _BadReply(f"reply's {name!r} (beside the coded message) does not load as a "
                        f"{sent.dtype}{list(sent.shape)}: {type(e).__name__}: {e}") from None
    if _is_inexact(array) and not np.isfinite(array).all():
        raise _BadReply(f"reply's {name!r} holds non-finite values")


def _majority(checked: Iterable[tuple[int, _MetricShape]]) -> Optional[_MetricShape]:
    """Of (node, metric shape) pairs, the shape most share (a tie: the one of the lowest node id);
    None when there are none. flwr's FedAvg refuses replies whose metrics differ in keys or shapes."""
    pairs = sorted(checked, key=lambda c: c[0])
    shapes = Counter(shape for _, shape in pairs)
    first: dict[_MetricShape, int] = {}
    for node, shape in pairs:
        first.setdefault(shape, node)
    return max(shapes, key=lambda s: (shapes[s], -first[s])) if shapes else None


def _check_density(density: Optional[float]) -> Optional[float]:
    """density as the code uses it: None for no sparsification (also 1.0)."""
    if density is None:
        return None
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0 < density <= 1:
        raise ValueError(f"density must be None or a number in (0, 1], got {density!r}")
    return None if density == 1 else float(density)


def _check_values(values: str, what: str = "values") -> str:
    if values not in VALUE_CODECS:
        raise ValueError(f"{what} must be one of {sorted(VALUE_CODECS)}, got {values!r}")
    return values


def _array_state(ctxt: Context, key: str) -> Optional[Model]:
    # an ArrayRecord: this module alone writes these keys
    return {k: a.numpy() for k, a in cast(ArrayRecord, ctxt.state[key]).items()} if key in ctxt.state else None


def _set_state(ctxt: Context, key: str, model: Optional[Mapping[str, np.ndarray]]) -> None:
    if model is None:
        if key in ctxt.state:
            del ctxt.state[key]
    else:
        ctxt.state[key] = ArrayRecord(array_dict={k: Array(np.asarray(v)) for k, v in model.items()})


# --- client side -------------------------------------------------------------------------------


def make_sparse_update_mod(
    *, density: Optional[float] = None, values: Optional[str] = None, error_feedback: Optional[bool] = None
) -> Mod:
    """A ClientApp mod that compresses what a `Compressed` strategy exchanges with this node
    (`sparse_update_mod` is `make_sparse_update_mod()`: every setting as the server sends it).

    Parameters
    ----------
    density : the fraction of the update's float elements sent (global top-k by magnitude over all
        float tensors), in (0, 1]; 1.0: no sparsification. None: the server's setting.
    values : the replies' value codec, one of codecs.VALUE_CODECS ("raw", "ans", "auto" lossless;
        "fp16", "bf16", "int8", "fp16-ans", "bf16-ans", "int2-ans" .. "int8-ans" lossy). None: the
        server's.
    error_feedback : whether what top-k and the value codec leave out of a reply is added to the
        next one (the residual, kept in the node's context state). None: the server's.

    Returns
    -------
    Mod : the mod (see its documentation: `help(sparse_update_mod)`).

    Raises
    ------
    ValueError : a density out of range or an unknown value codec.
    """
    own_density = None if density is None else _check_density(density) or 1.0
    own_values = None if values is None else _check_values(values)
    own_feedback = None if error_feedback is None else bool(error_feedback)

    def sparse_update_mod(msg: Message, ctxt: Context, call_next: Callable[[Message, Context], Message]) -> Message:
        """ClientApp mod: decode the model a `Compressed` strategy sent, and compress the training
        reply. Put it first in `ClientApp(mods=[...])` (the outermost mod): the mods after it and
        the ClientApp see the plain model and config, as without compression.

        The model (the one ArrayRecord coded by the strategy) is decoded, relative to the model
        this node holds when it came as a difference (lossy downlink; the node's copy lives in its
        context state and is checked against the server's CRC-32C). The message then goes on with
        the plain model under the same key and without the "compress" ConfigRecord.

        The training reply's model (the reply's ArrayRecord under the model's key, or its only
        ArrayRecord) must hold the arrays the node received (names, shapes, dtypes). It goes back
        as its update u = trained - received (float tensors), plus the residual r when error
        feedback is on; with a density, only the global top-k of |u + r| over all float tensors
        is sent, coded with the value codec, and the new residual is u + r minus what the server
        will decode (the encoder's decoded=True: quantisation error included). The other
        tensors go whole. With no sparsification, lossless values, a lossless downlink and no
        residual, the trained model itself is sent instead (bit for bit). Other replies (an error,
        an evaluation's metrics) pass unchanged.

        Parameters
        ----------
        msg : the incoming message; one without a coded ArrayRecord goes to `call_next` unchanged
            (a plain strategy's, SecAgg+'s stages).
        ctxt : the node's context; its state keeps the residual (and with a lossy downlink the model
            held) between rounds.
        call_next : the next mod, or the ClientApp.

        Returns
        -------
        Message : the reply of `call_next`, its model compressed for a training message.

        Raises
        ------
        CodecError : a model that does not decode, a difference to a model this node does not hold,
            or after which it holds another model than the server (CRC): flwr then replies with an
            error and the strategy sends this node the whole model next time.
        ValueError : a reply whose arrays are not the model's, or holding non-finite values in its
            update; error feedback asked for where the strategy's config carries a clipping norm
            (client-side clipping for central DP, whose bound the residual would break); settings
            out of range.
        """
        if not msg.has_content():
            return call_next(msg, ctxt)
        coded = [k for k, r in msg.content.array_records.items() if is_compressed(r)]
        if not coded:
            return call_next(msg, ctxt)
        if len(coded) != 1:
            raise CodecError(f"{len(coded)} compressed ArrayRecords in one message, expected one")
        (key,) = coded
        settings = msg.content.config_records.get(CONFIG_RECORD, ConfigRecord())
        record = msg.content.array_records[key]
        received, beside, exact = _receive(record, settings, ctxt)
        content = RecordDict(dict(msg.content.items()))  # a new one: the incoming one may be shared
        content[key] = _plain(received, beside, _names(received, beside, settings))
        if CONFIG_RECORD in content:
            del content[CONFIG_RECORD]
        msg.content = content
        reply = call_next(msg, ctxt)
        if (msg.metadata.message_type.split(".")[0] != MessageType.TRAIN or reply.has_error()
                or not reply.has_content()):
            return reply
        records = reply.content.array_records
        reply_key = key if key in records else next(iter(records)) if len(records) == 1 else None
        if reply_key is None or is_compressed(records[reply_key]):
            return reply
        density = own_density if own_density is not None else settings.get(DENSITY_KEY, 1.0)
        feedback = own_feedback if own_feedback is not None else bool(settings.get(ERROR_FEEDBACK_KEY, True))
        codec = _check_values(own_values if own_values is not None else str(settings.get(VALUES_KEY, "auto")))
        if feedback and any(KEY_CLIPPING_NORM in c for c in content.config_records.values()):
            raise ValueError("error feedback with client-side clipping (the config carries "
                             f"{KEY_CLIPPING_NORM!r}) would send more than the clipped update: turn it off "
                             "(Compressed(..., error_feedback=False))")
        out = _compress_reply(records[reply_key], received, _check_density(cast(float, density)), codec, feedback,
                              exact, ctxt)
        log(INFO, "sparse_update_mod: %s sent in %d bytes (%d plain)", "update" if is_update(out) else "model",
            _size(out), _size(records[reply_key]))
        reply.content[reply_key] = out
        return reply

    return sparse_update_mod


def _receive(record: ArrayRecord, settings: ConfigRecord, ctxt: Context) -> tuple[Model, dict[str, Array], bool]:
    """(the model received, the arrays beside it, whether it is exactly the one the strategy sent)."""
    beside = {k: a for k, a in record.items() if k != ENCODED_KEY}
    data = record[ENCODED_KEY].data
    stype = record[ENCODED_KEY].stype
    if stype == DELTA_STYPE:
        held = _array_state(ctxt, _HELD_STATE)
        if held is None:
            raise CodecError("a difference to the model this node holds, and it holds none")
        decoded = decode_model(data, expect=_schema(held)).tensors
        model = {k: held[k] + d if _is_float(d) else d for k, d in decoded.items()}
    elif stype == STYPE:
        model = dict(decode_model(data).tensors)
    else:
        raise CodecError(f"a model of stype {stype!r} is not one a server sends")
    if HELD_CRC_KEY in settings:  # a lossy downlink: keep the model held
        if model_crc(model) != int(cast(int, settings[HELD_CRC_KEY])):
            raise CodecError("the model decoded is not the one the server holds for this node (CRC-32C): the "
                             "node's state is out of step with the server's")
        _set_state(ctxt, _HELD_STATE, model)
    return model, beside, HELD_CRC_KEY not in settings


def _names(received: Model, beside: Mapping[str, Array], settings: ConfigRecord) -> list[str]:
    """The model's array names in the order the strategy sent them (ORDER_KEY, when the server sent it)."""
    names = [*received, *beside]
    order = settings.get(ORDER_KEY)
    if order is None:
        return names
    sent = [n for n in order if isinstance(n, str)] if isinstance(order, list) else []
    if not isinstance(order, list) or len(sent) != len(order) or sorted(sent) != sorted(names):
        raise CodecError(f"the order of the model's arrays {reprlib.repr(order)} does not name the arrays "
                         f"received {reprlib.repr(names)}")
    return sent


def _compress_reply(record: ArrayRecord, received: Model, density: Optional[float], values: str, feedback: bool,
                    exact: bool, ctxt: Context) -> ArrayRecord:
    """The reply's model coded: the trained model itself, or its update (+ residual, top-k)."""
    trained, beside = _split(record)
    if _schema(trained) != _schema(received):
        raise ValueError(f"the reply's arrays {_describe_schema(trained)} are not the model's "
                         f"{_describe_schema(received)}")
    residual = _array_state(ctxt, _RESIDUAL_STATE) if feedback else None
    if residual is not None:  # what fits the model, in its dtype (FedAdam turns float32 into float64)
        fits = {k: r.astype(received[k].dtype, copy=False) for k, r in residual.items()
                if k in received and _is_float(received[k]) and received[k].shape == r.shape}
        if fits.keys() != residual.keys():
            log(WARNING, "sparse_update_mod: the residual of %s does not fit the model: dropped",
                reprlib.repr(sorted(residual.keys() - fits.keys())))
        residual = fits if any(r.any() for r in fits.values()) else None
    if density is None and values in LOSSLESS and exact and residual is None:
        _set_state(ctxt, _RESIDUAL_STATE, None)
        return _pack(encode_model(trained, values=values), STYPE, beside)
    floats = [k for k, a in trained.items() if _is_float(a)]
    x = {k: np.subtract(trained[k], received[k]) for k in floats}
    if residual is not None:
        x = {k: x[k] + residual[k] if k in residual else x[k] for k in floats}
    for k in floats:
        if not np.isfinite(x[k]).all():
            raise ValueError(f"the update of {k!r} holds non-finite values")
    masks: Optional[dict[str, np.ndarray]] = None
    if density is not None and floats:
        one = len({x[k].dtype for k in floats}) == 1  # top-k takes one dtype: float32 within float64 is exact
        chosen = global_topk_masks([x[k] if one else x[k].astype(np.float64) for k in floats], density=density)
        masks = dict(zip(floats, chosen))
    update = {k: x[k] if k in x else a for k, a in trained.items()}
    if feedback:  # the residual: what the server will not decode (`sent`: what it does, without decoding)
        payload, sent = encode_model(update, masks=masks, values=values, decoded=True)
        _set_state(ctxt, _RESIDUAL_STATE, {k: x[k] - sent[k] for k in floats})
    else:
        payload = encode_model(update, masks=masks, values=values)
        _set_state(ctxt, _RESIDUAL_STATE, None)
    return _pack(payload, UPDATE_STYPE, beside)


def _describe_schema(model: Mapping[str, np.ndarray]) -> str:
    return reprlib.repr({k: f"{a.dtype.name}{list(a.shape)}" for k, a in model.items()})


sparse_update_mod = make_sparse_update_mod()


# --- server side -------------------------------------------------------------------------------


def _chain(strategy: Any) -> Iterable[Any]:
    """The strategy and those it wraps (flwr's wrappers keep theirs as `.strategy`)."""
    seen: set[int] = set()
    while strategy is not None and id(strategy) not in seen:
        seen.add(id(strategy))
        yield strategy
        strategy = vars(strategy).get("strategy") if hasattr(strategy, "__dict__") else None


class Compressed(Strategy):
    """Any flwr Strategy with compressed messages: the wrapped strategy configures and aggregates
    as it would without compression; this wrapper codes what goes down and decodes what comes up.

    Down (configure_train, configure_evaluate): the model in each message (the ArrayRecord under
    `arrayrecord_key`) is replaced by its coded form; training messages also carry the upload
    settings as the ConfigRecord "compress" (CONFIG_RECORD: DENSITY_KEY, VALUES_KEY,
    ERROR_FEEDBACK_KEY). With lossless `downlink_values` (the default) each node gets the model
    itself, coded once a round for all. With lossy ones each training message carries the
    difference between the model and the one the node holds (the whole model, coded, at first
    contact), so that what quantisation left out goes at the next contact and the node's copy
    never drifts; the wrapper keeps every node's copy (one model a node) and sends the CRC-32C of
    what the node holds once decoded (HELD_CRC_KEY); a node whose training reply failed or is
    missing is sent the whole model next time. Evaluation messages carry the model itself,
    losslessly ("auto" where `downlink_values` is lossy): nodes score the global model.

    Up (aggregate_train): each reply's model is decoded into the plain ArrayRecord of a trained
    model: the model the node sent back, or (an update) the model the strategy sent plus the
    decoded update (with a lossy downlink: the global model, not the node's quantised copy, so the
    downlink's error does not enter the aggregate). Replies are checked whole first; one is dropped
    (not handed to the wrapped strategy) and counted when its model is not coded, does not decode
    to the arrays sent (names, shapes, dtypes, checked before anything beyond the model's size is
    allocated), or holds non-finite values (any floating or complex dtype); when an array it
    carries beside the coded message is not one of the array sent's stype, dtype, shape and data
    length, or (a NumPy one) does not load as such without pickle, or holds non-finite values; when
    its metrics are not what flwr's FedAvg needs (exactly one MetricRecord of finite ints, floats
    and lists of them, the wrapped strategy's `weighted_by_key` a number in (0, 2^53], the same
    record name, keys and list lengths as the round's other replies: the shape most replies share
    wins, a tie goes to the lowest node id); when it comes from a node sent no training message
    this round, or twice. Error replies go to the wrapped strategy as they are (it counts them as
    failures, as it would), one a node sent a training message; others are dropped and counted
    too. The replies it gets keep their order. Evaluation replies' metrics are checked the same way
    (aggregate_evaluate).

    What the wrapped strategy must be: one whose model goes down as the ArrayRecord under
    `arrayrecord_key` and comes back as one ArrayRecord of the same arrays (the one the mod codes:
    under the same key, or the reply's only ArrayRecord). With flwr's FedAvg family (every flwr
    Message-API strategy: those with a `weighted_by_key`) a training reply must carry exactly one
    ArrayRecord and one MetricRecord, as FedAvg needs, and is dropped otherwise. Another strategy
    (one without `weighted_by_key`) gets a reply's other records as they came and its metrics
    unchecked: what they must hold is its own business.

    The round's MetricRecord is the wrapped strategy's, plus "compress-bytes-down" and
    "compress-bytes-up" (the training messages' coded model bytes, each way) and the counts
    "compress-aggregated", "compress-rejected", "compress-failed" and "compress-missing";
    cumulative: `bytes_down`, `bytes_up`, `bytes_evaluate`, `rejected`, `rejected_evaluate`, per
    round `rounds`, `reasons` and `reasons_evaluate`. Attributes the wrapper lacks are the wrapped
    strategy's (`strategy.proximal_mu`).

    Differential privacy: Compressed goes outermost, `Compressed(DifferentialPrivacy...(FedAvg()))`,
    and `sparse_update_mod` first in the ClientApp's mods, `mods=[sparse_update_mod,
    fixedclipping_mod]`: clipping, noise and the accountant then see plain models and updates.
    With client-side clipping, error feedback would add to each clipped update what top-k and
    quantisation left out of earlier ones, and the update sent could exceed the clipping norm the
    server's noise is calibrated to: `error_feedback=True` is refused there (server-side clipping
    clips what arrives, and takes it). Top-k of a clipped update stays within the norm; lossy
    values may round a value up by half a quantisation step.

    Parameters
    ----------
    strategy : the flwr Strategy (Message API) to wrap.
    density : the fraction of each update's float elements a node sends (global top-k by magnitude
        over all float tensors), in (0, 1]; None (or 1.0): no sparsification.
    values : the replies' value codec, one of codecs.VALUE_CODECS: "raw", "ans" or "auto" (lossless:
        "auto" takes per tensor the smaller of the two), or a lossy one ("fp16", "bf16", "int8",
        their "-ans" forms, "int2-ans" .. "int8-ans").
    error_feedback : whether nodes add what top-k and quantisation left out of a reply to the next
        one (the residual, in their context state).
    downlink_values : the value codec of the models sent; lossless by default, so that the wrapped
        strategy's arithmetic is unaffected; a lossy one codes differences to what each node holds.
    arrayrecord_key : the key of the model in the messages; None: the wrapped strategy's
        `arrayrecord_key` (flwr's FedAvg family), else "arrays".

    Raises
    ------
    TypeError : a `strategy` that is not a flwr Strategy.
    ValueError : a density out of range, an unknown value codec, or error feedback around a
        client-side-clipping DP wrapper.
    """

    def __init__(
        self,
        strategy: Strategy,
        *,
        density: Optional[float] = None,
        values: str = "auto",
        error_feedback: bool = True,
        downlink_values: str = "auto",
        arrayrecord_key: Optional[str] = None,
    ) -> None:
        if not isinstance(strategy, Strategy):
            raise TypeError(f"Compressed wraps a flwr Strategy (flwr.serverapp.strategy), got "
                            f"{type(strategy).__name__}")
        super().__init__()
        self.strategy = strategy
        self.density = _check_density(density)
        self.values = _check_values(values)
        self.downlink_values = _check_values(downlink_values, "downlink_values")
        self.error_feedback = bool(error_feedback)
        if self.error_feedback and any(isinstance(s, _CLIENT_SIDE_CLIPPING) for s in _chain(strategy)):
            raise ValueError("error feedback cannot go with client-side clipping for central DP: it would add to "
                             "each clipped update what top-k and quantisation left out of earlier ones, and the "
                             "update sent could exceed the clipping norm; use Compressed(..., error_feedback=False)")
        if arrayrecord_key is None:
            found = [vars(s)["arrayrecord_key"] for s in _chain(strategy) if "arrayrecord_key" in vars(s)]
            arrayrecord_key = str(found[0]) if found else "arrays"
        self.arrayrecord_key = arrayrecord_key
        keys = [vars(s)["weighted_by_key"] for s in _chain(strategy) if "weighted_by_key" in vars(s)]
        self.weighted_by_key: Optional[str] = str(keys[0]) if keys else None
        self.held: dict[int, Model] = {}  # lossy downlink: the model each node holds (as it decoded it)
        self.sent: dict[int, tuple[Model, dict[str, Array], list[str]]] = {}  # this round's training messages
        self.bytes_down = 0  # training messages' coded models
        self.bytes_up = 0  # training replies' coded models
        self.bytes_evaluate = 0  # evaluation messages' coded models
        self.rejected = 0
        # One entry a training round: nodes whose replies were aggregated, rejected, failed (error
        # replies) and missing (no reply).
        self.rounds: list[dict[str, list[int]]] = []
        self.reasons: list[dict[int, str]] = []  # one entry a training round: rejected node -> why
        self.rejected_evaluate = 0  # evaluation replies dropped: see aggregate_evaluate
        self.reasons_evaluate: list[dict[int, str]] = []  # one entry an evaluation round: dropped node -> why
        self._round_down = [0, 0]  # this round's training models: coded and plain bytes

    @classmethod
    def from_run_config(cls, strategy: Strategy, run_config: Mapping[str, Any]) -> Compressed:
        """A Compressed strategy set from the run config (`context.run_config`, the
        [tool.flwr.app.config] of pyproject.toml, overridable with `flwr run --run-config`):
        "compress-density" (1.0: none), "compress-values", "compress-error-feedback" and
        "compress-downlink-values", each optional; other keys are the app's and ignored.

        Parameters
        ----------
        strategy : the flwr Strategy to wrap.
        run_config : the run config.

        Returns
        -------
        Compressed : the wrapper, with the defaults for the settings the run config lacks.

        Raises
        ------
        ValueError : a "compress-*" key that is not one of RUN_CONFIG_KEYS, or a bad setting.
        """
        unknown = sorted(k for k in run_config if k.startswith("compress-") and k not in RUN_CONFIG_KEYS)
        if unknown:
            raise ValueError(f"unknown run config keys {unknown}: Compressed reads {list(RUN_CONFIG_KEYS)}")
        kwargs: dict[str, Any] = {}
        if DENSITY_KEY in run_config:
            kwargs["density"] = float(run_config[DENSITY_KEY])
        if VALUES_KEY in run_config:
            kwargs["values"] = str(run_config[VALUES_KEY])
        if ERROR_FEEDBACK_KEY in run_config:
            if not isinstance(run_config[ERROR_FEEDBACK_KEY], bool):
                raise ValueError(f"{ERROR_FEEDBACK_KEY} must be true or false, got {run_config[ERROR_FEEDBACK_KEY]!r}")
            kwargs["error_feedback"] = run_config[ERROR_FEEDBACK_KEY]
        if DOWNLINK_VALUES_KEY in run_config:
            kwargs["downlink_values"] = str(run_config[DOWNLINK_VALUES_KEY])
        return cls(strategy, **kwargs)

    def __getattr__(self, name: str) -> Any:
        # Only for attributes Compressed lacks: the wrapped strategy's (not while unpickling or
        # before __init__ has set `strategy`).
        if name == "strategy" or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.strategy, name)

    def __repr__(self) -> str:
        return f"Compressed({self.strategy!r})"

    @property
    def lossy_downlink(self) -> bool:
        """Whether models go down with lossy values (as differences to what each node holds).

        Returns
        -------
        bool : True when `downlink_values` is not "raw", "ans" or "auto".
        """
        return self.downlink_values not in LOSSLESS

    def summary(self) -> None:
        """Log the compression settings, then the wrapped strategy's summary."""
        log(INFO, "\t├──> Compression (feddip_kernels):")
        log(INFO, "\t│\t├── Density: %s | error feedback: %s", self.density or "1.0 (no sparsification)",
            self.error_feedback)
        log(INFO, "\t│\t└── Values: up %s | down %s", self.values, self.downlink_values)
        self.strategy.summary()

    def _settings(self) -> ConfigRecord:
        return ConfigRecord({DENSITY_KEY: self.density or 1.0, VALUES_KEY: self.values,
                             ERROR_FEEDBACK_KEY: self.error_feedback})

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Any
    ) -> Iterable[Message]:
        """The wrapped strategy's training messages, each with its model coded (see the class)
        and the "compress" ConfigRecord added.

        Parameters
        ----------
        server_round : flwr's round.
        arrays : the global model, passed to the wrapped strategy.
        config : the config, passed to the wrapped strategy.
        grid : flwr's Grid.

        Returns
        -------
        Iterable[Message] : the wrapped strategy's messages, with their content replaced.

        Raises
        ------
        ValueError : a message whose content already holds a record named "compress", or a model
            holding an array named "feddip".
        """
        messages = list(self.strategy.configure_train(server_round, arrays, config, grid))
        self.sent = {}
        self._round_down = [0, 0]
        shared: dict[int, tuple[ArrayRecord, Model, dict[str, Array], list[str]]] = {}  # id(record) -> coded
        for m in messages:
            if not m.has_content() or self.arrayrecord_key not in m.content.array_records:
                continue
            node = m.metadata.dst_node_id
            record = m.content.array_records[self.arrayrecord_key]
            if id(record) not in shared:  # flwr's FedAvg sends one record to all: code it once
                model, beside = _split(record)
                coded = None if self.lossy_downlink else _pack(encode_model(model, values=self.downlink_values),
                                                               STYPE, beside)
                shared[id(record)] = (cast(ArrayRecord, coded), model, beside, list(record.keys()))
            coded, model, beside, order = shared[id(record)]
            settings = self._settings()
            if _order(model, beside, order) is not None:
                settings[ORDER_KEY] = order
            if self.lossy_downlink:
                coded, settings[HELD_CRC_KEY] = self._downlink(node, model, beside)
            self.sent[node] = (model, beside, order)
            self.bytes_down += _size(coded)
            self._round_down[0] += _size(coded)
            self._round_down[1] += _size(record)
            m.content = self._content(m.content, coded, settings)
        return messages

    def _content(self, content: RecordDict, coded: ArrayRecord, settings: Optional[ConfigRecord]) -> RecordDict:
        if CONFIG_RECORD in content:
            raise ValueError(f"the message already holds a record named {CONFIG_RECORD!r}, which Compressed adds")
        out = RecordDict(dict(content.items()))
        out[self.arrayrecord_key] = coded
        if settings is not None:
            out[CONFIG_RECORD] = settings
        return out

    def _downlink(self, node: int, model: Model, beside: dict[str, Array]) -> tuple[ArrayRecord, int]:
        """(the lossy message to `node`, the CRC-32C of the model it holds once decoded), and the
        wrapper's record of that model updated."""
        held = self.held.get(node)
        if held is not None and _schema(held) == _schema(model):  # (decoded: what the node decodes)
            delta = {k: np.subtract(a, held[k], dtype=a.dtype) if _is_float(a) else a for k, a in model.items()}
            payload, decoded = encode_model(delta, values=self.downlink_values, decoded=True)
            stype, now = DELTA_STYPE, {k: held[k] + d if _is_float(d) else d for k, d in decoded.items()}
        else:
            payload, now = encode_model(model, values=self.downlink_values, decoded=True)
            stype = STYPE
        self.held[node] = now
        return _pack(payload, stype, beside), model_crc(now)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Any
    ) -> Iterable[Message]:
        """The wrapped strategy's evaluation messages, each with its model coded losslessly
        (`downlink_values`, or "auto" where that is lossy); nodes' copies are left as they are.
        Where an array sent beside the coded message sits between coded ones, a "compress"
        ConfigRecord carries the arrays' order (ORDER_KEY), which the mod removes.

        Parameters
        ----------
        server_round : flwr's round.
        arrays : the global model, passed to the wrapped strategy.
        config : the config, passed to the wrapped strategy.
        grid : flwr's Grid.

        Returns
        -------
        Iterable[Message] : the wrapped strategy's messages, with their content replaced.
        """
        messages = list(self.strategy.configure_evaluate(server_round, arrays, config, grid))
        values = "auto" if self.lossy_downlink else self.downlink_values
        shared: dict[int, tuple[ArrayRecord, Optional[list[str]]]] = {}
        for m in messages:
            if not m.has_content() or self.arrayrecord_key not in m.content.array_records:
                continue
            record = m.content.array_records[self.arrayrecord_key]
            if id(record) not in shared:
                model, beside = _split(record)
                shared[id(record)] = (_pack(encode_model(model, values=values), STYPE, beside),
                                      _order(model, beside, list(record.keys())))
            coded, order = shared[id(record)]
            self.bytes_evaluate += _size(coded)
            m.content = self._content(m.content, coded, None if order is None else ConfigRecord({ORDER_KEY: order}))
        return messages

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> Optional[MetricRecord]:
        """The wrapped strategy's aggregate_evaluate on the evaluation replies whose metrics pass the
        checks of aggregate_train's (with a `weighted_by_key`, flwr's FedAvg family: one MetricRecord
        of finite numbers, `weighted_by_key` in (0, MAX_WEIGHT], the shape most replies share; a tie
        goes to the lowest node id): the others are dropped, logged and counted in
        `rejected_evaluate` (why, in `reasons_evaluate`), rather than ending the run in flwr's
        consistency check. Error replies go on as they are; the replies kept keep their order.

        Parameters
        ----------
        server_round : flwr's round.
        replies : the evaluation replies, with or without errors.

        Returns
        -------
        Optional[MetricRecord] : what the wrapped strategy returns for the replies kept.
        """
        replies = list(replies)
        reasons: dict[int, str] = {}
        dropped: set[int] = set()  # the indices of the replies dropped
        checked: list[tuple[int, int, _MetricShape]] = []
        for i, reply in enumerate(replies):
            if reply.has_error() or not reply.has_content():
                continue
            node = reply.metadata.src_node_id
            try:
                checked.append((i, node, self._metric_shape(reply)))
            except (KeyError, TypeError, ValueError) as e:  # _BadReply is a ValueError
                reasons[node] = str(e)
                dropped.add(i)
        common = _majority((node, shape) for _, node, shape in checked)
        for i, node, shape in checked:
            if shape != common:
                reasons[node] = f"metrics {_describe(shape)} differ from the round's {_describe(common)}"
                dropped.add(i)
        for node, why in sorted(reasons.items()):
            log(WARNING, "Compressed: evaluation reply from node %d dropped: %s", node, why)
        self.rejected_evaluate += len(reasons)
        self.reasons_evaluate.append(reasons)
        return self.strategy.aggregate_evaluate(server_round, [r for i, r in enumerate(replies) if i not in dropped])

    def _decode_reply(self, reply: Message, node: int) -> tuple[str, ArrayRecord]:
        """(key, the plain ArrayRecord of the trained model) of a reply; CodecError or _BadReply."""
        if node not in self.sent:
            raise _BadReply("the node was sent no training message this round (or replied twice)")
        records = reply.content.array_records
        if self.weighted_by_key is not None and len(records) != 1:  # flwr's FedAvg family needs one
            raise _BadReply(f"reply has {len(records)} ArrayRecords, expected exactly one")
        coded = [k for k, r in records.items() if is_compressed(r) and r[ENCODED_KEY].stype != DELTA_STYPE]
        if not coded:
            raise _BadReply("reply's model is not compressed: is sparse_update_mod the first of the ClientApp's mods?")
        if len(coded) != 1:
            raise _BadReply(f"reply has {len(coded)} compressed ArrayRecords, expected one")
        key = coded[0]
        record = records[key]
        model, beside, order = self.sent[node]
        got = {k: a for k, a in record.items() if k != ENCODED_KEY}
        if got.keys() != beside.keys():
            raise _BadReply(f"reply's arrays outside the coded message {reprlib.repr(sorted(got))} are not those "
                            f"sent {reprlib.repr(sorted(beside))}")
        for k, a in got.items():
            _check_beside(k, a, beside[k])
        limit = sum(a.nbytes for a in model.values())
        decoded = decode_model(record[ENCODED_KEY].data, expect=_schema(model), max_bytes=limit).tensors
        if record[ENCODED_KEY].stype == UPDATE_STYPE:
            with np.errstate(over="ignore", invalid="ignore"):  # an overflow to inf is refused below
                trained = {k: model[k] + d if _is_float(d) else d for k, d in decoded.items()}
        else:
            trained = dict(decoded)
        for k, a in trained.items():
            if _is_inexact(a) and not np.isfinite(a).all():  # float16 and complex too: they travel whole
                raise _BadReply(f"reply's {k!r} holds non-finite values")
        return key, _plain(trained, got, order)

    def _metric_shape(self, reply: Message) -> _MetricShape:
        """The shape of a reply's metrics after the checks of flwr's FedAvg and those its aggregation
        needs (numbers only, finite in float64; the weight in (0, MAX_WEIGHT]); _BadReply otherwise.
        Only for flwr's FedAvg family (a `weighted_by_key`): for another strategy, whose needs are
        its own, every reply has the same shape, ("", ())."""
        if self.weighted_by_key is None:
            return "", ()
        return check_metrics(reply, self.weighted_by_key)[0]

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[Optional[ArrayRecord], Optional[MetricRecord]]:
        """Decode and check every reply (see the class), then the wrapped strategy's aggregate_train
        on the replies that pass, with their models plain, and the error replies.

        Parameters
        ----------
        server_round : flwr's round.
        replies : the training replies, with or without errors.

        Returns
        -------
        tuple[Optional[ArrayRecord], Optional[MetricRecord]] : the wrapped strategy's model, and its
            metrics with the bytes and counts added (the bytes and counts alone when it returns none).

        Raises
        ------
        Exception : whatever the wrapped strategy's aggregate_train raises.
        """
        replies = list(replies)
        seen: dict[str, list[int]] = {"aggregated": [], "rejected": [], "failed": [], "missing": []}
        reasons: dict[int, str] = {}
        checked: list[tuple[int, Message, str, ArrayRecord, _MetricShape]] = []
        keep: set[int] = set()  # the indices of the replies handed on
        bytes_up = dense_up = 0
        for i, reply in enumerate(replies):
            node = reply.metadata.src_node_id
            if reply.has_error() or not reply.has_content():
                if node not in self.sent:  # the wrapped strategy would count it as one more failure
                    reasons.setdefault(node, "an error reply from a node sent no training message this round "
                                             "(or a second reply)")
                    continue
                seen["failed"].append(node)
                keep.add(i)
                self.sent.pop(node)
                continue
            bytes_up += sum(_size(r) for r in reply.content.array_records.values() if is_compressed(r))
            try:
                key, plain = self._decode_reply(reply, node)
                shape = self._metric_shape(reply)
            except (CodecError, KeyError, TypeError, ValueError) as e:  # _BadReply is a ValueError
                reasons[node] = str(e)  # one bad reply must not abort the round: drop it, count it
                self.sent.pop(node, None)
                continue
            self.sent.pop(node)  # a second reply from the node is refused
            dense_up += _size(plain)
            checked.append((i, reply, key, plain, shape))
        # flwr's FedAvg refuses replies whose metrics differ in keys or shapes: keep the shape most
        # replies share (a tie: the one of the lowest node id), drop the rest.
        common = _majority((reply.metadata.src_node_id, shape) for _, reply, *_, shape in checked)
        for i, reply, key, plain, shape in checked:
            node = reply.metadata.src_node_id
            if shape != common:
                reasons[node] = f"metrics {_describe(shape)} differ from the round's {_describe(common)}"
                continue
            content = RecordDict(dict(reply.content.items()))
            content[key] = plain
            reply.content = content
            keep.add(i)
            seen["aggregated"].append(node)
        seen["rejected"] = sorted(reasons)
        seen["missing"] = sorted(self.sent)  # sent a training message, no reply
        for node in seen["failed"] + seen["missing"]:
            self.held.pop(node, None)  # it may or may not hold what it was sent: the whole model next time
        self.sent = {}
        for node, why in sorted(reasons.items()):
            log(WARNING, "Compressed: reply from node %d dropped: %s", node, why)
        self.bytes_up += bytes_up
        self.rejected += len(reasons)
        self.rounds.append(seen)
        self.reasons.append(reasons)
        bytes_down, dense_down = self._round_down
        self._round_down = [0, 0]
        log(INFO, "Compressed: %d bytes down (%s), %d bytes up (%s)", bytes_down, _ratio(bytes_down, dense_down),
            bytes_up, _ratio(bytes_up, dense_up))
        arrays, metrics = self.strategy.aggregate_train(server_round, [r for i, r in enumerate(replies) if i in keep])
        extra: dict[str, int] = {"compress-bytes-down": bytes_down, "compress-bytes-up": bytes_up}
        extra.update({f"compress-{k}": len(v) for k, v in seen.items()})
        return arrays, MetricRecord({**(dict(metrics) if metrics is not None else {}), **extra})


def _ratio(coded: int, plain: int) -> str:
    return f"{plain / coded:.1f}x fewer than plain" if coded and plain else "nothing plain to compare"
