"""Streams: wire format version 3 (docs/wire-format.md), written to and read from file objects
front to back, tensor by tensor and chunk by chunk, so that models larger than memory or than
2 GiB move through. Every chunk carries its own positions and values; the working memory is one
window of chunks (about a chunk a thread) besides the caller's tensors and output buffers."""

from __future__ import annotations

import errno
import io
import math
import numbers
from typing import Any, Mapping, NamedTuple, Optional, cast

import numpy as np

from .. import _backend
from .._arrays import What, check_disjoint, described, flat_float, flat_mask, on_device, writable_view
from . import entropy
from .format import (
    CHUNK_ELEMS,
    CRC,
    DEFAULT_MAX_BYTES,
    DOMAIN_FULL,
    DOMAIN_REFERENCE,
    DTYPE_CODES,
    HEADER,
    MAGIC,
    MAX_NDIM,
    MAX_STREAM_CHUNK,
    POSITIONS,
    SIGNS,
    STREAM_CHUNK,
    STREAM_RECORD,
    STREAM_VERSION,
    VALUE_NAMES,
    CodecError,
    Reader,
    ZeroSigns,
    read_header,
)
from .plain import check_float, check_mapping, check_name
from .positions import (
    check_zero_signs,
    decode_positions,
    decode_zero_signs,
    device_plan,
    encode_positions,
    golomb_max_len,
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
from .values import (
    LOSSLESS,
    Payload,
    check_codec,
    check_scale,
    decode_many,
    encode_many,
    read_payload,
    record_id,
    value_size,
    word_bits,
)

STREAM_POSITIONS = ("auto", "all", "bitmask", "golomb")  # not CSR: it codes rows, which chunks cut
_GOLOMB = POSITIONS["golomb"]
_READ_STEP = 1 << 20  # a take's buffer starts at this and doubles as its bytes arrive


# ------------------------------------------------------------------------------------ encoding


class _Source(NamedTuple):
    """A tensor on its way into a stream: flat views of it, its mask and its reference mask."""

    flat: Any  # NumPy, or torch on the tensor's device
    mask: Any
    ref: Optional[np.ndarray]
    signs: bool  # whether the -0.0 off its positions are sent


class _Writer:
    """Writes to a file object, keeping the count and the CRC-32C of everything written."""

    def __init__(self, file: Any, k: Any) -> None:
        self.file, self.k, self.crc, self.count = file, k, 0, 0

    def write(self, data: Any) -> None:
        view = memoryview(data).cast("B")
        self.crc = self.k.crc32c(view, self.crc)
        self.count += len(view)
        while len(view):
            written = self.file.write(view)
            if written is None and not isinstance(self.file, io.RawIOBase):
                return  # a writer that returns nothing (codecs.StreamWriter, tarfile's) took it all
            if written is None:
                # io.RawIOBase: a non-blocking file that would block, nothing taken. Waiting here
                # would be a busy loop (the file need not have a fileno to wait on).
                raise BlockingIOError(
                    errno.EAGAIN,
                    f"{type(self.file).__name__}.write returned None (a non-blocking file that would block "
                    f"takes nothing) after {self.count - len(view)} bytes of the message; encode_stream needs "
                    "a blocking file object whose write returns the number of bytes it took",
                    self.count - len(view))
            if isinstance(written, bool) or not isinstance(written, numbers.Integral):
                raise TypeError(f"{type(self.file).__name__}.write returned {written!r}, "
                                "not the number of bytes it took")
            if not 0 < int(written) <= len(view):
                raise OSError(f"{type(self.file).__name__}.write took {written} of {len(view)} bytes")
            view = view[int(written):]


def encode_stream(
    tensors: Mapping[str, Any],
    file: Any,
    *,
    masks: Optional[Mapping[str, Any]] = None,
    reference: Optional[Mapping[str, Any]] = None,
    positions: str = "auto",
    values: str = "raw",
    chunk_elems: int = CHUNK_ELEMS,
    signed_zeros: Optional[bool] = None,
    backend: str = "auto",
    rounding: str = "nearest",
    seed: Optional[int] = None,
) -> int:
    """Write named float32/float64 tensors to `file` (an object with `write`, e.g. an open file,
    a socket's makefile("wb"), io.BytesIO) as one version 3 message; returns its length in bytes.

    Each tensor goes out in chunks of `chunk_elems` elements (a multiple of 8, at most 2**24),
    each chunk with its own positions (the smallest of "all", "bitmask" and "golomb" for "auto",
    or the one named; CSR codes rows and is not offered) and values ("raw", "fp16", "bf16",
    "int8" with a scale per chunk). `masks` and `reference` mean what they mean to encode_model; a
    chunk whose positions are a subset of its part of the reference mask is coded relative to it.
    `tensors` is read one item at a time (a Mapping that loads each tensor on access keeps one in
    memory), and the working memory is a window of about one chunk a thread
    (get_num_threads()). Tensors on a CUDA device are sparsified there, chunk by chunk.
    `signed_zeros` means what it means to encode_model: by default the -0.0 of tensors without a
    mask are sent when values are raw (a chunk with none costs nothing more), so that raw values
    without masks give back the same bytes.

    `file.write` may take part of what it is given and return how much (as io objects do), or
    return None having taken it all (as codecs.StreamWriter does); from an io.RawIOBase, None
    means "would block" (a non-blocking raw file) and raises BlockingIOError (characters_written:
    the message's bytes written before), as does a non-blocking buffered file.

    Parameters
    ----------
    tensors : names (str) to float32/float64 arrays or torch tensors.
    file : an object with `write`.
    masks, reference, values, signed_zeros, backend, rounding, seed : as encode_model's ("auto"
        values: "ans", as a record has one values codec for all its chunks).
    positions : "auto", "all", "bitmask" or "golomb".
    chunk_elems : elements a chunk, a multiple of 8 from 8 to 2**24.

    Returns
    -------
    int : the message's length in bytes.

    Raises
    ------
    TypeError, ValueError : as encode_model (but a tensor that is not float32/float64 is refused),
        a file without `write`, or a chunk_elems out of range.
    BlockingIOError : a non-blocking file that would block.
    """
    check_mapping(tensors, "encode_stream")
    for what, given in (("masks", masks), ("reference", reference)):
        if given is not None:
            check_mapping(given, "encode_stream", what)
    if not callable(getattr(file, "write", None)):
        raise TypeError(f"encode_stream writes to a file object (with write), got {type(file).__name__}")
    check_codec(values, rounding)
    if positions not in STREAM_POSITIONS:
        raise ValueError(f"positions codec {positions!r} is not offered in streams; one of {STREAM_POSITIONS}")
    if isinstance(chunk_elems, bool) or not isinstance(chunk_elems, int) or chunk_elems % 8 \
            or not 8 <= chunk_elems <= MAX_STREAM_CHUNK:
        raise ValueError(f"chunk_elems must be a multiple of 8 from 8 to {MAX_STREAM_CHUNK}, got {chunk_elems!r}")
    if signed_zeros is not None and not isinstance(signed_zeros, bool):
        raise TypeError(f"signed_zeros must be None, True or False, got {signed_zeros!r}")
    k = _backend.kernels(backend)
    lossless = values in LOSSLESS
    values = "ans" if values == "auto" else values
    rng = np.random.default_rng(seed) if rounding == "stochastic" else None
    w = _Writer(file, k)
    w.write(HEADER.pack(MAGIC, STREAM_VERSION, 0, 0, len(tensors)))
    window: list[Any] = []  # record heads (bytes) and chunks (source, start, size), in stream order
    elems, window_elems = 0, max(1, _backend.get_num_threads()) * chunk_elems
    for name, t in tensors.items():
        check_name(name)
        check_float(t, f"tensors[{name!r}]")
        flat, shape, dtype = flat_float(t, f"tensors[{name!r}]", MAX_NDIM, on_device(t))
        n = math.prod(shape)
        mask = masks[name] if masks and name in masks else None
        if mask is not None:
            mask = flat_mask(mask, n, f"masks[{name!r}]", flat.device if on_device(flat) else None)
        ref = flat_mask(reference[name], n, f"reference[{name!r}]") if reference and name in reference else None
        record = STREAM_RECORD.pack(DTYPE_CODES[dtype], record_id(values), 0, chunk_elems)
        window.append(write_head(name, shape) + record)
        signs = signed_zeros if signed_zeros is not None else lossless and mask is None
        source = _Source(flat, mask, ref, signs)
        for start in range(0, n, chunk_elems):
            size = min(chunk_elems, n - start)
            window.append((source, start, size))
            elems += size
            if elems >= window_elems:
                _write_window(w, k, window, positions, values, rounding, rng)
                window, elems = [], 0
    _write_window(w, k, window, positions, values, rounding, rng)
    w.write(CRC.pack(w.crc))
    return w.count


class _SparseChunk(NamedTuple):
    domain: int
    d: int  # domain size
    bits: Optional[np.ndarray]  # packed positions over the domain (None: not fetched from a device, not taken)
    vals: np.ndarray
    # the -0.0 sent (signs_to_send), over the chunk's elements (packed: None if not taken)
    signs: Optional[tuple[Any, int, int]]


def _sparse_chunk(k: Any, job: tuple[_Source, int, int]) -> _SparseChunk:
    """One host chunk's positions, values and the -0.0 it sends."""
    src, start, size = job
    piece, mask = src.flat[start : start + size], None if src.mask is None else src.mask[start : start + size]
    bits, vals, negative = (k.sparsify(piece, mask, negative_zeros=True) if src.signs
                            else (*k.sparsify(piece, mask), None))
    signs = signs_to_send(k, negative, None if mask is None else bits, size)  # a mask's -0.0 are values
    return _relative(k, _SparseChunk(DOMAIN_FULL, size, bits, vals, signs), job)


def _relative(k: Any, c: _SparseChunk, job: tuple[_Source, int, int]) -> _SparseChunk:
    """The chunk coded relative to its part of the reference mask when its positions are a subset of it."""
    src, start, size = job
    if src.ref is not None:
        # a chunk with a reference mask has its packed positions (from a device too)
        sub = relative_to(k, cast(np.ndarray, c.bits), k.pack_bits(src.ref[start : start + size]), size)
        if sub is not None:
            return _SparseChunk(DOMAIN_REFERENCE, *sub, c.vals, c.signs)
    return c


def _device_chunks(k: Any, jobs: list[tuple[_Source, int, int]], positions: str) -> list[tuple[_SparseChunk, Any, Any]]:
    """Chunks of device tensors sparsified where they are, all at once, with their Golomb streams
    coded there (as encode_model's): (chunk, (m, stream) or None for Golomb not offered, the same
    for its -0.0). A chunk with a reference mask gets its packed positions: the host codes them."""
    dk = _backend.device_kernels()
    dev = dk.DeviceSparse([(src.flat[start : start + size],
                            None if src.mask is None else src.mask[start : start + size], src.signs)
                           for src, start, size in jobs], None)
    counts = dev.counts()
    plans = [dk.Plan(*device_plan(k, runs, negatives, positions, None, job[0].ref is None))
             for job, (runs, negatives) in zip(jobs, counts)]
    out = []
    for job, got, (_, negatives), plan in zip(jobs, dev.fetch(plans), counts, plans):
        c = _SparseChunk(DOMAIN_FULL, job[2], got.bits, got.vals,
                         (got.negative, job[2], negatives) if negatives else None)
        out.append((_relative(k, c, job), (plan.ms[0], got.streams[0]) if plan.ms[0] else None,
                    (plan.sign_m, got.sign_stream) if plan.sign_m else None))
    return out


def _write_window(w: _Writer, k: Any, window: list[Any], positions: str, values: str, rounding: str,
                  rng: Optional[np.random.Generator]) -> None:
    """Code a window's chunks and write them, with the record heads among them, in order. The
    kernels run on the library's threads within a large chunk; the Golomb coder, sequential
    within a stream, takes all the window's streams in one parallel call. The chunks of device
    tensors are sparsified and coded on their device, all of the window's at once."""
    jobs = [job for job in window if not isinstance(job, bytes)]
    sparse: list[Any] = [None] * len(jobs)
    golomb: dict[int, Optional[tuple[int, Any]]] = {}  # chunk: (m, stream), or None: Golomb not offered
    signs_coded: dict[int, Optional[tuple[int, Any]]] = {}
    on_dev = [i for i, job in enumerate(jobs) if on_device(job[0].flat)]
    if on_dev:
        for i, (c, g, s) in zip(on_dev, _device_chunks(k, [jobs[i] for i in on_dev], positions)):
            sparse[i] = c
            if jobs[i][0].ref is None:
                golomb[i] = g
            if c.signs is not None:
                signs_coded[i] = s
    for i, job in enumerate(jobs):
        if sparse[i] is None:
            sparse[i] = _sparse_chunk(k, job)
    if positions in ("auto", "golomb"):
        host = [i for i in range(len(sparse)) if i not in golomb]
        params = [k.golomb_parameter(sparse[i].vals.size, sparse[i].d) for i in host]
        streams = k.golomb_encode_many([(sparse[i].bits, sparse[i].d, m) for i, m in zip(host, params)])
        golomb.update(zip(host, zip(params, streams)))
    signed = [i for i, c in enumerate(sparse) if c.signs is not None]
    coded_signs = {j: signs_coded[i] for j, i in enumerate(signed) if i in signs_coded}
    sign_blocks = dict(zip(signed, zero_sign_blocks(k, [sparse[i].signs for i in signed], coded_signs)))
    coded = iter(enumerate(sparse))
    coded_values = encode_many(k, [[c.vals] for c in sparse], values, rounding, rng, fixed_width=False)
    for item in window:
        if isinstance(item, bytes):
            w.write(item)
            continue
        i, c = next(coded)
        codec, m, pos = encode_positions(c.bits, c.d, c.vals.size, positions, None, golomb.get(i))
        val = coded_values[i]
        w.write(STREAM_CHUNK.pack(c.domain, codec, int(i in sign_blocks), 0, c.d, c.vals.size, m, val.scale, len(pos)))
        w.write(pos)
        for part in val.payload:
            w.write(part)
        for part in sign_blocks.get(i, []):
            w.write(part)


# ------------------------------------------------------------------------------------ decoding


class _FileReader(Reader):
    """Reads a stream from a file object front to back, keeping the CRC-32C of what it read. Each
    take is exactly the bytes asked for (never more, so the file is left just past the message),
    and its buffer grows as they arrive: a length in the stream does not allocate bytes that were
    never sent."""

    def __init__(self, file: Any, k: Any) -> None:
        super().__init__(memoryview(b""))
        self.file, self.k, self.crc = file, k, 0
        self.readinto = getattr(file, "readinto", None)

    def take(self, n: int, what: What) -> memoryview:
        buf, got = bytearray(min(n, _READ_STEP)), 0
        while got < n:
            if got == len(buf):
                buf.extend(bytes(min(n - got, got)))
            with memoryview(buf) as whole, whole[got:] as part:
                arrived = self._fill(part)
            if not arrived:
                raise CodecError(f"truncated stream: {described(what)} needs {n} bytes, {got} arrived")
            got += arrived
        self.crc = self.k.crc32c(buf, self.crc)
        self.pos += n
        return memoryview(buf)

    def _fill(self, part: memoryview) -> int:
        if self.readinto is not None:
            return self.readinto(part) or 0
        data = self.file.read(len(part))
        part[: len(data)] = data
        return len(data)


def decode_stream(
    file: Any,
    *,
    reference: Optional[Mapping[str, Any]] = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
    out: Optional[Mapping[str, Any]] = None,
    expect: Optional[Mapping[str, tuple[tuple[int, ...], Any]]] = None,
    masks: bool = False,
    backend: str = "auto",
) -> Decoded:
    """Read one version 3 message (from encode_stream) from `file` (an object with `readinto` or
    `read`), tensor by tensor and chunk by chunk, leaving the file just past the message.

    `reference`, `out` and `expect` mean what they mean to decode_model; `max_bytes` caps the
    decoded tensors, those written into `out` included. With `out` for every tensor, the working
    memory is a window of about one chunk a thread. `masks=True` also returns the positions
    (`packed`, one bit an element; `masks` unpacks them), which otherwise are not kept.

    A stream is checked as it arrives: each record and chunk before its bytes are read or decoded,
    the CRC-32C at the end. On a CodecError (corrupt, truncated, over a limit, other tensors than
    expected) the tensors decoded so far, and `out`, must not be used.

    Parameters
    ----------
    file : an object with `readinto` or `read`.
    reference, max_bytes, out, expect, backend : as decode_model's.
    masks : also keep the positions.

    Returns
    -------
    Decoded : as decode_model's.

    Raises
    ------
    CodecError : as decode_model, or a stream that ends early.
    TypeError : a `file` without `readinto` or `read` (bytes go to decode_model).
    """
    if not callable(getattr(file, "readinto", None)) and not callable(getattr(file, "read", None)):
        raise TypeError(f"decode_stream reads a file object (with readinto or read), got {type(file).__name__}; "
                        "decode_model reads a message's bytes")
    k = _backend.kernels(backend)
    r = _FileReader(file, k)
    version, count = read_header(r)
    if version != STREAM_VERSION:
        raise CodecError(f"a version {version} message is not a stream: read its bytes and pass them to decode_model")
    result = decode_records(r, k, count, reference=reference, max_bytes=max_bytes, out=out, expect=expect,
                            masks=masks, caller="decode_stream")
    crc = r.crc
    (stored,) = r.unpack(CRC, "checksum")
    if stored != crc:
        raise CodecError("checksum mismatch: the stream is corrupt")
    return result


class _Chunk(NamedTuple):
    """A chunk read and checked, not yet decoded."""

    where: str
    dest: np.ndarray  # its slice of the output
    packed: Optional[np.ndarray]  # its bytes of the returned positions
    ref: Optional[np.ndarray]  # its part of the reference mask, packed, for domain 1
    pos_codec: int
    d: int
    nnz: int
    m: int
    pos_raw: memoryview
    values: Payload  # checked
    signs: Optional[ZeroSigns]  # the zero-sign block, checked


def decode_records(
    r: Reader,
    k: Any,
    count: int,
    *,
    reference: Optional[Mapping[str, Any]],
    max_bytes: int,
    out: Optional[Mapping[str, Any]],
    expect: Optional[Mapping[str, tuple[tuple[int, ...], Any]]],
    masks: bool,
    caller: str,
    message: Optional[memoryview] = None,
) -> Decoded:
    """The `count` version 3 records that follow the header in `r` (a file or, from decode_model,
    the message in memory), decoded a window of chunks at a time."""
    seen: set[str] = set()
    result, budget = Decoded(), Budget(max_bytes, caller)
    spans = {} if message is None else {"the message": np.frombuffer(message, dtype=np.uint8)}
    window: list[_Chunk] = []
    elems, window_elems = 0, max(1, _backend.get_num_threads()) * CHUNK_ELEMS
    for i in range(count):
        name, shape = read_head(r, i, seen)
        dtype_code, val_codec, reserved, chunk_elems = r.unpack(STREAM_RECORD, f"{name!r} record")
        dtype = record_dtype(name, dtype_code)
        check_expected(name, shape, dtype, expect)
        n = budget.take(name, shape, dtype)
        if val_codec not in VALUE_NAMES or reserved:
            raise CodecError(f"{name!r}: unknown values codec or reserved field")
        values = VALUE_NAMES[val_codec]
        if chunk_elems % 8 or not 8 <= chunk_elems <= MAX_STREAM_CHUNK:
            raise CodecError(f"{name!r}: chunks of {chunk_elems} elements (a multiple of 8 up to {MAX_STREAM_CHUNK})")
        if out is not None and name in out:
            dest = writable_view(out[name], f"out[{name!r}]", dtype.newbyteorder("="), n).reshape(-1)
            spans[f"out[{name!r}]"] = dest
            check_disjoint(spans)
            result.tensors[name] = out[name]
        else:
            dest = np.empty(n, dtype=dtype.newbyteorder("="))
            result.tensors[name] = dest.reshape(shape)
        packed = np.empty((n + 7) // 8, dtype=np.uint8) if masks else None
        if packed is not None:
            result.packed[name] = packed
        ref = None
        for j, start in enumerate(range(0, n, chunk_elems)):
            size, where = min(chunk_elems, n - start), f"{name!r} chunk {j}"
            domain, pos_codec, signed, reserved, d, nnz, m, scale, pos_len = r.unpack(STREAM_CHUNK, where)
            _check_chunk(where, domain, pos_codec, signed, reserved, d, size, nnz, m, scale, pos_len, values)
            ref_bits = None
            if domain == DOMAIN_REFERENCE:
                if ref is None:
                    ref = reference_mask(reference, name, n)
                ref_bits = k.pack_bits(ref[start : start + size])
                if k.count_bits(ref_bits, size) != d:
                    raise CodecError(f"{where}: the reference mask has {k.count_bits(ref_bits, size)} positions "
                                     f"there, the sender's had {d}")
            pos_raw = r.take(pos_len, f"{where} positions")
            if values in ("raw", "fp16", "bf16", "int8"):
                val_raw = r.take(nnz * value_size(values, dtype), f"{where} values")
            elif nnz:  # an entropy-coded block: its head says how long it is
                head = bytes(r.take(entropy.HEAD.size, f"{where} values"))
                rest = entropy.read_head(head, nnz, word_bits(values, dtype), where)[-1]
                val_raw = memoryview(head + bytes(r.take(rest, f"{where} values")))
            else:
                val_raw = memoryview(b"")
            payload = read_payload(val_raw, values, nnz, dtype, scale, where)
            signs = None
            if signed:  # which of the chunk's zeros are -0.0, checked before its payload is read
                s_codec, s_count, s_m, s_len = r.unpack(SIGNS, f"{where} zero signs")
                try:
                    check_zero_signs(s_codec, size, size - nnz, s_count, s_m, s_len)
                except CodecError as e:
                    raise CodecError(f"{where}: {e}") from None
                signs = ZeroSigns(s_codec, s_count, s_m, r.take(s_len, f"{where} zero signs"))
            window.append(_Chunk(where, dest[start : start + size],
                                 None if packed is None else packed[start // 8 : (start + size + 7) // 8],
                                 ref_bits, pos_codec, d, nnz, m, pos_raw, payload, signs))
            elems += size
            if elems >= window_elems:
                _decode_window(k, window)
                window, elems = [], 0
    _decode_window(k, window)
    check_all_expected(list(result.tensors), expect)
    return result


def _check_chunk(where: str, domain: int, pos_codec: int, signed: int, reserved: int, d: int, size: int, nnz: int,
                 m: int, scale: float, pos_len: int, values: str) -> None:
    """A chunk header's fields against each other and the chunk's size, before its bytes are read."""
    if domain not in (DOMAIN_FULL, DOMAIN_REFERENCE) or pos_codec not in POSITIONS.values() or signed not in (0, 1) \
            or reserved:
        raise CodecError(f"{where}: unknown domain, positions codec, signs or reserved field")
    if pos_codec == POSITIONS["csr"]:
        raise CodecError(f"{where}: CSR positions are not used in streams")
    if d > size or (domain == DOMAIN_FULL and d != size):
        raise CodecError(f"{where}: domain of {d} for a chunk of {size} elements")
    if nnz > d:
        raise CodecError(f"{where}: {nnz} values for a domain of {d}")
    if (m != 0) != (pos_codec == _GOLOMB):
        raise CodecError(f"{where}: Golomb parameter {m} (>= 1 for Golomb positions, else 0)")
    if values == "int-ans" or scale != 0 and values != "int8":
        check_scale(values, scale, where)
    if pos_codec == _GOLOMB:
        if pos_len > golomb_max_len(d, nnz, m):
            raise CodecError(f"{where}: {pos_len} bytes of Golomb positions, at most {golomb_max_len(d, nnz, m)} "
                             "for its counts")
        if 8 * pos_len < nnz:
            raise CodecError(f"{where}: Golomb payload is shorter than one bit per position")
    else:
        want = 0 if pos_codec == POSITIONS["all"] else (d + 7) // 8
        if pos_len != want:
            raise CodecError(f"{where}: {pos_len} bytes of positions, {want} expected")


def _decode_window(k: Any, window: list[_Chunk]) -> None:
    """Decode a window's chunks into their outputs: the Golomb streams in one parallel call, then
    chunk by chunk (the kernels run on the library's threads within a large chunk)."""
    if not window:
        return
    golomb = [c for c in window if c.pos_codec == _GOLOMB]
    bits, failed, message = k.golomb_decode_many([(c.pos_raw, c.d, c.nnz, c.m) for c in golomb])
    if failed >= 0:
        raise CodecError(f"{golomb[failed].where}: {message}")
    decoded = iter(bits)
    negatives = iter(decode_zero_signs(k, [(c.where, c.signs, c.dest.size) for c in window if c.signs is not None]))
    vals = iter(decode_many(k, [c.values for c in window], [c.where for c in window]))
    for c in window:
        b = next(decoded) if c.pos_codec == _GOLOMB else None
        try:
            if b is None:
                b = decode_positions(k, c.pos_raw, c.pos_codec, c.d, c.nnz, ())
        except CodecError as e:
            raise CodecError(f"{c.where}: {e}") from None
        if c.ref is not None:
            b = k.deposit_bits(b, c.ref, c.dest.size)
        k.densify(b, c.dest.size, next(vals), c.dest)
        if c.signs is not None:
            set_negative_zeros(k, c.where, b, next(negatives), c.dest)
        if c.packed is not None:
            c.packed[:] = b
