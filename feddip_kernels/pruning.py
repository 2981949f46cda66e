"""Global magnitude pruning: exact top-k by |w| over a list of tensors, ERK layer densities, and
packed masks.

Selection rule (all backends): the k elements with the largest |w| over the whole list are kept.
Ties at the threshold are broken by position in list order (tensor index, then C-order flat index):
earlier elements win. Exactly k elements are selected, always. +0.0 and -0.0 tie, +-inf are the
largest magnitudes, and any NaN raises ValueError (a NaN weight means training diverged; no mask is
meaningful then).
"""

from __future__ import annotations

import math
from typing import Any, Collection, Optional, Sequence

import numpy as np

from . import _backend
from ._arrays import as_array, block_views, contiguous, flat_mask, float_tensors, like_input, on_device


def k_for_density(n: int, density: float) -> int:
    """Number of kept elements for a density in [0, 1]: round half up of density * n."""
    if not 0.0 <= density <= 1.0 or math.isnan(density):
        raise ValueError(f"density must be in [0, 1], got {density}")
    return min(n, int(math.floor(density * n + 0.5)))


def _check_k(k: Any, n: int) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise TypeError(f"k must be an integer, got {type(k).__name__}")
    k = int(k)
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    if k > n:
        raise ValueError(f"k = {k} exceeds the number of elements ({n})")
    return k


def _radix_select(tensors: list[Any], k: int) -> Any:
    """The Triton radix select (_triton_topk) where it takes these device tensors and 0 < k < n,
    else None (torch operations: float64, other devices, no Triton, k = 0 or all)."""
    global _triton_topk
    if _triton_topk is None:
        try:
            from . import _triton_topk as module
        except ImportError:
            module = False
        _triton_topk = module
    if not _triton_topk or not 0 < k < sum(t.numel() for t in tensors) or not _triton_topk.usable(tensors):
        return None
    return _triton_topk


_triton_topk: Any = None  # the module, False where Triton does not import, None until first asked


def global_magnitude_threshold(tensors: Sequence[Any], k: int, *, backend: str = "auto") -> float:
    """The k-th largest |w| over all elements of `tensors` (float32 or float64, one dtype).

    Returns +inf for k = 0. The list is never concatenated: the native backend selects on the bit
    patterns of |w|, from 2^20 elements in one pass over memory (a sample brackets the k-th
    magnitude, the pass counts what lies above the bracket and gathers what lies inside); on
    heavily tied data, radix passes. Tensors on a CUDA device are handled there: float32 by a
    radix select in Triton over the list (_triton_topk: three counting passes, replayed as one
    CUDA graph), else torch operations on one flat copy of |w|; `backend` does not apply.
    """
    if on_device(*tensors):
        from . import _torch_kernels

        tensors = list(tensors)
        k = _check_k(k, sum(t.numel() for t in tensors))
        radix = _radix_select(tensors, k)
        if radix is not None:
            return radix.magnitude_threshold(tensors, k)
        return _torch_kernels.magnitude_threshold(tensors, k)
    arrays = float_tensors(tensors)
    k = _check_k(k, sum(a.size for a in arrays))
    return _backend.kernels(backend).magnitude_threshold(arrays, k)


def max_magnitude(tensors: Sequence[Any], *, backend: str = "auto") -> float:
    """The largest |w| over all elements of `tensors` (float32 or float64, one dtype); 0.0 for no
    elements, and NaN raises ValueError as in the top-k functions. One streaming read of the
    tensors: the memory roofline the benchmarks hold the top-k threshold against."""
    if on_device(*tensors):
        from . import _torch_kernels

        return _torch_kernels.max_magnitude(list(tensors))
    return _backend.kernels(backend).max_magnitude(float_tensors(tensors))


def global_topk_masks(
    tensors: Sequence[Any],
    k: Optional[int] = None,
    *,
    density: Optional[float] = None,
    backend: str = "auto",
) -> list[Any]:
    """Boolean masks (same shapes as `tensors`) keeping exactly the k globally largest |w|.

    Give either `k` or `density` (k = round(density * n)). Masks are NumPy bool arrays, or torch
    bool tensors sharing their memory when the inputs are torch tensors, views into one block
    (_arrays.block_views). Masks of tensors on a CUDA device
    are computed there and stay there (as global_magnitude_threshold; `backend` does not apply).
    """
    if (k is None) == (density is None):
        raise ValueError("give exactly one of k and density")
    if on_device(*tensors):
        from . import _torch_kernels

        tensors = list(tensors)
        n = sum(t.numel() for t in tensors)
        k = k_for_density(n, density) if density is not None else _check_k(k, n)
        radix = _radix_select(tensors, k)
        masks = radix.topk_masks(tensors, k) if radix is not None else None
        return masks if masks is not None else _torch_kernels.topk_masks(tensors, k)
    arrays = float_tensors(tensors)
    n = sum(a.size for a in arrays)
    k = k_for_density(n, density) if density is not None else _check_k(k, n)
    masks = block_views([(a.shape, np.dtype(bool)) for a in arrays])
    _backend.kernels(backend).topk_masks(arrays, masks, k)
    return [like_input(m, t) for m, t in zip(masks, tensors)]


def pack_mask(mask: Any, *, backend: str = "auto") -> np.ndarray:
    """Pack a mask (any shape, flattened in C order) into bits, little-endian bit order: element i
    is bit i % 8 of byte i // 8, as np.packbits(..., bitorder="little"). Unused bits are zero."""
    return _backend.kernels(backend).pack_bits(flat_mask(mask))


def unpack_mask(bits: Any, shape: Sequence[int] | int, *, backend: str = "auto") -> np.ndarray:
    """Inverse of pack_mask: a bool array of `shape` from its packed bits."""
    shape = (int(shape),) if isinstance(shape, (int, np.integer)) else tuple(int(s) for s in shape)
    if any(s < 0 for s in shape):
        raise ValueError(f"shape must be non-negative, got {shape}")
    n = math.prod(shape)
    b = contiguous(as_array(bits, "bits")).reshape(-1).view(np.uint8)
    if b.size < (n + 7) // 8:
        raise ValueError(f"packed mask holds {b.size} bytes, {(n + 7) // 8} needed for shape {shape}")
    return _backend.kernels(backend).unpack_bits(b, n).reshape(shape)


def erk_densities(
    shapes: Sequence[Sequence[int]], density: float, *, dense: Collection[int] = ()
) -> list[float]:
    """Per-layer densities by Erdos-Renyi-Kernel for an overall `density` of the listed layers.

    Layer l gets density eps * raw_l with raw_l = sum(shape_l) / prod(shape_l), one eps for all
    layers, chosen so that sum(density_l * size_l) = density * sum(size_l). Layers where that
    exceeds 1, and the layer indices in `dense`, are kept dense and eps is solved again for the rest.
    """
    if not 0.0 <= density <= 1.0 or math.isnan(density):
        raise ValueError(f"density must be in [0, 1], got {density}")
    sizes = [math.prod(int(d) for d in s) for s in shapes]
    raw = [sum(int(d) for d in s) / n if n else 0.0 for s, n in zip(shapes, sizes)]
    bad = [i for i in dense if not 0 <= i < len(shapes)]
    if bad:
        raise ValueError(f"dense layer indices {bad} out of range for {len(shapes)} layers")
    is_dense = [i in set(dense) or sizes[i] == 0 for i in range(len(shapes))]
    budget = density * sum(sizes)
    while True:
        rest = budget - sum(n for n, d in zip(sizes, is_dense) if d)
        if rest < -1e-9 * max(1, budget):
            raise ValueError(f"the dense layers alone exceed density {density}")
        weight = sum(r * n for r, n, d in zip(raw, sizes, is_dense) if not d)
        eps = max(rest, 0.0) / weight if weight > 0 else 0.0
        over = [i for i in range(len(shapes)) if not is_dense[i] and eps * raw[i] > 1.0]
        if not over:
            return [1.0 if d else eps * r for r, d in zip(raw, is_dense)]
        for i in over:
            is_dense[i] = True
