"""A real Flower deployment on localhost: one SuperLink and several SuperNodes (separate processes,
each in its own session, started here and killed with their children when the test ends, pass or
fail), `flwr run` of a FedDIP app (tests/flower_app) whose ClientApp uses feddip_mod. Checks a run
finishes with the encoded models on the wire smaller than the dense model in proportion to the
sparsity, and that a run survives nodes that crash, stall or reply with bad bytes."""

import json
import os
import shutil
import signal
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


class _Deployment:
    """A SuperLink and SuperNodes on loopback; `stop()` kills every process group it started."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp = tmp_path
        home = tmp_path / "flwr-home"
        home.mkdir()
        self.link = _free_port()
        self.env = {**os.environ, "FLWR_HOME": str(home)}
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "test"\n\n[superlink.test]\naddress = "127.0.0.1:{self.link}"\ninsecure = true\n'
        )
        self.procs: list[subprocess.Popen] = []
        self.nodes: dict[int, subprocess.Popen] = {}
        self.logs = []

    def _start(self, cmd: list[str], name: str) -> subprocess.Popen:
        log = open(self.tmp / f"{name}.log", "wb")
        self.logs.append(log)
        # A session of its own: the process and everything it starts (ClientApp processes) form one
        # group that stop() can kill at once.
        proc = subprocess.Popen(cmd, env=self.env, cwd=self.tmp, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        self.procs.append(proc)
        return proc

    def start(self, node_configs: list[str]) -> None:
        self._start(["flower-superlink", "--insecure", "--port", str(self.link)], "superlink")
        _wait_for(lambda: _port_open(self.link), 60, "the SuperLink")
        for i, config in enumerate(node_configs):
            self.nodes[i] = self._start(["flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{self.link}",
                                         "--port", str(_free_port()), "--node-config", config], f"supernode{i}")

    def kill_node(self, i: int) -> None:
        os.killpg(self.nodes[i].pid, signal.SIGKILL)

    def logs_tail(self) -> str:
        return "\n".join(p.read_text(errors="replace")[-3000:] for p in self.tmp.glob("*.log"))

    def stop(self) -> None:
        for p in self.procs:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for p in self.procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(p.pid, signal.SIGKILL)  # stragglers of the group, the ClientApps included
            except ProcessLookupError:
                pass
            p.wait()
        for log in self.logs:
            log.close()


@pytest.fixture
def deployment(tmp_path):
    d = _Deployment(tmp_path)
    try:
        yield d
    finally:
        d.stop()


def _flwr_run(d: _Deployment, report: Path, **config) -> None:
    settings = " ".join(f"{k}={json.dumps(v)}" for k, v in {"report": str(report), **config}.items())
    run = subprocess.run(["flwr", "run", str(APP), "test", "--run-config", settings], env=d.env, cwd=d.tmp,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr


def test_two_round_feddip_run_over_a_real_deployment(deployment):
    deployment.start(["partition-id=0", "partition-id=1"])
    report = deployment.tmp / "report.json"
    _flwr_run(deployment, report)

    def finished():
        return report.exists() and report.stat().st_size > 0

    try:
        _wait_for(finished, 120, "the ServerApp's report")
    except TimeoutError:
        raise AssertionError("run did not finish; logs:\n" + deployment.logs_tail()) from None
    r = json.loads(report.read_text())
    messages = 2 * 2  # two rounds, two nodes
    # Round 1 (t = 0) moves the dense model both ways (clients train under their own ERK masks);
    # round 2 sends the model pruned to s0 = 0.5 and gets back the values under that mask; then
    # the server prunes to s_1 = 0.85.
    assert 0.5 * messages * r["dense_bytes"] < r["bytes_down"] < 0.85 * messages * r["dense_bytes"]
    assert 0.5 * messages * r["dense_bytes"] < r["bytes_up"] < 0.8 * messages * r["dense_bytes"]
    assert r["sparsity"] > 0.8


def test_run_survives_crashed_stalled_and_lying_nodes(deployment):
    # Six SuperNodes: two behave; one replies corrupt bytes, one a valid message for another model,
    # one never replies within the round's timeout, and one is SIGKILLed (its whole process group)
    # in the middle of round 2. The run must finish its three rounds with exactly the model
    # aggregated from the valid replies, and count the others.
    sys.path.insert(0, str(APP))
    try:
        from feddip_test_app.client_app import update
        from feddip_test_app.server_app import initial_model
    finally:
        sys.path.remove(str(APP))
    from feddip_kernels import decode_model
    from feddip_kernels.protocol import FedDIPServer, Schedule, apply_mask

    deployment.start([f"partition-id={p}" + (f" fault={f}" if f else "") for p, f in enumerate([0, 0, 1, 2, 3, 4])])
    report = deployment.tmp / "report.json"
    _flwr_run(deployment, report, **{"num-server-rounds": 3, "nodes": 6, "timeout": 25.0, "stall": 90.0})
    marker = Path(str(report) + ".round2-5")
    try:
        _wait_for(marker.exists, 120, "round 2 to start on the node to kill")
        deployment.kill_node(5)
        _wait_for(lambda: report.exists() and report.stat().st_size > 0, 180, "the ServerApp's report")
    except TimeoutError:
        raise AssertionError("run did not finish; logs:\n" + deployment.logs_tail()) from None
    r = json.loads(report.read_text())
    rounds = r["rounds"]
    assert [len(x["aggregated"]) for x in rounds] == [3, 2, 2]  # partitions 0, 1 (and 5 before its death)
    assert [len(x["rejected"]) for x in rounds] == [2, 2, 2] and r["rejected"] == 6
    assert [len(x["missing"]) + len(x["failed"]) for x in rounds][1] >= 2  # the stalled and the killed node
    assert all(len(x["missing"]) + len(x["failed"]) >= 1 for x in rounds)
    # The final model, recomputed from the valid nodes' updates alone.
    server = FedDIPServer(
        initial_model(), ["conv.weight", "fc.weight"], Schedule(rounds=3, s0=0.5, sp=0.9, mask_every=1)
    )
    for t, valid in enumerate([[0, 1, 5], [0, 1], [0, 1]]):
        uploads = []
        for p in valid:
            local = update(server.weights, p, t)
            uploads.append(
                ({k: apply_mask(v, server.masks[k]) if k in server.masks else v for k, v in local.items()}, 10.0)
            )
        server.aggregate(uploads)
    final = decode_model(Path(str(report) + ".model").read_bytes()).tensors
    for k, v in server.weights.items():
        assert final[k].tobytes() == v.tobytes(), k
