"""A real Flower deployment on localhost: one SuperLink and several SuperNodes (separate processes,
each in its own session, started here and killed with their children when the test ends, pass or
fail), `flwr run` of a FedDIP app (tests/flower_app) whose ClientApp uses feddip_mod. Checks a run
finishes with the encoded models on the wire smaller than the dense model in proportion to the
sparsity, and that a run survives nodes that crash, stall or reply with bad bytes. The same for
compression of any Flower app (tests/flower_compress_app): flwr's stock FedAvg wrapped in
Compressed, the ClientApp with sparse_update_mod."""

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("flwr")
if not shutil.which("flower-superlink") or not shutil.which("flower-supernode") or not shutil.which("flwr"):
    pytest.skip("Flower command-line tools not on PATH", allow_module_level=True)

APP = Path(__file__).parent / "flower_app"
COMPRESS_APP = Path(__file__).parent / "flower_compress_app"


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


def _flwr_run(d: _Deployment, report: Path, app: Path = APP, **config) -> None:
    settings = " ".join(f"{k}={json.dumps(v)}" for k, v in {"report": str(report), **config}.items())
    run = subprocess.run(["flwr", "run", str(app), "test", "--run-config", settings], env=d.env, cwd=d.tmp,
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


@contextlib.contextmanager
def _task_identity():
    # Outside a deployment nothing sets the process's task identity, which Message creation reads.
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    try:
        yield
    finally:
        TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


class _Nodes:
    """The part of flwr's Grid that FedAvg.configure_train uses: the nodes of a round."""

    run = None

    def __init__(self, nodes) -> None:
        self.nodes = list(nodes)

    def get_node_ids(self):
        return list(self.nodes)


def _compressed_fedavg_in_process(settings: dict, rounds: list[list[int]], partitions: dict[int, int]) -> dict:
    """The compression app's run recomputed in this process: the same Compressed(FedAvg) and
    ClientApp (mods included), round t sent to and answered by the nodes rounds[t - 1] alone, in
    that order (FedAvg's float sums depend on it); each node with a context of its own that lives
    across rounds (its residual, the model it holds). The final model as NumPy arrays."""
    sys.path.insert(0, str(COMPRESS_APP))
    try:
        from compress_test_app.client_app import app
        from compress_test_app.server_app import fedavg, initial_model
    finally:
        sys.path.remove(str(COMPRESS_APP))
    from flwr.app import Array, ArrayRecord, ConfigRecord, Context, RecordDict

    from feddip_kernels.integrations.flower_compress import Compressed

    strategy = Compressed(fedavg(), **settings)
    contexts = {n: Context(run_id=1, node_id=n, node_config={"partition-id": p}, state=RecordDict(), run_config={})
                for n, p in partitions.items()}
    arrays = ArrayRecord(array_dict={k: Array(v) for k, v in initial_model().items()})
    with _task_identity():
        for t, order in enumerate(rounds, 1):
            messages = {m.metadata.dst_node_id: m
                        for m in strategy.configure_train(t, arrays, ConfigRecord(), _Nodes(order))}
            assert sorted(messages) == sorted(order)
            replies = [app(messages[n], contexts[n]) for n in order]
            arrays, metrics = strategy.aggregate_train(t, replies)
            assert metrics["compress-aggregated"] == len(order), strategy.reasons[-1]
    return {k: a.numpy() for k, a in arrays.items()}


def test_compressed_fedavg_survives_a_killed_and_a_corrupting_node(deployment):
    # Four SuperNodes running tests/flower_compress_app: flwr's FedAvg wrapped in Compressed
    # (density 0.1, int8-ans values up, fp16-ans differences down, error feedback). Partitions 0
    # and 1 behave; 2 flips a bit of every coded reply (a mod outside sparse_update_mod); 3 trains
    # in round 1, then hangs in round 2 and is SIGKILLed there (its SuperNode and ClientApp). The
    # run must finish its three rounds, count 2's replies as rejected and 3 as gone, and end with
    # exactly the model that the same Compressed(FedAvg) computes from the valid replies alone.
    deployment.start(["partition-id=0", "partition-id=1", 'partition-id=2 fault="corrupt"',
                      'partition-id=3 fault="hang"'])
    report = deployment.tmp / "report.json"
    _flwr_run(deployment, report, app=COMPRESS_APP, **{"timeout": 20.0, "stall": 600.0})
    try:
        _wait_for(Path(str(report) + ".hang3").exists, 120, "round 2 to start on the node to kill")
        deployment.kill_node(3)
        _wait_for(report.exists, 120, "the ServerApp's report")
    except TimeoutError:
        raise AssertionError("run did not finish; logs:\n" + deployment.logs_tail()) from None
    r = json.loads(report.read_text())
    node = {p: int(Path(f"{report}.node{p}").read_text()) for p in range(4)}  # partition -> node id
    rounds = r["rounds"]
    assert len(rounds) == 3 and len(r["metrics"]) == 3
    assert sorted(rounds[0]["aggregated"]) == sorted([node[0], node[1], node[3]])
    assert [sorted(x["aggregated"]) for x in rounds[1:]] == [sorted([node[0], node[1]])] * 2
    assert [x["rejected"] for x in rounds] == [[node[2]]] * 3 and r["rejected"] == 3
    assert all("checksum" in reasons[str(node[2])] for reasons in r["reasons"]), r["reasons"]
    assert node[3] in rounds[1]["missing"] + rounds[1]["failed"]  # killed mid-round
    # Round 3: sent a message and gone (missing, or failed once the SuperLink gives the node up),
    # or no longer among the nodes sampled.
    assert rounds[0]["missing"] == rounds[0]["failed"] == [] and node[3] not in rounds[2]["aggregated"]
    for t, x in enumerate(rounds, 1):
        m = r["metrics"][str(t)]
        assert [m[f"compress-{k}"] for k in ("aggregated", "rejected", "failed", "missing")] == [
            len(x[k]) for k in ("aggregated", "rejected", "failed", "missing")]
        sent = len(x["aggregated"]) + len(x["rejected"]) + len(x["failed"]) + len(x["missing"])
        # Down: fp16 values, under half the float32 model a message; up: 10% of the update in int8,
        # under a tenth of it a reply (the rejected one's bytes counted too).
        assert 0 < m["compress-bytes-down"] < 0.5 * sent * r["dense_bytes"]
        assert 0 < m["compress-bytes-up"] < 0.1 * (len(x["aggregated"]) + len(x["rejected"])) * r["dense_bytes"]
    # The final model, bit for bit: the same strategy in process, fed the valid nodes' replies alone.
    partition = {n: p for p, n in node.items()}
    valid = {n: partition[n] for n in rounds[0]["aggregated"]}
    expected = _compressed_fedavg_in_process(r["settings"], [x["aggregated"] for x in rounds], valid)
    with np.load(str(report) + ".npz") as final:
        assert sorted(final.files) == sorted(expected)
        for k, v in expected.items():
            assert final[k].dtype == v.dtype and final[k].tobytes() == v.tobytes(), k
    # The comparison sees what the nodes kept between rounds: without their residuals the model differs.
    forgetful = _compressed_fedavg_in_process({**r["settings"], "error_feedback": False},
                                              [x["aggregated"] for x in rounds], valid)
    assert any(forgetful[k].tobytes() != v.tobytes() for k, v in expected.items())
