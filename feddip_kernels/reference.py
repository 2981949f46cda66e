"""NumPy reference implementations: short, obviously correct, and the ground truth every other
backend is tested against. They concatenate and sort, so they are slow and memory hungry."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Optional, Sequence, cast

import numpy as np

from . import _formulas
from ._formulas import crc32c_table

if TYPE_CHECKING:
    from typing_extensions import Buffer

    from ._contract import AnsModel

golomb_parameter = _formulas.golomb_parameter  # a kernel of the contract, shared with the other Python backend


def _magnitudes(tensors: Sequence[np.ndarray]) -> np.ndarray:
    if not tensors:
        return np.zeros(0)
    flat = np.concatenate([np.abs(t).ravel() for t in tensors])
    if np.isnan(flat).any():
        raise ValueError("input contains NaN")
    return flat


def _check_k(k: int, n: int) -> None:
    if k > n:
        raise ValueError(f"k = {k} exceeds the number of elements ({n})")


def topk_order(tensors: list[np.ndarray], k: int) -> np.ndarray:
    """Flat indices (in list order) of the k largest |x|, ties by flat index: a stable sort."""
    mags = _magnitudes(tensors)
    _check_k(k, mags.size)
    return np.argsort(-mags, kind="stable")[:k]


def magnitude_threshold(tensors: Sequence[np.ndarray], k: int) -> float:
    mags = _magnitudes(tensors)
    _check_k(k, mags.size)
    if k == 0:
        return math.inf
    return float(-np.sort(-mags)[k - 1])


def max_magnitude(tensors: Sequence[np.ndarray]) -> float:
    mags = _magnitudes(tensors)
    return float(mags.max()) if mags.size else 0.0


def topk_masks(tensors: Sequence[np.ndarray], masks: Sequence[np.ndarray], k: int) -> None:
    flat = np.zeros(sum(t.size for t in tensors), dtype=bool)
    flat[topk_order(list(tensors), k)] = True
    start = 0
    for t, m in zip(tensors, masks):
        m.reshape(-1)[:] = flat[start : start + t.size]
        start += t.size


def topk_mask_list(tensors: Sequence[np.ndarray], k: int) -> list[np.ndarray]:
    """topk_masks into new arrays of the tensors' shapes (for tests and callers without buffers)."""
    masks = [np.zeros(t.shape, dtype=bool) for t in tensors]
    topk_masks(tensors, masks, k)
    return masks


def pack_bits(mask: np.ndarray) -> np.ndarray:
    return np.packbits(np.asarray(mask, dtype=bool).ravel(), bitorder="little")


def unpack_bits(bits: np.ndarray, n: int) -> np.ndarray:
    return np.unpackbits(bits, count=n, bitorder="little").astype(bool)


def masked_norm(w: np.ndarray, mask: Optional[np.ndarray], *, p: int, mask_packed: bool = False) -> float:
    if mask_packed:  # the public layer passes packed bits only with a mask
        mask = unpack_bits(cast(np.ndarray, mask), w.size)
    v = w.astype(np.float64).ravel()
    if mask is not None:
        with np.errstate(invalid="ignore"):  # inf * 0 is NaN, as w * m in the kernels (and torch)
            v = v * mask.ravel()
    if p == 1:
        return float(np.sum(np.abs(v)))
    top = float(np.max(np.abs(v), initial=0.0))
    if not 0 < top < np.inf:  # zero, inf or NaN: no scaling to do
        return float(np.sqrt(np.sum(v * v)))
    return top * float(np.sqrt(np.sum((v / top) ** 2)))  # scaled: no squares underflow


def masked_ef_step(
    w: np.ndarray,
    g: np.ndarray,
    mask: Optional[np.ndarray],
    *,
    momentum_buffer: Optional[np.ndarray],
    pruned_out: Optional[np.ndarray],
    lr: float,
    weight_decay: float,
    lam: float,
    momentum: float,
    p: int,
    norm: Optional[float],
    mask_packed: bool = False,
) -> float:
    """Step by step, in w's dtype: the same update the fused kernels make in one pass. NaN and inf
    propagate by IEEE arithmetic, as in the kernels, without floating-point warnings."""
    if mask_packed:  # the public layer passes packed bits only with a mask
        mask = unpack_bits(cast(np.ndarray, mask), w.size)
    with np.errstate(invalid="ignore", over="ignore"):
        dt = w.dtype.type
        m = np.ones_like(w) if mask is None else mask.reshape(w.shape).astype(w.dtype)
        if norm is None:
            norm = masked_norm(w, mask, p=p)
        if p == 2:
            # lam * w / norm in double: each term is at most lam even where lam / norm overflows dtype.
            reg = (lam * (m * w).astype(np.float64) / norm if 0 < norm < np.inf else 0 * w).astype(w.dtype)
        else:
            reg = dt(lam) * m * np.sign(w)
        d = g.reshape(w.shape) + dt(weight_decay) * w + reg
        if momentum_buffer is not None:
            buf = momentum_buffer.reshape(w.shape)
            buf[...] = dt(momentum) * buf + d
            d = buf
        w -= dt(lr) * d
        if pruned_out is not None:
            pruned_out.reshape(w.shape)[...] = w * m
        return masked_norm(w, mask, p=p)


masked_ef_step_many = _formulas.layer_by_layer(masked_ef_step)


def golomb_encode(bits: np.ndarray, n: int, m: int) -> bytes:
    """Bit-by-bit Golomb coder of the gaps between packed positions (docs/wire-format.md)."""
    if m < 1:
        raise ValueError("Golomb parameter must be >= 1")
    positions_mask = unpack_bits(bits, n)
    out_bits: list[int] = []
    b = (m - 1).bit_length()
    cut = (1 << b) - m
    prev = 0
    for pos in np.flatnonzero(positions_mask):
        gap = int(pos) - prev
        prev = int(pos) + 1
        q, r = divmod(gap, m)
        out_bits += [0] * q + [1]
        if b == 0:
            continue
        if r < cut:
            out_bits += [(r >> i) & 1 for i in range(b - 1)]
        else:
            v = r + cut
            out_bits += [((v >> 1) >> i) & 1 for i in range(b - 1)] + [v & 1]
    return np.packbits(np.array(out_bits, dtype=np.uint8), bitorder="little").tobytes()


def golomb_decode(data: Buffer, n: int, nnz: int, m: int) -> np.ndarray:
    """Bit-by-bit decoder with the same checks as the native one; returns packed positions."""
    if m < 1:
        raise ValueError("Golomb parameter must be >= 1")
    stream = np.unpackbits(np.frombuffer(bytes(data), dtype=np.uint8), bitorder="little")
    b = (m - 1).bit_length()
    cut = (1 << b) - m
    at, nxt = 0, 0
    mask = np.zeros(n, dtype=bool)

    def bit() -> int:
        nonlocal at
        if at >= stream.size:
            raise ValueError("Golomb stream is truncated")
        at += 1
        return int(stream[at - 1])

    if nnz > n:
        raise ValueError("Golomb stream: more positions than elements")
    for _ in range(nnz):
        q = 0
        while bit() == 0:
            q += 1
            if q > n // m + 1:
                raise ValueError("Golomb stream: position out of range")
        r = 0
        if b:
            r = sum(bit() << i for i in range(b - 1))
            if r >= cut:
                r = ((r << 1) | bit()) - cut
        if r >= m:
            raise ValueError("Golomb stream: bad remainder")
        pos = nxt + q * m + r
        if pos >= n:
            raise ValueError("Golomb stream: position out of range")
        mask[pos] = True
        nxt = pos + 1
    if (at + 7) // 8 != stream.size // 8 or stream[at:].any():
        raise ValueError("Golomb stream: bytes or bits left after the last code")
    return pack_bits(mask)


def select_bits(bits: np.ndarray, ref: np.ndarray, n: int) -> np.ndarray:
    return pack_bits(unpack_bits(bits, n)[unpack_bits(ref, n)])


def deposit_bits(sub: np.ndarray, ref: np.ndarray, n: int) -> np.ndarray:
    where = unpack_bits(ref, n)
    out = np.zeros(n, dtype=bool)
    out[where] = unpack_bits(sub, int(where.sum()))
    return pack_bits(out)


def sparsify(
    x: np.ndarray, mask: np.ndarray | None, *, negative_zeros: bool = False
) -> tuple[np.ndarray, np.ndarray] | tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]:
    flat = x.reshape(-1)
    keep = mask.reshape(-1).astype(bool) if mask is not None else flat != 0
    if not negative_zeros:
        return pack_bits(keep), flat[keep]
    negative = np.signbit(flat) & (flat == 0)  # by value, where the backends compare bits
    return pack_bits(keep), flat[keep], pack_bits(negative) if negative.any() else None


def densify(bits: np.ndarray, n: int, values: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    keep = unpack_bits(bits, n)
    if int(keep.sum()) != values.size:
        raise ValueError("number of values differs from the number of positions")
    if out is None:
        out = np.zeros(n, dtype=values.dtype)
    else:
        out[...] = 0
    out[keep] = values
    return out


_CRC_TABLE = crc32c_table()


def crc32c(data: Buffer, crc: int = 0) -> int:
    c = crc ^ 0xFFFFFFFF
    for byte in bytes(data):
        c = (c >> 8) ^ _CRC_TABLE[(c ^ byte) & 0xFF]
    return c ^ 0xFFFFFFFF


join_crc32c = _formulas.join_with_crc32c(crc32c)


def count_bits(bits: np.ndarray, n: int) -> int:
    return int(unpack_bits(bits, n).sum())


def golomb_encode_many(items: Sequence[tuple[np.ndarray, int, int]]) -> list[bytes]:
    return _formulas.encode_each(golomb_encode, items)


def golomb_decode_many(items: Sequence[tuple[object, int, int, int]]) -> tuple[list[np.ndarray], int, str]:
    return _formulas.decode_each(golomb_decode, items)


# Entropy-coded values (docs/wire-format.md): a word's magnitude (its low word_bits - 1 bits)
# splits into a symbol, |w| >> shift, rANS-coded over `lanes` interleaved states, and raw bits,
# the sign above the low `shift` bits of the magnitude.
def _magnitude(words: np.ndarray, word_bits: int) -> np.ndarray:
    return words.astype(np.uint64) & np.uint64((1 << (word_bits - 1)) - 1)


def ans_histogram(words: np.ndarray, *, word_bits: int, max_symbols: int) -> tuple[int, int, np.ndarray]:
    if words.size == 0:
        return 0, 0, np.zeros(0, dtype=np.uint64)
    mag = _magnitude(words, word_bits)
    lo, hi = int(mag.min()), int(mag.max())
    shift = 0
    while (hi >> shift) - (lo >> shift) >= max_symbols:
        shift += 1
    sym = mag >> np.uint64(shift)
    base = lo >> shift
    return shift, base, np.bincount((sym - np.uint64(base)).astype(np.int64)).astype(np.uint64)


def ans_encode(words: np.ndarray, *, word_bits: int, shift: int, base: int, freqs: np.ndarray, prob_bits: int,
               lanes: int) -> tuple[bytes, bytes]:
    mag = _magnitude(words, word_bits)
    sym = ((mag >> np.uint64(shift)) - np.uint64(base)).astype(np.int64)
    f = freqs.astype(np.int64)
    if words.size and ((sym < 0) | (sym >= f.size)).any() or (f[sym[(sym >= 0) & (sym < f.size)]] == 0).any():
        raise ValueError("entropy-coded values: a symbol has no frequency")
    cum = _formulas.ans_cumulative(f)
    x = np.full(lanes, _formulas.ANS_LOW, dtype=np.int64)
    out: list[np.ndarray] = []  # each group's words in lane order, last group first
    for g in range((words.size + lanes - 1) // lanes - 1, -1, -1):
        s = sym[g * lanes : (g + 1) * lanes]
        xs, fs = x[: s.size], f[s]
        need = xs >= fs << (31 - prob_bits)
        out.append((xs[need] & 0xFFFF).astype("<u2"))
        xs[need] >>= 16
        xs[:] = ((xs // fs) << prob_bits) + xs % fs + cum[s]
    stream = x.astype("<u4").tobytes() + b"".join(w.tobytes() for w in reversed(out))
    sign = (words.astype(np.uint64) >> np.uint64(word_bits - 1)) & np.uint64(1)
    low = mag & np.uint64((1 << shift) - 1)
    return stream, _pack_fixed((sign << np.uint64(shift)) | low, shift + 1)


def _pack_fixed(v: np.ndarray, width: int) -> bytes:
    """Each value's low `width` bits, back to back, least significant first."""
    bits = ((v[:, None] >> np.arange(width, dtype=np.uint64)) & np.uint64(1)).astype(np.uint8)
    return np.packbits(bits.reshape(-1), bitorder="little").tobytes()


def _unpack_fixed(raw: np.ndarray, n: int, width: int) -> np.ndarray:
    bits = np.unpackbits(raw, bitorder="little")
    if bits[n * width :].any():
        raise ValueError("entropy-coded values: non-zero padding bits")
    b = bits[: n * width].reshape(n, width).astype(np.uint64)
    return (b << np.arange(width, dtype=np.uint64)).sum(axis=1, dtype=np.uint64)


def ans_decode(stream: Buffer, raw: Buffer, n: int, *, word_bits: int, shift: int, base: int, freqs: np.ndarray,
               prob_bits: int, lanes: int) -> np.ndarray:
    data = np.frombuffer(bytes(stream), dtype=np.uint8)
    if data.size < 4 * lanes or (data.size - 4 * lanes) % 2:
        raise ValueError("entropy-coded values: stream of a bad length")
    r = np.frombuffer(bytes(raw), dtype=np.uint8)
    if r.size != (n * (shift + 1) + 7) // 8:
        raise ValueError("entropy-coded values: raw bits of a bad length")
    rest = _unpack_fixed(r, n, shift + 1)
    x = data[: 4 * lanes].view("<u4").astype(np.int64)
    if ((x < _formulas.ANS_LOW) | (x >= 1 << 31)).any():
        raise ValueError("entropy-coded values: initial state out of range")
    feed = data[4 * lanes :].view("<u2").astype(np.int64)
    f = freqs.astype(np.int64)
    cum = _formulas.ans_cumulative(f)
    slot_symbol = np.repeat(np.arange(f.size), f)
    sym = np.empty(n, dtype=np.int64)
    at = 0
    for g in range((n + lanes - 1) // lanes):
        xs = x[: min(lanes, n - g * lanes)]
        slot = xs & ((1 << prob_bits) - 1)
        s = slot_symbol[slot]
        sym[g * lanes : g * lanes + s.size] = s
        xs[:] = f[s] * (xs >> prob_bits) + slot - cum[s]
        need = xs < _formulas.ANS_LOW
        take = int(need.sum())
        if at + take > feed.size:
            raise ValueError("entropy-coded values: stream ends early")
        xs[need] = (xs[need] << 16) | feed[at : at + take]
        at += take
    if at != feed.size or (x != _formulas.ANS_LOW).any():
        raise ValueError("entropy-coded values: stream does not end where its symbols do")
    mag = ((sym.astype(np.uint64) + np.uint64(base)) << np.uint64(shift)) | (rest & np.uint64((1 << shift) - 1))
    sign = (rest >> np.uint64(shift)) << np.uint64(word_bits - 1)
    return (mag | sign).astype(_formulas.word_dtype(word_bits))


def ans_encode_many(items: Sequence[tuple[np.ndarray, AnsModel]]) -> list[tuple[bytes, bytes]]:
    return _formulas.ans_each(ans_encode, items)


def ans_decode_many(items: Sequence[tuple[Buffer, Buffer, int, AnsModel]]) -> tuple[list[np.ndarray], int, str]:
    return _formulas.ans_decode_each(ans_decode, items)
