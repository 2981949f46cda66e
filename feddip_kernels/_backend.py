"""Backend selection: "native" (C++ extension), "numba" (JIT twins), "numpy" (reference)."""

from __future__ import annotations

import functools
from types import ModuleType
from typing import Optional

BACKENDS = ("auto", "native", "numba", "numpy")


@functools.lru_cache(maxsize=None)
def native_module() -> Optional[ModuleType]:
    try:
        from . import _core
    except ImportError:
        return None
    return _core


@functools.lru_cache(maxsize=None)
def numba_module() -> Optional[ModuleType]:
    try:
        from . import _numba_kernels
    except ImportError:
        return None
    return _numba_kernels


def available_backends() -> list[str]:
    """Backends usable in this installation, fastest first; "numpy" is always there."""
    found = []
    if native_module() is not None:
        found.append("native")
    if numba_module() is not None:
        found.append("numba")
    return found + ["numpy"]


def resolve(backend: str) -> str:
    """Map "auto" to the fastest available backend; check that an explicit choice is usable."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":  # numba is imported only when there is no native extension
        return "native" if native_module() is not None else available_backends()[0]
    if backend == "native" and native_module() is None:
        raise RuntimeError("the native extension feddip_kernels._core is not built; reinstall with `pip install .`")
    if backend == "numba" and numba_module() is None:
        raise RuntimeError("numba is not installed; `pip install numba` or the [numba] extra")
    return backend
