"""The benchmark summary's layout (benchmarks/conftest.py): legend, units, baseline named, aligned
columns, extra fields named, unknown extras shown; built from made-up rows, nothing timed."""

import ast
import pathlib
import re

from benchmarks.conftest import EXTRAS, Row, render_group, render_summary

BENCH = pathlib.Path(__file__).resolve().parent.parent / "benchmarks"


def _rows() -> list[Row]:
    return [
        Row("save model", "torch.save", 0.050, 45_000_000, True, extra={"bytes": 45e6, "ratio_vs_torch_save": 1.0}),
        Row("save model", "feddip_kernels.save", 0.020, 45_000_000, False,
            extra={"bytes": 1.9e6, "ratio_vs_torch_save": 23.7, "mystery_field": 3}),
        Row("topk", "read roofline: max |w|", 0.001, 44_000_000, False, roofline=True),
        Row("topk", "threshold[native]", 0.002, 44_000_000, False),
        Row("topk", "torch.topk", 0.150, 44_000_000, True),
        Row("small tensors", "feddip encode", 0.0004, 25_600, False, extra={"us_a_tensor": 4.0}),
        Row("smoke", "untimed", None, 1, True),
    ]


def _blocks(lines: list[str]) -> list[list[str]]:
    """The group blocks: each starts with its [title] line and ends before the next blank line."""
    blocks: list[list[str]] = []
    for line in lines:
        if line.startswith("["):
            blocks.append([line])
        elif blocks and line:
            blocks[-1].append(line)
        elif blocks and blocks[-1][-1]:
            blocks[-1].append("")  # the end of a block
    return [[x for x in b if x] for b in blocks]


def test_legend_names_every_column_and_its_unit():
    lines = render_summary(_rows(), benchmark_tables=True)
    assert max(len(x) for x in lines[:lines.index("")]) <= 110  # the legend wraps
    text = " ".join(" ".join(lines).split())
    for words in ("median ms / us", "milliseconds or microseconds", "GB/s", "1e9 bytes a second",
                  "vs baseline", "baseline's median time / this row's", ">1: faster", "of read rate",
                  "streaming read of the same bytes", "file MB", "vs torch.save size", "torch.save's file bytes /",
                  "us/tensor", "microseconds", "fastest row of the group", "not against the baseline"):
        assert words in text, words
    assert "mystery_field" in text and "not described" in text  # an unknown extra: shown under its own name


def test_groups_named_with_their_baseline_and_aligned():
    lines = render_summary(_rows())
    blocks = _blocks(lines)
    assert [b[0].split("]")[0] for b in blocks] == ["[save model", "[topk", "[small tensors"]  # untimed: left out
    save, topk, small = blocks
    assert "baseline: torch.save" in save[0]
    assert "baseline: torch.topk" in topk[0] and "read roofline: read roofline: max |w|" in topk[0]
    assert "baseline: none" in small[0]
    for block in blocks:
        table = block[1:]
        assert len({len(x) for x in table}) == 1, table  # heading, rule and rows: one width
        assert set(table[1].strip()) == {"-"}
    assert "median ms" in save[1] and "median us" in small[1]  # the unit of the group's times
    # The columns line up: every value ends where its heading does.
    heading = save[1]
    for col in ("median ms", "GB/s", "vs baseline", "file MB", "vs torch.save size", "mystery_field"):
        end = heading.index(col) + len(col)
        assert all(row[end - 1] != " " and (end == len(row) or row[end] == " ") for row in save[3:]), col
    # Fastest first; values, units and the ratios against the baseline.
    assert save[3].split()[0] == "feddip_kernels.save" and "2.50x" in save[3] and "1.00x" in save[4]
    assert "23.70x" in save[3] and "1.900" in save[3] and "45.000" in save[4]
    assert save[4].rstrip().endswith("-")  # torch.save has no mystery_field
    assert "100.0%" in topk[3] and "50.0%" in topk[4] and "0.7%" in topk[5]  # share of the read rate
    assert "150.00x" in topk[3] and "75.00x" in topk[4]
    assert "400.000" in small[3] and "4.00" in small[3]


def test_one_row_with_many_extras_lists_them_under_the_row():
    extra = {k: 1.5 for k in ("encode_speed_vs_pcodec", "decode_speed_vs_pcodec", "ms_enc", "ms_pcodec_enc", "ms_dec",
                              "ms_pcodec_dec", "ratio_vs_pcodec", "speedup", "native_over_fused")}
    block = render_group([Row("interleaved", "encode + decode", 0.3, 10**8, False, extra=extra)])
    assert len({len(x) for x in block[1:4]}) == 1
    listed = [re.split(r"\s{2,}", x.strip())[0] for x in block[4:]]
    assert listed == [getattr(EXTRAS[k], "header", None) for k in extra]


def test_every_extra_the_benchmarks_pass_is_described():
    """record()'s extra keywords, and the keys of the dicts its extras come from (ratios_of and the
    helpers that build extras), all have a heading and a meaning in EXTRAS."""
    params = {"group", "name", "dense_bytes", "baseline", "roofline", "ratios_of", "rounds"}
    builders = {"ratios", "rate", "_errors", "_vs_pcodec", "_lossy_extra"}
    passed = set()
    for path in BENCH.glob("test_bench_*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "record":
                passed |= {k.arg for k in node.keywords if k.arg and k.arg not in params}
                ratios_of = next((k.value for k in node.keywords if k.arg == "ratios_of"), None)
                if isinstance(ratios_of, ast.Lambda) and isinstance(ratios_of.body, ast.Dict):
                    passed |= {k.value for k in ratios_of.body.keys if isinstance(k, ast.Constant)}
            if isinstance(node, ast.FunctionDef) and node.name in builders:
                for d in ast.walk(node):
                    if isinstance(d, ast.Dict):
                        passed |= {k.value for k in d.keys if isinstance(k, ast.Constant)}
    assert passed and passed <= set(EXTRAS), passed - set(EXTRAS)


def test_benchmark_columns_narrowed_only_with_benchmark_and_unless_chosen():
    from types import SimpleNamespace

    from benchmarks.conftest import pytest_configure

    def config(benchmark: bool, args: tuple[str, ...]):
        opts = {"--benchmark": benchmark}
        return SimpleNamespace(getoption=lambda name, default=None: opts.get(name, default),
                               option=SimpleNamespace(benchmark_columns=["min", "max", "mean"]),
                               invocation_params=SimpleNamespace(args=args))

    for benchmark, args, want in [(True, (), ["median", "iqr", "rounds"]), (False, (), ["min", "max", "mean"]),
                                  (True, ("--benchmark-columns=min,max,mean",), ["min", "max", "mean"])]:
        c = config(benchmark, args)
        pytest_configure(c)
        assert c.option.benchmark_columns == want
