"""CIFAR-10 and CIFAR-100 as their authors ship them, in both distributions:

- binary: fixed-size records, CIFAR-10 `data_batch_1.bin` .. `data_batch_5.bin` and
  `test_batch.bin` (a label byte, then 3072 pixel bytes: 1024 red, 1024 green, 1024 blue),
  CIFAR-100 `train.bin` and `test.bin` (a coarse and a fine label byte, then the pixels);
- python: pickled dicts, CIFAR-10 `data_batch_1` .. `data_batch_5` and `test_batch`, CIFAR-100
  `train` and `test`. They are read by an unpickler that builds only dicts, lists, strings,
  numbers and uint8 arrays (numpy's array reconstruction is replaced by a checker that takes the
  raw bytes), so a malicious file cannot run code.

Images come out as (N, 3, 32, 32) float32, normalised per channel with the training set's mean
and standard deviation; the training set is marked for augmentation (random 32x32 crop of the
image padded by 4, horizontal flip: `augment_batch`), applied per batch in training only.
"""

from __future__ import annotations

import io
import os
import pickle
from typing import Any, cast

import numpy as np

from .dataset import Dataset

_PIXELS = 3 * 32 * 32
_LAYOUTS = {
    # name: (train files, test files, label bytes per record (binary) or label key (python))
    "cifar-10-bin": ([f"data_batch_{i}.bin" for i in range(1, 6)], ["test_batch.bin"], 1),
    "cifar-100-bin": (["train.bin"], ["test.bin"], 2),
    "cifar-10-py": ([f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], b"labels"),
    "cifar-100-py": (["train"], ["test"], b"fine_labels"),
}
_SUBDIRS = ("cifar-10-batches-bin", "cifar-100-binary", "cifar-10-batches-py", "cifar-100-python")


def find_cifar(directory: str) -> tuple[str, str] | None:
    """(layout, directory holding its files) of a CIFAR distribution at `directory` or in one of
    the folders its archives unpack to; None when there is none."""
    for d in (directory, *(os.path.join(directory, s) for s in _SUBDIRS)):
        for name, (train, test, _) in _LAYOUTS.items():
            if all(os.path.isfile(os.path.join(d, f)) for f in train + test):
                return name, d
    return None


def load_cifar(directory: str) -> tuple[Dataset, Dataset]:
    """(train, test) of the CIFAR distribution at `directory` (see the module's docstring)."""
    found = find_cifar(directory)
    if found is None:
        raise FileNotFoundError(f"no CIFAR-10/100 files (binary or python version) in {directory}")
    name, d = found
    train_files, test_files, labels = _LAYOUTS[name]
    def read(path: str) -> tuple[np.ndarray, np.ndarray]:
        # labels is the label bytes per record (binary) or the label key (python): _LAYOUTS
        if name.endswith("bin"):
            return _read_binary(path, cast(int, labels))
        return _read_python(path, cast(bytes, labels))

    parts = []
    for files in (train_files, test_files):
        xs, ys = zip(*(read(os.path.join(d, f)) for f in files))
        parts.append((np.concatenate(xs), np.concatenate(ys)))
    (xtr, ytr), (xte, yte) = ((xs.reshape(-1, 3, 32, 32).astype(np.float32) / 255.0, ys) for xs, ys in parts)
    mean, std = xtr.mean(axis=(0, 2, 3), keepdims=True), xtr.std(axis=(0, 2, 3), keepdims=True)
    train = Dataset((xtr - mean) / std, ytr.astype(np.int64), augment=True)
    return train, Dataset((xte - mean) / std, yte.astype(np.int64))


def _read_binary(path: str, label_bytes: int) -> tuple[np.ndarray, np.ndarray]:
    record = label_bytes + _PIXELS
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size == 0 or raw.size % record:
        raise ValueError(f"{path}: {raw.size} bytes is not a whole number of {record}-byte CIFAR records")
    rows = raw.reshape(-1, record)
    return rows[:, label_bytes:], rows[:, label_bytes - 1]  # CIFAR-100: the fine label, second


class _Array:
    """Stands in for numpy's array reconstruction: keeps the state (shape, dtype, raw bytes) that
    the pickle hands it, checked and turned into an array by `_to_array`."""

    def __init__(self, *args: Any) -> None:
        self.state: Any = None

    def __setstate__(self, state: Any) -> None:
        self.state = state


class _DType:
    def __init__(self, name: Any = None, *args: Any) -> None:
        self.name = name.decode() if isinstance(name, bytes) else name

    def __setstate__(self, state: Any) -> None:
        self.state = state


def _latin1_bytes(text: Any, encoding: str = "latin1") -> bytes:
    """What pickle protocol 2 written by Python 3 uses to rebuild bytes (_codecs.encode)."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("only latin-1 text is rebuilt into bytes")
    return text.encode("latin1")


class _Unpickler(pickle.Unpickler):
    _ALLOWED = {
        ("_codecs", "encode"): _latin1_bytes,
        ("numpy.core.multiarray", "_reconstruct"): _Array,
        ("numpy._core.multiarray", "_reconstruct"): _Array,
        ("numpy", "ndarray"): _Array,
        ("numpy", "dtype"): _DType,
    }

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refusing {module}.{name}: a CIFAR batch holds only arrays and lists") from None


def _to_array(obj: Any, path: str) -> np.ndarray:
    if not isinstance(obj, _Array) or not isinstance(obj.state, tuple) or len(obj.state) != 5:
        raise ValueError(f"{path}: 'data' is not a pickled array")
    _, shape, dtype, fortran, raw = obj.state
    if not isinstance(dtype, _DType) or dtype.name != "u1" or fortran or not isinstance(raw, (bytes, bytearray)):
        raise ValueError(f"{path}: 'data' must be a C-ordered uint8 array")
    # The pickle supplies the shape: its entries must be ints (not bools, floats or anything else
    # that compares equal to one) before they reach arithmetic and reshape.
    if not (isinstance(shape, tuple) and len(shape) == 2 and all(type(s) is int for s in shape)
            and shape[1] == _PIXELS and shape[0] * _PIXELS == len(raw)):
        raise ValueError(f"{path}: 'data' has shape {shape!r} and {len(raw)} bytes, expected (n, {_PIXELS}) of ints")
    return np.frombuffer(raw, dtype=np.uint8).reshape(shape)


def _read_python(path: str, label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    with open(path, "rb") as f:
        try:
            batch = _Unpickler(io.BytesIO(f.read()), encoding="bytes").load()
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as e:
            raise ValueError(f"{path}: not a CIFAR python batch ({e})") from None
    if not isinstance(batch, dict) or b"data" not in batch or label_key not in batch:
        raise ValueError(f"{path}: a CIFAR python batch is a dict with b'data' and {label_key!r}")
    x = _to_array(batch[b"data"], path)
    y = np.asarray(batch[label_key])
    if y.ndim != 1 or len(y) != len(x) or y.dtype.kind not in "iu" or (len(y) and (y.min() < 0 or y.max() > 99)):
        raise ValueError(f"{path}: {label_key!r} must be {len(x)} labels in [0, 100)")
    return x, y


def augment_batch(x: np.ndarray, rng: np.random.Generator, pad: int = 4) -> np.ndarray:
    """A random crop of each image padded by `pad` zeros (the normalised mean), the original size,
    then a horizontal flip with probability 1/2; the whole batch at once."""
    n, c, h, w = x.shape
    padded = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    shifts: np.ndarray = rng.integers(0, 2 * pad + 1, (2, n))
    dy, dx = shifts[0], shifts[1]
    rows = dy[:, None] + np.arange(h)
    cols: np.ndarray = dx[:, None] + np.arange(w)
    flip = rng.random((n, 1)) < 0.5
    cols = np.where(flip, cols[:, ::-1], cols)
    return padded[np.arange(n)[:, None, None, None], np.arange(c)[None, :, None, None],
                  rows[:, None, :, None], cols[:, None, None, :]]
