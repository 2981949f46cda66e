"""A real Flower deployment on localhost: one SuperLink and two SuperNodes (separate processes,
started and stopped here), `flwr run` of a two-round FedDIP app (tests/flower_app) whose ClientApp
uses feddip_mod. Checks the run finishes and that the encoded models on the wire are smaller than
the dense model in proportion to the sparsity."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("flwr")
if not shutil.which("flower-superlink") or not shutil.which("flower-supernode") or not shutil.which("flwr"):
    pytest.skip("Flower command-line tools not on PATH", allow_module_level=True)

APP = Path(__file__).parent / "flower_app"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture
def deployment(tmp_path):
    home = tmp_path / "flwr-home"
    home.mkdir()
    link = _free_port()
    env = {**os.environ, "FLWR_HOME": str(home)}
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "test"\n\n[superlink.test]\naddress = "127.0.0.1:{link}"\ninsecure = true\n'
    )
    procs, logs = [], []

    def start(cmd, name):
        log = open(tmp_path / f"{name}.log", "wb")
        logs.append(log)
        procs.append(subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT))

    try:
        start(["flower-superlink", "--insecure", "--port", str(link)], "superlink")
        _wait_for(lambda: _port_open(link), 60, "the SuperLink")
        for i in range(2):
            start(["flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{link}",
                   "--port", str(_free_port()), "--node-config", f"partition-id={i}"], f"supernode{i}")
        yield env, tmp_path
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
        for log in logs:
            log.close()


def test_two_round_feddip_run_over_a_real_deployment(deployment):
    env, tmp = deployment
    report = tmp / "report.json"
    run = subprocess.run(
        ["flwr", "run", str(APP), "test", "--run-config", f'report="{report}"'],
        env=env, cwd=tmp, capture_output=True, text=True, timeout=120,
    )
    assert run.returncode == 0, run.stdout + run.stderr

    def finished():
        return report.exists() and report.stat().st_size > 0

    try:
        _wait_for(finished, 120, "the ServerApp's report")
    except TimeoutError:
        logs = "\n".join(p.read_text(errors="replace")[-3000:] for p in tmp.glob("*.log"))
        raise AssertionError("run did not finish; logs:\n" + logs) from None
    r = json.loads(report.read_text())
    messages = 2 * 2  # two rounds, two nodes
    # Round 1 (t = 0) moves the dense model both ways (clients train under their own ERK masks);
    # round 2 sends the model pruned to s0 = 0.5 and gets back the values under that mask; then
    # the server prunes to s_1 = 0.85.
    assert 0.5 * messages * r["dense_bytes"] < r["bytes_down"] < 0.85 * messages * r["dense_bytes"]
    assert 0.5 * messages * r["dense_bytes"] < r["bytes_up"] < 0.8 * messages * r["dense_bytes"]
    assert r["sparsity"] > 0.8
