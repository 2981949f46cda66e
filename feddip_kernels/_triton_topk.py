"""Global top-k of |w| over a list of float32 tensors on a CUDA device, as a radix select in Triton:
the k-th largest magnitude is found on the bit patterns of |w| (non-negative floats order as
their bits do) by a histogram pass over all tensors per digit (by default bits 30-20, 19-9 and
8-0; each pass counts only the elements whose higher bits match the bucket chosen so far), then
one pass writes the masks. The list is never copied or concatenated: kernels read the tensors through a
table of their addresses, a program one block of one tensor, as _triton_kernels steps layers.

Launches: a pass and a one-program selection per digit, then the masks, recorded once per
list of tensors (their addresses and sizes) as a CUDA graph and replayed afterwards; one small
copy to the host (the largest key, for NaN, and the ties at the threshold) is the only wait.
Ties at the threshold beyond the k-th (rare on trained weights) go to the exact torch path
(_torch_kernels.torch_topk_masks: list order), so results equal the host's. The device kernels
(_torch_kernels.topk_masks, magnitude_threshold) take this path where it applies (radix_select).
Importing this module needs Triton (_backend.triton_topk() imports it where it can);
TRITON_INTERPRET=1 runs it on CPU tensors (the tests)."""

from __future__ import annotations

import re
from collections import OrderedDict
from typing import Any, Optional, Sequence

import torch
import triton
import triton.language as tl
from torch._utils import _unflatten_dense_tensors

BLOCK = 4096  # elements a program reads in a pass
_PLANS = 16  # lists of tensors whose tables and graph are kept (least recently used goes first)
_INF_KEY = 0x7F800000  # bits of +inf: a larger key is a NaN
# The digits of a 31-bit key (the sign bit is cleared), most significant first: fewer passes with
# wider digits, or cheaper per-block histograms with narrower ones.
DIGIT_BITS = (11, 11, 9)


def _digits(widths: tuple[int, ...]) -> list[tuple[int, int]]:
    """(shift, bits) of each digit."""
    out, shift = [], 31
    for bits in widths:
        shift -= bits
        out.append((shift, bits))
    assert shift == 0, "the digits must cover the 31 bits"
    return out
# sel: [0] largest key (NaN check), [1] k still to find in the bucket, [2] the key's digits so far,
# [3] elements equal to the threshold key.
_SEL = 4


@triton.jit
def _hist_kernel(ptrs, sizes, block_tensor, block_start, hist, sel, SHIFT: tl.constexpr, BITS: tl.constexpr,
                 FIRST: tl.constexpr, BLOCK: tl.constexpr):
    """Counts the BITS-bit digit at SHIFT of |w|'s bits over one block, of the elements whose
    higher digits are sel[2] (all of them in the first pass, which also keeps the largest key)."""
    pid = tl.program_id(0)
    t = tl.load(block_tensor + pid)
    offs = tl.load(block_start + pid) + tl.arange(0, BLOCK).to(tl.int64)
    valid = offs < tl.load(sizes + t)
    key = tl.load(tl.load(ptrs + t).to(tl.pointer_type(tl.int32)) + offs, mask=valid, other=0) & 0x7FFFFFFF
    if FIRST:
        take = valid
        tl.atomic_max(sel, tl.max(key, axis=0).to(tl.int64))
    else:
        take = valid & ((key >> (SHIFT + BITS)).to(tl.int64) == tl.load(sel + 2))
    h = tl.histogram((key >> SHIFT) & ((1 << BITS) - 1), 1 << BITS, mask=take)
    bins = tl.arange(0, 1 << BITS)
    tl.atomic_add(hist + bins, h.to(tl.int64), mask=h > 0)  # most bins of a block are empty


@triton.jit
def _select_kernel(hist, sel, BITS: tl.constexpr, LAST: tl.constexpr):
    """The bucket of the k-th largest key among those counted: the lowest bin with fewer than k
    counted above it; k becomes the rank within that bucket, and the bin is appended to the key."""
    bins = tl.arange(0, 1 << BITS)
    h = tl.load(hist + bins)
    above = tl.cumsum(h, axis=0, reverse=True) - h  # counted in higher bins
    k = tl.load(sel + 1)
    b = tl.min(tl.where(above < k, bins, 1 << BITS), axis=0)
    tl.store(sel + 1, k - tl.sum(tl.where(bins == b, above, 0), axis=0))
    tl.store(sel + 2, (tl.load(sel + 2) << BITS) | b.to(tl.int64))
    if LAST:
        tl.store(sel + 3, tl.sum(tl.where(bins == b, h, 0), axis=0))


@triton.jit
def _mask_kernel(ptrs, sizes, block_tensor, block_start, out_start, keep, sel, BLOCK: tl.constexpr):
    """keep = |w| >= the threshold, written at each tensor's place in one flat mask."""
    pid = tl.program_id(0)
    t = tl.load(block_tensor + pid)
    offs = tl.load(block_start + pid) + tl.arange(0, BLOCK).to(tl.int64)
    valid = offs < tl.load(sizes + t)
    key = tl.load(tl.load(ptrs + t).to(tl.pointer_type(tl.int32)) + offs, mask=valid, other=0) & 0x7FFFFFFF
    tl.store(keep + tl.load(out_start + t) + offs, (key.to(tl.int64) >= tl.load(sel + 2)).to(tl.int8), mask=valid)


def usable(tensors: Sequence[torch.Tensor]) -> bool:
    """Whether the radix select takes this list: contiguous float32 tensors on one CUDA device (CPU
    tensors under TRITON_INTERPRET=1), some elements, and fewer than 2^31 in all, with a Triton
    that has what the kernels use (a masked tl.histogram, from 3.4; older ones: torch operations)."""
    if not tensors or not TRITON_OK:
        return False
    device = tensors[0].device
    interpreted = device.type == "cpu" and _interpreted()
    return ((device.type == "cuda" or interpreted)
            and all(t.dtype == torch.float32 and t.device == device and t.is_contiguous() for t in tensors)
            and 0 < sum(t.numel() for t in tensors) < 1 << 31)


def _triton_at_least(major: int, minor: int) -> bool:
    """Whether Triton's version (e.g. "3.6.0", "3.4.0+git1234") is at least major.minor."""
    digits = re.match(r"(\d+)\.(\d+)", triton.__version__)
    return digits is not None and (int(digits[1]), int(digits[2])) >= (major, minor)


# tl.histogram's mask argument came with Triton 3.4 (torch 2.8); torch 2.1-2.7 ship older ones.
TRITON_OK = _triton_at_least(3, 4)


def _interpreted() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET") == "1"


class _Plan:
    """One list of tensors (by address and size) as the kernels read it: the block table, the
    histogram and selection buffers, a flat mask it writes, and the recorded graph."""

    def __init__(self, tensors: Sequence[torch.Tensor]) -> None:
        self.device = tensors[0].device
        sizes = [t.numel() for t in tensors]
        counts = [-(-n // BLOCK) for n in sizes]
        starts, acc = [], 0
        for n in sizes:
            starts.append(acc)
            acc += n
        self.n = acc

        def table(values: list[int]) -> torch.Tensor:
            host = torch.tensor(values, dtype=torch.int64)
            return (host.pin_memory() if self.device.type == "cuda" else host).to(self.device, non_blocking=True)

        self.ptrs = table([t.data_ptr() for t in tensors])
        self.sizes = table(sizes)
        self.block_tensor = table([i for i, c in enumerate(counts) for _ in range(c)])
        self.block_start = table([j * BLOCK for c in counts for j in range(c)])
        self.out_start = table(starts)
        self.blocks = sum(counts)
        self.digits = _digits(DIGIT_BITS)
        self.hist = torch.zeros(sum(1 << bits for _, bits in self.digits), dtype=torch.int64, device=self.device)
        self.sel = torch.zeros(_SEL, dtype=torch.int64, device=self.device)
        self.sel_init = torch.zeros(_SEL, dtype=torch.int64, device=self.device)  # k is written here
        self.keep = torch.empty(self.n, dtype=torch.bool, device=self.device)
        self.graph: Optional[Any] = None
        self.graph_error: Optional[str] = None  # why recording failed, if it did (then launched each call)
        self.runs = 0

    def _launch(self, masks: bool) -> None:
        self.hist.zero_()
        self.sel.copy_(self.sel_init)
        at = 0
        for i, (shift, bits) in enumerate(self.digits):
            hist = self.hist[at : at + (1 << bits)]
            at += 1 << bits
            _hist_kernel[(self.blocks,)](self.ptrs, self.sizes, self.block_tensor, self.block_start, hist, self.sel,
                                         SHIFT=shift, BITS=bits, FIRST=i == 0, BLOCK=BLOCK)
            _select_kernel[(1,)](hist, self.sel, BITS=bits, LAST=i == len(self.digits) - 1)
        if masks:
            _mask_kernel[(self.blocks,)](self.ptrs, self.sizes, self.block_tensor, self.block_start, self.out_start,
                                         self.keep, self.sel, BLOCK=BLOCK)

    def run(self, k: int) -> tuple[int, int, int, int]:
        """Selects the k-th largest key (1 <= k <= n) and writes `keep` (|w| >= it); returns
        (largest key, threshold key, elements equal to it still needed, elements equal to it)."""
        self.sel_init[1].fill_(k)
        if self.graph is not None:
            self.graph.replay()
        else:
            self._launch(masks=True)
            self.runs += 1
            if self.device.type == "cuda" and self.graph_error is None and self.runs >= 2:
                self._record()
        peak, need, tau, ties = self.sel.tolist()  # the one wait
        return peak, tau, need, ties

    def _record(self) -> None:
        """Records the launches as a CUDA graph on a side stream (the kernels compiled by now)."""
        try:
            graph = torch.cuda.CUDAGraph()
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                graph.capture_begin(capture_error_mode="thread_local")
                try:
                    self._launch(masks=True)  # recorded, not run
                finally:
                    graph.capture_end()
            torch.cuda.current_stream(self.device).wait_stream(side)
            self.graph = graph
        except Exception as e:  # noqa: BLE001 - the launches work without a graph, only slower
            self.graph_error = f"{type(e).__name__}: {e}"


_plans: "OrderedDict[tuple, _Plan]" = OrderedDict()


def _plan(tensors: Sequence[torch.Tensor]) -> _Plan:
    """The plan of this list: kept by address and size, so a model's weights stepped in place
    replay one graph (a new tensor at the same place with the same size reads as this one)."""
    key = (BLOCK, DIGIT_BITS, tensors[0].device, tuple((t.data_ptr(), t.numel()) for t in tensors))
    plan = _plans.get(key)
    if plan is None:
        plan = _plans[key] = _Plan(tensors)
        while len(_plans) > _PLANS:
            _plans.popitem(last=False)
    _plans.move_to_end(key)
    return plan


def _no_nan(peak: int) -> None:
    if peak > _INF_KEY:
        raise ValueError("input contains NaN")  # as every backend says it


def _float(key: int) -> float:
    return float(torch.tensor([key], dtype=torch.int32).view(torch.float32))


def magnitude_threshold(tensors: Sequence[torch.Tensor], k: int) -> float:
    """The k-th largest |w| (1 <= k <= n)."""
    plan = _plan(tensors)
    peak, tau, _, _ = plan.run(k)
    _no_nan(peak)
    return _float(tau)


def topk_masks(tensors: Sequence[torch.Tensor], k: int) -> Optional[list[torch.Tensor]]:
    """Masks keeping exactly the k largest |w| (1 <= k <= n) as views into one new flat mask, or
    None where more elements equal the threshold than are needed (the caller's exact path, which
    takes ties in list order)."""
    plan = _plan(tensors)
    peak, _, need, ties = plan.run(k)
    _no_nan(peak)
    if ties != need:
        return None
    keep = plan.keep.clone()  # the plan's mask is written again by the next call
    return list(_unflatten_dense_tensors(keep, list(tensors)))
