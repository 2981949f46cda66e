import os

import pytest
from hypothesis import settings

import feddip_kernels

# CI runs a fixed set of examples (derandomized), so a run is reproducible and a failure is never
# a lottery; the random profiles (dev, stress) are for looking for new failures.
settings.register_profile("ci", max_examples=60, deadline=None, derandomize=True)
# `random`: new examples on every run, for CI's second, bounded pass (see README); a failure prints
# the blob that reproduces it (@reproduce_failure).
settings.register_profile("random", max_examples=100, deadline=None, print_blob=True)
settings.register_profile("dev", max_examples=200, deadline=None)
settings.register_profile("stress", max_examples=2000, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

BACKENDS = feddip_kernels.available_backends()


@pytest.fixture(params=BACKENDS, scope="session")
def backend(request):
    return request.param


# The native loops with hand-written vector code have AVX-512, AVX2 and generic versions (top-k's
# pass and the float32 error-feedback step; the float64 step AVX2 and generic). `_isa` caps the one in
# use, so one machine runs every path its CPU has.
@pytest.fixture(params=["avx512", "avx2", "generic"])
def isa(request):
    native = pytest.importorskip("feddip_kernels._core")
    before = native._isa()
    if native._isa(request.param) != request.param:
        native._isa(before)
        pytest.skip(f"this CPU has no {request.param}")
    yield request.param
    native._isa("avx512")


def pytest_report_header(config):
    return f"feddip_kernels backends: {', '.join(BACKENDS)}"
