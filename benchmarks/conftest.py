"""Shared benchmark helpers: model-sized inputs, and a summary table of every benchmark group with
throughput and the speed ratio against the group's baseline, all measured in the same run."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np
import pytest

from feddip_kernels import available_backends

# Conv/linear weight shapes of ResNet-18 for CIFAR-10 (biases and norms excluded): 11,164,352 weights.
RESNET18_SHAPES = (
    [(64, 3, 3, 3)]
    + [(64, 64, 3, 3)] * 4
    + [(128, 64, 3, 3), (128, 128, 3, 3), (128, 64, 1, 1), (128, 128, 3, 3), (128, 128, 3, 3)]
    + [(256, 128, 3, 3), (256, 256, 3, 3), (256, 128, 1, 1), (256, 256, 3, 3), (256, 256, 3, 3)]
    + [(512, 256, 3, 3), (512, 512, 3, 3), (512, 256, 1, 1), (512, 512, 3, 3), (512, 512, 3, 3)]
    + [(10, 512)]
)


# The numba backend's cases, skipped with the reason where numba is not installed.
NUMBA = pytest.param("numba", marks=pytest.mark.skipif(
    "numba" not in available_backends(), reason="numba is not installed (the [numba] extra)"))


def resnet18_weights(seed: int = 0) -> list[np.ndarray]:
    """Kaiming-normal float32 weights in ResNet-18 (CIFAR) shapes."""
    rng = np.random.default_rng(seed)
    out = []
    for s in RESNET18_SHAPES:
        fan_in = int(np.prod(s[1:]))
        out.append((rng.standard_normal(s, dtype=np.float32) * np.float32(np.sqrt(2.0 / fan_in))))
    return out


@dataclass
class Row:
    group: str
    name: str
    median_s: float | None
    dense_bytes: int
    baseline: bool
    roofline: bool = False
    extra: dict = field(default_factory=dict)


_ROWS: list[Row] = []


@pytest.fixture
def record(benchmark):
    """record(fn, *args, group=..., name=..., dense_bytes=..., baseline=False, roofline=False,
    ratios_of=None, rounds=None, **extra): benchmark fn and remember its median for the summary table;
    `ratios_of()`, called after the timing, adds metrics derived from it to extra. The roofline
    row of a group (a plain read of the same bytes) makes the summary print every row's share of
    its read rate. Returns fn's result."""

    def run(fn, *args, group: str, name: str, dense_bytes: int, baseline: bool = False, roofline: bool = False,
            ratios_of=None, rounds: Optional[int] = None, **extra):
        benchmark.group = group
        benchmark.name = name
        # `rounds`: exactly that many (after one warm-up), where a median of ratios needs more
        # rounds than the time-based calibration gives slow calls.
        result = (
            benchmark(fn, *args) if rounds is None else benchmark.pedantic(fn, args, rounds=rounds, warmup_rounds=1)
        )
        if ratios_of is not None:  # metrics computed from the timed calls themselves
            extra.update(ratios_of())
        benchmark.extra_info.update(extra, dense_bytes=dense_bytes, baseline=baseline, roofline=roofline)
        stats = getattr(benchmark, "stats", None)
        median = stats.stats.median if stats is not None else None
        if median:
            benchmark.extra_info["dense_GBps"] = dense_bytes / median / 1e9
        _ROWS.append(Row(group, name, median, dense_bytes, baseline, roofline, extra))
        return result

    return run


def alternating(calls: dict[Any, Callable[[], object]], seed: int) -> tuple[Callable[[], None], dict[Any, list[float]]]:
    """(round, times): each round runs every call once, in an order drawn at random each round (no
    call always follows the same one), and appends its time to times[key]. Ratios taken round by
    round compare calls made moments apart, which a slow spell of the machine cannot skew."""
    keys = list(calls)
    times: dict[Any, list[float]] = {k: [] for k in keys}
    order = np.random.default_rng(seed)

    def round_() -> None:
        for i in order.permutation(len(keys)):
            t0 = time.perf_counter()
            calls[keys[i]]()
            times[keys[i]].append(time.perf_counter() - t0)

    return round_, times


def thread_counts() -> dict[str, int]:
    """Threads each contender may use in this run (every table is read against these)."""
    from feddip_kernels import _backend

    counts = {"native (OpenMP)": _backend.get_num_threads()}  # feddip_kernels.set_num_threads or OpenMP's default
    try:
        import torch

        counts["torch"] = torch.get_num_threads()
    except ImportError:
        pass
    counts["numpy, scipy, numba kernels"] = 1
    return counts


def _late_regions() -> tuple[int, int]:
    """(late, timed) parallel regions of the native kernels in this process: a late one's threads
    waited a scheduler slice for a core, the sign of another process on the cores (csrc/common.hpp)."""
    from feddip_kernels import _backend

    core = _backend.native_module()
    if core is None:
        return 0, 0
    state = core._contention()
    return state[2], state[4]


def pytest_terminal_summary(terminalreporter):
    timed = [r for r in _ROWS if r.median_s]
    if not timed:
        return
    tr = terminalreporter
    tr.section("feddip-kernels: throughput and speed-up vs baseline (same run)")
    late, regions = _late_regions()
    if late > max(2, regions // 100):  # a rare late start happens idle too (a kernel thread, a first region)
        tr.write_line(f"WARNING: {late} of {regions} parallel regions of this run started over 1 ms late: another "
                      "process was using the cores, and the figures below are load-affected. Measure on an idle "
                      "machine before publishing them.", red=True, bold=True)
    tr.write_line("threads: " + ", ".join(f"{k} {v}" for k, v in thread_counts().items()) + "; zstd encode as native")
    for group in dict.fromkeys(r.group for r in timed):
        rows = [r for r in timed if r.group == group]
        base = next((r for r in rows if r.baseline), None)
        read = next((r for r in rows if r.roofline), None)
        tr.write_line(f"[{group}]")
        for r in sorted(rows, key=lambda r: r.median_s):
            ratio = f"{base.median_s / r.median_s:8.2f}x" if base else "       -"
            extra = "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.extra.items())
            if read:  # the share of a plain read's rate of the same bytes
                extra = f"of read rate: {read.median_s / r.median_s * r.dense_bytes / read.dense_bytes:6.1%}  " + extra
            tr.write_line(
                f"  {r.name:<36} {r.median_s * 1e3:10.3f} ms {r.dense_bytes / r.median_s / 1e9:8.2f} GB/s {ratio}"
                f"{'  (baseline)' if r is base else ''}  {extra}"
            )
