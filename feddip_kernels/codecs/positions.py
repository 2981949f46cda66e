"""Positions codecs (docs/wire-format.md): all, bitmask, CSR and Golomb-coded gaps, over a domain
of d indices. Positions travel between the codecs as packed little-endian bits. Also the set of
-0.0 elements that a record's zero signs carry: coded, checked and set here."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional, Sequence, cast

import numpy as np

from .format import POSITION_NAMES, POSITIONS, SIGNS, CodecError, Record, ZeroSigns

if TYPE_CHECKING:
    from .._contract import Kernels


def _csr_layout(shape: tuple[int, ...], n: int) -> tuple[int, int, int]:
    rows = shape[0] if len(shape) >= 1 and n else 1
    cols = n // rows if rows else 0
    width = 1 if cols <= 1 << 8 else 2 if cols <= 1 << 16 else 4
    return rows, cols, width


def _csr_encode(bits: np.ndarray, n: int, shape: tuple[int, ...]) -> bytes:
    rows, cols, width = _csr_layout(shape, n)
    flat = np.flatnonzero(np.unpackbits(bits, count=n, bitorder="little"))
    r, c = np.divmod(flat, max(cols, 1))
    indptr = np.zeros(rows + 1, dtype="<u4")
    np.cumsum(np.bincount(r, minlength=rows), out=indptr[1:])
    return indptr.tobytes() + c.astype({1: "<u1", 2: "<u2", 4: "<u4"}[width]).tobytes()


def _csr_size(shape: tuple[int, ...], n: int, nnz: int) -> int:
    rows, cols, width = _csr_layout(shape, n)
    return 4 * (rows + 1) + width * nnz


def _csr_decode(raw: memoryview, n: int, nnz: int, shape: tuple[int, ...]) -> np.ndarray:
    rows, cols, width = _csr_layout(shape, n)
    if len(raw) != _csr_size(shape, n, nnz):
        raise CodecError("CSR positions have the wrong length")
    indptr = np.frombuffer(raw, dtype="<u4", count=rows + 1).astype(np.int64)
    col = np.frombuffer(raw, dtype={1: "<u1", 2: "<u2", 4: "<u4"}[width], offset=4 * (rows + 1), count=nnz).astype(
        np.int64
    )
    if indptr[0] != 0 or indptr[-1] != nnz or (np.diff(indptr) < 0).any():
        raise CodecError("CSR row pointers are not a valid partition of the values")
    if nnz and (col >= cols).any():
        raise CodecError("CSR column index out of range")
    row = np.repeat(np.arange(rows, dtype=np.int64), np.diff(indptr))
    flat = row * cols + col
    if nnz > 1 and (np.diff(flat) <= 0).any():
        raise CodecError("CSR column indices are not strictly increasing within rows")
    mask = np.zeros(n, dtype=bool)
    mask[flat] = True
    return np.packbits(mask, bitorder="little")


def joined(parts: Sequence[Any]) -> np.ndarray:
    """The concatenation of packed bits in runs of whole bytes (a tensor's runs): the one run
    itself, not a copy, for one."""
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def complement(bits: np.ndarray, n: int) -> np.ndarray:
    """The packed positions (padding bits zero) of the n elements that packed `bits` leaves out."""
    out = np.bitwise_not(bits[: (n + 7) // 8])
    if n % 8:
        out[-1] &= (1 << n % 8) - 1
    return out


_BLOCK = 1 << 16  # elements a step when packing or setting signs: the temporaries stay in cache
# Row b: the sign bits of the 8 elements whose -0.0 flags are the bits of byte b (little-endian).
_UNSIGNED: tuple[tuple[int, type[np.unsignedinteger[Any]]], ...] = ((4, np.uint32), (8, np.uint64))
_SIGN_WORDS = {
    size: ((np.arange(256, dtype=u)[:, None] >> np.arange(8, dtype=u)) & 1) << u(8 * size - 1)
    for size, u in _UNSIGNED
}


def set_negative_zeros(k: "Kernels", name: str, bits: np.ndarray, negative: np.ndarray, dest: np.ndarray) -> None:
    """Sets the sign bit of the elements of flat `dest` at the packed positions `negative`, which
    must be off the record's positions `bits` (where `dest` holds +0.0)."""
    n = dest.size
    if np.any(bits[: (n + 7) // 8] & negative):
        raise CodecError(f"{name!r}: zero signs at positions that hold values")
    # OR in the sign bits, looked up a byte of flags (8 elements) at a time: a tenth of the time
    # of a boolean-indexed assignment of -0.0 (numpy's masked stores branch per element).
    words = _SIGN_WORDS[dest.itemsize]
    ints = dest.view(words.dtype)
    for s in range(0, (n + 7) // 8, _BLOCK // 8):
        part = ints[8 * s : 8 * s + _BLOCK]
        np.bitwise_or(part, np.take(words, negative[s : s + _BLOCK // 8], axis=0).reshape(-1)[: part.size], out=part)


def signs_to_send(k: "Kernels", negative: Optional[np.ndarray], positions: Optional[np.ndarray],
                  n: int) -> Optional[tuple[np.ndarray, int, int]]:
    """(packed -0.0 off the positions, n, their count) for a zero-sign block, or None when none are
    left. `positions`: packed positions that may hold -0.0 as values (a mask's), None when the
    positions are the non-zeros (so no -0.0 is one)."""
    if negative is None:
        return None
    if positions is not None:
        negative &= complement(positions, n)
    count = k.count_bits(negative, n)
    return (negative, n, count) if count else None


def zero_sign_blocks(k: "Kernels", sets: Sequence[tuple[Optional[np.ndarray], int, int]],
                     coded: Optional[dict[int, Optional[tuple[int, Any]]]] = None) -> list[list[Any]]:
    """Each (packed -0.0 positions, elements, count) of signs_to_send as a zero-sign block (SIGNS
    header, payload): the smallest of all, bitmask and Golomb, except that a Golomb parameter of 1
    (densities from about 0.38) codes the bitmask itself up to its last set bit, as long or a few
    bytes shorter at the cost of a sequential decode: the bitmask is taken then. The Golomb
    streams of all sets in one call (the native backend encodes them in parallel), except those
    in `coded` (set index: (parameter, stream), or None when Golomb is not offered: coded on a
    device, with the packed positions None when payload_needs says that they are not taken)."""
    golomb = dict(coded or {})
    params = {i: k.golomb_parameter(count, n) for i, (_, n, count) in enumerate(sets) if i not in golomb}
    host = [i for i, m in params.items() if m > 1]
    golomb.update({i: None for i in params})
    # the sets not in `coded` have their packed positions (None only for those coded on a device)
    items = [(cast(np.ndarray, sets[i][0]), sets[i][1], params[i]) for i in host]
    golomb.update(zip(host, zip([params[i] for i in host], k.golomb_encode_many(items))))
    blocks = []
    for i, (negative, n, count) in enumerate(sets):
        codec, m, payload = encode_positions(negative, n, count, "auto", None, golomb[i])
        blocks.append([SIGNS.pack(codec, count, m, len(payload)), payload])
    return blocks


def decode_zero_signs(k: "Kernels", blocks: Sequence[tuple[str, ZeroSigns, int]]) -> list[np.ndarray]:
    """The packed -0.0 positions of each (label for errors, checked block, elements) (the Golomb
    streams of all in one parallel call); a CodecError names the label."""
    golomb = [j for j, (_, s, _) in enumerate(blocks) if s.codec == POSITIONS["golomb"]]
    bits, failed, message = k.golomb_decode_many([(blocks[j][1].raw, blocks[j][2], blocks[j][1].count,
                                                   blocks[j][1].m) for j in golomb])
    if failed >= 0:
        raise CodecError(f"{blocks[golomb[failed]][0]}: zero signs: {message}")
    out: list[Any] = [None] * len(blocks)
    for j, b in zip(golomb, bits):
        out[j] = b
    for j, (label, s, n) in enumerate(blocks):
        if s.codec != POSITIONS["golomb"]:
            try:
                out[j] = decode_positions(k, s.raw, s.codec, n, s.count, ())
            except CodecError as e:
                raise CodecError(f"{label}: zero signs: {e}") from None
    return out


def check_zero_signs(codec: int, n: int, zeros: int, count: int, m: int, length: int) -> None:
    """A zero-sign block's fields (count -0.0, at most the record's zeros, as positions over its n
    elements), before its payload is read: the payload is the length its codec implies, or for
    Golomb from ceil(count / 8) to golomb_max_len bytes."""
    if codec not in (POSITIONS["all"], POSITIONS["bitmask"], POSITIONS["golomb"]):
        raise CodecError(f"zero signs: unknown positions codec {codec}")
    if not 1 <= count <= zeros or (codec == POSITIONS["all"] and count != n):
        raise CodecError(f"zero signs: {count} negative zeros for {zeros} zeros of {n} elements")
    if (m != 0) != (codec == POSITIONS["golomb"]):
        raise CodecError(f"zero signs: Golomb parameter {m} (>= 1 for Golomb positions, else 0)")
    if codec == POSITIONS["golomb"]:
        if length > golomb_max_len(n, count, m) or 8 * length < count:
            raise CodecError(f"zero signs: {length} bytes of Golomb positions for {count} among {n}")
    elif length != (0 if codec == POSITIONS["all"] else (n + 7) // 8):
        raise CodecError(f"zero signs: {length} bytes of {POSITION_NAMES[codec]} positions for {n} elements")


def relative_to(k: "Kernels", bits: np.ndarray, ref: np.ndarray, n: int) -> Optional[tuple[int, np.ndarray]]:
    """(domain size, positions within it) of packed positions that are a subset of the packed
    reference mask `ref` (n elements), or None if they are not."""
    if np.any(bits & ~ref):
        return None
    return k.count_bits(ref, n), k.select_bits(bits, ref, n)


def _sizes(d: int, nnz: int, shape: Optional[tuple[int, ...]]) -> dict[str, int]:
    """The payload sizes of the codecs other than Golomb that can code nnz positions among d."""
    sizes = {"bitmask": (d + 7) // 8}
    if shape is not None and d < 1 << 32 and nnz < 1 << 32:
        sizes["csr"] = _csr_size(shape, d, nnz)
    if nnz == d:
        sizes["all"] = 0
    return sizes


def golomb_bounds(d: int, nnz: int, m: int) -> tuple[int, int]:
    """The fewest and most bytes of a Golomb stream of nnz positions among d (parameter m): every
    code takes a stop bit and at least ceil(log2 m) - 1 remainder bits; no position, no byte."""
    return (nnz * max(1, (m - 1).bit_length()) + 7) // 8, golomb_max_len(d, nnz, m) if nnz else 0


def payload_needs(codec: str, d: int, nnz: int, shape: Optional[tuple[int, ...]],
                  golomb: Optional[tuple[int, int]]) -> tuple[bool, bool]:
    """For positions coded elsewhere (on a device), before their Golomb stream's length is known:
    whether encode_positions(bits, d, nnz, codec, shape, ...) may take a Golomb stream of (fewest,
    most) bytes `golomb` (None: Golomb not offered), and whether it may take the packed bits."""
    if codec != "auto":
        return codec == "golomb", codec in ("bitmask", "csr")
    sizes = _sizes(d, nnz, shape)
    if "all" in sizes:  # no payload: nothing is smaller, and ties go to it
        return False, False
    if golomb is None:
        return False, True
    other = min(sizes.values())  # Golomb, last in the order, is taken only when strictly smaller
    return golomb[0] < other, golomb[1] >= other


def device_plan(k: "Kernels", runs: Sequence[tuple[int, int]], negatives: Optional[int], codec: str,
                shape: Optional[tuple[int, ...]], full: bool) -> tuple[list[int], bool, int, bool]:
    """What to code and fetch from a device for a tensor (or chunk) sparsified there, from its
    counts: [(run size, positions in it)] (one run, or the runs of a chunked record) and the -0.0
    to send. (Each run's Golomb parameter, 0 for no stream; whether the packed positions may be
    taken; the same two for the -0.0.) Parameters are the host's golomb_parameter of the counts,
    as for host tensors. `full`: positions in the tensor's own index space; else (a reference
    mask) the host codes them from the packed positions."""
    n, nnz = sum(size for size, _ in runs), sum(c for _, c in runs)
    ms, bits = [0] * len(runs), True
    if full:
        params = [k.golomb_parameter(c, size) for size, c in runs]
        lo, hi = (sum(b) for b in zip(*(golomb_bounds(size, c, m) for (size, c), m in zip(runs, params))))
        stream, bits = payload_needs(codec, n, nnz, shape, (lo, hi) if codec in ("auto", "golomb") else None)
        ms = params if stream else ms
        # Golomb with m = 1 codes the bitmask itself up to its last position: fetched, it gives
        # the packed positions too (DeviceSparse pads it back).
        bits = bits and not (stream and all(m == 1 for m in params))
    sign_m, sign_bits = 0, False
    if negatives:  # as zero_sign_blocks: Golomb offered for a parameter above 1
        m = k.golomb_parameter(negatives, n)
        stream, sign_bits = payload_needs("auto", n, negatives, None, golomb_bounds(n, negatives, m) if m > 1 else None)
        sign_m = m if stream else 0
    return ms, bits, sign_m, sign_bits


def encode_positions(
    bits: Optional[np.ndarray], d: int, nnz: int, codec: str, shape: Optional[tuple[int, ...]],
    golomb: Optional[tuple[int, Any]],
) -> tuple[int, int, Any]:
    """encode_run_positions of positions in one run: `bits` its packed bits, `golomb` (parameter,
    stream); the payload in one piece (b"" for none)."""
    pos_codec, m, pieces = encode_run_positions([bits], d, nnz, codec, shape,
                                                None if golomb is None else (golomb[0], [golomb[1]]))
    return pos_codec, m, pieces[0] if pieces else b""


def encode_run_positions(
    bits: Sequence[Optional[np.ndarray]], d: int, nnz: int, codec: str, shape: Optional[tuple[int, ...]],
    golomb: Optional[tuple[int, list[Any]]],
) -> tuple[int, int, list[Any]]:
    """(codec id, Golomb parameter, payload pieces) for packed positions over a domain of d
    elements in runs of whole bytes (`bits`, a packed array a run; None where they are not at
    hand, for codecs that cannot be chosen); `golomb` is the (parameter, a stream a run) already
    encoded when codec is "auto" or "golomb". "auto" takes the smallest payload (the others are
    sized by formula and built only when chosen)."""
    sizes = _sizes(d, nnz, shape)
    if golomb is not None:
        sizes["golomb"] = sum(map(len, golomb[1]))
    if codec == "auto":
        codec = min(sizes, key=lambda k: (sizes[k], k != "all"))
    if codec not in sizes:
        raise ValueError(f"positions codec {codec!r} is not available here (choose from {sorted(sizes)})")
    if codec == "all":
        return POSITIONS["all"], 0, []
    if codec == "bitmask":
        return POSITIONS["bitmask"], 0, [joined(bits).tobytes()]
    if codec == "csr":
        assert shape is not None  # CSR is offered with a shape only
        return POSITIONS["csr"], 0, [_csr_encode(joined(bits), d, shape)]
    assert golomb is not None
    return POSITIONS["golomb"], golomb[0], golomb[1]


def decode_positions(k: "Kernels", raw: memoryview, codec: int, d: int, nnz: int, shape: tuple[int, ...]) -> np.ndarray:
    if codec == POSITIONS["all"]:
        if nnz != d or len(raw):
            raise CodecError("'all' positions need nnz equal to the domain size and no payload")
        bits = np.full((d + 7) // 8, 0xFF, dtype=np.uint8)
        if d % 8:
            bits[-1] = (1 << (d % 8)) - 1
        return bits
    if codec == POSITIONS["bitmask"]:
        if len(raw) != (d + 7) // 8:
            raise CodecError(f"bitmask positions have {len(raw)} bytes, {(d + 7) // 8} expected")
        bits = np.frombuffer(raw, dtype=np.uint8).copy()  # a copy: nothing returned aliases the message
        if d % 8 and bits[-1] >> (d % 8):
            raise CodecError("bitmask padding bits are not zero")
        if k.count_bits(bits, d) != nnz:
            raise CodecError("bitmask holds a different number of positions than the record says")
        return bits
    if codec == POSITIONS["csr"]:
        return _csr_decode(raw, d, nnz, shape)
    raise CodecError(f"unknown positions codec {codec}")  # Golomb streams: decode_golomb_positions


def golomb_max_len(d: int, nnz: int, m: int) -> int:
    """The most bytes a Golomb stream of nnz positions among d takes with parameter m: the gaps add
    up to at most d - nnz, so the quotients' bits to at most (d - nnz) / m; each position adds a
    stop bit and at most ceil(log2 m) remainder bits."""
    return ((d - nnz) // m + nnz * (1 + (m - 1).bit_length()) + 7) // 8


# The codecs of a set of positions on its own (encode_position_set), by name, and the largest
# Golomb parameter such a set may carry (the kernels' u32).
SET_CODECS = (POSITION_NAMES[POSITIONS["bitmask"]], POSITION_NAMES[POSITIONS["golomb"]])
MAX_SET_GOLOMB_M = (1 << 32) - 1


def check_position_set(codec: Any, m: Any) -> None:
    """A set's codec name and Golomb parameter (ints already checked), before its payload is
    read: a Golomb set has 1 <= m <= MAX_SET_GOLOMB_M, a bitmask m = 0."""
    if codec not in SET_CODECS:
        raise CodecError(f"unknown positions codec {codec!r} for a set of positions")
    if codec == POSITION_NAMES[POSITIONS["golomb"]] and not 1 <= m <= MAX_SET_GOLOMB_M:
        raise CodecError(f"Golomb parameter m = {m} is outside [1, {MAX_SET_GOLOMB_M}]")
    if codec == POSITION_NAMES[POSITIONS["bitmask"]] and m != 0:
        raise CodecError(f"m = {m} with bitmask positions (0 expected)")


def encode_position_set(k: "Kernels", bits: np.ndarray, n: int, count: int) -> tuple[str, int, bytes]:
    """A set of `count` positions among n (packed bits) on its own, outside a message (fk.save's
    -0.0 sets): (codec name, Golomb parameter or 0, payload), the Golomb-coded gaps where they are
    shorter than the bitmask, else the bitmask."""
    m = k.golomb_parameter(count, n)
    stream = bytes(k.golomb_encode(bits, n, m))
    if len(stream) < (n + 7) // 8:
        return POSITION_NAMES[POSITIONS["golomb"]], m, stream
    return POSITION_NAMES[POSITIONS["bitmask"]], 0, bits[: (n + 7) // 8].tobytes()


def decode_position_set(k: "Kernels", codec: str, raw: memoryview, n: int, count: int, m: int) -> np.ndarray:
    """The packed bits of a set that encode_position_set wrote, checked as a message's positions
    are (count among n; CodecError on anything else)."""
    if codec == POSITION_NAMES[POSITIONS["golomb"]]:
        check_golomb(raw, count, m)
        try:
            return k.golomb_decode(raw, n, count, m)
        except ValueError as e:
            raise CodecError(str(e)) from None
    if codec == POSITION_NAMES[POSITIONS["bitmask"]]:
        return decode_positions(k, raw, POSITIONS["bitmask"], n, count, ())
    raise CodecError(f"unknown positions codec {codec!r} for a set of positions")


def check_golomb(raw: memoryview, nnz: int, m: int) -> None:
    if m < 1:
        raise CodecError("Golomb parameter must be >= 1")
    if 8 * len(raw) < nnz:
        raise CodecError("Golomb payload is shorter than one bit per position")


def decode_golomb_positions(k: "Kernels", records: list[Record]) -> dict[int, list[np.ndarray]]:
    """The Golomb-coded positions of all records at once, by record index: the native backend
    decodes the streams in parallel (one per unchunked record, one per chunk of a chunked one;
    each stream is sequential). Each record gets its streams' packed bits, in chunk order."""
    items: list[tuple[int, memoryview, int, int, int]] = []  # (record, stream, domain, nnz, m)
    for i, rec in enumerate(records):
        if rec.pos_codec != POSITIONS["golomb"]:
            continue
        for c in rec.chunks or (None,):
            raw, d, nnz, m = (rec.pos_raw, rec.d, rec.nnz, rec.m) if c is None else (c.pos_raw, c.size, c.nnz, c.m)
            try:
                check_golomb(raw, nnz, m)
            except CodecError as e:
                raise CodecError(f"{rec.name!r}: {e}") from None
            items.append((i, raw, d, nnz, m))
    order = sorted(range(len(items)), key=lambda j: -items[j][2])  # largest first: better balance
    bits, failed, message = k.golomb_decode_many([items[j][1:] for j in order])
    if failed >= 0:
        raise CodecError(f"{records[items[order[failed]][0]].name!r}: {message}")
    out: dict[int, list[np.ndarray]] = {}
    for j, b in sorted(zip(order, bits)):
        out.setdefault(items[j][0], []).append(b)
    return out
