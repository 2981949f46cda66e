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
from typing import Any, Collection, Iterator, Optional, Sequence, cast

import numpy as np

from . import _backend
from ._arrays import as_array, block_views, contiguous, flat_mask, float_tensors, like_input


def k_for_density(n: int, density: float) -> int:
    """Number of kept elements for a density in [0, 1]: round half up of density * n.

    Parameters
    ----------
    n : number of elements.
    density : fraction kept, in [0, 1].

    Returns
    -------
    int : min(n, floor(density * n + 0.5)).

    Raises
    ------
    ValueError : density outside [0, 1] or NaN.
    """
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


def global_magnitude_threshold(tensors: Sequence[Any], k: int, *, backend: str = "auto") -> float:
    """The k-th largest |w| over all elements of `tensors` (float32 or float64, one dtype).

    Returns +inf for k = 0. The list is never concatenated: the native backend selects on the bit
    patterns of |w|, from 2^20 elements in one pass over memory (a sample brackets the k-th
    magnitude, the pass counts what lies above the bracket and gathers what lies inside); on
    heavily tied data, radix passes. Tensors on a CUDA device are handled there (the device
    kernels): float32 by a radix select in Triton over the list (_triton_topk: three counting
    passes, replayed as one CUDA graph), else torch operations on one flat copy of |w|; `backend`
    does not apply.

    Parameters
    ----------
    tensors : NumPy arrays or torch tensors (any shapes), float32 or float64, one dtype.
    k : rank of the magnitude returned, 0 <= k <= the number of elements.
    backend : "auto", "native", "numba" or "numpy" (host arrays).

    Returns
    -------
    float : the k-th largest |w| (+inf for k = 0).

    Raises
    ------
    TypeError : k not an integer, or tensors of another or mixed dtypes.
    ValueError : k out of range, NaN in the tensors, or an unknown backend.
    """
    kernels, arrays = _kernels_and_tensors(tensors, backend)
    return kernels.magnitude_threshold(arrays, _check_k(k, _size(arrays)))


def max_magnitude(tensors: Sequence[Any], *, backend: str = "auto") -> float:
    """The largest |w| over all elements of `tensors` (float32 or float64, one dtype); 0.0 for no
    elements, and NaN raises ValueError as in the top-k functions. One streaming read of the
    tensors: the memory roofline the benchmarks hold the top-k threshold against.

    Parameters
    ----------
    tensors : NumPy arrays or torch tensors, float32 or float64, one dtype.
    backend : "auto", "native", "numba" or "numpy" (host arrays).

    Returns
    -------
    float : max |w| (0.0 for no elements).

    Raises
    ------
    TypeError : tensors of another or mixed dtypes.
    ValueError : NaN in the tensors, or an unknown backend.
    """
    kernels, arrays = _kernels_and_tensors(tensors, backend)
    return kernels.max_magnitude(arrays)


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
    Ties at the threshold are kept in list order (tensor index, then flat index).

    Parameters
    ----------
    tensors : NumPy arrays or torch tensors, float32 or float64, one dtype.
    k : elements kept, 0 <= k <= n (or `density`).
    density : fraction kept, in [0, 1] (or `k`).
    backend : "auto", "native", "numba" or "numpy" (host arrays).

    Returns
    -------
    list : one bool mask a tensor, of its shape, with exactly k set in all.

    Raises
    ------
    TypeError : k not an integer, or tensors of another or mixed dtypes.
    ValueError : neither or both of k and density, either out of range, NaN in the tensors, or an
        unknown backend.
    """
    if (k is None) == (density is None):
        raise ValueError("give exactly one of k and density")
    tensors = list(tensors) if isinstance(tensors, Iterator) else tensors  # read once, here
    kernels, arrays = _kernels_and_tensors(tensors, backend)
    n = _size(arrays)
    k = k_for_density(n, density) if density is not None else _check_k(k, n)
    if _backend.is_device(kernels):
        return kernels.topk_masks(arrays, k)  # new masks on the device
    masks = cast("list[np.ndarray]", block_views([(a.shape, np.dtype(bool)) for a in arrays]))  # no None spec
    kernels.topk_masks(arrays, masks, k)
    return [like_input(m, t) for m, t in zip(masks, tensors)]


def _kernels_and_tensors(tensors: Sequence[Any], backend: str) -> tuple[Any, list[Any]]:
    """The kernels for these tensors (_backend.kernels_for) and the tensors checked for them: the
    top-k functions' one validator (float_tensors)."""
    if isinstance(tensors, Iterator):  # read once, here
        tensors = list(tensors)
    iterable = hasattr(tensors, "__iter__")  # else float_tensors says what it needs
    kernels = _backend.kernels_for(*tensors, backend=backend) if iterable else _backend.kernels(backend)
    return kernels, float_tensors(tensors, device=_backend.is_device(kernels))


def _size(arrays: Sequence[Any]) -> int:
    return sum(a.size if isinstance(a, np.ndarray) else a.numel() for a in arrays)


def pack_mask(mask: Any, *, backend: str = "auto") -> np.ndarray:
    """Pack a mask (any shape, flattened in C order) into bits, little-endian bit order: element i
    is bit i % 8 of byte i // 8, as np.packbits(..., bitorder="little"). Unused bits are zero.

    Parameters
    ----------
    mask : bool array or tensor (non-zero = set), any shape.
    backend : "auto", "native", "numba" or "numpy".

    Returns
    -------
    numpy.ndarray : uint8, ceil(n / 8) bytes.
    """
    return _backend.kernels(backend).pack_bits(flat_mask(mask))


def unpack_mask(bits: Any, shape: Sequence[int] | int, *, backend: str = "auto") -> np.ndarray:
    """Inverse of pack_mask: a bool array of `shape` from its packed bits.

    Parameters
    ----------
    bits : packed bits (uint8 array or buffer), at least ceil(n / 8) bytes.
    shape : shape of the mask (or its length).
    backend : "auto", "native", "numba" or "numpy".

    Returns
    -------
    numpy.ndarray : bool, of `shape`.

    Raises
    ------
    ValueError : a negative dimension, or too few bytes for the shape.
    """
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

    Parameters
    ----------
    shapes : each layer's shape.
    density : the overall density, in [0, 1].
    dense : indices of layers kept dense.

    Returns
    -------
    list[float] : each layer's density, in [0, 1].

    Raises
    ------
    ValueError : density out of range, an index in `dense` out of range, or dense layers that alone
        exceed the density.
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
