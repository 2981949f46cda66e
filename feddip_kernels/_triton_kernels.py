"""FedDIPSGD's step on a CUDA device as one Triton kernel over all layers of a parameter group, as
torch's fused multi-tensor optimisers step all parameters in one launch: a step of L layers is two
launches (the update, then a small one that adds up each layer's norm), not L or more, replayed
as one CUDA graph from a table's second step on, and nothing waits for the device.

Layers travel as tables of raw addresses on the device; a program updates BLOCK elements of one
layer (w, g and m read once; w, the momentum buffer and the pruned copy w * m written once) and
leaves the block's share of ||w * m||_p^p, which the second launch adds up per layer in a fixed
order, so the norms do not depend on scheduling. Same arithmetic as _torch_kernels.ef_step (the
regulariser in float64); layers without a mask get plain SGD. Importing this module needs Triton
(_backend.triton_step() imports it where it can); TRITON_INTERPRET=1 runs it on CPU tensors (the
tests)."""

from __future__ import annotations

import os
from typing import Any, Optional, Sequence

import torch
import triton
import triton.language as tl

BLOCK = 2048  # elements a program updates
_REDUCE = 256  # partial sums a norm program adds at a time
_DOUBLE_MAX: tl.constexpr = tl.constexpr(1.7976931348623157e308)


@triton.jit
def _step_kernel(w_tab, g_tab, m_tab, b_tab, o_tab, sizes, block_layer, block_start, hp, norms, partials,
                 DTYPE: tl.constexpr, P: tl.constexpr, HAS_BUF: tl.constexpr, NORM_ONLY: tl.constexpr,
                 BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    layer = tl.load(block_layer + pid)
    offs = tl.load(block_start + pid) + tl.arange(0, BLOCK).to(tl.int64)
    valid = offs < tl.load(sizes + layer)
    w_ptr = tl.load(w_tab + layer).to(tl.pointer_type(DTYPE))
    m_addr = tl.load(m_tab + layer)
    masked = m_addr != 0  # a layer without a mask: plain SGD, no pruned copy
    keep = tl.load(m_addr.to(tl.pointer_type(tl.int8)) + offs, mask=valid & masked, other=1)
    mf = (keep != 0).to(DTYPE)
    w = tl.load(w_ptr + offs, mask=valid, other=0.0)
    if not NORM_ONLY:
        g = tl.load(tl.load(g_tab + layer).to(tl.pointer_type(DTYPE)) + offs, mask=valid, other=0.0)
        lr, wd, lam, mu = tl.load(hp), tl.load(hp + 1), tl.load(hp + 2), tl.load(hp + 3)
        if P == 2:
            n = tl.load(norms + layer)
            scale = tl.where(masked & (n > 0) & (n <= _DOUBLE_MAX), lam / n, 0.0)  # NaN fails both
            # lam * w / norm in float64: each term is at most lam even where lam / norm overflows w's dtype.
            reg = ((w * mf).to(tl.float64) * scale).to(DTYPE)
        else:
            sign = tl.where(w > 0, 1.0, tl.where(w < 0, -1.0, 0.0)).to(DTYPE)
            reg = tl.where(masked, lam.to(DTYPE) * sign * mf, 0.0)
        d = g + wd.to(DTYPE) * w + reg
        if HAS_BUF:
            b_ptr = tl.load(b_tab + layer).to(tl.pointer_type(DTYPE))
            d = mu.to(DTYPE) * tl.load(b_ptr + offs, mask=valid, other=0.0) + d
            tl.store(b_ptr + offs, d, mask=valid)
        w = w - lr.to(DTYPE) * d
        tl.store(w_ptr + offs, w, mask=valid)
        tl.store(tl.load(o_tab + layer).to(tl.pointer_type(DTYPE)) + offs, w * mf, mask=valid & masked)
    v = (w * mf).to(tl.float64)
    if P == 2:
        v = v * v
    else:
        v = tl.abs(v)
    tl.store(partials + pid, tl.sum(v, axis=0))


@triton.jit
def _norm_kernel(partials, layer_first, norms, P: tl.constexpr, MAX_BLOCKS: tl.constexpr, REDUCE: tl.constexpr):
    """A layer's norm from its blocks' partial sums, added in a fixed order."""
    layer = tl.program_id(0)
    first, end = tl.load(layer_first + layer), tl.load(layer_first + layer + 1)
    acc = tl.zeros([REDUCE], dtype=tl.float64)
    for j in range(0, MAX_BLOCKS, REDUCE):  # static bounds: the most blocks any layer has, rounded up
        idx = first + j + tl.arange(0, REDUCE)
        acc += tl.load(partials + idx, mask=idx < end, other=0.0)
    total = tl.sum(acc, axis=0)
    if P == 2:
        total = tl.sqrt(total)
    tl.store(norms + layer, total)


class LayerTable:
    """One parameter group's layers on one device and dtype, as the kernel reads them: addresses of
    the weights w, masks (bool; None for plain SGD), momentum buffers and pruned copies, the block
    partition, and the layers' norms ||w * m||_p (a float64 vector on the device, updated in place
    by each step). Built once and reused while the layers' storage stays where it is."""

    def __init__(self, ws: Sequence[torch.Tensor], masks: Sequence[Optional[torch.Tensor]],
                 bufs: Sequence[Optional[torch.Tensor]], outs: Sequence[Optional[torch.Tensor]]) -> None:
        self.device, dtype = ws[0].device, ws[0].dtype
        if any(w.device != self.device or w.dtype != dtype for w in ws):
            raise ValueError("a layer table holds layers of one device and dtype")
        if self.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError("the Triton step takes CPU tensors only under TRITON_INTERPRET=1 (its interpreter); "
                             'step them with device_kernels="auto" or "torch"')
        self.f64 = dtype == torch.float64
        self.has_buf = bufs[0] is not None
        # The kernel reads the layers through their addresses: the table holds the tensors too.
        self.layers = (list(ws), list(masks), list(bufs), list(outs))
        sizes = [w.numel() for w in ws]
        counts = [max(1, -(-n // BLOCK)) for n in sizes]
        layer_of_block = [i for i, c in enumerate(counts) for _ in range(c)]
        start_of_block = [j * BLOCK for c in counts for j in range(c)]

        def table(values: list[int]) -> torch.Tensor:
            return self._upload(values).to(self.device, non_blocking=True)

        self.sizes, self.block_layer, self.block_start = table(sizes), table(layer_of_block), table(start_of_block)
        first = [0]
        for c in counts:
            first.append(first[-1] + c)
        self.layer_first = table(first)
        self.max_blocks = _REDUCE
        while self.max_blocks < max(counts):  # a power of two: few compiled variants
            self.max_blocks *= 2
        self.w_tab, self.m_tab, self.b_tab, self.o_tab = (
            table([0 if x is None else x.data_ptr() for x in xs]) for xs in self.layers)
        self.g_key: tuple[int, ...] = ()
        # Gradients' addresses and the hyperparameters are written into these buffers in place: a
        # captured graph reads them where they are.
        self.g_tab = torch.zeros(len(ws), dtype=torch.int64, device=self.device)
        self.hp_key: tuple[float, ...] = ()
        self.hp = torch.zeros(4, dtype=torch.float64, device=self.device)
        self.partials = torch.empty(len(layer_of_block), dtype=torch.float64, device=self.device)
        self.norms = torch.zeros(len(ws), dtype=torch.float64, device=self.device)
        self.views = list(self.norms)  # state["norm"] of each layer: 0-d views of `norms`
        self.graphs: dict[int, Any] = {}  # p -> the step's two launches as one CUDA graph
        self.graph_error: Optional[str] = None  # why capturing failed, if it did (then launched each step)

    def _launch(self, p: int, norm_only: bool) -> None:
        _step_kernel[(self.partials.numel(),)](
            self.w_tab, self.g_tab, self.m_tab, self.b_tab, self.o_tab, self.sizes, self.block_layer,
            self.block_start, self.hp, self.norms, self.partials, DTYPE=tl.float64 if self.f64 else tl.float32,
            P=p, HAS_BUF=self.has_buf, NORM_ONLY=norm_only, BLOCK=BLOCK)
        _norm_kernel[(self.norms.numel(),)](self.partials, self.layer_first, self.norms, P=p,
                                            MAX_BLOCKS=self.max_blocks, REDUCE=_REDUCE)

    def compute_norms(self, p: int) -> None:
        """Each layer's ||w * m||_p into `norms`, for a first step or after weights changed."""
        self._launch(p, norm_only=True)

    def step(self, grads: Sequence[torch.Tensor], lr: float, weight_decay: float, lam: float, momentum: float,
             p: int) -> None:
        """One step of every layer: w, the buffers and the pruned copies in place, `norms` after it.
        The first step launches the kernels (compiling them the first time) and then captures them
        as a CUDA graph, which later steps replay: one call instead of two Triton launches, whose
        argument handling in Python costs more than the step itself takes on the device."""
        g_key = tuple(g.data_ptr() for g in grads)
        if g_key != self.g_key:  # gradients set to None and allocated again often land where they were
            self.g_tab.copy_(self._upload(g_key), non_blocking=True)
            self.g_key = g_key
        hp_key = (lr, weight_decay, lam, momentum)
        if hp_key != self.hp_key:
            self.hp.copy_(self._upload(hp_key, torch.float64), non_blocking=True)
            self.hp_key = hp_key
        graph = self.graphs.get(p)
        if graph is not None:
            graph.replay()
            return
        self._launch(p, norm_only=False)
        if self.device.type == "cuda" and self.graph_error is None:
            # Captured on a side stream with the low-level calls: torch.cuda.graph() would also
            # empty torch's allocator cache, at every new table.
            try:
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.stream(torch.cuda.Stream(self.device)):
                    graph.capture_begin(capture_error_mode="thread_local")
                    try:
                        self._launch(p, norm_only=False)  # recorded, not run
                    finally:
                        graph.capture_end()
                self.graphs[p] = graph
            except Exception as e:  # noqa: BLE001 - the launches work without a graph, only slower
                self.graph_error = f"{type(e).__name__}: {e}"

    def _upload(self, values: Sequence[float], dtype: torch.dtype = torch.int64) -> torch.Tensor:
        """A small table for the device: pinned host memory where the device is CUDA, so that the
        copy does not wait (torch's pinned-block cache keeps a block until the copy from it is done)."""
        host = torch.tensor(values, dtype=dtype)
        return host.pin_memory() if self.device.type == "cuda" else host
