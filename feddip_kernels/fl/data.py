"""Datasets for the simulation: IDX files (MNIST / Fashion-MNIST layout), a built-in synthetic set,
and IID or Dirichlet non-IID partitions over clients."""

from __future__ import annotations

import gzip
import os
import struct

import numpy as np

from .cifar import find_cifar, load_cifar
from .dataset import Dataset

_IDX_CODES = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_IDX_TYPES: dict[int, np.dtype] = {code: np.dtype(t) for code, t in _IDX_CODES.items()}


def read_idx(path: str) -> np.ndarray:
    """An IDX file (optionally gzip-compressed) as an array; the header is checked against the size."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES:
        raise ValueError(f"{path}: not an IDX file")
    ndim = raw[3]
    if len(raw) < 4 + 4 * ndim:
        raise ValueError(f"{path}: truncated IDX header")
    shape = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    dtype = _IDX_TYPES[raw[2]]
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    body = raw[4 + 4 * ndim :]
    if len(body) != expected:
        raise ValueError(f"{path}: {len(body)} data bytes, header says {expected}")
    return np.frombuffer(body, dtype=dtype).reshape(shape)


def _find(directory: str, stem: str) -> str:
    for name in (stem, stem + ".gz"):
        p = os.path.join(directory, name)
        if os.path.exists(p):
            return p
    raise FileNotFoundError(f"{stem}[.gz] not found in {directory}")


def load_dataset(directory: str) -> tuple[Dataset, Dataset]:
    """(train, test) from `directory`: CIFAR-10/100 (binary or python version, see fl.cifar) when
    it holds one, else MNIST-style IDX files."""
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"data directory {directory} not found")
    return load_cifar(directory) if find_cifar(directory) else load_idx_dataset(directory)


def load_idx_dataset(directory: str) -> tuple[Dataset, Dataset]:
    """(train, test) from MNIST-style IDX files in `directory`; pixels scaled to [0, 1] and
    standardised with the training set's mean and std."""
    parts = []
    for prefix in ("train", "t10k"):
        x = read_idx(_find(directory, f"{prefix}-images-idx3-ubyte")).astype(np.float32) / 255.0
        y = read_idx(_find(directory, f"{prefix}-labels-idx1-ubyte")).astype(np.int64)
        if len(x) != len(y):
            raise ValueError(f"{directory}: {len(x)} {prefix} images but {len(y)} labels")
        parts.append(Dataset(x[:, None, :, :], y))
    mean, std = float(parts[0].x.mean()), float(parts[0].x.std())
    for p in parts:
        p.x = (p.x - mean) / std
    return parts[0], parts[1]


def synthetic_dataset(n_train: int = 6000, n_test: int = 1000, num_classes: int = 10, seed: int = 0,
                      shape: tuple[int, int, int] = (1, 28, 28)) -> tuple[Dataset, Dataset]:
    """A learnable, not trivial image set that needs no download, of `shape` (C, H, W; H and W
    multiples of 4), deterministic by `seed`; two generators, by the number of channels.

    Grey (C != 3; the default 1x28x28, `--data synthetic`): each class has four blocky random
    prototypes (modes, 4x4-pixel blocks); a sample is one of its class's modes plus up to 0.6 times
    a mode of another class, shifted by up to 2 pixels, scaled by 0.7-1.3, with N(0, 0.8) noise.
    In the default `feddip simulate` run (1x28x28, ten classes, 10 clients, 20 rounds) FedAvg
    reaches 99.5% and FedDIP 92% and still rising: harder than MNIST for a sparse LeNet-5, so the
    algorithms differ.

    Colour (C == 3; `synthetic-cifar10`, `synthetic-cifar100`, the stand-ins for CIFAR): each class
    has one smooth colour prototype, a random 2x2 colour layout plus 0.7 times a random 4x4 one
    (N(0, 1) values, bilinearly upsampled). A sample is its prototype times U(0.7, 1.3) plus
    U(0, 0.9) times another class's prototype (some samples are ambiguous: a flip-aware nearest
    class mean scores 93% with ten classes, 91.5% with a hundred), plus a smooth 4x4 background
    of std 0.3, mirrored left-right with probability 1/2, plus N(0, 0.5) pixel noise; each channel
    is then standardised to mean 0 and std 2, twice normalised CIFAR's scale. 10,000 images take
    about 0.6 s on 2 cores, 20,000 about 2 s.

    Why, measured on 2 CPU cores under the paper's client recipe (plain SGD, lr 0.1, no momentum,
    weight decay 5e-4, batch 128, CIFAR's crop-and-flip augmentation), ten classes. The plain
    AlexNet (default initialisation, no BatchNorm) starts on a plateau that no data of this scale
    avoids: its layers shrink the input-dependent part of the activations two- to threefold each,
    the logits vary over samples by about 1e-3, the loss sits at ln 10, and it leaves only as fast
    as the class signal reaching its last layers grows, which the data sets. On the blocky
    generator at 3x32x32 (the colour sets' generator until 2026-12), trained centrally on 5,000
    images, it stayed at 8% for 200 steps, and at chance for 100 steps even at three times the
    scale; 5% of the variance of its untrained penultimate features lay between the class means
    (34% here). A trivially separable set (one standardised colour a class) left chance after
    about 60 steps. On this set, centrally (5,000 images, test accuracy every 10 steps): 15% after
    40 steps, 25% after 50, 33% after 70, then between 15% and 40% up to step 150 (lr 0.1 without
    momentum keeps it noisy); at std 1 instead of 2: 10% up to step 50, 18-28% over steps 100-150;
    at std 3: 48% at step 150. ResNet-18 (BatchNorm: no plateau) reached 70% after 24 steps
    (19% on the blocky set). Federated, 10 IID clients, 5 a round, E = 5, the schedules over 8
    rounds, accuracy after rounds 1-3 on 1,000 test images:

    - AlexNet, 1,000 images a client (40 steps a round): FedAvg 9.0, 43.5, 30.0%; FedDIP 9.0,
      9.0, 10.2% (loss 2.303, 2.299, 2.286: FedDIP's 50%-sparse AlexNet leaves the plateau later);
    - AlexNet, 2,000 images a client (80 steps a round): FedDIP 11.4, 9.8, 44.4% (loss 2.207
      after round 2);
    - ResNet-18, 256 images a client, 2 clients a round (10 steps each): FedAvg 27.9, 58.7, 82.0%;
      FedDIP 27.1, 65.0, 83.0%.
    """
    channels, height, width = shape
    if height % 4 or width % 4 or min(shape) < 1:
        raise ValueError(f"synthetic images need C >= 1 and H, W multiples of 4, got {shape}")
    rng = np.random.default_rng(seed)
    make = _colour_images(rng, num_classes, shape) if channels == 3 else _blocky_images(rng, num_classes, shape)
    train, test = make(n_train), make(n_test)
    if channels == 3:  # per channel to std 2, with the training set's statistics (as for CIFAR)
        ref = (train if len(train) > 1 else test).x[:4096]  # (those of its first 4,096 images)
        if len(ref) > 1:
            mean = ref.mean(axis=(0, 2, 3), keepdims=True, dtype=np.float64).astype(np.float32)
            scale = (_COLOUR_SCALE / ref.std(axis=(0, 2, 3), keepdims=True, dtype=np.float64)).astype(np.float32)
            for part in (train, test):
                part.x -= mean
                part.x *= scale
    return train, test


def _blocky_images(rng: np.random.Generator, num_classes: int, shape: tuple[int, int, int]):
    """The grey generator (see synthetic_dataset)."""
    channels, height, width = shape
    modes = 4
    coarse = rng.standard_normal((num_classes, modes, channels, height // 4, width // 4)).astype(np.float32)
    protos = np.kron(coarse, np.ones((4, 4), np.float32))  # 4x4-pixel blocks

    def make(n: int) -> Dataset:
        y = rng.integers(0, num_classes, n)
        mode = rng.integers(0, modes, n)
        other = (y + rng.integers(1, num_classes, n)) % num_classes
        other_mode = rng.integers(0, modes, n)
        mix = rng.uniform(0, 0.6, n).astype(np.float32)
        shifts = rng.integers(-2, 3, (n, 2))
        x = np.empty((n, *shape), np.float32)
        for i in range(n):
            img = protos[y[i], mode[i]] + mix[i] * protos[other[i], other_mode[i]]
            x[i] = np.roll(img, tuple(shifts[i]), axis=(1, 2))
        x *= rng.uniform(0.7, 1.3, (n, 1, 1, 1)).astype(np.float32)
        x += rng.normal(0, 0.8, x.shape).astype(np.float32)
        return Dataset(x, y.astype(np.int64))

    return make


# Pixel standard deviation of the colour sets (normalised CIFAR's: 1): see synthetic_dataset.
_COLOUR_SCALE = 2.0


def _bilinear(n: int, g: int) -> np.ndarray:
    """(n, g) matrix of linear interpolation from g evenly spaced points (ends included) to n."""
    pos = np.linspace(0, g - 1, n)
    lo = np.clip(np.floor(pos).astype(np.int64), 0, max(g - 2, 0))
    frac = (pos - lo).astype(np.float32)
    a = np.zeros((n, g), np.float32)
    a[np.arange(n), lo] = 1 - frac
    if g > 1:
        a[np.arange(n), lo + 1] += frac
    return a


def _colour_images(rng: np.random.Generator, num_classes: int, shape: tuple[int, int, int]):
    """The colour generator (see synthetic_dataset), before standardisation."""
    channels, height, width = shape
    up = _bilinear(4, 2)  # the 2x2 layout on the 4x4 grid: bilinear 2 -> 4 -> H is bilinear 2 -> H
    protos = up @ rng.standard_normal((num_classes, channels, 2, 2), dtype=np.float32) @ up.T
    protos += np.float32(0.7) * rng.standard_normal((num_classes, channels, 4, 4), dtype=np.float32)
    rows, cols = _bilinear(height, 4), _bilinear(width, 4).T

    def make(n: int) -> Dataset:
        # Everything but the pixel noise is smooth: built on the 4x4 grid, upsampled once.
        y = rng.integers(0, num_classes, n)
        other = (y + rng.integers(1, num_classes, n)) % num_classes
        own = rng.uniform(0.7, 1.3, (n, 1, 1, 1)).astype(np.float32)
        mix = rng.uniform(0, 0.9, (n, 1, 1, 1)).astype(np.float32)
        grid = own * protos[y] + mix * protos[other]
        grid += np.float32(0.3) * rng.standard_normal(grid.shape, dtype=np.float32)
        flip = rng.random(n) < 0.5
        grid[flip] = grid[flip, :, :, ::-1]  # the interpolation is symmetric: flips the image
        x = rows @ grid @ cols
        x += np.float32(0.5) * rng.standard_normal(x.shape, dtype=np.float32)
        return Dataset(x, y.astype(np.int64))

    return make


# --data names of the synthetic sets: (shape, classes, training-time augmentation as for CIFAR).
SYNTHETIC = {
    "synthetic": ((1, 28, 28), 10, False),
    "synthetic-cifar10": ((3, 32, 32), 10, True),
    "synthetic-cifar100": ((3, 32, 32), 100, True),
}


def iid_partition(n: int, clients: int, seed: int = 0) -> list[np.ndarray]:
    """Indices split uniformly at random into `clients` near-equal shards."""
    return [np.sort(s) for s in np.array_split(np.random.default_rng(seed).permutation(n), clients)]


def dirichlet_partition(labels: np.ndarray, clients: int, alpha: float, seed: int = 0,
                        min_size: int = 10) -> list[np.ndarray]:
    """Non-IID split: each class spread over clients by proportions ~ Dirichlet(alpha); redrawn
    until every client holds at least `min_size` samples (smaller alpha, more skew)."""
    if alpha <= 0:
        raise ValueError("alpha must be > 0")
    if clients * min_size > len(labels):
        raise ValueError(f"{len(labels)} samples cannot give {clients} clients {min_size} each")
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    for _ in range(1000):
        shards: list[list[np.ndarray]] = [[] for _ in range(clients)]
        for c in classes:
            idx = rng.permutation(np.flatnonzero(labels == c))
            cuts = (np.cumsum(rng.dirichlet([alpha] * clients)) * len(idx)).astype(int)[:-1]
            for k, part in enumerate(np.split(idx, cuts)):
                shards[k].append(part)
        out = [np.sort(np.concatenate(s)) for s in shards]
        if min(len(s) for s in out) >= min_size:
            return out
    raise RuntimeError("could not draw a Dirichlet partition meeting min_size; raise alpha or lower min_size")
