"""The simulation's data set type: what the loaders (data: IDX and synthetic sets; cifar: CIFAR
files) return and the simulation trains on. Its own module so that the loaders need not import
each other."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Dataset:
    """Images (N, C, H, W) float32, labels (N,) int64; `augment`: training batches get random
    crops and flips (cifar.augment_batch), as the paper does for CIFAR."""

    x: np.ndarray
    y: np.ndarray
    augment: bool = False

    def __len__(self) -> int:
        return len(self.y)

    @property
    def num_classes(self) -> int:
        return int(self.y.max()) + 1 if len(self.y) else 0
