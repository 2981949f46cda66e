"""Repository-level pytest options: `pytest --benchmark` runs the benchmarks/ suite with timing;
plain `pytest` runs the tests and smoke-runs every benchmark once (pytest-benchmark disabled)."""

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


def pytest_collection_modifyitems(config, items):
    if not config.getoption("--benchmark"):
        return
    keep = [it for it in items if "benchmarks" in it.path.parts]
    drop = [it for it in items if "benchmarks" not in it.path.parts]
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
