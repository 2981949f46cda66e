"""The kernels on cores shared with another process: while parallel regions start late, the
default thread count drops to one (csrc/common.hpp, Contention), with the same results."""

import multiprocessing as mp
import os
import time

import numpy as np
import pytest

import feddip_kernels as fk

core = pytest.importorskip("feddip_kernels._core")
pytestmark = pytest.mark.skipif(not core.openmp, reason="the native extension was built without OpenMP")


def _spin(seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


def _steps(w0: np.ndarray, g: np.ndarray, mask: np.ndarray, calls: int) -> tuple[bytes, list[float]]:
    w, norms = w0.copy(), []
    for _ in range(calls):
        norms.append(fk.masked_ef_step(w, g, mask, lr=1e-3, lam=0.01))
    return w.tobytes(), norms


def test_late_regions_put_the_default_thread_count_on_one_thread_with_the_same_bits():
    rng = np.random.default_rng(0)
    w0 = rng.standard_normal(1 << 20).astype(np.float32)  # several chunks: a parallel region a call
    g = rng.standard_normal(w0.size).astype(np.float32)
    mask = rng.random(w0.size) < 0.1
    fk.set_num_threads(1)
    try:
        alone = _steps(w0, g, mask, 40)
    finally:
        fk.set_num_threads(0)
    assert core._contention()[0]
    before = core._contention()[2]
    load = [mp.get_context("spawn").Process(target=_spin, args=(6.0,)) for _ in range(os.cpu_count() or 2)]
    for p in load:
        p.start()
    try:
        time.sleep(0.5)  # the spinners hold the cores
        serial_seen, t_end = False, time.monotonic() + 4.0
        while time.monotonic() < t_end and not serial_seen:
            assert _steps(w0, g, mask, 40) == alone  # the same bits whatever the thread count
            serial_seen = core._contention()[1]
        enabled, _, late, since, regions = core._contention()
    finally:
        for p in load:
            p.terminate()
            p.join()
    assert late > before and regions >= late and 0 <= since < 10 and serial_seen


def test_adapting_can_be_turned_off_and_an_explicit_count_is_kept():
    try:
        assert core._contention(False)[0] is False
        assert not core._contention()[1]  # never on one thread while off
    finally:
        assert core._contention(True)[0] is True
    fk.set_num_threads(2)
    try:
        assert fk.get_num_threads() == 2
    finally:
        fk.set_num_threads(0)


def test_the_simulation_trains_on_one_torch_thread_while_the_cores_are_shared(monkeypatch, tmp_path):
    torch = pytest.importorskip("torch")
    import json

    from feddip_kernels.fl import simulation
    from feddip_kernels.fl.cli import main

    seen = []
    train = simulation._train_client

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return train(*args, **kwargs)

    monkeypatch.setattr(simulation, "_train_client", spy)
    before = torch.get_num_threads()
    for shared, threads in ((True, 0), (False, 0), (True, 1)):
        monkeypatch.setattr(simulation, "_cores_shared", lambda shared=shared: shared)
        seen.clear()
        out = tmp_path / f"{shared}-{threads}"
        argv = ["simulate", "--algorithm", "feddip", "--rounds", "1", "--clients", "2", "--synthetic-train", "200",
                "--synthetic-test", "50", "--threads", str(threads), "--out", str(out), "--quiet"]
        try:
            assert main(argv) == 0
        finally:
            torch.set_num_threads(before)
            fk.set_num_threads(0)
        want = 1 if shared or threads == 1 else before
        assert seen == [want, want]
        results = json.loads((out / "results.json").read_text())
        assert results["threads"] == threads and results["command"] == ["feddip", *argv]
        assert results["versions"]["feddip-kernels"] == fk.__version__
    assert torch.get_num_threads() == before  # given back after the run


def test_a_probe_times_an_empty_region():
    late = core._probe_contention()
    assert 0 <= late < 60
