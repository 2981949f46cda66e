"""Sparse models at rest: `save` and `load` for torch state dicts and plain dicts of arrays.

The float32/float64 entries go into one wire-format message (docs/wire-format.md), so a pruned
tensor costs its kept values and their coded positions; every other entry (integers, bools,
float16, bfloat16, ...) is stored as raw little-endian bytes. A JSON header lists the entries and
the caller's metadata. Nothing is pickled, and `load` checks every length against the file and a
size limit before allocating. The layout is in docs/storage-format.md.

    "FDKS" | version u8 = 1 | reserved u8 * 3 = 0 | json_len u32 | message_len u64
    | JSON (UTF-8) | message | raw entries | CRC-32C u32 of every byte before it
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from collections import OrderedDict
from typing import TYPE_CHECKING, Any, BinaryIO, Mapping, Optional, Union

import numpy as np

from . import _backend, codecs
from ._arrays import as_array, flat_mask, is_torch
from .codecs import DEFAULT_MAX_BYTES, CodecError, decode_model, encode_model
from .codecs.format import MAX_ARRAY_BYTES
from .codecs.positions import SET_CODECS, check_position_set, decode_position_set, encode_position_set

if TYPE_CHECKING:
    from ._contract import Kernels

MAGIC = b"FDKS"
VERSION = 1
_HEADER = struct.Struct("<4sB3sIQ")
_CRC = struct.Struct("<I")
# The raw entries' dtypes a file may name (little-endian, fixed size): nothing else is accepted.
RAW_DTYPES = frozenset(
    ["|b1", "|i1", "|u1", "<i2", "<u2", "<i4", "<u4", "<i8", "<u8", "<f2", "<f4", "<f8", "<c8", "<c16"]
)
_MESSAGE_DTYPES = ("<f4", "<f8")
# How deeply a header's JSON may nest (metadata included). json.loads recurses once a level, so an
# unbounded depth is a RecursionError (or a crashed interpreter) instead of CodecError.
MAX_JSON_DEPTH = 100
# The keys a header, an entry (by store) and a negative-zero record may have: anything else is refused.
_HEADER_KEYS = frozenset(["container", "entries", "metadata", "torch_metadata"])
_ENTRY_KEYS = {
    "message": frozenset(["name", "shape", "dtype", "store", "torch", "negative_zeros"]),
    "raw": frozenset(["name", "shape", "dtype", "store", "torch", "torch_bytes", "offset", "nbytes"]),
}
_NZ_KEYS = frozenset(["count", "positions", "m", "offset", "nbytes"])

PathOrFile = Union[str, "os.PathLike[str]", BinaryIO]


def save(
    state_dict: Mapping[str, Any],
    file: PathOrFile,
    *,
    masks: Optional[Mapping[str, Any]] = None,
    values: str = "auto",
    metadata: Optional[Mapping[str, Any]] = None,
    signed_zeros: bool = True,
) -> int:
    """Write `state_dict` (names to torch tensors or arrays) to `file`, a path (written atomically:
    a temporary file, flushed, then renamed) or a binary file object. Returns the bytes written.

    Float32/float64 entries keep their non-zero elements, or the positions of `masks[name]` where
    given (values there are stored even when zero; a non-zero value outside the mask is an error,
    as it would be lost). Zeros come back bit for bit: the -0.0 elements outside the positions are
    recorded as a position set of their own. Pruning by multiplying with a mask leaves -0.0 at
    about half the pruned places, and their signs cost about a bit each; `signed_zeros=False`
    stores them as +0.0 instead (equal as numbers, not as bits). `values="auto"` (the default) is lossless, each entry's
    values the smaller of raw words and entropy-coded ones ("raw" and "ans" force one); "fp16",
    "bf16", "int8", their "-ans" forms and "int2-ans" .. "int7-ans" store the float entries' values
    lossily (docs/wire-format.md). `metadata` is any
    JSON-serialisable mapping, given back by `load(..., metadata=True)`. Tensors that share
    storage are stored once each (as copies).

    Parameters
    ----------
    state_dict : names (str) to torch tensors or NumPy arrays.
    file : a path or a binary file object.
    masks : names to bool masks of float entries (the positions stored), optional.
    values : "auto", "raw", "ans", or a lossy codec of encode_model.
    metadata : JSON-serialisable mapping, optional.
    signed_zeros : keep -0.0 off the positions (True) or store +0.0 there (False).

    Returns
    -------
    int : the bytes written.

    Raises
    ------
    TypeError : a state dict that is not a mapping, a key that is not a string, or an entry of a
        dtype the format does not store.
    KeyError : masks naming entries that are not in the state dict.
    ValueError : a mask that leaves out non-zero values, or is given for a non-float entry.
    """
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a mapping of names to tensors, got {type(state_dict).__name__}")
    masks = dict(masks or {})
    unknown = sorted(set(masks) - set(state_dict))
    if unknown:
        raise KeyError(f"masks name entries that are not in the state dict: {unknown}")
    k = _backend.kernels()
    entries: list[dict[str, Any]] = []
    floats: dict[str, np.ndarray] = {}
    keeps: dict[str, np.ndarray] = {}
    blobs: list[bytes] = []
    offset = 0
    container = "numpy"
    for name, value in state_dict.items():
        if not isinstance(name, str):
            raise TypeError(f"state dict keys must be strings, got {name!r}")
        entry: dict[str, Any] = {"name": name}
        a = _to_numpy(value, name, entry)
        if "torch" in entry:
            container = "torch"
        entry.setdefault("shape", [int(s) for s in a.shape])
        if a.dtype.str in _MESSAGE_DTYPES and "torch_bytes" not in entry:
            entry["dtype"] = a.dtype.str
            flat = np.ascontiguousarray(a).reshape(-1)
            if name in masks:
                keep = flat_mask(masks[name], flat.size, f"masks[{name!r}]")
                with np.errstate(invalid="ignore"):
                    lost = int(np.count_nonzero((flat != 0) & ~keep))
                if lost:
                    raise ValueError(f"masks[{name!r}] leaves out {lost} non-zero elements; they would be lost")
            else:
                keep = flat != 0  # NaN counts as non-zero
            negative = np.signbit(flat) & ~keep  # only zeros are outside the positions here
            count = int(np.count_nonzero(negative)) if signed_zeros else 0
            if count:
                codec, m, payload = encode_position_set(k, k.pack_bits(negative), negative.size, count)
                entry["negative_zeros"] = {"count": count, "positions": codec, "m": m, "offset": offset,
                                           "nbytes": len(payload)}
                blobs.append(payload)
                offset += len(payload)
            floats[name], keeps[name] = a, keep
            entry["store"] = "message"
        else:
            if name in masks:
                raise ValueError(f"masks[{name!r}] is given for an entry of dtype {entry.get('torch', a.dtype)}; "
                                 "masks apply to float32/float64 entries")
            raw = np.ascontiguousarray(a.astype(a.dtype.newbyteorder("<"), copy=False))
            if raw.dtype.str not in RAW_DTYPES:
                raise TypeError(f"entry {name!r} has dtype {a.dtype}, which this format does not store")
            entry.update(dtype=raw.dtype.str, store="raw", offset=offset, nbytes=raw.nbytes)
            blobs.append(raw.tobytes())
            offset += raw.nbytes
        entries.append(entry)
    message = encode_model(floats, masks=keeps, values=values)
    header: dict[str, Any] = {"container": container, "entries": entries, "metadata": dict(metadata or {})}
    torch_meta = getattr(state_dict, "_metadata", None)
    if torch_meta is not None:
        header["torch_metadata"] = torch_meta  # module versions that load_state_dict consults
    try:
        body = json.dumps(header, allow_nan=False).encode("utf-8")
    except (TypeError, ValueError, RecursionError) as e:
        raise TypeError(f"metadata must be JSON-serialisable: {e}") from None
    if json_too_deep(body):  # load would refuse the file
        raise ValueError(f"metadata nests deeper than load accepts ({MAX_JSON_DEPTH} levels in all)")
    if len(body) > 0xFFFFFFFF:
        raise ValueError("the header (entry list and metadata) exceeds 4 GiB")
    parts = [_HEADER.pack(MAGIC, VERSION, bytes(3), len(body), len(message)), body, message, *blobs]
    crc = 0
    for p in parts:
        crc = k.crc32c(p, crc)
    parts.append(_CRC.pack(crc))
    size = sum(len(p) for p in parts)
    if isinstance(file, (str, os.PathLike)):
        tmp = os.fspath(file) + ".tmp"
        with open(tmp, "wb") as f:
            for p in parts:
                f.write(p)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, file)
    else:
        for p in parts:
            file.write(p)
    return size


def load(
    file: Union[PathOrFile, bytes, bytearray, memoryview],
    *,
    as_torch: Optional[bool] = None,
    masks: bool = False,
    metadata: bool = False,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> Any:
    """Read what `save` wrote, from a path, a binary file object or the bytes themselves.

    Returns the state dict (torch tensors when it was saved from torch, else NumPy arrays; set
    `as_torch` to choose), then, when asked, the float entries' positions as bool masks and the
    metadata: `sd`, or a tuple `(sd, masks?, metadata?)` in that order. Raises CodecError for a
    corrupt, truncated or inconsistent file, or one whose entries would take more than `max_bytes`
    (checked before anything is allocated). Nothing returned shares memory with the file's bytes.

    Parameters
    ----------
    file : a path, a binary file object, or the bytes.
    as_torch : return torch tensors (True), NumPy arrays (False), or as saved (None).
    masks : also return the float entries' positions as bool masks.
    metadata : also return the metadata saved.
    max_bytes : the most bytes the entries may decode to.

    Returns
    -------
    dict, or tuple : the state dict, or (state dict, masks?, metadata?).

    Raises
    ------
    CodecError : a corrupt, truncated or inconsistent file, or one over max_bytes.
    """
    if isinstance(file, (str, os.PathLike)):
        with open(file, "rb") as f:
            data = memoryview(f.read())
    elif isinstance(file, (bytes, bytearray, memoryview)):
        data = memoryview(file).cast("B")
    else:
        data = memoryview(file.read())
    header, message, blob = _split(data)
    entries = _check_entries(header, len(blob), max_bytes)
    torch_out = header["container"] == "torch" if as_torch is None else bool(as_torch)
    expect = {e["name"]: (tuple(e["shape"]), np.dtype(e["dtype"])) for e in entries if e["store"] == "message"}
    raw_total = sum(e["nbytes"] for e in entries if e["store"] == "raw")
    decoded = decode_model(message, expect=expect, max_bytes=max_bytes - raw_total)
    k = _backend.kernels()
    out: dict[str, Any] = OrderedDict()
    kept: dict[str, np.ndarray] = {}
    for e in entries:
        name = e["name"]
        if e["store"] == "message":
            a = decoded.tensors[name]
            if masks:
                kept[name] = decoded.masks[name].reshape(a.shape)
            nz = e.get("negative_zeros")
            if nz is not None:
                neg = _decode_position_set(k, blob[nz["offset"] : nz["offset"] + nz["nbytes"]], nz, a.size, name)
                stored = np.unpackbits(decoded.packed[name], count=a.size, bitorder="little").view(bool)
                if (stored & neg).any():
                    raise CodecError(f"entry {name!r}: negative zeros recorded at stored positions")
                a.reshape(-1)[neg] = -0.0
        else:
            raw = blob[e["offset"] : e["offset"] + e["nbytes"]]
            a = np.frombuffer(raw, dtype=np.dtype(e["dtype"])).copy()
            if not e.get("torch_bytes"):  # those stay flat bytes until viewed as their torch dtype
                a = a.reshape(e["shape"])
        out[name] = _from_numpy(a, e, torch_out)
    if "torch_metadata" in header:
        out._metadata = header["torch_metadata"]  # type: ignore[attr-defined]
    result: tuple[Any, ...] = (out,)
    if masks:
        result += (kept,)
    if metadata:
        result += (header["metadata"],)
    return result[0] if len(result) == 1 else result


# ------------------------------------------------------------------------- conversion


def _to_numpy(value: Any, name: str, entry: dict[str, Any]) -> np.ndarray:
    """`value` as a CPU NumPy array; torch tensors record their dtype in `entry` (those NumPy has
    no type for, such as bfloat16, as raw bytes)."""
    if is_torch(value):
        import torch

        t = value.detach().cpu().contiguous()
        entry["torch"] = str(t.dtype).removeprefix("torch.")
        entry["shape"] = [int(s) for s in t.shape]
        try:
            return t.resolve_conj().resolve_neg().numpy()
        except TypeError:  # bfloat16, float8 ...: the bytes, restored by dtype name on load
            entry["torch_bytes"] = True
            return t.reshape(-1).view(torch.uint8).numpy()
    if isinstance(value, np.ndarray) or hasattr(value, "__array_interface__") or hasattr(value, "__dlpack__"):
        return as_array(value, f"state_dict[{name!r}]")
    raise TypeError(f"state_dict[{name!r}] is a {type(value).__name__}; tensors and arrays are stored "
                    "(put other values in metadata=)")


def _from_numpy(a: np.ndarray, entry: Mapping[str, Any], torch_out: bool) -> Any:
    a = a.astype(a.dtype.newbyteorder("="), copy=False)
    if entry.get("torch_bytes"):
        if not torch_out:
            raise TypeError(f"entry {entry['name']!r} is a torch {entry['torch']} tensor, which NumPy cannot hold; "
                            "load it with as_torch=True")
    if not torch_out:
        return a
    import torch

    t = torch.from_numpy(a)
    if entry.get("torch_bytes"):
        dt = _torch_dtype(entry)
        try:
            size = torch.empty((), dtype=dt).element_size()
        except (RuntimeError, TypeError):  # a dtype name that is no tensor element type (torch.qint8 ...)
            raise CodecError(f"entry {entry['name']!r}: torch.{entry['torch']} is not a tensor dtype") from None
        if a.size != math.prod(entry["shape"]) * size:
            raise CodecError(
                f"entry {entry['name']!r}: {a.size} bytes for shape {entry['shape']} of torch.{entry['torch']}"
            )
        try:
            t = t.view(dt).reshape(entry["shape"])
        except RuntimeError as e:
            raise CodecError(
                f"entry {entry['name']!r}: {a.size} bytes cannot be viewed as torch.{entry['torch']}: {e}"
            ) from None
    elif "torch" in entry and t.dtype != _torch_dtype(entry):
        raise CodecError(f"entry {entry['name']!r}: stored as {a.dtype}, labelled torch.{entry['torch']}")
    return t


def _torch_dtype(entry: Mapping[str, Any]) -> Any:
    import torch

    # The module's own attributes only: getattr would also import submodules (torch.onnx ...) by name.
    dt = vars(torch).get(entry["torch"])
    if not isinstance(dt, torch.dtype):
        raise CodecError(f"entry {entry['name']!r}: unknown torch dtype {entry['torch']!r}")
    return dt


# ------------------------------------------------------------------ negative-zero sets


def _decode_position_set(k: "Kernels", raw: memoryview, nz: Mapping[str, Any], n: int, name: str) -> np.ndarray:
    """A negative-zero position set as a bool array (`nz` as _check_entries passed it: m within
    the kernels' u32)."""
    try:
        bits = decode_position_set(k, nz["positions"], raw, n, nz["count"], nz["m"])
    except CodecError as e:
        raise CodecError(f"entry {name!r}: negative-zero positions: {e}") from None
    return np.unpackbits(np.asarray(bits), count=n, bitorder="little").view(bool)


# ----------------------------------------------------------------------------- reading


def _split(data: memoryview) -> tuple[dict[str, Any], memoryview, memoryview]:
    """(header, message, raw area) of a file, after checking its framing and checksum."""
    if len(data) < _HEADER.size + _CRC.size:
        raise CodecError(f"file of {len(data)} bytes is shorter than its header and checksum")
    magic, version, reserved, json_len, message_len = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise CodecError(f"bad magic {bytes(magic)!r}: not a file written by feddip_kernels.save")
    if version != VERSION:
        raise CodecError(f"unsupported storage format version {version} (this library reads {VERSION})")
    if reserved != bytes(3):
        raise CodecError("reserved header bytes are not zero")
    body_end = len(data) - _CRC.size
    if json_len > body_end - _HEADER.size or message_len > body_end - _HEADER.size - json_len:
        raise CodecError("truncated file: the header and message lengths run past its end")
    (stored,) = _CRC.unpack_from(data, body_end)
    if codecs.crc32c(data[:body_end]) != stored:
        raise CodecError("checksum mismatch: the file is corrupt")
    start = _HEADER.size + json_len
    header = parse_json(bytes(data[_HEADER.size : start]), "the header")
    return header, data[start : start + message_len], data[start + message_len : body_end]


# A string's rest after its opening quote. Tried once per string, from its quote, so a scan is
# linear even when a string never ends (the match then fails once, in one pass).
_JSON_STRING_REST = re.compile(rb'[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_JSON_SPECIAL = re.compile(rb'[\[\]{}"]')


def json_too_deep(raw: bytes, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether the JSON text `raw` (UTF-8) nests arrays and objects deeper than `limit`, found in
    one linear pass without parsing it. For text that is not JSON the answer covers the depth that
    json.loads reaches before it meets the error (the scan stops at an unterminated string or a
    surplus closing bracket, where json.loads stops too; beyond an error it can only overcount)."""
    if raw.count(b"[") + raw.count(b"{") <= limit:  # the common case: too few brackets to matter
        return False
    depth, pos = 0, 0
    while (m := _JSON_SPECIAL.search(raw, pos)) is not None:
        c = raw[m.start()]
        if c == 0x22:  # '"': skip the string, brackets in it included
            end = _JSON_STRING_REST.match(raw, m.end())
            if end is None:
                return False
            pos = end.end()
            continue
        pos = m.end()
        if c in b"[{":
            depth += 1
            if depth > limit:
                return True
        else:
            depth -= 1
            if depth < 0:
                return False
    return False


def parse_json(raw: bytes, what: str) -> Any:
    """`raw` (UTF-8 JSON) parsed, refusing with CodecError what is not JSON or nests deeper than
    MAX_JSON_DEPTH levels (checked first: json.loads would exhaust the recursion limit)."""
    if json_too_deep(raw):
        raise CodecError(f"{what} nests deeper than {MAX_JSON_DEPTH} levels")
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:  # ValueError: JSONDecodeError, an int of too many digits
        raise CodecError(f"{what} is not valid JSON: {e}") from None


def _check_entries(header: Any, blob_len: int, max_bytes: int) -> list[dict[str, Any]]:
    """The header's entry list, with every field's type and range, every raw entry's size and
    offset, and the total decoded size checked (raw entries must tile the raw area exactly, in
    order). Unknown keys are refused: nothing in the header goes unread."""
    if not isinstance(header, dict) or header.get("container") not in ("torch", "numpy"):
        raise CodecError("the header is not a storage header")
    if not isinstance(header.get("entries"), list) or not isinstance(header.get("metadata"), dict):
        raise CodecError("the header lacks its entry list or metadata")
    unknown = set(header) - _HEADER_KEYS
    if unknown:
        raise CodecError(f"the header has unknown fields {sorted(unknown)}")
    tm = header.get("torch_metadata", {})
    # torch's _metadata: module prefix -> {"version": int, ...}; values that load_state_dict reads
    # as scalars, so nothing nested is accepted.
    if not isinstance(tm, dict) or not all(
            isinstance(v, dict) and all(x is None or isinstance(x, (str, int, float)) for x in v.values())
            for v in tm.values()):
        raise CodecError("the header's torch_metadata is not a mapping of module names to mappings of scalars")
    entries: list[dict[str, Any]] = header["entries"]
    names: set[str] = set()
    offset, total = 0, 0
    for i, e in enumerate(entries):
        if not isinstance(e, dict) or not isinstance(e.get("name"), str) or e["name"] in names:
            raise CodecError(f"header entry {i} has no name or repeats one")
        name = e["name"]
        names.add(name)
        store = e.get("store")
        if store not in ("message", "raw"):
            raise CodecError(f"entry {name!r}: unknown store {store!r}")
        unknown = set(e) - _ENTRY_KEYS[store]
        if unknown:
            raise CodecError(f"entry {name!r}: unknown fields {sorted(unknown)} for store {store!r}")
        shape = e.get("shape")
        if not isinstance(shape, list) or len(shape) > codecs.MAX_NDIM or not all(_is_count(s) for s in shape):
            raise CodecError(f"entry {name!r}: bad shape {shape!r}")
        if "torch" in e and not isinstance(e["torch"], str):
            raise CodecError(f"entry {name!r}: bad torch dtype")
        dtype = e.get("dtype")
        if store == "message":
            if dtype not in _MESSAGE_DTYPES:
                raise CodecError(f"entry {name!r}: the message holds float32 and float64 entries only")
            nz = e.get("negative_zeros")
            if nz is not None:
                size = math.prod(shape)
                if (not isinstance(nz, dict) or set(nz) != _NZ_KEYS or nz["positions"] not in SET_CODECS
                        or not all(_is_count(nz[f]) for f in _NZ_KEYS - {"positions"})
                        or not 0 < nz["count"] <= size or nz["offset"] != offset):
                    raise CodecError(f"entry {name!r}: bad negative-zero record")
                try:
                    check_position_set(nz["positions"], nz["m"])
                except CodecError as err:  # not `e`: that is the entry, read below
                    raise CodecError(f"entry {name!r}: negative-zero record: {err}") from None
                offset += nz["nbytes"]
        else:
            if (
                not isinstance(dtype, str)
                or dtype not in RAW_DTYPES
                or not _is_count(e.get("offset"))
                or not _is_count(e.get("nbytes"))
            ):
                raise CodecError(f"entry {name!r}: bad raw entry")
            # present only as true, on the |u1 bytes of a named torch dtype
            if "torch_bytes" in e and (e["torch_bytes"] is not True or dtype != "|u1" or "torch" not in e):
                raise CodecError(f"entry {name!r}: bad torch byte entry")
            count = e["nbytes"] if e.get("torch_bytes") else math.prod(shape) * np.dtype(dtype).itemsize
            if e["nbytes"] != count or e["offset"] != offset:
                raise CodecError(f"entry {name!r}: size or offset disagrees with its shape and the entries before it")
            offset += e["nbytes"]
            total += e["nbytes"]
        # NumPy refuses shapes over its size limit even when they hold no element, such as (0, 2**62).
        if math.prod(max(s, 1) for s in shape) * np.dtype(dtype).itemsize > MAX_ARRAY_BYTES:
            raise CodecError(f"entry {name!r}: shape {shape} is beyond NumPy's array size limit")
        if offset > blob_len:
            raise CodecError(f"entry {name!r} runs past the end of the file")
        if total > max_bytes:
            raise CodecError(f"the entries exceed the limit of {max_bytes} bytes (load's max_bytes)")
    if offset != blob_len:
        raise CodecError(f"{blob_len - offset} unexpected bytes after the last entry")
    return entries


def _is_count(x: Any) -> bool:
    return type(x) is int and 0 <= x < 1 << 63


__all__ = ["MAGIC", "VERSION", "load", "save"]
