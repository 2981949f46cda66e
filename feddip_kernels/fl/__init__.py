"""A thin federated-learning simulation (FedDIP as its authors run it, its ablations FedDP and
FedDIP without error feedback, and FedAvg) that uses the library's kernels and codecs for every
step and transfer, and counts the real encoded bytes; the server side is feddip_kernels.protocol.
Needs torch (the [fl] extra). Names load on first use, so that the command line's checks and
`--help` do not wait for torch."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .cifar import load_cifar
    from .data import Dataset, dirichlet_partition, iid_partition, load_dataset, load_idx_dataset, synthetic_dataset
    from .models import MODELS, make_model, prunable_parameters
    from .simulation import SimulationConfig, run_simulation

_WHERE = {
    "load_cifar": "cifar",
    "Dataset": "data",
    "dirichlet_partition": "data",
    "iid_partition": "data",
    "load_dataset": "data",
    "load_idx_dataset": "data",
    "synthetic_dataset": "data",
    "MODELS": "models",
    "make_model": "models",
    "prunable_parameters": "models",
    "SimulationConfig": "simulation",
    "run_simulation": "simulation",
}

__all__ = [
    "MODELS",
    "Dataset",
    "SimulationConfig",
    "dirichlet_partition",
    "iid_partition",
    "load_cifar",
    "load_dataset",
    "load_idx_dataset",
    "make_model",
    "prunable_parameters",
    "run_simulation",
    "synthetic_dataset",
]


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    globals()[name] = value  # once
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
