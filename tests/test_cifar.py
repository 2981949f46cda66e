"""CIFAR-10/100 loaders (binary and python distributions, restricted unpickler) and the training
augmentation, on small files written here in each exact format."""

import os
import pickle

import numpy as np
import pytest

from feddip_kernels.fl import load_dataset, make_model
from feddip_kernels.fl.cifar import augment_batch, find_cifar, load_cifar


def _images(n, seed):
    return np.random.default_rng(seed).integers(0, 256, (n, 3072), dtype=np.uint8)


def _write_cifar10_bin(d, n=4):
    os.makedirs(d)
    for i, name in enumerate([f"data_batch_{k}.bin" for k in range(1, 6)] + ["test_batch.bin"]):
        x, y = _images(n, i), (np.arange(n) + i) % 10
        np.concatenate([y[:, None].astype(np.uint8), x], axis=1).tofile(os.path.join(d, name))


def _write_cifar100_bin(d, n=6):
    os.makedirs(d)
    for i, name in enumerate(["train.bin", "test.bin"]):
        x, fine = _images(n, i), (np.arange(n) * 17 + i) % 100
        np.concatenate([(fine // 5)[:, None].astype(np.uint8), fine[:, None].astype(np.uint8), x], 1).tofile(
            os.path.join(d, name))


def _write_python(d, names, label_key, n=4, protocol=2):
    os.makedirs(d)
    for i, name in enumerate(names):
        batch = {b"batch_label": b"batch", label_key: [int(v) for v in (np.arange(n) * 7 + i) % 10],
                 b"data": _images(n, 10 + i), b"filenames": [b"x.png"] * n}
        with open(os.path.join(d, name), "wb") as f:
            pickle.dump(batch, f, protocol=protocol)


@pytest.mark.parametrize("kind", ["10-bin", "100-bin", "10-py", "100-py"])
def test_every_distribution_loads(tmp_path, kind):
    root = tmp_path / "download"
    if kind == "10-bin":
        _write_cifar10_bin(root / "cifar-10-batches-bin")
        n_train, n_test, labels0 = 20, 4, [0, 1, 2, 3]
    elif kind == "100-bin":
        _write_cifar100_bin(root / "cifar-100-binary")
        n_train, n_test, labels0 = 6, 6, [0, 17, 34, 51]
    elif kind == "10-py":
        _write_python(
            root / "cifar-10-batches-py", [f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"], b"labels"
        )
        n_train, n_test, labels0 = 20, 4, [0, 7, 4, 1]
    else:
        _write_python(root / "cifar-100-python", ["train", "test"], b"fine_labels")
        n_train, n_test, labels0 = 4, 4, [0, 7, 4, 1]
    train, test = load_dataset(str(root))
    assert train.x.shape == (n_train, 3, 32, 32) and test.x.shape == (n_test, 3, 32, 32)
    assert train.x.dtype == np.float32 and train.y.dtype == np.int64
    assert train.y[:4].tolist() == labels0
    np.testing.assert_allclose(train.x.mean(axis=(0, 2, 3)), 0, atol=1e-5)  # per-channel normalisation
    np.testing.assert_allclose(train.x.std(axis=(0, 2, 3)), 1, atol=1e-4)
    assert train.augment and not test.augment
    # Pixel order: the first 1024 bytes are the red plane, row by row.
    raw = _images(4, 0 if "bin" in kind else 10)
    red = raw[0, :1024].reshape(32, 32).astype(np.float32)
    corr = np.corrcoef(red.ravel(), train.x[0, 0].ravel())[0, 1]
    assert corr == pytest.approx(1.0, abs=1e-6)


def test_malicious_and_malformed_files_are_refused(tmp_path):
    d = tmp_path / "cifar-10-batches-py"
    _write_python(d, [f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"], b"labels")

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    with open(d / "data_batch_3", "wb") as f:
        pickle.dump({b"data": Evil(), b"labels": [1]}, f, protocol=2)
    with pytest.raises(ValueError, match="refusing"):
        load_cifar(str(tmp_path))
    assert not (tmp_path / "pwned").exists()
    with open(d / "data_batch_3", "wb") as f:  # a float array is not CIFAR data
        pickle.dump({b"data": np.zeros((2, 3072)), b"labels": [1, 2]}, f, protocol=2)
    with pytest.raises(ValueError, match="uint8"):
        load_cifar(str(tmp_path))
    with open(d / "data_batch_3", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 3072), np.uint8), b"labels": [1]}, f, protocol=2)
    with pytest.raises(ValueError, match="labels"):
        load_cifar(str(tmp_path))
    b = tmp_path / "bin" / "cifar-10-batches-bin"
    _write_cifar10_bin(b)
    with open(b / "test_batch.bin", "ab") as f:
        f.write(b"\x00" * 10)
    with pytest.raises(ValueError, match="records"):
        load_cifar(str(tmp_path / "bin"))
    assert find_cifar(str(tmp_path / "nothing")) is None
    with pytest.raises(FileNotFoundError):
        load_dataset(str(tmp_path / "nothing"))


def test_augmentation_crops_and_flips_reproducibly():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 3, 32, 32)).astype(np.float32)
    a = augment_batch(x, np.random.default_rng(1))
    assert a.shape == x.shape and a.dtype == x.dtype
    np.testing.assert_array_equal(a, augment_batch(x, np.random.default_rng(1)))  # seeded
    # Each output is the image shifted by at most 4 pixels (zeros come in), possibly mirrored.
    for i in range(64):
        padded = np.pad(x[i], ((0, 0), (4, 4), (4, 4)))
        found = any(np.array_equal(a[i], (padded[:, dy:dy + 32, dx:dx + 32])[:, :, ::f])
                    for dy in range(9) for dx in range(9) for f in (1, -1))
        assert found, i
    flipped = sum(not any(np.array_equal(a[i], np.pad(x[i], ((0, 0), (4, 4), (4, 4)))[:, dy:dy + 32, dx:dx + 32])
                          for dy in range(9) for dx in range(9)) for i in range(64))
    assert 16 < flipped < 48


def test_paper_models_have_the_papers_sizes():
    sizes = {("lenet5", 1, 10): 61_706, ("alexnet", 3, 10): 23_272_266, ("resnet18", 3, 100): 11_220_132}
    for (name, channels, classes), n in sizes.items():
        assert sum(p.numel() for p in make_model(name, channels, classes).parameters()) == n


def test_simulation_trains_on_cifar_with_augmentation(tmp_path):
    from feddip_kernels.fl import iid_partition, run_simulation
    from feddip_kernels.fl.simulation import SimulationConfig

    _write_cifar10_bin(tmp_path / "cifar-10-batches-bin", n=8)
    train, test = load_dataset(str(tmp_path))
    cfg = SimulationConfig(algorithm="feddip", model="alexnet", clients=2, clients_per_round=None, rounds=1,
                           local_epochs=1, batch_size=8, seed=0)
    a = run_simulation(cfg, train, test, iid_partition(len(train), 2))
    b = run_simulation(cfg, train, test, iid_partition(len(train), 2))
    assert a.history[-1]["bytes_up"] > 0 and a.history[-1]["loss"] == b.history[-1]["loss"]  # seeded


class _Reshaped:
    """Pickles as a uint8 (n, 3072) array whose recorded shape is `shape` (a crafted batch)."""

    def __init__(self, shape, n=1):
        self.shape, self.n = shape, n

    def __reduce__(self):
        rebuild, args, state = np.zeros((self.n, 3072), np.uint8).__reduce__()
        return rebuild, args, (state[0], self.shape, *state[2:])


@pytest.mark.parametrize("shape", [(1.0, 3072), (1, 3072.0), (True, 3072), ("1", 3072), (None, 3072), [1, 3072],
                                   (1, 3072, 1), (1,), (-1, 3072), (2**70, 3072), (1, 1024 * 3 + 0.0)])
def test_pickled_shapes_that_are_not_int_pairs_are_refused(tmp_path, shape):
    # (1.0, 3072) matches the byte count and reached reshape, which raised TypeError before.
    d = tmp_path / "cifar-10-batches-py"
    _write_python(d, [f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"], b"labels")
    with open(d / "data_batch_2", "wb") as f:
        pickle.dump({b"data": _Reshaped(shape), b"labels": [1]}, f, protocol=2)
    with pytest.raises(ValueError, match="shape"):
        load_cifar(str(tmp_path))
    with open(d / "data_batch_2", "wb") as f:  # the same file with the true shape loads
        pickle.dump({b"data": _Reshaped((1, 3072)), b"labels": [1]}, f, protocol=2)
    assert len(load_cifar(str(tmp_path))[0]) == 17
