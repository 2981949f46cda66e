"""Backend selection, the one place that decides which kernels a call runs on.

Host backends: "native" (C++ extension), "numba" (JIT twins), "numpy" (reference); each is a module
meeting the kernel contract (_contract.Kernels), and `kernels(name)` hands one out. Torch tensors on
a device (CUDA) go to the device kernels (_torch_kernels, meeting _contract.DeviceKernels), which
use the Triton modules where those import. `kernels_for(*arrays, backend=...)` makes the choice for
a call's arguments; optional modules (native, numba, torch, Triton) are imported here, when first
needed."""

from __future__ import annotations

import functools
from types import ModuleType
from typing import TYPE_CHECKING, Any, Optional, Union, cast

from ._arrays import on_device

if TYPE_CHECKING:
    from . import _core, _numba_kernels, _torch_kernels, reference
    from ._contract import DeviceKernels, Kernels

    # What mypy checks (never run): each backend module meets its contract, structurally, so a
    # kernel whose signature or return type drifts from _contract is a type error.
    _native_meets_the_contract: Kernels = _core
    _numba_meets_the_contract: Kernels = _numba_kernels
    _numpy_meets_the_contract: Kernels = reference
    _device_meets_the_contract: DeviceKernels = _torch_kernels

BACKENDS = ("auto", "native", "numba", "numpy")
MAX_THREADS = 4096  # more than any machine has cores; each thread of a parallel region costs a stack


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
    """Backends usable in this installation, fastest first; "numpy" is always there.

    Returns
    -------
    list[str] : from "native", "numba" and "numpy", in that order.
    """
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


def kernels(backend: str = "auto") -> "Kernels":
    """The kernel module of a backend ("auto": the fastest available), every function of the
    contract with the same signature whichever it is."""
    be = resolve(backend)
    if be == "native":
        return cast("Kernels", native_module())  # resolve() made sure it imports
    if be == "numba":
        return cast("Kernels", numba_module())
    from . import reference

    return reference


def kernels_for(*arrays: Any, backend: str = "auto") -> "Union[Kernels, DeviceKernels]":
    """The kernels for a call on these arguments: the device kernels (device_kernels()) when any is a
    torch tensor on a device (on_device), else the host backend's (kernels(backend)), for which
    torch CPU tensors are NumPy arrays. The public functions check the arguments for the kernels
    handed out (is_device) and make one call; `backend` names a host backend, checked either way."""
    if on_device(*arrays):
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        return device_kernels()
    return kernels(backend)


_device: Optional[ModuleType] = None  # the device kernels, once imported


def device_kernels() -> "DeviceKernels":
    """The kernels for torch tensors on a device (_torch_kernels; imports torch)."""
    global _device
    if _device is None:
        from . import _torch_kernels

        _device = _torch_kernels
    return _device


def is_device(k: Any) -> bool:
    """Whether kernels handed out by kernels_for are the device kernels (torch tensors in and out)."""
    return k is not None and k is _device


def checks_overlaps(k: Any) -> bool:
    """Whether the kernels' masked_ef_step_many refuses arrays that share memory itself (the native
    core, in C++: ValueError "... share memory; pass separate arrays"); for the others the public
    layer checks (_arrays.check_disjoint)."""
    return k is native_module()


@functools.lru_cache(maxsize=None)
def triton_step() -> Optional[ModuleType]:
    """FedDIPSGD's multi-layer step in Triton (_triton_kernels), None where Triton does not import."""
    try:
        from . import _triton_kernels
    except ImportError:
        return None
    return _triton_kernels


@functools.lru_cache(maxsize=None)
def triton_topk() -> Optional[ModuleType]:
    """The global top-k's radix select in Triton (_triton_topk), None where Triton does not import."""
    try:
        from . import _triton_topk
    except ImportError:
        return None
    return _triton_topk


def set_num_threads(n: int) -> None:
    """Threads every parallel kernel uses from now on, in this process: n >= 1, or 0 for the
    default (OpenMP's: OMP_NUM_THREADS or the number of cores). The native kernels are the
    parallel ones; the Numba and NumPy backends run on one thread. At most MAX_THREADS (4096).

    Parameters
    ----------
    n : threads, 0 <= n <= MAX_THREADS (0: the default).

    Raises
    ------
    ValueError : n not an integer in that range.
    """
    if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= MAX_THREADS:
        raise ValueError(f"n must be an integer from 0 to {MAX_THREADS}, got {n!r}")
    core = native_module()
    if core is not None:
        core.set_num_threads(n)


def get_num_threads() -> int:
    """Threads a parallel kernel uses now (1 without the native extension or OpenMP).

    Returns
    -------
    int : the threads (the count set, else the default: 1 while another process holds the cores).
    """
    core = native_module()
    return core.get_num_threads() if core is not None else 1

