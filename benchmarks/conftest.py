"""Shared benchmark helpers: model-sized inputs, and a summary table of every benchmark group with
throughput and the speed ratio against the group's baseline, all measured in the same run."""

from __future__ import annotations

import textwrap
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


# --- the summary table -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Extra:
    """How the summary shows one of record()'s extra fields: its column heading, what it means (with
    its unit, for the legend), and the format of a value (None: four significant digits)."""

    header: str
    meaning: str
    fmt: Optional[str] = None
    scale: float = 1.0


# Every extra field the benchmarks pass to record() (or return from ratios_of). A field missing here
# is shown under its own name and listed as undescribed; one mapped to None is left out of the
# summary (it stays in extra_info and --benchmark-json).
EXTRAS: dict[str, Optional[Extra]] = {
    # sizes
    "ratio": Extra("compression", "compression ratio = dense float32 bytes / encoded bytes (>1: smaller)", "{:.2f}x"),
    "ratio_vs_pcodec": Extra("size vs pcodec", "pcodec's compressed bytes / this row's (>1: smaller than pcodec's)",
                             "{:.3f}x"),
    "bytes": Extra("file MB", "size of the saved file, in MB (1e6 bytes)", "{:.3f}", 1e-6),
    "ratio_vs_torch_save": Extra("vs torch.save size",
                                 "torch.save's file bytes / this file's bytes (>1: smaller than torch.save's)",
                                 "{:.2f}x"),
    "ratio_vs_torch_save_exact": Extra("same, -0.0 kept",
                                       "vs torch.save size of the same model saved with every -0.0 kept exactly "
                                       "(signed_zeros=True, the default)", "{:.2f}x"),
    "size_vs_unsplit": Extra("size vs unsplit", "message bytes / the same tensor's message coded in one piece, not "
                             "split into 4 Mi-element runs for threads (the cost of splitting; 1.005 at most)",
                             "{:.4f}x"),
    "size_vs_encode_model": Extra("size vs encode_model",
                                  "encode_stream's bytes / encode_model's message bytes for the same tensor",
                                  "{:.4f}x"),
    # times and speed ratios taken from interleaved rounds (each round runs every contender once)
    "rounds": Extra("rounds", "interleaved rounds the medians and ratios in this row are taken over (a count; "
                    "pytest-benchmark's warm-up and calibration rounds included, so more than its Rounds)", "{}"),
    "us_a_tensor": Extra("us/tensor", "median time of one call / number of tensors, in microseconds", "{:.2f}"),
    "ms_1_thread": Extra("1-thread ms", "median time on 1 thread, in ms", "{:.3f}"),
    "ms_2_threads": Extra("2-thread ms", "median time on 2 threads, in ms", "{:.3f}"),
    "speedup": Extra("2-thread speed-up",
                     "median over rounds of (1-thread time / 2-thread time) (>1: faster on 2 threads)", "{:.2f}x"),
    "native_ms": Extra("native ms", "median time of the native step (masked_ef_step, packed masks), in ms", "{:.3f}"),
    "fused_ms": Extra("fused SGD ms", "median time of torch.optim.SGD(fused=True).step, in ms", "{:.3f}"),
    "eager_ms": Extra("eager ms", "median time of the eager torch masked step, in ms", "{:.3f}"),
    "feddipsgd_ms": Extra("FedDIPSGD ms", "median time of FedDIPSGD.step, in ms", "{:.3f}"),
    "native_over_fused": Extra("native/fused time",
                               "median over rounds of native step time / fused SGD time (<1: native faster)",
                               "{:.3f}x"),
    "eager_over_native": Extra("eager/native time",
                               "median over rounds of eager step time / native step time (>1: native faster)",
                               "{:.2f}x"),
    "eager_over_floor": Extra("eager/floor",
                              "eager/fused SGD time x 20 / 24.125: eager against a step moving the 24.125 bytes an "
                              "element a masked step needs at fused SGD's bandwidth (a reference, not a bound)",
                              "{:.2f}x"),
    "feddipsgd_over_fused": Extra("FedDIPSGD/fused time",
                                  "median over rounds of FedDIPSGD step time / fused SGD time (<1: FedDIPSGD faster)",
                                  "{:.3f}x"),
    "encode_speed_vs_pcodec": Extra("encode vs pcodec",
                                    "median over rounds of pcodec's encode time / ours (>1: ours faster)", "{:.2f}x"),
    "decode_speed_vs_pcodec": Extra("decode vs pcodec",
                                    "median over rounds of pcodec's decode time / ours (>1: ours faster)", "{:.2f}x"),
    "ms_enc": Extra("ans encode ms", "median time of encode_model(values=\"ans\"), in ms", "{:.3f}"),
    "ms_pcodec_enc": Extra("pcodec encode ms", "median time of pcodec's encode, in ms", "{:.3f}"),
    "ms_dec": Extra("ans decode ms", "median time of decode_model into buffers, in ms", "{:.3f}"),
    "ms_pcodec_dec": Extra("pcodec decode ms", "median time of pcodec's decode into buffers, in ms", "{:.3f}"),
    "G_elements_per_s": Extra("G elements/s", "dense model elements / median time, in 1e9 elements a second",
                              "{:.3f}"),
    # lossy values
    "value_bits": Extra("value bits", "bits a kept value takes in a message with a shared mask (positions and "
                        "framing excluded)", "{:.3f}"),
    "nominal_bits": Extra("nominal bits", "bits a value of the format before entropy coding (32 for ans, 16 for "
                          "fp16/bf16, b for int-b)", "{}"),
    "msg_bits_a_value": Extra("message bits/kept", "whole message bits / kept (non-zero) values, positions included",
                              "{:.3f}"),
    "max_abs_err": Extra("max |error|", "largest absolute error of a decoded value over the model", "{:.3g}"),
    "snr_db": Extra("SNR dB", "signal-to-noise ratio over the model: 10 log10(sum w^2 / sum error^2), in dB",
                    "{:.2f}"),
    # FL round coding (test_bench_transport)
    "bytes_a_client": Extra("bytes/client", "message bytes of one client's round, down + up", "{}"),
    "compact_over_recipe": Extra("compact/recipe time", "median over rounds of the compact coding's time / the "
                                 "recipe's (<1: compact faster)", "{:.3f}x"),
    "ms_recipe": Extra("recipe ms", "median time of the recipe's coding (fp16), in ms", "{:.3f}"),
    "ms_compact": Extra("compact ms", "median time of the compact coding (int4-ans), in ms", "{:.3f}"),
    "step_vs_ours_max": Extra("NNCodec step/ours", "largest over tensors of NNCodec's quantisation step / ours "
                              "(<=1: its error is at most ours)", "{:.4f}"),
}

MAX_WIDTH = 150  # a one-row group wider than this lists its extras under the row instead of as columns
LEGEND_WIDTH = 110  # the legend's lines wrap at this width


def _num(v: Any) -> str:
    """Four significant digits, no exponent between 1e-3 and 1e6; anything not a float as str()."""
    if isinstance(v, bool) or not isinstance(v, (float, np.floating)):
        return str(v)
    a = abs(float(v))
    if a == 0 or not np.isfinite(a):
        return str(float(v))
    if 1e-3 <= a < 1e6:
        return f"{v:.{max(0, 3 - int(np.floor(np.log10(a))))}f}"
    return f"{v:.3g}"


def _extra_spec(key: str) -> Extra:
    known = EXTRAS.get(key)
    return known if known is not None else Extra(key, "(not described: add it to EXTRAS in benchmarks/conftest.py)")


def _extra_text(key: str, value: Any) -> str:
    spec = _extra_spec(key)
    if isinstance(value, (int, float, np.number)) and not isinstance(value, bool):
        value = value * spec.scale if spec.scale != 1.0 else value
        if spec.fmt is not None:
            return spec.fmt.format(value)
    return _num(value)


def _shown_extras(rows: list[Row]) -> list[str]:
    """The extra fields of these rows the summary shows, in the order they first appear."""
    keys = dict.fromkeys(k for r in rows for k in r.extra)
    return [k for k in keys if k not in EXTRAS or EXTRAS[k] is not None]


def _time_unit(rows: list[Row]) -> tuple[str, float]:
    fastest = min(r.median_s for r in rows if r.median_s)
    return ("us", 1e6) if fastest < 1e-3 else ("ms", 1e3)


def _legend(timed: list[Row], benchmark_tables: bool) -> list[str]:
    units = sorted({_time_unit([r for r in timed if r.group == g])[0] for g in dict.fromkeys(r.group for r in timed)})
    cols = [
        ("benchmark", "what was timed (pytest-benchmark's name for it); rows fastest first"),
        (f"median {' / '.join(units)}", "median wall-clock time of one timed call, in "
         + " or ".join({"ms": "milliseconds", "us": "microseconds"}[u] for u in units)
         + (" as the group's heading says" if len(units) > 1 else "")),
        ("GB/s", "dense input bytes of one timed call / median time, in 1e9 bytes a second (dense: the input's "
         "size uncompressed, zeros included, however sparse it is; an interleaved round counts every call in it)"),
    ]
    if any(r.baseline for r in timed):
        cols.append(("vs baseline", "speed-up: the group's baseline's median time / this row's (>1: faster than "
                     "the baseline, <1: slower; the baseline, named above its group, is 1.00x)"))
    if any(r.roofline for r in timed):
        cols.append(("of read rate", "this row's GB/s / that of a plain streaming read of the same bytes (the "
                     "group's read-roofline row): the share of the memory bandwidth reached"))
    for key in _shown_extras(timed):
        spec = _extra_spec(key)
        cols.append((spec.header, spec.meaning))
    width = max(len(c) for c, _ in cols)
    lines = ["Columns (every figure from this run; a group's rows ran on the same inputs):"]
    for c, m in cols:
        wrapped = textwrap.wrap(m, LEGEND_WIDTH - width - 4)
        lines += [f"  {c:<{width}}  {wrapped[0]}"] + [" " * (width + 4) + w for w in wrapped[1:]]
    if benchmark_tables:
        lines += textwrap.wrap("pytest-benchmark's tables above give each row's timing statistics (here by default "
                               "median, IQR and rounds); their bracketed factors are against the fastest row of the "
                               "group in that column, not against the baseline.", LEGEND_WIDTH)
    return lines


def render_group(rows: list[Row], name_width: int = 0) -> list[str]:
    """One group's block: a title line naming the group and its baseline and read roofline, then an
    aligned table (heading, rule, rows fastest first; every line the same width)."""
    rows = [r for r in rows if r.median_s]  # a smoke run's rows have no time
    if not rows:
        return []
    keys = _shown_extras(rows)  # in the order the benchmarks ran, whatever their times
    rows = sorted(rows, key=lambda r: r.median_s or 0.0)
    base = next((r for r in rows if r.baseline), None)
    read = next((r for r in rows if r.roofline), None)
    unit, scale = _time_unit(rows)
    title = f"[{rows[0].group}]  baseline: {base.name if base else 'none in this group'}"
    if read is not None:
        title += f"; read roofline: {read.name}"
    heads = ["benchmark", f"median {unit}", "GB/s"]
    cells = []
    for r in rows:
        median = r.median_s or 1.0  # (every row here has one)
        gbps = r.dense_bytes / median / 1e9
        row = [r.name, f"{median * scale:.3f}", f"{gbps:.2f}" if gbps >= 0.01 else _num(gbps)]
        if base is not None and base.median_s:
            row.append(f"{base.median_s / median:.2f}x")
        if read is not None and read.median_s:
            row.append(f"{read.median_s / median * r.dense_bytes / read.dense_bytes:.1%}")
        cells.append(row)
    if base is not None:
        heads.append("vs baseline")
    if read is not None:
        heads.append("of read rate")
    fixed = len(heads)
    heads += [_extra_spec(k).header for k in keys]
    for r, row in zip(rows, cells):
        row += [_extra_text(k, r.extra[k]) if k in r.extra else "-" for k in keys]
    widths = [max(len(x) for x in col) for col in zip(heads, *cells)]
    widths[0] = max(widths[0], name_width)
    below = len(rows) == 1 and keys and sum(widths) + 2 * len(widths) > MAX_WIDTH
    if below:  # one row with many extras: list them under the row, one a line
        heads, widths, extra_lines = heads[:fixed], widths[:fixed], list(zip(heads[fixed:], cells[0][fixed:]))
        cells = [cells[0][:fixed]]

    def line(parts: list[str]) -> str:
        return "  " + "  ".join(p.ljust(w) if i == 0 else p.rjust(w) for i, (p, w) in enumerate(zip(parts, widths)))

    out = [title, line(heads), "  " + "-" * (len(line(heads)) - 2)] + [line(c) for c in cells]
    if below:
        w = max(len(h) for h, _ in extra_lines)
        out += [f"      {h:<{w}}  {v}" for h, v in extra_lines]
    return out


def render_summary(rows: list[Row], benchmark_tables: bool = False) -> list[str]:
    """The summary's legend and one block per group (in the order the groups first ran), separated
    by blank lines; rows without a time (a smoke run) are left out."""
    timed = [r for r in rows if r.median_s]
    if not timed:
        return []
    name_width = max(len(r.name) for r in timed)
    out = _legend(timed, benchmark_tables)
    for group in dict.fromkeys(r.group for r in timed):
        out.append("")
        out += render_group([r for r in timed if r.group == group], name_width)
    return out


def pytest_configure(config):
    """With --benchmark, pytest-benchmark's own tables (printed before this summary) show the
    columns that say how spread a row's times are, unless the command line chose columns."""
    if not config.getoption("--benchmark", default=False) or not hasattr(config.option, "benchmark_columns"):
        return
    if not any(a.startswith("--benchmark-columns") for a in config.invocation_params.args):
        config.option.benchmark_columns = ["median", "iqr", "rounds"]


@pytest.hookimpl(trylast=True)  # after pytest-benchmark's tables: the summary is the last thing printed
def pytest_terminal_summary(terminalreporter):
    lines = render_summary(_ROWS, benchmark_tables=not terminalreporter.config.getoption("benchmark_quiet", False))
    if not lines:
        return
    tr = terminalreporter
    tr.section("feddip-kernels benchmark summary: throughput and speed-up vs each group's baseline, same run")
    late, regions = _late_regions()
    if late > max(2, regions // 100):  # a rare late start happens idle too (a kernel thread, a first region)
        warning = (f"WARNING: {late} of {regions} parallel regions of this run started over 1 ms late: another "
                   "process was using the cores, and the figures below are load-affected. Measure on an idle machine "
                   "before publishing them.")
        for line in textwrap.wrap(warning, LEGEND_WIDTH):
            tr.write_line(line, red=True, bold=True)
    tr.write_line("threads: " + ", ".join(f"{k} {v}" for k, v in thread_counts().items()) + "; zstd encode as native")
    for line in lines:
        tr.write_line(line)
