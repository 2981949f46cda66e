"""Model messages: encode_model and decode_model over the format, positions and values codecs.
Decoding validates every record and length of the whole message before allocating (and before
decoding any payload), then decodes the Golomb streams of several tensors in parallel. Version 3
messages (streams, written by encode_stream) are read by the stream decoder over the bytes."""

from __future__ import annotations

import math
import struct
from typing import Any, Mapping, NamedTuple, Optional

import numpy as np

from .. import _backend
from .._arrays import block_views, check_disjoint, flat_float, flat_mask, on_device, writable_view
from .format import (
    CHUNK, CHUNK_ELEMS, CRC, DEFAULT_MAX_BYTES, DOMAIN_FULL, DOMAIN_REFERENCE, DTYPE_CODES, FLAG_ZERO_SIGNS, HEADER,
    MAGIC, MAX_NDIM, POSITION_NAMES, POSITIONS, RECORD, SIGNS, STREAM_VERSION, VALUE_NAMES, VALUES,
    Chunk, CodecError, Reader, Record, ZeroSigns, read_header_flags,
)
from .positions import (
    check_zero_signs, decode_golomb_positions, decode_positions, decode_zero_signs, device_plan, encode_positions,
    joined, relative_to, set_negative_zeros, signs_to_send, zero_sign_blocks,
)
from .records import Budget, Decoded, check_all_expected, check_expected, read_head, record_dtype, reference_mask, write_head
from .stream import decode_records
from .values import decode_values, encode_values, value_size


def _runs(n: int) -> range:
    return range(0, n, CHUNK_ELEMS)


def _sparsify(k: Any, a: np.ndarray, mask: Optional[np.ndarray], signs: bool) -> tuple[Any, Any, Optional[np.ndarray]]:
    """k.sparsify, or for a tensor over CHUNK_ELEMS the lists of its runs' positions and values:
    small arrays a run (each sparsified on the library's threads), which the message's one join
    copies, rather than large new ones that a first write must fault in page by page. With
    `signs`, also the packed positions of a's -0.0 elements (None when it has none), found in the
    pass that finds the non-zeros: no pass of its own over a tensor without -0.0."""
    if a.size <= CHUNK_ELEMS:
        return k.sparsify(a, mask, negative_zeros=True) if signs else (*k.sparsify(a, mask), None)
    runs = [k.sparsify(a[s : s + CHUNK_ELEMS], None if mask is None else mask[s : s + CHUNK_ELEMS], negative_zeros=signs)
            for s in _runs(a.size)]
    found = [(s, r[2]) for s, r in zip(_runs(a.size), runs) if signs and r[2] is not None]
    negative = np.zeros((a.size + 7) // 8, dtype=np.uint8) if found else None  # built only when there are some
    for s, part in found:  # runs of whole bytes: CHUNK_ELEMS is a multiple of 8
        negative[s // 8 : s // 8 + part.size] = part
    return [r[0] for r in runs], [r[1] for r in runs], negative


def _sparse_on_device(k: Any, names: list[str], flats: dict[str, Any], masks: Optional[Mapping[str, Any]],
                      reference: Optional[Mapping[str, Any]], positions: str, signs_of: Any) -> dict[str, Any]:
    """Device tensors sparsified where they are, with the Golomb streams that the message may take
    coded there (device_plan), so that only those streams, the values and the packed bits that it
    may take cross to the host. By name: (Fetched, ([(run size, nnz)], -0.0 sent), Plan)."""
    dk = _backend.device_kernels()
    masked = {name: bool(masks) and name in masks for name in names}
    dev = dk.DeviceSparse([(flats[name][0], masks[name] if masks and masked[name] else None, signs_of(masked[name]))
                           for name in names], CHUNK_ELEMS)
    counts = dev.counts()
    plans = [dk.Plan(*device_plan(k, runs, negatives, positions, flats[name][1], not (reference and name in reference)))
             for name, (runs, negatives) in zip(names, counts)]
    return dict(zip(names, zip(dev.fetch(plans), counts, plans)))


def _pieces(payload: Any) -> list[Any]:
    return payload if isinstance(payload, list) else [payload]


class _Sparse(NamedTuple):
    """One tensor on its way into a message: its positions (over the domain) and values."""

    head: bytes  # the record's name and shape
    shape: tuple[int, ...]
    dtype: np.dtype
    domain: int
    d: int
    nnz: int
    pos_bits: Any  # packed bits, or a list of them a run of CHUNK_ELEMS (None: left on the device, not taken)
    csr_shape: Optional[tuple[int, ...]]
    vals: Any  # an array, or a list of them a run
    signs: Optional[tuple[Any, int, int]]  # the -0.0 sent: (packed over its n elements or None if not taken, n, count)


def encode_model(
    tensors: Mapping[str, Any],
    *,
    masks: Optional[Mapping[str, Any]] = None,
    reference: Optional[Mapping[str, Any]] = None,
    positions: str = "auto",
    values: str = "raw",
    signed_zeros: Optional[bool] = None,
    backend: str = "auto",
) -> bytes:
    """Encode named float32/float64 tensors as one message.

    Positions kept per tensor: `masks[name]` if given (values there are sent even when zero;
    every element outside the mask decodes to +0.0, whatever it was), else the non-zeros (+0.0
    and -0.0 both count as zero). With `reference[name]`, a mask the receiver already has: kept
    positions equal to it cost nothing (values go in mask order), positions that are a subset of
    it are coded relative to it (mask delta); otherwise the full tensor is the domain.
    `positions` is "auto" (smallest per tensor), "bitmask", "csr", "golomb" or "all"; `values` is
    "raw" (lossless) or the lossy "fp16", "bf16", "int8" (per-tensor scale).

    What comes back: the values at the positions (bit for bit with raw values: -0.0, NaN
    payloads, infinities and subnormals included) and +0.0 elsewhere, except for the -0.0 off the
    positions that `signed_zeros` sends, as a set of positions of their own (a bitmask or Golomb
    code over the tensor's elements; a tensor without such -0.0 costs nothing more). By default
    (None) they are sent for tensors without a mask when values are raw: raw values without
    masks give back the same bytes. Pruning by `w * mask` leaves -0.0 at about half of the
    pruned places, which then cost about a bit an element. True sends them for every tensor,
    with a mask too (raw values then give back the same bytes wherever only zeros lie outside
    the mask); False never (messages that readers predating signed zeros read).
    Tensors on a CUDA device are sparsified there and their Golomb streams (positions and -0.0)
    coded there: only what the message takes (streams, values, packed bits) is copied to the host.
    """
    if values not in VALUES:
        raise ValueError(f"unknown values codec {values!r}; one of {sorted(VALUES)}")
    if positions not in ("auto", *POSITIONS):
        raise ValueError(f"unknown positions codec {positions!r}")
    if signed_zeros is not None and not isinstance(signed_zeros, bool):
        raise TypeError(f"signed_zeros must be None, True or False, got {signed_zeros!r}")

    def signs_of(masked: bool) -> bool:
        """Whether a tensor's -0.0 off its positions are sent: by default with raw values, no mask."""
        return signed_zeros if signed_zeros is not None else values == "raw" and not masked

    k = _backend.kernels(backend)
    prepared: list[_Sparse] = []
    where = {name: on_device(t) for name, t in tensors.items()}
    flats = {name: flat_float(t, ("tensors[{!r}]", name), MAX_NDIM, where[name]) for name, t in tensors.items()}
    on_dev = [name for name in flats if where[name]]
    from_device = _sparse_on_device(k, on_dev, flats, masks, reference, positions, signs_of) if on_dev else {}
    # Streams coded on the device, by tensor: [(run size, nnz, m, stream)] (empty: Golomb not
    # offered), and (m, stream) or None for its -0.0.
    coded: dict[int, list[tuple[int, int, int, Any]]] = {}
    signs_coded: dict[int, Optional[tuple[int, Any]]] = {}
    for name, (flat, shape, dtype) in flats.items():
        n = math.prod(shape)
        masked = bool(masks) and name in masks
        if name in from_device:
            got, (runs, negatives), plan = from_device[name]
            bits, vals, signs = got.bits, got.vals, (got.negative, n, negatives) if negatives else None
            if reference is None or name not in reference:
                coded[len(prepared)] = [(size, c, m, s) for (size, c), m, s in zip(runs, plan.ms, got.streams) if m]
            if negatives:
                signs_coded[len(prepared)] = (plan.sign_m, got.sign_stream) if plan.sign_m else None
        else:
            mask = flat_mask(masks[name], n, f"masks[{name!r}]") if masked else None
            bits, vals, negative = _sparsify(k, flat, mask, signs_of(masked))
            signs = signs_to_send(k, negative, joined(bits) if masked and negative is not None else None, n)
        nnz = sum(v.size for v in vals) if isinstance(vals, list) else vals.size
        domain, d, pos_bits, csr_shape = DOMAIN_FULL, n, bits, shape
        if reference is not None and name in reference:
            bits = joined(bits)
            sub = relative_to(k, bits, k.pack_bits(flat_mask(reference[name], n, f"reference[{name!r}]")), n)
            if sub is not None:  # a subset of the reference: code relative to it
                (d, pos_bits), domain, csr_shape = sub, DOMAIN_REFERENCE, None
        prepared.append(_Sparse(write_head(name, shape), shape, dtype, domain, d, nnz, pos_bits, csr_shape, vals,
                                signs))
    # The Golomb streams of all tensors in one call (the native backend encodes them in parallel):
    # one stream a tensor, or one a run of CHUNK_ELEMS for a large tensor in its own index space.
    streams: list[list[tuple[int, int, int, Any]]] = [coded.get(i, []) for i in range(len(prepared))]
    if positions in ("auto", "golomb"):
        items, owner = [], []
        for i, sp in enumerate(prepared):
            if i in coded:
                continue
            if sp.domain == DOMAIN_FULL and sp.d > CHUNK_ELEMS:
                runs = [(s, min(CHUNK_ELEMS, sp.d - s)) for s in _runs(sp.d)]
                if isinstance(sp.pos_bits, list):  # sparsified run by run
                    parts, counts = sp.pos_bits, [v.size for v in sp.vals]
                else:
                    parts = [sp.pos_bits[s // 8 : (s + size + 7) // 8] for s, size in runs]
                    counts = [k.count_bits(b, size) for b, (_, size) in zip(parts, runs)]
            else:
                runs, parts, counts = [(0, sp.d)], [sp.pos_bits], [sp.nnz]
            for b, (_, size), nnz in zip(parts, runs, counts):
                items.append((b, size, k.golomb_parameter(nnz, size)))
                owner.append((i, nnz))
        for (b, size, m), (i, nnz), stream in zip(items, owner, k.golomb_encode_many(items)):
            streams[i].append((size, nnz, m, stream))
    records = []
    for sp, runs in zip(prepared, streams):
        g = None if not runs else (runs[0][2] if len(runs) == 1 else 0, [r[3] for r in runs])
        pos_codec, m, pos_payload = encode_positions(sp.pos_bits, sp.d, sp.nnz, positions, sp.csr_shape, g)
        table = runs if pos_codec == POSITIONS["golomb"] and len(runs) > 1 else []
        records.append((sp, pos_codec, m, pos_payload, table))
    signed = [i for i, sp in enumerate(prepared) if sp.signs is not None]
    coded_signs = {j: signs_coded[i] for j, i in enumerate(signed) if i in signs_coded}
    sign_blocks = dict(zip(signed, zero_sign_blocks(k, [prepared[i].signs for i in signed], coded_signs)))
    version = 2 if any(table for *_, table in records) else 1  # version 1 readers read what needs no chunks
    parts = [HEADER.pack(MAGIC, version, FLAG_ZERO_SIGNS if signed else 0, 0, len(tensors))]
    for i, (sp, pos_codec, m, pos_payload, table) in enumerate(records):
        if isinstance(sp.vals, list) and values == "raw":  # the runs' values go in as they are
            val_payload, scale = [encode_values(v, values)[0] for v in sp.vals], 0.0
        else:
            val_payload, scale = encode_values(joined(sp.vals), values)
        pos_payload, val_payload = _pieces(pos_payload), _pieces(val_payload)
        parts += [
            sp.head,
            RECORD.pack(DTYPE_CODES[sp.dtype], sp.domain, pos_codec, VALUES[values], int(i in sign_blocks), 0, sp.d,
                        sp.nnz, m, scale, sum(map(len, pos_payload)), sum(map(len, val_payload))),
        ]
        if version == 2:
            parts.append(struct.pack("<I", len(table)))
            parts += [CHUNK.pack(size, nnz, cm, len(stream)) for size, nnz, cm, stream in table]
        parts += pos_payload + val_payload + sign_blocks.get(i, [])
    return k.join_crc32c(parts)  # one pass: each piece copied into the message and checksummed there


def decode_model(
    data: Any,
    *,
    reference: Optional[Mapping[str, Any]] = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
    out: Optional[Mapping[str, Any]] = None,
    expect: Optional[Mapping[str, tuple[tuple[int, ...], Any]]] = None,
    backend: str = "auto",
) -> Decoded:
    """Decode a message from encode_model. `reference` supplies the shared masks of tensors coded
    relative to one. `max_bytes` caps the total size of the decoded arrays: a message that would
    exceed it is rejected before anything is allocated. `expect` maps names to (shape, dtype): the
    message must hold exactly those tensors, which is checked before anything is allocated (a peer
    replying for another model is refused at no cost). `out` maps names to existing arrays (or
    torch CPU tensors) of the right dtype and size to decode into, skipping the allocation; they
    are returned in `tensors` and must not overlap each other or the message. Nothing else returned
    shares memory with `data`, which the caller may reuse. Raises CodecError on any corruption
    (`out` may then be partly written)."""
    k = _backend.kernels(backend)
    view = memoryview(data).cast("B")
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
        return result
    records: list[Record] = []
    seen: set[str] = set()
    budget = Budget(max_bytes, "decode_model")
    for i in range(count):
        name, shape = read_head(r, i, seen)
        (dtype_code, domain, pos_codec, val_codec, r0, r1, d, nnz, m, scale, pos_len, val_len) = r.unpack(RECORD, ("{!r} record", name))
        dtype = record_dtype(name, dtype_code)
        check_expected(name, shape, dtype, expect)
        n = budget.take(name, shape, dtype)
        if val_codec not in VALUE_NAMES or pos_codec not in POSITION_NAMES or domain not in (0, 1) or r1 \
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
        if val_len != nnz * value_size(val_codec, dtype):
            raise CodecError(f"{name!r}: values take {val_len} bytes, {nnz} values need {nnz * value_size(val_codec, dtype)}")
        table = _read_chunk_table(r, name, domain, pos_codec, d, nnz, m, pos_len) if version == 2 else []
        pos_raw = r.take(pos_len, ("{!r} positions", name))
        val_raw = r.take(val_len, ("{!r} values", name))
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
        records.append(Record(name, tuple(shape), n, dtype, domain, pos_codec, val_codec, d, nnz, m, scale, pos_raw,
                              val_raw, tuple(chunks), signs))
    check_all_expected([rec.name for rec in records], expect)
    if r.pos != len(body):
        raise CodecError(f"{len(body) - r.pos} unexpected bytes after the last tensor")
    dests = {
        rec.name: writable_view(out[rec.name], f"out[{rec.name!r}]", rec.dtype.newbyteorder("="), rec.n).reshape(-1)
        for rec in records
        if out is not None and rec.name in out
    }
    check_disjoint({"the message": np.frombuffer(view, dtype=np.uint8), **{f"out[{k!r}]": a for k, a in dests.items()}})
    targets = _allocate(records, out)
    golomb = decode_golomb_positions(k, records)
    negative = _decode_zero_signs(k, records)
    result = Decoded()
    for i, (rec, target) in enumerate(zip(records, targets)):
        name, n = rec.name, rec.n
        vals = decode_values(rec.val_raw, rec.val_codec, rec.nnz, rec.dtype, rec.scale)
        if rec.chunks:  # each run into its slice of the output (densify runs on the library's threads)
            dest = dests[name] if name in dests else target
            for c, bits in zip(rec.chunks, golomb[i]):
                k.densify(bits, c.size, vals[c.first : c.first + c.nnz], dest[c.start : c.start + c.size])
            if i in negative:
                set_negative_zeros(k, name, np.concatenate(golomb[i]), negative[i], dest)
            result.tensors[name] = out[name] if name in dests else target.reshape(rec.shape)
            result.packed_parts[name] = golomb[i]
            continue
        bits = golomb[i][0] if i in golomb else decode_positions(k, rec.pos_raw, rec.pos_codec, rec.d, rec.nnz, rec.shape)
        if rec.domain == DOMAIN_REFERENCE:
            ref_bits = k.pack_bits(reference_mask(reference, name, n))
            held = k.count_bits(ref_bits, n)
            if held != rec.d:
                raise CodecError(f"{name!r}: the reference mask has {held} positions, the sender's had {rec.d}")
            bits = k.deposit_bits(bits, ref_bits, n)
        dest = dests[name] if name in dests else target
        k.densify(bits, n, vals, dest)
        if i in negative:
            set_negative_zeros(k, name, bits, negative[i], dest)
        result.tensors[name] = out[name] if name in dests else target.reshape(rec.shape)
        result.packed[name] = bits
    return result


def _decode_zero_signs(k: Any, records: list[Record]) -> dict[int, np.ndarray]:
    """The -0.0 of each record with a zero-sign block, by record index, as packed positions over
    its elements."""
    signed = [i for i, rec in enumerate(records) if rec.signs is not None]
    found = decode_zero_signs(k, [(repr(records[i].name), records[i].signs, records[i].n) for i in signed])
    return dict(zip(signed, found))


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
    for j, (size, c_nnz, c_m, c_len) in enumerate(table):
        if size == 0 or (j < count - 1 and size % 8) or c_nnz > size or c_m < 1:
            raise CodecError(f"{name!r}: chunk {j} has size {size}, {c_nnz} positions, parameter {c_m}")
    if [sum(col) for col in zip(*table)][0:2] != [d, nnz] or sum(row[3] for row in table) != pos_len:
        raise CodecError(f"{name!r}: the chunks' sizes, counts or lengths do not add up to the record's")
    return table


def _allocate(records: list[Record], out: Optional[Mapping[str, Any]]) -> list[Optional[np.ndarray]]:
    """Flat output arrays for the records not decoded into `out`, views into one block; its size is
    within the caller's max_bytes (each record's size was checked against it)."""
    return block_views(
        [None if out is not None and rec.name in out else ((rec.n,), rec.dtype.newbyteorder("=")) for rec in records]
    )
