"""What the two Python backends (reference, Numba) share: the CRC-32C table and the Golomb
parameter (the C++ core's formulas too), and the sequential form of the Golomb *_many kernels.
Plain Python, no backend of its own."""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence


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
