"""A thin federated-learning simulation (FedDIP as its authors run it, its ablations FedDP and
FedDIP without error feedback, and FedAvg) that uses the library's kernels and codecs for every
step and transfer, and counts the real encoded bytes; the server side is feddip_kernels.protocol.
Needs torch (the [fl] extra)."""

from .cifar import load_cifar
from .data import Dataset, dirichlet_partition, iid_partition, load_dataset, load_idx_dataset, synthetic_dataset
from .models import MODELS, make_model, prunable_parameters
from .simulation import SimulationConfig, run_simulation

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
