"""Model messages: encode_model and decode_model over the format, positions and values codecs.
Decoding validates every record and length of the whole message before allocating (and before
decoding any payload), then decodes the Golomb streams of several tensors in parallel. Version 3
messages (streams, written by encode_stream) are read by the stream decoder over the bytes.

Words: a *chunk* is what the wire format calls one (an entry of a version 2 record's chunk table,
a piece of a version 3 stream); the encoder cuts a tensor of more than CHUNK_ELEMS elements into
*runs* of CHUNK_ELEMS, which it sparsifies and Golomb-codes independently and which become the
chunks of its record when that record is chunked (Golomb positions in two or more runs)."""

from __future__ import annotations

import math
import struct
import sys
from operator import attrgetter
from typing import Any, Callable, Literal, Mapping, NamedTuple, Optional, Union, cast, overload

import numpy as np

from .. import _backend
from .._arrays import block_views, check_disjoint, flat_float, flat_mask, on_device, writable_view
from .format import (
    CHUNK,
    CHUNK_ELEMS,
    CRC,
    DEFAULT_MAX_BYTES,
    DOMAIN_FULL,
    DOMAIN_REFERENCE,
    DTYPE_CODES,
    FLAG_ZERO_SIGNS,
    HEADER,
    MAGIC,
    MAX_NDIM,
    PLAIN_DTYPES,
    POSITION_NAMES,
    POSITIONS,
    RECORD,
    SIGNS,
    STREAM_VERSION,
    VALUE_NAMES,
    Chunk,
    CodecError,
    Reader,
    Record,
    ZeroSigns,
    bad_magic,
    read_header_flags,
)
from .plain import (
    PlainIn,
    PlainRecord,
    check_mapping,
    check_name,
    check_payload,
    check_record,
    check_whole,
    copy_out,
    decoded_whole,
    dtype_of,
    out_dtype,
    out_view,
    split,
    to_torch,
    words_of,
)
from .positions import (
    check_zero_signs,
    decode_golomb_positions,
    decode_positions,
    decode_zero_signs,
    device_plan,
    encode_run_positions,
    joined,
    relative_to,
    set_negative_zeros,
    signs_to_send,
    zero_sign_blocks,
)
from .records import (
    Budget,
    Decoded,
    check_all_expected,
    check_expected,
    read_head,
    record_dtype,
    reference_mask,
    write_head,
)
from .stream import decode_records
from .values import (
    LOSSLESS,
    Payload,
    check_codec,
    check_scale,
    decode_many,
    encode_many,
    read_payload,
    record_id,
)

# The -0.0 that a record sends (signs_to_send): (packed over its n elements, None when left on the
# device; n; how many).
Signs = tuple[Optional[np.ndarray], int, int]


class _Run(NamedTuple):
    """A run of a record's domain, as sparsified: its size, how many positions it holds, and their
    packed bits (None: left on the device, not taken)."""

    size: int
    nnz: int
    bits: Optional[np.ndarray]


class _GolombRun(NamedTuple):
    """A run's positions Golomb-coded with parameter m: in a record of two or more runs, a chunk of
    its chunk table (CHUNK) and the chunk's stream."""

    size: int
    nnz: int
    m: int
    stream: Any  # bytes or a uint8 array


class _Found(NamedTuple):
    """A tensor sparsified, on the host or on its device: its runs (one for a tensor of at most
    CHUNK_ELEMS elements), its values in pieces (back to back, in position order) and the -0.0 it
    sends. From a device also the streams coded there."""

    runs: list[_Run]
    vals: list[np.ndarray]
    signs: Optional[Signs]
    golomb: Optional[list[_GolombRun]] = None  # coded on the device (empty: Golomb not offered); None: on the host
    signs_on_device: bool = False  # the -0.0's Golomb stream was coded on the device: sign_golomb
    sign_golomb: Optional[tuple[int, Any]] = None  # its (parameter, stream); None: Golomb not offered


class _Sparse(NamedTuple):
    """One tensor on its way into a message: its record's fields and its positions over the domain
    (runs of the tensor's own elements, or one run of a reference mask's) and values."""

    head: bytes  # the record's name and shape
    dtype: np.dtype
    domain: int
    d: int
    nnz: int
    csr_shape: Optional[tuple[int, ...]]  # None: CSR not offered (a reference domain)
    found: _Found
    own_runs: list[_Run]  # its runs over its own elements (`found`'s may be over a reference's)
    shape: tuple[int, ...]


class _Whole(NamedTuple):
    """A tensor of another dtype than float32/float64 on its way into a message: its record's name
    and shape, and its words (a record of its own dtype code, docs/wire-format.md "Other dtypes")."""

    head: bytes
    plain: PlainIn


class _Coded(NamedTuple):
    """One tensor's record, coded: the fields and payloads (lists of pieces) that _write lays out."""

    head: bytes
    dtype: np.dtype
    domain: int
    d: int
    nnz: int
    pos_codec: int
    m: int
    pos_payload: list[Any]
    chunks: list[_GolombRun]  # its chunk table (version 2): the runs' streams of a chunked record, else empty
    values: str  # the values codec's name
    scale: float
    val_payload: list[Any]
    signs: list[Any]  # its zero-sign block (SIGNS, payload); empty: none
    decoded: Optional[np.ndarray] = None  # the values a decoder gets back (encode_model's `decoded`)


_NNZ, _BITS, _STREAM = attrgetter("nnz"), attrgetter("bits"), attrgetter("stream")  # (map: no frame an item)


def _run_starts(n: int) -> range:
    """Where the runs of n elements start (one run, at 0, for n of at most CHUNK_ELEMS; n = 0 too)."""
    return range(0, n, CHUNK_ELEMS) if n else range(1)


def _sparsify(k: Any, a: np.ndarray, mask: Optional[np.ndarray],
              signs: bool) -> tuple[list[_Run], list[np.ndarray], Optional[np.ndarray]]:
    """(a's runs, its values a piece a run, and with `signs` the packed positions of a's -0.0
    elements over its n elements, None when it has none), each run sparsified on the library's
    threads. Small arrays a run, which the message's one join copies, rather than large new ones
    that a first write must fault in page by page. The -0.0 are found in the pass that finds the
    non-zeros: no pass of their own over a tensor without -0.0."""
    if a.size <= CHUNK_ELEMS:  # one run: the array itself
        got = k.sparsify(a, mask, negative_zeros=signs)
        return [_Run(a.size, got[1].size, got[0])], [got[1]], got[2] if signs else None
    runs: list[_Run] = []
    vals: list[np.ndarray] = []
    found: list[tuple[int, np.ndarray]] = []  # (start, packed -0.0) of the runs with some
    for s in _run_starts(a.size):
        got = k.sparsify(a[s : s + CHUNK_ELEMS], None if mask is None else mask[s : s + CHUNK_ELEMS],
                         negative_zeros=signs)
        runs.append(_Run(min(CHUNK_ELEMS, a.size - s), got[1].size, got[0]))
        vals.append(got[1])
        if signs and got[2] is not None:
            found.append((s, got[2]))
    if not found:
        return runs, vals, None
    negative = np.zeros((a.size + 7) // 8, dtype=np.uint8)  # built only when there are some
    for s, part in found:  # runs of whole bytes: CHUNK_ELEMS is a multiple of 8
        negative[s // 8 : s // 8 + part.size] = part
    return runs, vals, negative


def _sparse_on_device(k: Any, names: list[str], flats: dict[str, Any], masks: Optional[Mapping[str, Any]],
                      reference: Optional[Mapping[str, Any]], positions: str,
                      signs_of: Callable[[bool], bool]) -> dict[str, _Found]:
    """Device tensors sparsified where they are, with the Golomb streams that the message may take
    coded there (device_plan), so that only those streams, the values and the packed bits that it
    may take cross to the host. Positions over a reference mask are coded on the host."""
    dk = _backend.device_kernels()
    masked = {name: masks is not None and name in masks for name in names}
    full = {name: reference is None or name not in reference for name in names}
    dev = dk.DeviceSparse([(flats[name][0], masks[name] if masks is not None and masked[name] else None,
                            signs_of(masked[name])) for name in names], CHUNK_ELEMS)
    counts = dev.counts()
    plans = [dk.Plan(*device_plan(k, sizes, negatives, positions, flats[name][1], full[name]))
             for name, (sizes, negatives) in zip(names, counts)]
    out = {}
    for name, got, (sizes, negatives), plan in zip(names, dev.fetch(plans), counts, plans):
        runs, start = [], 0
        for size, nnz in sizes:  # runs of whole bytes: views of the packed positions
            runs.append(_Run(size, nnz, None if got.bits is None else got.bits[start // 8 : (start + size + 7) // 8]))
            start += size
        golomb = [_GolombRun(size, nnz, m, s) for (size, nnz), m, s in zip(sizes, plan.ms, got.streams) if m]
        n = math.prod(flats[name][1])
        out[name] = _Found(runs, [got.vals], (got.negative, n, negatives) if negatives else None,
                           golomb if full[name] else None, bool(negatives),
                           (plan.sign_m, got.sign_stream) if plan.sign_m else None)
    return out


@overload
def encode_model(tensors: Mapping[str, Any], *, masks: Optional[Mapping[str, Any]] = None,
                 reference: Optional[Mapping[str, Any]] = None, positions: str = "auto", values: str = "raw",
                 signed_zeros: Optional[bool] = None, backend: str = "auto", rounding: str = "nearest",
                 seed: Optional[int] = None, decoded: Literal[False] = False) -> bytes: ...


@overload
def encode_model(tensors: Mapping[str, Any], *, masks: Optional[Mapping[str, Any]] = None,
                 reference: Optional[Mapping[str, Any]] = None, positions: str = "auto", values: str = "raw",
                 signed_zeros: Optional[bool] = None, backend: str = "auto", rounding: str = "nearest",
                 seed: Optional[int] = None, decoded: Literal[True]) -> tuple[bytes, dict[str, np.ndarray]]: ...


@overload
def encode_model(tensors: Mapping[str, Any], *, masks: Optional[Mapping[str, Any]] = None,
                 reference: Optional[Mapping[str, Any]] = None, positions: str = "auto", values: str = "raw",
                 signed_zeros: Optional[bool] = None, backend: str = "auto", rounding: str = "nearest",
                 seed: Optional[int] = None, decoded: bool = False
                 ) -> Union[bytes, tuple[bytes, dict[str, np.ndarray]]]: ...


def encode_model(
    tensors: Mapping[str, Any],
    *,
    masks: Optional[Mapping[str, Any]] = None,
    reference: Optional[Mapping[str, Any]] = None,
    positions: str = "auto",
    values: str = "raw",
    signed_zeros: Optional[bool] = None,
    backend: str = "auto",
    rounding: str = "nearest",
    seed: Optional[int] = None,
    decoded: bool = False,
) -> Union[bytes, tuple[bytes, dict[str, np.ndarray]]]:
    """Encode named tensors as one message: float32/float64 tensors sparse-coded (below), those of
    the other dtypes a model holds whole and bit for bit (bool, int8 .. int64, uint8 .. uint64,
    float16, bfloat16 from torch, complex64, complex128: a BatchNorm's num_batches_tracked, a
    half-precision copy), so that a torch state_dict or a dict of arrays goes as it is.

    Positions kept per float tensor: `masks[name]` if given (values there are sent even when zero;
    every element outside the mask decodes to +0.0, whatever it was), else the non-zeros (+0.0
    and -0.0 both count as zero). With `reference[name]`, a mask the receiver already has: kept
    positions equal to it cost nothing (values go in mask order), positions that are a subset of
    it are coded relative to it (mask delta); otherwise the full tensor is the domain.
    `positions` is "auto" (smallest per tensor), "bitmask", "csr", "golomb" or "all". `values`:
    lossless "raw" (the words as they are) or "ans" (the words entropy-coded: about 24 bits a
    float32 value of a pruned model), or "auto" (per tensor the smaller of the two); lossy "fp16",
    "bf16", "int8" (per-tensor scale), the same values entropy-coded as "fp16-ans", "bf16-ans",
    "int8-ans", and "int2-ans" .. "int7-ans" (b-bit uniform quantisation with a per-tensor scale,
    |error| <= scale / 2 with `rounding` "nearest", < scale with "stochastic", which draws from
    numpy's default_rng(seed); scale = max |value| / (2^(b-1) - 1)).

    What comes back: the values at the positions (bit for bit with raw values: -0.0, NaN
    payloads, infinities and subnormals included) and +0.0 elsewhere, except for the -0.0 off the
    positions that `signed_zeros` sends, as a set of positions of their own (a bitmask or Golomb
    code over the tensor's elements; a tensor without such -0.0 costs nothing more). By default
    (None) they are sent for tensors without a mask when values are lossless: lossless values without
    masks give back the same bytes. Pruning by `w * mask` leaves -0.0 at about half of the
    pruned places, which then cost about a bit an element. True sends them for every tensor,
    with a mask too (raw values then give back the same bytes wherever only zeros lie outside
    the mask); False never (messages that readers predating signed zeros read).
    Tensors on a CUDA device are sparsified there and their Golomb streams (positions and -0.0)
    coded there: only what the message takes (streams, values, packed bits) is copied to the host.
    Tensors of the other dtypes ignore `positions`, `values` and `signed_zeros` (every element goes
    as a raw little-endian word); a mask or reference mask given for one must keep every element.

    Parameters
    ----------
    tensors : a mapping of names (str) to arrays or torch tensors (host or CUDA) of the dtypes above.
    masks : names to masks of the positions sent (non-zero = kept), optional.
    reference : names to masks the receiver already holds, optional.
    positions : "auto", "bitmask", "csr", "golomb" or "all".
    values : "raw", "ans", "auto", "fp16", "bf16", "int8", "fp16-ans", "bf16-ans" or "int2-ans" ..
        "int8-ans".
    signed_zeros : None (the default above), True or False.
    backend : "auto", "native", "numba" or "numpy" (host tensors).
    rounding : "nearest" or "stochastic" (only the int*-ans codecs round: others refuse
        "stochastic").
    seed : the stochastic rounding's seed (None: fresh entropy).
    decoded : also return what the receiver decodes: the message and, by name, the NumPy arrays
        that decode_model(message, reference=reference).tensors gives, bit for bit, built
        without decoding from the encoder's own positions and quantised values (what error
        feedback subtracts), and the other dtypes' words; only where a CUDA tensor's positions or
        -0.0 were coded on the device and not fetched is the message decoded instead.

    Returns
    -------
    bytes : the message (docs/wire-format.md); with `decoded`, (message, tensors).

    Raises
    ------
    TypeError : `tensors` (or masks, reference) not a mapping, a name that is not a str, a tensor
        of a dtype not above (the error names the tensor and its dtype), or a signed_zeros that is
        not a bool.
    ValueError : an unknown codec or backend, stochastic rounding with a codec that does not
        round, a mask of another size, a mask or reference mask that leaves out elements of a
        tensor that is not float32/float64, a bfloat16 tensor with `decoded`, or a positions
        codec that cannot code a tensor's positions.
    """
    check_mapping(tensors, "encode_model")
    for what, given in (("masks", masks), ("reference", reference)):
        if given is not None:
            check_mapping(given, "encode_model", what)
    check_codec(values, rounding)
    if positions not in ("auto", *POSITIONS):
        raise ValueError(f"unknown positions codec {positions!r}")
    if signed_zeros is not None and not isinstance(signed_zeros, bool):
        raise TypeError(f"signed_zeros must be None, True or False, got {signed_zeros!r}")

    def signs_of(masked: bool) -> bool:
        """Whether a tensor's -0.0 off its positions are sent: by default with raw values, no mask."""
        return signed_zeros if signed_zeros is not None else values in LOSSLESS and not masked

    floats: dict[str, Any] = {}
    wholes: dict[str, _Whole] = {}
    order: list[str] = []
    for name, t in tensors.items():
        check_name(name)
        order.append(name)
        f, plain = split(name, t, f"tensors[{name!r}]")
        if plain is None:
            floats[name] = f
            continue
        for what, given in (("masks", masks), ("reference", reference)):
            if given is not None and name in given:
                check_whole(given[name], math.prod(plain.shape), f"{what}[{name!r}]", name, dtype_of(plain.code))
        wholes[name] = _Whole(write_head(name, plain.shape), plain)
    if decoded:
        wide = [name for name, w in wholes.items() if dtype_of(w.plain.code) == "bfloat16"]
        if wide:
            raise ValueError(f"decoded=True: {wide[0]!r} is a bfloat16 tensor, which NumPy cannot hold")
    k = _backend.kernels(backend)
    prepared = _prepare(k, floats, masks, reference, positions, signs_of)
    rng = np.random.default_rng(seed) if rounding == "stochastic" else None
    coded = _code(k, prepared, positions, values, rounding, rng, decoded)
    it = iter(coded)
    message = _write(k, [wholes[name] if name in wholes else next(it) for name in order])
    if not decoded:
        return message
    got = _decoded(k, list(floats), prepared, coded)
    if got is None:  # positions or -0.0 left on a device: the message decoded (it is the caller's size)
        return message, dict(decode_model(message, reference=reference, max_bytes=sys.maxsize).tensors)
    got.update((name, decoded_whole(w.plain)) for name, w in wholes.items())
    return message, {name: got[name] for name in order}


def _prepare(k: Any, tensors: Mapping[str, Any], masks: Optional[Mapping[str, Any]],
             reference: Optional[Mapping[str, Any]], positions: str,
             signs_of: Callable[[bool], bool]) -> list[_Sparse]:
    """Each tensor sparsified (device tensors on their device, with their Golomb streams) and, with
    a reference mask that its positions are a subset of, moved into the reference's domain."""
    where = {name: on_device(t) for name, t in tensors.items()}
    flats = {name: flat_float(t, ("tensors[{!r}]", name), MAX_NDIM, where[name]) for name, t in tensors.items()}
    on_dev = [name for name in flats if where[name]]
    from_device = _sparse_on_device(k, on_dev, flats, masks, reference, positions, signs_of) if on_dev else {}
    prepared = []
    for name, (flat, shape, dtype) in flats.items():
        n = math.prod(shape)
        if name in from_device:
            found = from_device[name]
        else:
            masked = masks is not None and name in masks
            mask = flat_mask(masks[name], n, f"masks[{name!r}]") if masks is not None and masked else None
            runs, vals, negative = _sparsify(k, flat, mask, signs_of(masked))
            # a mask's -0.0 are values: only those off its positions are sent
            kept = joined(list(map(_BITS, runs))) if masked and negative is not None else None
            found = _Found(runs, vals, signs_to_send(k, negative, kept, n))
        nnz = sum(map(_NNZ, found.runs))
        domain, d = DOMAIN_FULL, n
        csr_shape: Optional[tuple[int, ...]] = shape
        own_runs = found.runs
        if reference is not None and name in reference:
            bits = joined(list(map(_BITS, found.runs)))
            sub = relative_to(k, bits, k.pack_bits(flat_mask(reference[name], n, f"reference[{name!r}]")), n)
            if sub is not None:  # a subset of the reference: code relative to it, as one run
                (d, sub_bits), domain, csr_shape = sub, DOMAIN_REFERENCE, None
                found = found._replace(runs=[_Run(d, nnz, sub_bits)])
        prepared.append(_Sparse(write_head(name, shape), dtype, domain, d, nnz, csr_shape, found, own_runs, shape))
    return prepared


def _golomb_streams(k: Any, prepared: list[_Sparse], positions: str) -> list[list[_GolombRun]]:
    """Each tensor's Golomb streams, one a run (empty: Golomb not offered): those coded on a
    device, and the others' in one call (the native backend encodes them in parallel)."""
    streams = [[] if sp.found.golomb is None else sp.found.golomb for sp in prepared]
    if positions not in ("auto", "golomb"):
        return streams
    owners = [(i, run) for i, sp in enumerate(prepared) if sp.found.golomb is None for run in sp.found.runs]
    items = [(run.bits, run.size, k.golomb_parameter(run.nnz, run.size)) for _, run in owners]
    for (i, run), (_, _, m), stream in zip(owners, items, k.golomb_encode_many(items)):
        streams[i].append(_GolombRun(run.size, run.nnz, m, stream))
    return streams


def _code(k: Any, prepared: list[_Sparse], positions: str, values: str, rounding: str,
          rng: Optional[np.random.Generator], decoded: bool = False) -> list[_Coded]:
    """Each tensor's record coded: positions (the smallest payload for "auto"), values (all
    tensors' in one call, with `decoded` also what they decode to) and -0.0."""
    signed: list[int] = []
    sets: list[Signs] = []
    coded_signs: dict[int, Optional[tuple[int, Any]]] = {}  # by set: coded on a device
    for i, sp in enumerate(prepared):
        if sp.found.signs is not None:
            if sp.found.signs_on_device:
                coded_signs[len(sets)] = sp.found.sign_golomb
            signed.append(i)
            sets.append(sp.found.signs)
    sign_blocks = dict(zip(signed, zero_sign_blocks(k, sets, coded_signs)))
    coded_values = encode_many(k, [sp.found.vals for sp in prepared], values, rounding, rng, decoded=decoded)
    out = []
    for i, (sp, golomb, val) in enumerate(zip(prepared, _golomb_streams(k, prepared, positions), coded_values)):
        g = (golomb[0].m if len(golomb) == 1 else 0, list(map(_STREAM, golomb))) if golomb else None
        pos_codec, m, pos_payload = encode_run_positions(list(map(_BITS, sp.found.runs)), sp.d, sp.nnz, positions,
                                                         sp.csr_shape, g)
        chunks = golomb if pos_codec == POSITIONS["golomb"] and len(golomb) > 1 else []
        out.append(_Coded(sp.head, sp.dtype, sp.domain, sp.d, sp.nnz, pos_codec, m, pos_payload, chunks, val.codec,
                          val.scale, val.payload, sign_blocks.get(i, []), val.decoded))
    return out


def _decoded(k: Any, names: list[str], prepared: list[_Sparse], coded: list[_Coded]
             ) -> Optional[dict[str, np.ndarray]]:
    """What decode_model gives back for each float tensor of a message, from its encoder's
    positions, values as they decode and -0.0; None where a tensor's positions or -0.0 stayed on
    a device (coded there, not fetched)."""
    out = {}
    for name, sp, rec in zip(names, prepared, coded):
        if rec.decoded is None or any(run.bits is None for run in sp.own_runs) or (
                sp.found.signs is not None and sp.found.signs[0] is None):
            return None
        n = math.prod(sp.shape)
        bits = joined(list(map(_BITS, sp.own_runs)))
        dest = k.densify(bits, n, rec.decoded, np.empty(n, sp.dtype.newbyteorder("=")))
        if sp.found.signs is not None:
            set_negative_zeros(k, name, bits, cast(np.ndarray, sp.found.signs[0]), dest)
        out[name] = dest.reshape(sp.shape)
    return out


def _write(k: Any, records: list[Union[_Coded, _Whole]]) -> bytes:
    """The message: header, then each record (head, fields, version 2's chunk table, payloads),
    joined and checksummed in one pass (each piece copied into the message and checksummed there).
    Version 1 unless a record is chunked: version 1 readers read what needs no chunks."""
    version = 2 if any(isinstance(rec, _Coded) and rec.chunks for rec in records) else 1
    flags = FLAG_ZERO_SIGNS if any(isinstance(rec, _Coded) and rec.signs for rec in records) else 0
    parts: list[Any] = [HEADER.pack(MAGIC, version, flags, 0, len(records))]
    for rec in records:
        if isinstance(rec, _Whole):  # every element, raw: docs/wire-format.md "Other dtypes"
            n = math.prod(rec.plain.shape)
            parts += [rec.head, RECORD.pack(rec.plain.code, DOMAIN_FULL, POSITIONS["all"], record_id("raw"), 0, 0,
                                            n, n, 0, 0.0, 0, rec.plain.words.size)]
            if version == 2:
                parts.append(struct.pack("<I", 0))
            parts.append(rec.plain.words)
            continue
        parts += [
            rec.head,
            RECORD.pack(DTYPE_CODES[rec.dtype], rec.domain, rec.pos_codec, record_id(rec.values),
                        int(bool(rec.signs)), 0, rec.d, rec.nnz, rec.m, rec.scale, sum(map(len, rec.pos_payload)),
                        sum(map(len, rec.val_payload))),
        ]
        if version == 2:
            parts.append(struct.pack("<I", len(rec.chunks)))
            parts += [CHUNK.pack(c.size, c.nnz, c.m, len(c.stream)) for c in rec.chunks]
        parts += rec.pos_payload + rec.val_payload + rec.signs
    return k.join_crc32c(parts)

def decode_model(
    data: Any,
    *,
    reference: Optional[Mapping[str, Any]] = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
    out: Optional[Mapping[str, Any]] = None,
    expect: Optional[Mapping[str, tuple[tuple[int, ...], Any]]] = None,
    backend: str = "auto",
    as_torch: bool = False,
) -> Decoded:
    """Decode a message from encode_model. `reference` supplies the shared masks of tensors coded
    relative to one. `max_bytes` caps the total size of the decoded arrays: a message that would
    exceed it is rejected before anything is allocated. `expect` maps names to (shape, dtype): the
    message must hold exactly those tensors, which is checked before anything is allocated (a peer
    replying for another model is refused at no cost). `out` maps names to existing arrays (or
    torch CPU tensors) of the right dtype and size to decode into, skipping the allocation; they
    are returned in `tensors` and must not overlap each other or the message. Nothing else returned
    shares memory with `data`, which the caller may reuse.

    Tensors come back as NumPy arrays, or with `as_torch=True` as torch CPU tensors (sharing the
    arrays' memory; `out` tensors as given, `masks` and `packed` NumPy as ever): a message does not
    record whether it was encoded from torch. Tensors of other dtypes than float32/float64 come
    back whole, of their dtype, bit for bit; a bfloat16 one, which NumPy cannot hold, needs
    `as_torch=True` (or a torch.bfloat16 `out`), else the message is refused with CodecError before
    anything is allocated.

    Parameters
    ----------
    data : the message (bytes or any buffer).
    reference : names to the shared masks of tensors coded relative to one.
    max_bytes : the most bytes the decoded arrays may take.
    out : names to arrays to decode into, optional.
    expect : names to (shape, dtype) the message must hold exactly, optional (dtypes as NumPy or
        torch names them: np.float32, torch.int64, "bfloat16").
    backend : "auto", "native", "numba" or "numpy".
    as_torch : return torch tensors instead of NumPy arrays.

    Returns
    -------
    Decoded : `tensors` (names to arrays) and `masks` (names to the float tensors' positions);
        itself a mapping of the names to the tensors (`d["w"]`, `len(d)`, `d.items()`, ...).

    Raises
    ------
    CodecError : any corruption or inconsistency, bytes that are not a message (the error says
        what they are where it is known: a torch.save file, a file of feddip_kernels.save), a
        message over max_bytes, another set of tensors than `expect`, a missing reference mask
        (`out` may then be partly written), or a bfloat16 tensor without `as_torch`.
    ValueError : `out` arrays of the wrong size, or overlapping.
    TypeError : `data` that is not a buffer, `out` arrays of the wrong dtype.
    """
    if not isinstance(as_torch, bool):
        raise TypeError(f"as_torch must be True or False, got {as_torch!r}")
    k = _backend.kernels(backend)
    try:
        view = memoryview(data)
    except TypeError:
        raise TypeError(f"decode_model takes the message's bytes (bytes or any buffer), got {type(data).__name__}"
                        ) from None
    view = view.cast("B")
    head = bytes(view[: len(MAGIC)])
    if head != MAGIC[: len(head)]:  # not a message at all: say so before any talk of a checksum
        raise CodecError(bad_magic(head))
    if len(view) < HEADER.size + CRC.size:
        raise CodecError(f"message of {len(view)} bytes is shorter than header and checksum")
    body = view[: len(view) - CRC.size]
    (stored,) = CRC.unpack(view[len(view) - CRC.size :])
    if k.crc32c(body) != stored:
        raise CodecError("checksum mismatch: the message is corrupt")
    r = Reader(body)
    version, flags, count = read_header_flags(r)
    if version == STREAM_VERSION:
        result = decode_records(r, k, count, reference=reference, max_bytes=max_bytes, out=out, expect=expect,
                                masks=True, caller="decode_model", message=view)
        if r.pos != len(body):
            raise CodecError(f"{len(body) - r.pos} unexpected bytes after the last tensor")
        if as_torch:
            _to_torch(result, set(out or ()), {})
        return result
    entries: list[Union[Record, PlainRecord]] = []
    seen: set[str] = set()
    budget = Budget(max_bytes, "decode_model")
    for i in range(count):
        name, shape = read_head(r, i, seen)
        dtype_code, domain, pos_codec, val_id, r0, r1, d, nnz, m, scale, pos_len, val_len = r.unpack(
            RECORD, ("{!r} record", name)
        )
        if dtype_code in PLAIN_DTYPES:  # another dtype: every element, raw
            check_expected(name, shape, dtype_of(dtype_code), expect)
            n = budget.take(name, shape, words_of(dtype_code))
            check_record(name, dtype_code, n, (domain, pos_codec, val_id, r0, r1, m, pos_len), d, nnz, scale,
                         val_len)
            if version == 2:  # no chunk table: a count other than 0 is refused
                _read_chunk_table(r, name, domain, pos_codec, d, nnz, m, pos_len)
            if dtype_of(dtype_code) == "bfloat16" and not as_torch and (out is None or name not in out):
                raise CodecError(f"{name!r} is a bfloat16 tensor, which NumPy cannot hold: pass as_torch=True "
                                 f"to decode_model (torch tensors out), or out={{{name!r}: a torch.bfloat16 tensor}}")
            plain = PlainRecord(name, tuple(shape), n, dtype_code, r.take(val_len, ("{!r} values", name)))
            check_payload(plain)
            entries.append(plain)
            continue
        dtype = record_dtype(name, dtype_code)
        check_expected(name, shape, dtype, expect)
        n = budget.take(name, shape, dtype)
        if val_id not in VALUE_NAMES or pos_codec not in POSITION_NAMES or domain not in (0, 1) or r1 \
                or r0 not in ((0, 1) if flags & FLAG_ZERO_SIGNS else (0,)):
            raise CodecError(f"{name!r}: unknown codec, domain or reserved field")
        if pos_codec == POSITIONS["csr"] and domain != DOMAIN_FULL:
            raise CodecError(f"{name!r}: CSR positions are defined for the tensor's own index space only")
        if domain == DOMAIN_FULL and d != n:
            raise CodecError(f"{name!r}: domain size {d} differs from the element count {n}")
        if domain == DOMAIN_REFERENCE and d > n:
            raise CodecError(f"{name!r}: reference domain larger than the tensor")
        if nnz > d:
            raise CodecError(f"{name!r}: {nnz} values for a domain of {d}")
        values = VALUE_NAMES[val_id]
        if values != "int8":  # int8's scale is checked where its values are decoded, as it always was
            check_scale(values, scale, repr(name))
        table = _read_chunk_table(r, name, domain, pos_codec, d, nnz, m, pos_len) if version == 2 else []
        pos_raw = r.take(pos_len, ("{!r} positions", name))
        val_raw = r.take(val_len, ("{!r} values", name))
        payload = read_payload(val_raw, values, nnz, dtype, scale, repr(name))
        signs = None
        if r0:  # which of the zeros are -0.0
            s_codec, s_count, s_m, s_len = r.unpack(SIGNS, ("{!r} zero signs", name))
            try:
                check_zero_signs(s_codec, n, n - nnz, s_count, s_m, s_len)
            except CodecError as e:
                raise CodecError(f"{name!r}: {e}") from None
            signs = ZeroSigns(s_codec, s_count, s_m, r.take(s_len, ("{!r} zero signs", name)))
        chunks, start, first, at = [], 0, 0, 0
        for size, c_nnz, c_m, c_len in table:
            chunks.append(Chunk(start, size, c_nnz, c_m, first, pos_raw[at : at + c_len]))
            start, first, at = start + size, first + c_nnz, at + c_len
        entries.append(Record(name, tuple(shape), n, dtype, domain, pos_codec, values, d, nnz, m, scale, pos_raw,
                              val_raw, tuple(chunks), signs, payload.block))
    check_all_expected([e.name for e in entries], expect)
    if r.pos != len(body):
        raise CodecError(f"{len(body) - r.pos} unexpected bytes after the last tensor")
    dests: dict[str, np.ndarray] = {}
    for ent in entries:
        if out is not None and ent.name in out:
            where = f"out[{ent.name!r}]"
            dests[ent.name] = (writable_view(out[ent.name], where, ent.dtype.newbyteorder("="), ent.n).reshape(-1)
                               if isinstance(ent, Record) else out_view(out[ent.name], ent.code, where, ent.n))
    check_disjoint({"the message": np.frombuffer(view, dtype=np.uint8), **{f"out[{k!r}]": a for k, a in dests.items()}})
    targets = _allocate(entries, out)
    records = [e for e in entries if isinstance(e, Record)]
    golomb = decode_golomb_positions(k, records)
    negative = _decode_zero_signs(k, records)
    all_vals = decode_many(k, [Payload(rec.val_codec, rec.nnz, rec.dtype, rec.scale, rec.val_raw, rec.block)
                               for rec in records], [repr(rec.name) for rec in records])
    result = Decoded()
    result.tensors.update((e.name, None) for e in entries)  # the message's order
    for i, (rec, vals) in enumerate(zip(records, all_vals)):
        name, n = rec.name, rec.n
        dest = dests[name] if name in dests else cast(np.ndarray, targets[name])  # _allocate's for each not in out
        if rec.chunks:  # each chunk into its slice of the output (densify runs on the library's threads)
            for c, bits in zip(rec.chunks, golomb[i]):
                k.densify(bits, c.size, vals[c.first : c.first + c.nnz], dest[c.start : c.start + c.size])
            if i in negative:
                set_negative_zeros(k, name, np.concatenate(golomb[i]), negative[i], dest)
            result.packed_parts[name] = golomb[i]
        else:
            bits = golomb[i][0] if i in golomb else decode_positions(k, rec.pos_raw, rec.pos_codec, rec.d, rec.nnz,
                                                                     rec.shape)
            if rec.domain == DOMAIN_REFERENCE:
                ref_bits = k.pack_bits(reference_mask(reference, name, n))
                held = k.count_bits(ref_bits, n)
                if held != rec.d:
                    raise CodecError(f"{name!r}: the reference mask has {held} positions, the sender's had {rec.d}")
                bits = k.deposit_bits(bits, ref_bits, n)
            k.densify(bits, n, vals, dest)
            if i in negative:
                set_negative_zeros(k, name, bits, negative[i], dest)
            result.packed[name] = bits
        result.tensors[name] = out[name] if out is not None and name in dests else dest.reshape(rec.shape)
    codes: dict[str, int] = {}
    for ent in entries:
        if isinstance(ent, PlainRecord):
            dest = dests[ent.name] if ent.name in dests else cast(np.ndarray, targets[ent.name])
            copy_out(ent, dest)
            result.tensors[ent.name] = cast(Mapping, out)[ent.name] if ent.name in dests else dest.reshape(ent.shape)
            codes[ent.name] = ent.code
    if as_torch:
        _to_torch(result, set(dests), codes)
    return result


def _to_torch(result: Decoded, given: set[str], codes: dict[str, int]) -> None:
    """The decoded arrays as torch tensors sharing their memory, but for the caller's `out` (given)."""
    for name, a in list(result.tensors.items()):
        if name not in given:
            result.tensors[name] = to_torch(a, codes.get(name))


def _decode_zero_signs(k: Any, records: list[Record]) -> dict[int, np.ndarray]:
    """The -0.0 of each record with a zero-sign block, by record index, as packed positions over
    its elements."""
    signed = [(i, rec.name, rec.signs, rec.n) for i, rec in enumerate(records) if rec.signs is not None]
    found = decode_zero_signs(k, [(repr(name), signs, n) for _, name, signs, n in signed])
    return {i: bits for (i, *_), bits in zip(signed, found)}


def _read_chunk_table(r: Reader, name: str, domain: int, pos_codec: int, d: int, nnz: int, m: int,
                      pos_len: int) -> list[tuple[int, int, int, int]]:
    """A version 2 record's chunk table (empty when the record is not chunked), checked: runs of
    the tensor's own index space, each but the last a multiple of 8 elements, whose sizes, counts
    and stream lengths add up to the record's."""
    (count,) = r.unpack("<I", f"{name!r} chunk count")
    if not count:
        return []
    if pos_codec != POSITIONS["golomb"] or domain != DOMAIN_FULL or m != 0 or count < 2:
        raise CodecError(f"{name!r}: chunks are for Golomb positions over the tensor's own index space, "
                         "two or more, with the record's Golomb parameter 0")
    raw = r.take(CHUNK.size * count, f"{name!r} chunk table")
    table = [CHUNK.unpack_from(raw, CHUNK.size * j) for j in range(count)]
    for j, (size, c_nnz, c_m, _) in enumerate(table):
        if size == 0 or (j < count - 1 and size % 8) or c_nnz > size or c_m < 1:
            raise CodecError(f"{name!r}: chunk {j} has size {size}, {c_nnz} positions, parameter {c_m}")
    if [sum(col) for col in zip(*table)][0:2] != [d, nnz] or sum(row[3] for row in table) != pos_len:
        raise CodecError(f"{name!r}: the chunks' sizes, counts or lengths do not add up to the record's")
    return table


def _allocate(entries: list[Union[Record, PlainRecord]], out: Optional[Mapping[str, Any]]
              ) -> dict[str, Optional[np.ndarray]]:
    """Flat output arrays, by name, for the records not decoded into `out`, views into one block;
    its size is within the caller's max_bytes (each record's size was checked against it)."""
    specs = [None if out is not None and e.name in out
             else ((e.n,), e.dtype.newbyteorder("=") if isinstance(e, Record) else out_dtype(e.code)) for e in entries]
    return dict(zip([e.name for e in entries], block_views(specs)))
