"""Write a 28x28, 10-class IDX data set derived from another one (such as MNIST), for checking an
FL recipe on data it was not tuned on: every image's pixels are permuted by one fixed random
permutation and their intensities inverted, and the labels are relabelled by a fixed random
permutation of the classes. Spatial structure is gone, so convolutions see other statistics.

    python tools/derive_idx.py ../shared/data/mnist /tmp/heldout --seed 7
"""

from __future__ import annotations

import argparse
import gzip
import os
import struct
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from feddip_kernels.fl.data import read_idx  # noqa: E402

FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def _find(src: str, stem: str) -> str:
    for name in (stem, stem + ".gz"):
        if os.path.exists(os.path.join(src, name)):
            return os.path.join(src, name)
    raise FileNotFoundError(f"{stem}[.gz] not in {src}")


def _write(path: str, arr: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    with gzip.open(path + ".gz", "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src")
    ap.add_argument("dst")
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    pixels, classes = rng.permutation(28 * 28), rng.permutation(10)
    os.makedirs(args.dst, exist_ok=True)
    for stem in FILES:
        a = read_idx(_find(args.src, stem))
        if "images" in stem:
            a = 255 - a.reshape(len(a), -1)[:, pixels].reshape(a.shape)
        else:
            a = classes[a]
        _write(os.path.join(args.dst, stem), a)
    print(f"wrote {args.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
