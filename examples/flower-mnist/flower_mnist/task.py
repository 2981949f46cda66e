"""flower-mnist: the model (LeNet-5), the data (MNIST from IDX files, split IID over the nodes) and
local training and testing, all from feddip_kernels.fl."""

from __future__ import annotations

import functools
import os
from typing import Optional

import numpy as np
import torch
from torch import nn

from feddip_kernels.fl import Dataset, iid_partition, load_idx_dataset, make_model
from feddip_kernels.fl.simulation import evaluate
from feddip_kernels.integrations.pytorch import FedDIPSGD
from feddip_kernels.protocol import seed_for

Weights = dict[str, np.ndarray]


def load_model() -> nn.Module:
    """LeNet-5 for 1x28x28 images, 10 classes (61,706 parameters)."""
    return make_model("lenet5", 1, 10)


def init_seed(seed: int) -> int:
    """The seed the initial model is built from: FedDIP's default init_seed for the run's seed."""
    return seed_for(seed, 0)


def initial_weights(seed: int) -> Weights:
    """The initial model: LeNet-5 built after torch.manual_seed(seed). FedDIP's compact coding
    builds it on each node from the seed alone (make_feddip_mod's init_model)."""
    torch.manual_seed(seed)
    return {k: v.numpy().copy() for k, v in load_model().state_dict().items()}


def set_weights(model: nn.Module, weights: Weights) -> None:
    model.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in weights.items()})


@functools.lru_cache(maxsize=2)
def _mnist(path: str) -> tuple[Dataset, Dataset]:
    directory = os.path.expanduser(os.path.expandvars(path))
    if not path or not os.path.isdir(directory):
        raise FileNotFoundError(
            f"MNIST not found at data-path={path!r}: give the directory of its IDX files "
            "(train-images-idx3-ubyte[.gz], ...) as an absolute path, e.g. "
            "flwr run . --run-config \"data-path='/path/to/mnist'\"")
    return load_idx_dataset(directory)  # pixels in [0, 1], standardised with the training set's mean and std


def _head(data: Dataset, limit: int) -> Dataset:
    return data if limit <= 0 else Dataset(data.x[:limit], data.y[:limit])


def load_data(path: str, partition_id: int, num_partitions: int, *, seed: int = 0, limit: int = 0,
              split: str = "train") -> Dataset:
    """Node `partition_id`'s shard of `num_partitions` IID shards of MNIST's training set (or of its
    test set, `split="test"`), drawn from the run's seed; `limit` > 0: of its first `limit` examples."""
    train, test = _mnist(path)
    data = _head(train if split == "train" else test, limit)
    if not 0 <= partition_id < num_partitions <= len(data):
        raise ValueError(f"partition {partition_id} of {num_partitions} with {len(data)} examples")
    return _take(data, iid_partition(len(data), num_partitions, seed)[partition_id])


def _take(data: Dataset, idx: np.ndarray) -> Dataset:
    return Dataset(data.x[idx], data.y[idx])


def load_test_data(path: str, *, limit: int = 0) -> Dataset:
    """MNIST's test set (its first `limit` examples when `limit` > 0), for the server's evaluation."""
    return _head(_mnist(path)[1], limit)


def train(
    model: nn.Module,
    data: Dataset,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    seed: int,
    masks: Optional[dict[str, np.ndarray]] = None,
    lam: float = 0.0,
) -> tuple[Weights, float]:
    """Local SGD on `data` from the weights `model` holds.

    Without `masks`: torch.optim.SGD (FedAvg's clients). With `masks` (name -> bool array: FedDIP's
    mask to train under): FedDIPSGD, which trains the masked layers' dense weights w with error
    feedback (the gradient taken at w * mask) and adds FedDIP's regulariser of strength `lam`; the
    masked layers are returned as their dense weights (what FedDIP's clients upload: the mod sends
    the values under the global mask).

    Returns
    -------
    (the trained model's weights, the mean training loss)
    """
    torch.manual_seed(seed)
    model.train()
    params = dict(model.named_parameters())
    opt: torch.optim.Optimizer
    if masks:
        fed = FedDIPSGD(model.parameters(), lr=lr, weight_decay=weight_decay, lam=lam)
        fed.set_masks({params[k]: torch.from_numpy(np.ascontiguousarray(m)) for k, m in masks.items()})
        opt = fed
    else:
        opt = torch.optim.SGD(model.parameters(), lr=lr, weight_decay=weight_decay)
    rng = np.random.default_rng(seed)
    x, y = torch.from_numpy(data.x), torch.from_numpy(data.y)
    total, seen = 0.0, 0
    for _ in range(epochs):
        order = torch.from_numpy(rng.permutation(len(data)))
        for i in range(0, len(data), batch_size):
            idx = order[i : i + batch_size]
            opt.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
            seen += len(idx)
    weights = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    if masks:
        weights.update({k: fed.dense(params[k]).detach().numpy().copy() for k in masks})
    return weights, total / max(seen, 1)


def test(model: nn.Module, data: Dataset) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) of `model` on `data`."""
    return evaluate(model, data)
