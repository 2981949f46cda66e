"""What the two Python backends (reference, Numba) share: the CRC-32C table, the Golomb
parameter and rANS's constants (the C++ core's formulas too), and the sequential forms of the
*_many kernels. No backend of its own."""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import numpy as np


def crc32c_table() -> list[int]:
    """The 256-entry table of the reflected Castagnoli polynomial 0x82F63B78."""
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ (0x82F63B78 if c & 1 else 0)
        table.append(c)
    return table


def golomb_parameter(nnz: int, n: int) -> int:
    """Golomb parameter for i.i.d. positions of density nnz / n: ceil(log(2 - p) / -log(1 - p))."""
    if nnz == 0 or nnz >= n:
        return 1
    theta = 1.0 - nnz / n
    m = math.ceil(math.log(1.0 + theta) / -math.log(theta))
    return max(1, min(m, 1 << 31))


def encode_each(encode: Callable[..., bytes], items: Sequence[tuple[Any, int, int]]) -> list[bytes]:
    """golomb_encode_many, one item after another."""
    return [bytes(encode(bits, n, m)) for bits, n, m in items]


def decode_each(decode: Callable[..., Any], items: Sequence[tuple[Any, int, int, int]]) -> tuple[list[Any], int, str]:
    """golomb_decode_many, one item after another, stopping at the first failure."""
    out = []
    for i, (data, n, nnz, m) in enumerate(items):
        try:
            out.append(decode(data, n, nnz, m))
        except ValueError as e:
            return out, i, str(e)
    return out, -1, ""


def layer_by_layer(step: Callable[..., float]) -> Callable[..., list[float]]:
    """The kernel masked_ef_step_many of a Python backend: its masked_ef_step on each layer in turn."""

    def masked_ef_step_many(ws, gs, masks, *, momentum_buffers, pruned_outs, lr, weight_decay, lam, momentum, p, norms,
                            mask_packed=False):
        return [step(w, g, m, momentum_buffer=b, pruned_out=o, lr=lr, weight_decay=weight_decay, lam=lam,
                     momentum=momentum, p=p, norm=nm, mask_packed=mask_packed and m is not None)
                for w, g, m, b, o, nm in zip(ws, gs, masks, momentum_buffers, pruned_outs, norms)]

    return masked_ef_step_many


def join_with_crc32c(crc32c: Callable[..., int]) -> Callable[[Sequence[Any]], bytes]:
    """The kernel join_crc32c of a Python backend, from its crc32c."""

    def join_crc32c(parts: Sequence[Any]) -> bytes:
        body = b"".join(parts)
        return body + crc32c(body).to_bytes(4, "little")

    return join_crc32c


# rANS of values (docs/wire-format.md, "Entropy-coded values"): states live in [ANS_LOW, 2^31)
# and move 16 bits at a time, so one word in or out a symbol suffices, and the encoder's
# division by a frequency may be a multiplication by its reciprocal (exact below 2^31).
ANS_LOW = 1 << 15
ANS_MAX_PROB_BITS = 15
ANS_MAX_LANES = 32


def word_dtype(word_bits: int) -> np.dtype:
    """The narrowest unsigned dtype that holds words of word_bits bits (1..64)."""
    return np.dtype(np.uint8 if word_bits <= 8 else np.uint16 if word_bits <= 16 else
                    np.uint32 if word_bits <= 32 else np.uint64)


def ans_cumulative(freqs: np.ndarray) -> np.ndarray:
    """The symbols' starts in [0, 2^prob_bits): cum[j] = freqs[0] + ... + freqs[j - 1]."""
    cum = np.zeros(freqs.size + 1, dtype=np.int64)
    np.cumsum(freqs, out=cum[1:])
    return cum[:-1]


def ans_each(encode: Callable[..., Any], items: Sequence[tuple[Any, Any]]) -> list[Any]:
    """ans_encode_many, one item after another."""
    return [encode(words, **model._asdict()) for words, model in items]


def ans_decode_each(decode: Callable[..., Any],
                    items: Sequence[tuple[Any, Any, int, Any]]) -> tuple[list[Any], int, str]:
    """ans_decode_many, one item after another, stopping at the first failure."""
    out = []
    for i, (stream, raw, n, model) in enumerate(items):
        try:
            out.append(decode(stream, raw, n, **model._asdict()))
        except ValueError as e:
            return out, i, str(e)
    return out, -1, ""
