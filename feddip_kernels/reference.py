"""NumPy reference implementations: short, obviously correct, and the ground truth every other
backend is tested against. They concatenate and sort, so they are slow and memory hungry."""

from __future__ import annotations

import math

import numpy as np


def _magnitudes(tensors: list[np.ndarray]) -> np.ndarray:
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


def magnitude_threshold(tensors: list[np.ndarray], k: int) -> float:
    mags = _magnitudes(tensors)
    _check_k(k, mags.size)
    if k == 0:
        return math.inf
    return float(-np.sort(-mags)[k - 1])


def topk_masks(tensors: list[np.ndarray], k: int) -> list[np.ndarray]:
    flat = np.zeros(sum(t.size for t in tensors), dtype=bool)
    flat[topk_order(tensors, k)] = True
    masks, start = [], 0
    for t in tensors:
        masks.append(flat[start : start + t.size].reshape(t.shape))
        start += t.size
    return masks


def pack_bits(mask: np.ndarray) -> np.ndarray:
    return np.packbits(np.asarray(mask, dtype=bool).ravel(), bitorder="little")


def unpack_bits(bits: np.ndarray, n: int) -> np.ndarray:
    return np.unpackbits(bits, count=n, bitorder="little").astype(bool)
