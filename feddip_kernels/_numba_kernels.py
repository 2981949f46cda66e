"""Numba twins of the native kernels (imported lazily; needs the optional numba dependency).

Each twin follows the same algorithm as its C++ counterpart in csrc/, so the two can be compared
on speed and checked against the NumPy reference in the same tests."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Sequence

import numba as nb
import numpy as np

from . import _formulas
from ._formulas import crc32c_table

if TYPE_CHECKING:
    from typing_extensions import Buffer

    from ._contract import AnsModel

golomb_parameter = _formulas.golomb_parameter  # a kernel of the contract, shared with the other Python backend

_BINS = 1 << 16


def _keys(a: np.ndarray) -> np.ndarray:
    """Bit patterns of a contiguous float array, as unsigned integers of the same width."""
    return a.reshape(-1).view(np.uint32 if a.dtype == np.float32 else np.uint64)


@nb.njit(cache=True, nogil=True)
def _hist_first(keys, sign_clear, shift, hist):
    mx = sign_clear - sign_clear  # zero of the key type
    for i in range(keys.size):
        key = keys[i] & sign_clear
        hist[key >> shift] += 1
        if key > mx:
            mx = key
    return mx


@nb.njit(cache=True, nogil=True)
def _hist_filtered(keys, sign_clear, shift, prefix, prefix_mask, digit, hist):
    for i in range(keys.size):
        key = keys[i] & sign_clear
        if (key & prefix_mask) == prefix:
            hist[(key >> shift) & digit] += 1


@nb.njit(cache=True, nogil=True)
def _write_mask(keys, sign_clear, key, inclusive, out):
    if inclusive:
        for i in range(keys.size):
            out[i] = (keys[i] & sign_clear) >= key
    else:
        for i in range(keys.size):
            out[i] = (keys[i] & sign_clear) > key


@nb.njit(cache=True, nogil=True)
def _take_ties(keys, sign_clear, key, ties, out):
    for i in range(keys.size):
        if ties == 0:
            break
        if (keys[i] & sign_clear) == key:
            out[i] = True
            ties -= 1
    return ties


def _select(keys_list: list[np.ndarray], bits: int, k: int) -> tuple[int, int, int]:
    """Radix select over 16-bit digits of |x| bit patterns: (key, n_greater, n_equal)."""
    utype = np.uint32 if bits == 32 else np.uint64
    sign_clear = utype((1 << (bits - 1)) - 1)
    inf_key = 0x7F800000 if bits == 32 else 0x7FF0000000000000
    n = sum(k_.size for k_ in keys_list)
    if k > n:
        raise ValueError(f"k = {k} exceeds the number of elements ({n})")
    prefix = prefix_mask = 0
    rank, above = k, 0
    for shift in range(bits - 16, -1, -16):
        hist = np.zeros(_BINS, dtype=np.int64)
        if prefix_mask == 0:
            mx = max((int(_hist_first(keys, sign_clear, utype(shift), hist)) for keys in keys_list), default=0)
            if mx > inf_key:
                raise ValueError("input contains NaN")
            if k == 0:
                return inf_key, 0, 0
        else:
            for keys in keys_list:
                _hist_filtered(keys, sign_clear, utype(shift), utype(prefix), utype(prefix_mask), utype(0xFFFF), hist)
        # Bin b holding the rank-th largest: counts strictly above b are < rank <= counts from b.
        above_b = np.cumsum(hist[::-1])[::-1] - hist  # elements in bins above each bin
        b = int(np.nonzero(above_b < rank)[0][0])
        above += int(above_b[b])
        rank -= int(above_b[b])
        prefix |= b << shift
        prefix_mask |= 0xFFFF << shift
        if shift == 0:
            return prefix, above, int(hist[b])
    raise AssertionError("unreachable")


def magnitude_threshold(tensors: Sequence[np.ndarray], k: int) -> float:
    dtype = tensors[0].dtype if tensors else np.dtype(np.float32)
    bits = 8 * dtype.itemsize
    key, greater, equal = _select([_keys(t) for t in tensors], bits, k)
    if k == 0:
        return math.inf
    return float(np.array([key], dtype=np.uint32 if bits == 32 else np.uint64).view(dtype)[0])


@nb.njit(cache=True, nogil=True)
def _peak(keys, sign_clear):
    mx = sign_clear - sign_clear  # zero of the key type
    for i in range(keys.size):
        mx = max(mx, keys[i] & sign_clear)
    return mx


def max_magnitude(tensors: Sequence[np.ndarray]) -> float:
    dtype = tensors[0].dtype if tensors else np.dtype(np.float32)
    utype = np.uint32 if dtype.itemsize == 4 else np.uint64
    sign_clear = utype(np.iinfo(utype).max >> 1)
    peak = max((int(_peak(_keys(t), sign_clear)) for t in tensors), default=0)
    if peak > (0x7F800000 if dtype.itemsize == 4 else 0x7FF0000000000000):
        raise ValueError("input contains NaN")
    return float(np.array([peak], dtype=utype).view(dtype)[0])


def topk_masks(tensors: Sequence[np.ndarray], masks: Sequence[np.ndarray], k: int) -> None:
    dtype = tensors[0].dtype if tensors else np.dtype(np.float32)
    bits = 8 * dtype.itemsize
    utype = np.uint32 if bits == 32 else np.uint64
    sign_clear = utype((1 << (bits - 1)) - 1)
    keys_list = [_keys(t) for t in tensors]
    key, greater, equal = _select(keys_list, bits, k)
    if k == 0:
        for m in masks:
            m.fill(False)
        return
    inclusive = greater + equal == k
    for keys, m in zip(keys_list, masks):
        _write_mask(keys, sign_clear, utype(key), inclusive, m.reshape(-1))
    if not inclusive:
        ties = k - greater
        for keys, m in zip(keys_list, masks):
            ties = _take_ties(keys, sign_clear, utype(key), ties, m.reshape(-1))


@nb.njit(cache=True, nogil=True)
def pack_bits(mask):
    n = mask.size
    out = np.zeros((n + 7) // 8, dtype=np.uint8)
    for i in range(n):
        if mask[i]:
            out[i >> 3] |= np.uint8(1 << (i & 7))
    return out


@nb.njit(cache=True, nogil=True)
def unpack_bits(bits, n):
    out = np.empty(n, dtype=np.bool_)
    for i in range(n):
        out[i] = (bits[i >> 3] >> (i & 7)) & 1
    return out


_TINY_OVER_EPS = float(np.finfo(np.float64).tiny / np.finfo(np.float64).eps)


@nb.njit(cache=True, nogil=True)
def _norm(w, mask, has_mask, p):
    acc = 0.0
    for i in range(w.size):
        v = np.float64(w[i] * mask[i] if has_mask else w[i])
        acc += v * v if p == 2 else abs(v)
    return math.sqrt(acc) if p == 2 else acc


@nb.njit(cache=True, nogil=True)
def _ef_step(w, g, mask, has_mask, buf, has_buf, pruned, has_pruned, lr, wd, reg, scale, mom, p):
    acc = 0.0
    for i in range(w.size):
        wi = w[i]
        mi = w.dtype.type(mask[i]) if has_mask else w.dtype.type(1)
        r = (mi * wi) * scale if p == 2 else mi * np.sign(wi)  # scaled masked value is bounded by the norm
        d = g[i] + wd * wi + reg * r
        if has_buf:
            d = mom * buf[i] + d
            buf[i] = d
        wn = wi - lr * d
        w[i] = wn
        v = wn * mi
        if has_pruned:
            pruned[i] = v
        v64 = np.float64(v)
        acc += v64 * v64 if p == 2 else abs(v64)
    return math.sqrt(acc) if p == 2 else acc


@nb.njit(cache=True, nogil=True)
def _norm2_scaled(w, mask, has_mask):
    top = 0.0
    for i in range(w.size):
        v = abs(np.float64(w[i] * mask[i] if has_mask else w[i]))
        top = max(top, v)
    if top == 0.0 or top == math.inf:
        return top
    acc = 0.0
    for i in range(w.size):
        v = np.float64(w[i] * mask[i] if has_mask else w[i]) / top
        acc += v * v
    return top * math.sqrt(acc)


def _finish_norm(norm: float, flat: np.ndarray, m: np.ndarray, has_mask: bool, p: int) -> float:
    # Squares of tiny float64 values underflow and of huge ones overflow; rescale as the other
    # backends do (an infinite element keeps the norm infinite).
    if p == 2 and (norm * norm < flat.size * _TINY_OVER_EPS or norm == math.inf):
        return float(_norm2_scaled(flat, m, has_mask))
    return norm


def masked_norm(w: np.ndarray, mask, *, p: int, mask_packed: bool = False) -> float:
    if mask_packed:
        mask = unpack_bits(mask, w.size)
    m = mask.reshape(-1) if mask is not None else np.ones(1, np.bool_)
    flat = w.reshape(-1)
    return _finish_norm(float(_norm(flat, m, mask is not None, p)), flat, m, mask is not None, p)


def _regulariser_factors(lam: float, norm: float, p: int, dtype: np.dtype) -> tuple[float, float]:
    """(reg, scale) with reg * scale = lam / norm for p = 2, neither overflowing dtype (as csrc/ef_step.cpp)."""
    if p == 1:
        return lam, 1.0
    if lam == 0 or not (0 < norm < math.inf):
        return 0.0, 1.0
    info = np.finfo(dtype)
    e = min(max(1 - math.frexp(norm)[1], info.minexp + 1), info.maxexp - 2)
    scale = math.ldexp(1.0, e)
    return lam / (norm * scale), scale


def masked_ef_step(w, g, mask, *, momentum_buffer, pruned_out, lr, weight_decay, lam, momentum, p, norm,
                   mask_packed=False) -> float:
    if mask_packed:
        mask = unpack_bits(mask, w.size)
    flat = w.reshape(-1)
    dt = w.dtype.type
    dummy = np.zeros(1, w.dtype)
    m = mask.reshape(-1) if mask is not None else np.ones(1, np.bool_)
    if norm is None:
        norm = masked_norm(w, mask, p=p)
    reg, scale = _regulariser_factors(lam, norm, p, w.dtype)
    out = float(
        _ef_step(
            flat, g.reshape(-1), m, mask is not None,
            momentum_buffer.reshape(-1) if momentum_buffer is not None else dummy, momentum_buffer is not None,
            pruned_out.reshape(-1) if pruned_out is not None else dummy, pruned_out is not None,
            dt(lr), dt(weight_decay), dt(reg), dt(scale), dt(momentum), p,
        )
    )
    return _finish_norm(out, flat, m, mask is not None, p)


masked_ef_step_many = _formulas.layer_by_layer(masked_ef_step)


# ------------------------------------------------------------------ codec kernels


@nb.njit(cache=True, nogil=True)
def count_bits(bits, n):
    c = 0
    for i in range(n):
        c += (bits[i >> 3] >> (i & 7)) & 1
    return c


@nb.njit(cache=True, nogil=True)
def _golomb_encode(bits, n, m):
    b = 0
    while (1 << b) < m:
        b += 1
    cut = (1 << b) - m
    nnz = count_bits(bits, n)
    out = np.zeros((n // m + nnz * (1 + b)) // 8 + 16, dtype=np.uint8)
    at = 0
    acc = 0
    fill = 0
    prev = 0
    for i in range(n):
        if not (bits[i >> 3] >> (i & 7)) & 1:
            continue
        gap = i - prev
        prev = i + 1
        q, r = gap // m, gap % m
        # q zeros, then the code: a one and the remainder (see docs/wire-format.md).
        code, length = 1, 1
        if b > 0:
            if r < cut:
                code |= r << 1
                length += b - 1
            else:
                v = r + cut
                code |= ((v >> 1) << 1) | ((v & 1) << b)
                length += b
        for k in range(q + length):
            if k >= q:
                acc |= ((code >> (k - q)) & 1) << fill
            fill += 1
            if fill == 8:
                out[at] = acc
                at += 1
                acc = 0
                fill = 0
    if fill:
        out[at] = acc
        at += 1
    return out[:at]


def golomb_encode(bits: np.ndarray, n: int, m: int) -> bytes:
    if m < 1:
        raise ValueError("Golomb parameter must be >= 1")
    return _golomb_encode(bits, n, m).tobytes()


@nb.njit(cache=True, nogil=True)
def _golomb_decode(data, n, nnz, m, out):
    """0 on success, else an error code (see _DECODE_ERRORS)."""
    b = 0
    while (1 << b) < m:
        b += 1
    cut = (1 << b) - m
    total = data.size * 8
    at = 0
    nxt = 0
    max_q = n // m + 1
    for _ in range(nnz):
        q = 0
        while True:
            if at >= total:
                return 1
            bit = (data[at >> 3] >> (at & 7)) & 1
            at += 1
            if bit:
                break
            q += 1
            if q > max_q:
                return 2
        r = 0
        if b > 0:
            if at + b - 1 > total:
                return 1
            for k in range(b - 1):
                r |= ((data[at >> 3] >> (at & 7)) & 1) << k
                at += 1
            if r >= cut:
                if at >= total:
                    return 1
                r = ((r << 1) | ((data[at >> 3] >> (at & 7)) & 1)) - cut
                at += 1
        if r >= m:
            return 3
        pos = nxt + q * m + r
        if pos >= n:
            return 2
        out[pos >> 3] |= np.uint8(1 << (pos & 7))
        nxt = pos + 1
    if (at + 7) // 8 != data.size:
        return 4
    while at < total:
        if (data[at >> 3] >> (at & 7)) & 1:
            return 4
        at += 1
    return 0


_DECODE_ERRORS = {
    1: "Golomb stream is truncated",
    2: "Golomb stream: position out of range",
    3: "Golomb stream: bad remainder",
    4: "Golomb stream: bytes or bits left after the last code",
}


def golomb_decode(data, n: int, nnz: int, m: int) -> np.ndarray:
    if m < 1:
        raise ValueError("Golomb parameter must be >= 1")
    if nnz > n:
        raise ValueError("Golomb stream: more positions than elements")
    out = np.zeros((n + 7) // 8, dtype=np.uint8)
    err = _golomb_decode(np.frombuffer(data, dtype=np.uint8), n, nnz, m, out)
    if err:
        raise ValueError(_DECODE_ERRORS[err])
    return out


@nb.njit(cache=True, nogil=True)
def _gather(x, keep, values):
    j = 0
    for i in range(x.size):
        if keep[i]:
            values[j] = x[i]
            j += 1


@nb.njit(cache=True, nogil=True)
def _holds(ints, value):
    for i in range(ints.size):
        if ints[i] == value:
            return True
    return False


_INTS = {4: np.int32, 8: np.int64}


def sparsify(
    x: np.ndarray, mask, *, negative_zeros: bool = False
) -> tuple[np.ndarray, np.ndarray] | tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    flat = x.reshape(-1)
    keep = mask.reshape(-1) if mask is not None else flat != 0
    bits = pack_bits(keep)
    values = np.empty(count_bits(bits, flat.size), dtype=x.dtype)
    _gather(flat, keep, values)
    if not negative_zeros:
        return bits, values
    # -0.0 is the one float whose bits read as the smallest integer of its width.
    ints = flat.view(_INTS[flat.itemsize])
    low = np.iinfo(ints.dtype).min
    return bits, values, pack_bits(ints == low) if _holds(ints, low) else None


@nb.njit(cache=True, nogil=True)
def _scatter(bits, n, values, out):
    j = 0
    for i in range(n):
        if (bits[i >> 3] >> (i & 7)) & 1:
            out[i] = values[j]
            j += 1
        else:
            out[i] = 0


def densify(bits: np.ndarray, n: int, values: np.ndarray, out=None) -> np.ndarray:
    if count_bits(bits, n) != values.size:
        raise ValueError("number of values differs from the number of positions")
    if out is None:
        out = np.empty(n, dtype=values.dtype)
    _scatter(bits, n, values, out)
    return out


@nb.njit(cache=True, nogil=True)
def _crc32c(data, crc, table):
    c = crc ^ 0xFFFFFFFF
    for i in range(data.size):
        c = (c >> 8) ^ table[(c ^ data[i]) & 0xFF]
    return c ^ 0xFFFFFFFF


_CRC_TABLE = np.array(crc32c_table(), dtype=np.int64)


def crc32c(data, crc: int = 0) -> int:
    return int(_crc32c(np.frombuffer(data, dtype=np.uint8), np.int64(crc), _CRC_TABLE))


join_crc32c = _formulas.join_with_crc32c(crc32c)


def golomb_encode_many(items: Sequence[tuple[np.ndarray, int, int]]) -> list[bytes]:
    return _formulas.encode_each(golomb_encode, items)


def golomb_decode_many(items: Sequence[tuple[object, int, int, int]]) -> tuple[list[np.ndarray], int, str]:
    return _formulas.decode_each(golomb_decode, items)


@nb.njit(cache=True, nogil=True)
def _select_bits(bits, ref, n, out):
    j = 0
    for i in range(n):
        if (ref[i >> 3] >> (i & 7)) & 1:
            if (bits[i >> 3] >> (i & 7)) & 1:
                out[j >> 3] |= np.uint8(1 << (j & 7))
            j += 1


def select_bits(bits: np.ndarray, ref: np.ndarray, n: int) -> np.ndarray:
    out = np.zeros((count_bits(ref, n) + 7) // 8, dtype=np.uint8)
    _select_bits(bits, ref, n, out)
    return out


@nb.njit(cache=True, nogil=True)
def _deposit_bits(sub, ref, n, out):
    j = 0
    for i in range(n):
        if (ref[i >> 3] >> (i & 7)) & 1:
            if (sub[j >> 3] >> (j & 7)) & 1:
                out[i >> 3] |= np.uint8(1 << (i & 7))
            j += 1


def deposit_bits(sub: np.ndarray, ref: np.ndarray, n: int) -> np.ndarray:
    out = np.zeros((n + 7) // 8, dtype=np.uint8)
    _deposit_bits(sub, ref, n, out)
    return out


# Entropy-coded values: the algorithm of csrc/ans.cpp (its division by a frequency a division here).
_ANS_ERRORS = {
    1: "entropy-coded values: stream of a bad length",
    2: "entropy-coded values: initial state out of range",
    3: "entropy-coded values: stream ends early",
    4: "entropy-coded values: stream does not end where its symbols do",
    5: "entropy-coded values: non-zero padding bits",
    6: "entropy-coded values: a symbol has no frequency",
    7: "entropy-coded values: raw bits of a bad length",
}


def _split(words: np.ndarray, word_bits: int) -> tuple[np.ndarray, np.ndarray]:
    """(magnitudes as int64, signs as int64) of the words."""
    w = words.astype(np.uint64)
    mag = (w & np.uint64((1 << (word_bits - 1)) - 1)).astype(np.int64)
    return mag, (w >> np.uint64(word_bits - 1)).astype(np.int64)


@nb.njit(cache=True, nogil=True)
def _ans_counts(mag, shift, base, size):
    counts = np.zeros(size, dtype=np.uint64)
    for i in range(mag.size):
        counts[(mag[i] >> shift) - base] += 1
    return counts


def ans_histogram(words: np.ndarray, *, word_bits: int, max_symbols: int) -> tuple[int, int, np.ndarray]:
    if words.size == 0:
        return 0, 0, np.zeros(0, dtype=np.uint64)
    mag, _ = _split(words, word_bits)
    lo, hi = int(mag.min()), int(mag.max())
    shift = 0
    while (hi >> shift) - (lo >> shift) >= max_symbols:
        shift += 1
    return shift, lo >> shift, _ans_counts(mag, shift, lo >> shift, (hi >> shift) - (lo >> shift) + 1)


@nb.njit(cache=True, nogil=True)
def _ans_encode(sym, freqs, prob_bits, lanes, out):
    """The states and the words (from `at` to the end of out); an error code when a symbol has no
    frequency."""
    cum = np.zeros(freqs.size, dtype=np.int64)
    for j in range(1, freqs.size):
        cum[j] = cum[j - 1] + freqs[j - 1]
    x = np.full(lanes, 1 << 15, dtype=np.int64)
    at = out.size
    n = sym.size
    lane = (n - 1) % lanes if n else 0
    for i in range(n - 1, -1, -1):
        s = sym[i]
        if s < 0 or s >= freqs.size or freqs[s] == 0:
            return x, at, 6
        f = np.int64(freqs[s])
        xv = x[lane]
        if xv >= f << (31 - prob_bits):
            at -= 1
            out[at] = xv & 0xFFFF
            xv >>= 16
        x[lane] = ((xv // f) << prob_bits) + xv % f + cum[s]
        lane = lane - 1 if lane else lanes - 1
    return x, at, 0


@nb.njit(cache=True, nogil=True)
def _pack_fields(mag, sign, shift, out):
    """Each word's sign above its low `shift` magnitude bits, (shift + 1) bits a word."""
    width = shift + 1
    low = (np.uint64(1) << np.uint64(shift)) - np.uint64(1) if shift < 64 else ~np.uint64(0)
    acc = np.uint64(0)
    used = 0
    at = 0
    for i in range(mag.size):
        v = (np.uint64(sign[i]) << np.uint64(shift)) | (np.uint64(mag[i]) & low)
        acc |= v << np.uint64(used)
        total = used + width
        if total >= 64:
            for b in range(8):
                out[at + b] = np.uint8((acc >> np.uint64(8 * b)) & np.uint64(0xFF))
            at += 8
            acc = v >> np.uint64(64 - used) if used else np.uint64(0)
            used = total - 64
        else:
            used = total
    for b in range((used + 7) // 8):
        out[at + b] = np.uint8((acc >> np.uint64(8 * b)) & np.uint64(0xFF))


def ans_encode(words: np.ndarray, *, word_bits: int, shift: int, base: int, freqs: np.ndarray, prob_bits: int,
               lanes: int) -> tuple[bytes, bytes]:
    mag, sign = _split(words, word_bits)
    out = np.empty(words.size, dtype="<u2")
    x, at, err = _ans_encode((mag >> shift) - base, freqs.astype(np.int64), prob_bits, lanes, out)
    if err:
        raise ValueError(_ANS_ERRORS[err])
    raw = np.zeros((words.size * (shift + 1) + 7) // 8 + 8, dtype=np.uint8)
    _pack_fields(mag, sign, shift, raw)
    return x.astype("<u4").tobytes() + out[at:].tobytes(), raw[: raw.size - 8].tobytes()


@nb.njit(cache=True, nogil=True)
def _ans_decode(states, feed, raw, n, word_bits, shift, base, freqs, prob_bits, out):
    lanes = states.size
    x = states.astype(np.int64)
    for j in range(lanes):
        if x[j] < (1 << 15) or x[j] >= (1 << 31):
            return 2
    total = 1 << prob_bits
    slot_symbol = np.empty(total, dtype=np.int64)
    cum = np.zeros(freqs.size, dtype=np.int64)
    c = 0
    for s in range(freqs.size):
        cum[s] = c
        for t in range(freqs[s]):
            slot_symbol[c + t] = s
        c += freqs[s]
    width = shift + 1
    low = (np.uint64(1) << np.uint64(shift)) - np.uint64(1)
    at = 0
    lane = 0
    for i in range(n):
        xv = x[lane]
        slot = xv & (total - 1)
        s = slot_symbol[slot]
        xv = freqs[s] * (xv >> prob_bits) + slot - cum[s]
        if xv < (1 << 15):
            if at == feed.size:
                return 3
            xv = (xv << 16) | np.int64(feed[at])
            at += 1
        x[lane] = xv
        lane = lane + 1 if lane + 1 < lanes else 0
        bit = i * width
        field = np.uint64(0)
        for b in range(width):  # bit by bit: a field may straddle 9 bytes
            p = bit + b
            field |= np.uint64((raw[p >> 3] >> (p & 7)) & 1) << np.uint64(b)
        mag = (np.uint64(base + s) << np.uint64(shift)) | (field & low)
        out[i] = mag | (((field >> np.uint64(shift)) & np.uint64(1)) << np.uint64(word_bits - 1))
    if at != feed.size:
        return 4
    for j in range(lanes):
        if x[j] != (1 << 15):
            return 4
    return 0


def ans_decode(stream: Buffer, raw: Buffer, n: int, *, word_bits: int, shift: int, base: int, freqs: np.ndarray,
               prob_bits: int, lanes: int) -> np.ndarray:
    data = np.frombuffer(memoryview(stream), dtype=np.uint8)
    r = np.frombuffer(memoryview(raw), dtype=np.uint8)
    if data.size < 4 * lanes or (data.size - 4 * lanes) % 2:
        raise ValueError(_ANS_ERRORS[1])
    if r.size != (n * (shift + 1) + 7) // 8:
        raise ValueError(_ANS_ERRORS[7])
    if (n * (shift + 1)) % 8 and r[-1] >> ((n * (shift + 1)) % 8):
        raise ValueError(_ANS_ERRORS[5])
    out = np.empty(n, dtype=np.uint64)
    states = data[: 4 * lanes].view("<u4").astype(np.int64)  # copies: the views may be unaligned
    feed = data[4 * lanes :].view("<u2").astype(np.int64)
    err = _ans_decode(states, feed, r, n, word_bits, shift, base,
                      freqs.astype(np.int64), prob_bits, out)
    if err:
        raise ValueError(_ANS_ERRORS[err])
    return out.astype(_formulas.word_dtype(word_bits))


def ans_encode_many(items: Sequence[tuple[np.ndarray, AnsModel]]) -> list[tuple[bytes, bytes]]:
    return _formulas.ans_each(ans_encode, items)


def ans_decode_many(items: Sequence[tuple[Buffer, Buffer, int, AnsModel]]) -> tuple[list[np.ndarray], int, str]:
    return _formulas.ans_decode_each(ans_decode, items)
