"""Entropy-coded values (docs/wire-format.md, "Entropy-coded values"): a block per tensor (or
chunk) holding its words' model and their rANS stream. The model is chosen here, the same for
every backend, so that every backend writes the same bytes; the kernels count and code.

A word's magnitude (its low word_bits - 1 bits) splits at `shift`: the part above is a symbol,
coded with the tensor's own frequencies; the sign and the bits below travel raw. The kept values
of a pruned model are the tails of a bell: their exponents take a few values and the top of their
mantissas is skewed, which the symbols catch, while the low mantissa bits are close to uniform.
The encoder takes the shift that makes the block smallest, counting the table it carries."""

from __future__ import annotations

import math
import struct
from typing import Any, Callable, NamedTuple, Sequence, Union

import numpy as np

from .._contract import AnsModel
from .._formulas import ANS_MAX_LANES, ANS_MAX_PROB_BITS, word_dtype
from .format import CodecError

__all__ = ["HEAD", "MAX_SYMBOLS", "MIN_BLOCK", "AnsModel", "Block", "decode_blocks", "encode_blocks",
           "read_block", "read_head", "word_dtype"]

# word_bits, shift, prob_bits, lanes, base, n_symbols, table_len, stream_len
HEAD = struct.Struct("<BBBBQHHQ")
MIN_BLOCK = HEAD.size + 5  # the fewest bytes a block of words takes: head, a table entry, a lane's state
MAX_SYMBOLS = 4096  # a table's most entries (the decoder's tables: 2^prob_bits slots, these symbols)
_ENCODER_PROB_BITS = 12  # the finest precision the encoder uses: 4096 slots, whose tables stay in L1
# Lanes: 32 from _FULL_LANES words on (the decoder's vector loops take 32), else a lane for every
# _LANE_WORDS words, at least one: a state costs 4 bytes, a few hundredths of a bit a word there.
_FULL_LANES = 8192
_LANE_WORDS = 256
_SHORT = 64  # histograms of at most this many symbols are planned in Python's numbers


class Block(NamedTuple):
    """One entropy-coded block, read and checked, not yet decoded."""

    model: AnsModel
    stream: memoryview
    raw: memoryview


def _varint_len(f: np.ndarray) -> np.ndarray:
    return 1 + (f >= 1 << 7) + (f >= 1 << 14)


def _normalise(counts: np.ndarray, prob_bits: int) -> np.ndarray:
    """Frequencies adding up to 2^prob_bits, 1 or more for every counted symbol: 1 plus the
    symbol's share of what is left, rounded down, then 1 more for the largest remainders (ties to
    the smaller symbol). Integer arithmetic throughout: the same table from any backend, and from
    either path (Python's ints for short histograms, where NumPy's calls cost more, NumPy's else)."""
    if counts.size <= _SHORT:
        return np.array(_normalise_short([int(c) for c in counts.tolist()], prob_bits), dtype=np.uint32)
    total = int(counts.sum())
    present = counts > 0
    spare = (1 << prob_bits) - int(present.sum())
    if total < 1 << 48:  # c * spare < 2^63
        share, rem = np.divmod(counts.astype(np.int64) * spare, total)
    else:  # in Python's integers (2^48 words: a tensor no encoder meets today)
        pairs = [divmod(int(c) * spare, total) for c in counts]
        share = np.array([p[0] for p in pairs], dtype=np.int64)
        rem = np.array([p[1] for p in pairs], dtype=object)
    freqs = np.where(present, share + 1, 0).astype(np.int64)
    left = (1 << prob_bits) - int(freqs.sum())
    if left:  # the largest remainders among the counted symbols, ties to the smaller symbol
        order = sorted(np.flatnonzero(present).tolist(), key=lambda j: (-rem[j], j))
        freqs[order[:left]] += 1
    return freqs.astype(np.uint32)


def _normalise_short(counts: list[int], prob_bits: int) -> list[int]:
    """_normalise of a short histogram, in Python's ints (the same frequencies)."""
    total = sum(counts)
    present = [j for j, c in enumerate(counts) if c]
    spare = (1 << prob_bits) - len(present)
    pairs = [divmod(c * spare, total) for c in counts]
    freqs = [q + 1 if c else 0 for (q, _), c in zip(pairs, counts)]
    left = (1 << prob_bits) - sum(freqs)
    for j in sorted(present, key=lambda j: (-pairs[j][1], j))[:left]:
        freqs[j] += 1
    return freqs


def _prob_bits(present: int, n: int) -> int:
    """The precision for `present` symbols among n words: about n (a finer one only makes the
    table longer), enough for every symbol, at most _ENCODER_PROB_BITS."""
    return max(present.bit_length(), min(_ENCODER_PROB_BITS, max(n - 1, 1).bit_length()))


def _cost_bits(counts: np.ndarray, n: int, shift: int) -> float:
    """The block's size in bits with this histogram: the symbols at their entropy, the raw bits
    and the table at its frequencies' varint lengths."""
    c = counts[counts > 0].astype(np.float64)
    entropy = n * math.log2(n) - float(np.dot(c, np.log2(c)))
    scaled = c * ((1 << _prob_bits(c.size, n)) / n)
    table = counts.size + int(np.count_nonzero(scaled >= 1 << 7)) + int(np.count_nonzero(scaled >= 1 << 14))
    return entropy + n * (shift + 1) + 8 * table


def _cost_bits_short(counts: list[int], n: int, shift: int) -> float:
    """_cost_bits of a short histogram, in Python's floats."""
    c = [x for x in counts if x]
    entropy = n * math.log2(n) - math.fsum(x * math.log2(x) for x in c)
    unit = (1 << _prob_bits(len(c), n)) / n
    table = len(counts) + sum((x * unit >= 1 << 7) + (x * unit >= 1 << 14) for x in c)
    return entropy + n * (shift + 1) + 8 * table


def _coarser(counts: np.ndarray, base: int) -> tuple[np.ndarray, int]:
    """The histogram one shift up: symbols s and s ^ 1 merged."""
    zero = np.zeros(1, counts.dtype)  # (a list's 0 would make uint64 counts float64)
    if base & 1:
        counts = np.concatenate((zero, counts))
    if counts.size & 1:
        counts = np.concatenate((counts, zero))
    return counts[0::2] + counts[1::2], base >> 1


def _coarser_short(counts: list[int], base: int) -> tuple[list[int], int]:
    if base & 1:
        counts = [0, *counts]
    if len(counts) & 1:
        counts = [*counts, 0]
    return [counts[j] + counts[j + 1] for j in range(0, len(counts), 2)], base >> 1


def _no_smaller(cost: float, best: float) -> bool:
    """Whether a coarser shift's cost is not below the best so far: a tie to float rounding (the
    two ways of summing, the log2 of each libm) is a tie, and ties keep the finer shift."""
    return cost >= best * (1 - 1e-12)


def plan(k: Any, words: np.ndarray, word_bits: int) -> AnsModel:
    """The model that codes these words smallest: the finest shift with at most MAX_SYMBOLS
    symbols, or n / 64 for n words (finer tables cost more than they save), then coarser ones
    while the block shrinks. A histogram of at most _SHORT symbols (a quantised tensor's, a small
    tensor's) is weighed in Python's numbers: a plan per tensor, where NumPy's calls cost more."""
    n = words.size
    shift, base, counts = k.ans_histogram(words, word_bits=word_bits, max_symbols=min(MAX_SYMBOLS, max(n // 64, 2)))
    if counts.size <= _SHORT:
        shift, base, short = _search(counts.tolist(), n, shift, base, word_bits, _cost_bits_short, _coarser_short)
        prob_bits = _prob_bits(sum(1 for c in short if c), n)
        freqs = np.array(_normalise_short(short, prob_bits), dtype=np.uint32)
    else:
        shift, base, counts = _search(counts, n, shift, base, word_bits, _cost_bits, _coarser)
        prob_bits = _prob_bits(int((counts > 0).sum()), n)
        freqs = _normalise(counts, prob_bits)
    lanes = ANS_MAX_LANES if n >= _FULL_LANES else max(1, min(ANS_MAX_LANES, n // _LANE_WORDS))
    return AnsModel(word_bits, shift, base, freqs, prob_bits, lanes)


def _search(counts: Any, n: int, shift: int, base: int, word_bits: int, cost_of: Callable[[Any, int, int], float],
            coarser: Callable[[Any, int], tuple[Any, int]]) -> tuple[int, int, Any]:
    """(shift, base, histogram): coarser shifts from the given one while the block shrinks."""
    best = (cost_of(counts, n, shift), shift, base, counts)
    while len(counts) > 1 and shift < word_bits - 1:
        counts, base = coarser(counts, base)
        shift += 1
        cost = cost_of(counts, n, shift)
        if _no_smaller(cost, best[0]):
            break
        best = (cost, shift, base, counts)
    return best[1], best[2], best[3]


def _write_table(freqs: np.ndarray) -> bytes:
    """The frequencies as LEB128 varints (7 bits a byte, low first, the high bit: more follows).
    A Python loop: tables are short (tens to hundreds of entries), where NumPy's calls cost more."""
    out = bytearray()
    for f in freqs.tolist():
        while f >= 0x80:
            out.append(f & 0x7F | 0x80)
            f >>= 7
        out.append(f)
    return bytes(out)


def _read_table(raw: memoryview, n_symbols: int, prob_bits: int, where: str) -> np.ndarray:
    freqs: list[int] = []
    value = at = 0
    for byte in bytes(raw):
        value |= (byte & 0x7F) << at
        if byte < 0x80:
            freqs.append(value)
            value = at = 0
        elif at == 14:
            raise CodecError(f"{where}: a frequency of more than 3 bytes")
        else:
            at += 7
    if at or len(freqs) != n_symbols:
        raise CodecError(f"{where}: the frequency table does not hold exactly {n_symbols} entries")
    total = sum(freqs)
    if total != 1 << prob_bits:
        raise CodecError(f"{where}: frequencies add up to {total}, not 2^{prob_bits}")
    return np.array(freqs, dtype=np.uint32)


def raw_len(n: int, shift: int) -> int:
    """Bytes of the raw bits of n words: sign and `shift` low bits each."""
    return (n * (shift + 1) + 7) // 8


def encode_blocks(k: Any, items: Sequence[tuple[np.ndarray, int]]) -> list[list[Any]]:
    """Each (words, word_bits) item's block, as pieces: the blocks coded in one call (in parallel
    with the native backend). An item of no words codes to no bytes."""
    models = [plan(k, words, word_bits) if words.size else None for words, word_bits in items]
    coded = iter(k.ans_encode_many([(words, m) for (words, _), m in zip(items, models) if m is not None]))
    out: list[list[Any]] = []
    for m in models:
        if m is None:
            out.append([])
            continue
        stream, raw = next(coded)
        table = _write_table(m.freqs)
        out.append([HEAD.pack(m.word_bits, m.shift, m.prob_bits, m.lanes, m.base, m.freqs.size, len(table),
                              len(stream)), table, stream, raw])
    return out


def read_head(raw: Any, n: int, widths: Union[int, range], where: str
              ) -> tuple[int, int, int, int, int, int, int, int, int]:
    """A block's head, checked against n words of a width in `widths`: (word_bits, shift,
    prob_bits, lanes, base, n_symbols, table_len, stream_len, the bytes after the head)."""
    word_bits, shift, prob_bits, lanes, base, n_symbols, table_len, stream_len = HEAD.unpack(raw)
    if word_bits not in (widths if isinstance(widths, range) else (widths,)):
        allowed = f"{widths[0]} to {widths[-1]}" if isinstance(widths, range) else str(widths)
        raise CodecError(f"{where}: words of {word_bits} bits, the values codec has {allowed}")
    if shift >= word_bits:
        raise CodecError(f"{where}: shift {shift} for words of {word_bits} bits")
    if not 1 <= prob_bits <= ANS_MAX_PROB_BITS or not 1 <= lanes <= ANS_MAX_LANES:
        raise CodecError(f"{where}: precision {prob_bits} or {lanes} lanes out of range")
    if not 1 <= n_symbols <= MAX_SYMBOLS or base + n_symbols - 1 > ((1 << (word_bits - 1)) - 1) >> shift:
        raise CodecError(f"{where}: {n_symbols} symbols from {base} do not fit words of {word_bits} bits")
    if not n_symbols <= table_len <= 3 * n_symbols:
        raise CodecError(f"{where}: a table of {table_len} bytes for {n_symbols} symbols")
    if stream_len < 4 * lanes or (stream_len - 4 * lanes) % 2 or (stream_len - 4 * lanes) // 2 > n:
        raise CodecError(f"{where}: a stream of {stream_len} bytes for {n} values in {lanes} lanes")
    return (word_bits, shift, prob_bits, lanes, base, n_symbols, table_len, stream_len,
            table_len + stream_len + raw_len(n, shift))


def read_block(raw: memoryview, n: int, widths: Union[int, range], where: str) -> Block:
    """A block of n words of a width in `widths`, its head and table checked: exactly `raw`'s
    bytes (CodecError otherwise)."""
    if n == 0:
        if len(raw):
            raise CodecError(f"{where}: {len(raw)} bytes of values for no values")
        width = widths if isinstance(widths, int) else widths[-1]
        return Block(AnsModel(width, 0, 0, np.zeros(0, np.uint32), 1, 1), raw, raw)
    if len(raw) < HEAD.size:
        raise CodecError(f"{where}: {len(raw)} bytes of entropy-coded values, shorter than their head")
    word_bits, shift, prob_bits, lanes, base, n_symbols, table_len, stream_len, rest = read_head(
        raw[: HEAD.size], n, widths, where)
    if len(raw) != HEAD.size + rest:
        raise CodecError(f"{where}: entropy-coded values take {len(raw)} bytes, their head says {HEAD.size + rest}")
    at = HEAD.size + table_len
    freqs = _read_table(raw[HEAD.size : at], n_symbols, prob_bits, where)
    model = AnsModel(word_bits, shift, base, freqs, prob_bits, lanes)
    return Block(model, raw[at : at + stream_len], raw[at + stream_len :])


def decode_blocks(k: Any, blocks: Sequence[tuple[Block, int]], names: Sequence[str]) -> list[np.ndarray]:
    """The words of each (block, n) in one call (in parallel with the native backend); CodecError
    naming the first corrupt one."""
    todo = [(b.stream, b.raw, n, b.model) for b, n in blocks if n]
    words, failed, message = k.ans_decode_many(todo)
    if failed >= 0:
        raise CodecError(f"{[nm for (_, n), nm in zip(blocks, names) if n][failed]}: {message}")
    it = iter(words)
    return [next(it) if n else np.zeros(0, word_dtype(b.model.word_bits)) for b, n in blocks]
