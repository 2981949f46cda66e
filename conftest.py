"""Repository-level pytest options: `pytest --benchmark` runs the benchmarks/ suite with timing;
plain `pytest` runs the tests and smoke-runs every benchmark once (pytest-benchmark disabled)."""

import importlib.util
import os

import pytest


def pytest_addoption(parser):
    parser.addoption(
        "--benchmark",
        action="store_true",
        default=False,
        help="run only benchmarks/ and time them with pytest-benchmark (default: run each benchmark once, untimed)",
    )


def pytest_configure(config):
    if not config.getoption("--benchmark") and hasattr(config.option, "benchmark_disable"):
        config.option.benchmark_disable = True
    config.addinivalue_line("markers", "cuda: needs a CUDA device (or FEDDIP_TEST_DEVICE=cpu); left out elsewhere")
    config.addinivalue_line(
        "markers", "triton: needs Triton and a CUDA device (or TRITON_INTERPRET=1); left out elsewhere"
    )


# Tests of the GPU paths need hardware that no install provides (CI has no GPU): where it is
# missing they are left out of the run, said in the summary, rather than skipped (which CI fails).
_LEFT_OUT: dict[str, int] = {}


def _hardware() -> dict[str, bool]:
    try:
        import torch

        cuda = torch.cuda.is_available()
    except ImportError:
        cuda = False
    triton_ok = importlib.util.find_spec("triton") is not None and (cuda or os.environ.get("TRITON_INTERPRET") == "1")
    return {"cuda": cuda or os.environ.get("FEDDIP_TEST_DEVICE") == "cpu", "triton": triton_ok}


def pytest_collection_modifyitems(config, items):
    drop = []
    if config.getoption("--benchmark"):
        drop = [it for it in items if "benchmarks" not in it.path.parts]
    needs = [
        it for it in items if it not in drop and (it.get_closest_marker("cuda") or it.get_closest_marker("triton"))
    ]
    if needs:
        have = _hardware()
        for it in needs:
            missing = [name for name in ("cuda", "triton") if it.get_closest_marker(name) and not have[name]]
            if missing:
                drop.append(it)
                _LEFT_OUT[missing[0]] = _LEFT_OUT.get(missing[0], 0) + 1
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = [it for it in items if it not in drop]


def pytest_terminal_summary(terminalreporter):
    why = {"cuda": "a CUDA device", "triton": "Triton with a CUDA device or TRITON_INTERPRET=1"}
    for name, count in _LEFT_OUT.items():
        terminalreporter.write_line(f"left out {count} tests that need {why[name]} (this machine has none)")


# In CI (CI=true) a skip means a missing optional tool, package or data set that the install was
# meant to provide: it fails there instead of passing unnoticed. Elsewhere a skip stays a skip.
def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("true", "1")


def _fail_skip_in_ci(report) -> None:
    if _in_ci() and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped in CI (CI=true), which must not happen: {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    _fail_skip_in_ci(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    _fail_skip_in_ci(outcome.get_result())
