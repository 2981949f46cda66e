"""The `feddip` command line as a user meets it: mistakes caught before any work, one error style,
a fast --help with defaults, warnings for settings that cost accuracy, plain lines off a terminal,
and a results.json that reads at a glance."""

import json
import subprocess
import sys

import pytest

from feddip_kernels.fl.cli import ROW_FIELDS, main, parser

pytest.importorskip("torch")

# A run of seconds: 3 clients, 2 rounds on 240 synthetic images.
_TINY = ["simulate", "--rounds", "2", "--clients", "3", "--synthetic-train", "240", "--synthetic-test", "60",
         "--threads", "1"]


def _error(capsys, args):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("feddip simulate: error: "), err
    return err


@pytest.mark.parametrize("args, why", [
    (["--algorithm", "feddip, fedvag"], "--algorithm: 'fedvag' is not one of"),
    (["--algorithm", "feddip,feddip"], "names an algorithm twice"),
    (["--values", "feddip=float16"], "--values: 'float16' is not one of"),
    (["--values", "float16"], "--values: 'float16' is not one of"),
    (["--values", "feddp=fp16"], "--values: 'feddp' is not among the algorithms run"),
    (["--rounding", "stochastic", "--coding", "plain"], "--rounding stochastic: no run quantises"),
    (["--values", "fp16-ans", "--rounding", "stochastic"], "--rounding stochastic: no run quantises"),
    (["--threads", "-1"], "--threads must be"),
    (["--partition", "dirichlet", "--alpha", "0"], "--alpha must be a positive number"),
    (["--data", "/nonexistent/mnist"], "is neither a directory nor one of the built-in sets"),
    (["--device", "gpu"], "--device must be cpu, cuda"),
    (["--sp", "1.5"], "sp"),
    (["--rounds", "0"], "rounds"),
    (["--out", __file__], "exists and is not a directory"),
])
def test_mistakes_are_caught_before_any_work(tmp_path, capsys, monkeypatch, args, why):
    from feddip_kernels.fl import simulation

    def never(*a, **k):
        raise AssertionError("a run started before every argument was checked")

    monkeypatch.setattr(simulation, "run_simulation", never)
    out = tmp_path / "out"
    err = _error(capsys, _TINY + ([] if "--out" in args else ["--out", str(out)]) + args)
    assert why in err
    assert not out.exists()  # nothing written


def test_spaces_after_commas_are_accepted(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(_TINY + ["--algorithm", "feddip, fedavg", "--values", "feddip = int8-ans, fedavg = raw",
                         "--horizon", "10", "--out", str(out), "--quiet"]) == 0
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert list(runs) == ["feddip", "fedavg"]
    assert (runs["feddip"]["config"]["values"], runs["fedavg"]["config"]["values"]) == ("int8-ans", "raw")


def test_help_is_fast_complete_and_shows_defaults():
    # --help loads neither torch nor the simulation: it is read before anything heavy.
    code = ("import sys\nfrom feddip_kernels.fl.cli import main\ntry:\n    main(['simulate', '--help'])\n"
            "except SystemExit:\n    pass\nprint('TORCH' if 'torch' in sys.modules else 'NO TORCH')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout.strip().endswith("NO TORCH")
    text = " ".join(done.stdout.split())  # as argparse wraps it
    assert "(default: synthetic)" in text and "(preset quick 20, paper 1000, compact 150)" in text
    simulate = parser()._subparsers._group_actions[0].choices["simulate"]  # type: ignore[union-attr]
    bare = [a.option_strings for a in simulate._actions if not a.help]
    assert not bare, f"flags without help: {bare}"


def test_a_short_ramp_warns_and_a_missing_checkpoint_is_said(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(_TINY + ["--algorithm", "feddip", "--out", str(out), "--resume"]) == 0
    captured = capsys.readouterr()
    assert "feddip simulate: warning: the sparsity ramp (0.5 -> 0.95, pruning every 2 rounds) runs over 2 rounds" \
        in captured.err
    assert "no checkpoint" in captured.out and "starting it afresh" in captured.out
    assert (out / "feddip.ckpt").exists()  # --resume keeps checkpointing
    # resumed: nothing to do, and no word of starting afresh
    assert main(_TINY + ["--algorithm", "feddip", "--out", str(out), "--resume", "--horizon", "10"]) == 2
    assert main(_TINY + ["--algorithm", "feddip", "--out", str(out), "--resume"]) == 0
    assert "afresh" not in capsys.readouterr().out


def test_off_a_terminal_the_lines_are_plain_and_the_results_read_at_a_glance(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(_TINY + ["--horizon", "10", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "\r" not in captured.out + captured.err  # no progress bar redraws in a file
    lines = captured.out.splitlines()
    assert lines[0].startswith("feddip simulate: preset quick, data synthetic, lenet5, algorithms feddip, fedavg")
    assert f"output {out}" in lines[0] and "threads 1" in lines[0]
    assert sum(line.startswith(("feddip round", "fedavg round")) for line in lines) == 4
    res = json.loads((out / "results.json").read_text())
    assert res["preset"] == "quick" and "alpha" not in res  # alpha: only for a Dirichlet split
    assert res["command"][:2] == ["feddip", "simulate"] and res["versions"]["feddip-kernels"]
    assert res["started"] <= res["finished"] and res["train_examples"] == 240
    rows = res["runs"]["feddip"]["history"]
    assert set(rows[0]) <= set(ROW_FIELDS) and "bytes_cumulative" in rows[0] and "bytes_total" not in rows[0]
    assert rows[1]["bytes_cumulative"] == sum(r["bytes_up"] + r["bytes_down"] for r in rows)
    assert res["fields"] == ROW_FIELDS
    assert res["runs"]["feddip"]["vs_fedavg"]["bytes_ratio"] > 1
    assert (out / "results.png").stat().st_size > 10_000


def test_a_dirichlet_run_records_its_alpha(tmp_path):
    out = tmp_path / "out"
    assert main(_TINY + ["--algorithm", "fedavg", "--partition", "dirichlet", "--alpha", "0.3", "--out", str(out),
                         "--quiet"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert (res["partition"], res["alpha"]) == ("dirichlet", 0.3)


def test_resume_checks_every_checkpoint_before_any_run(tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    args = _TINY + ["--horizon", "10", "--out", str(out), "--quiet", "--checkpoint"]
    assert main(args) == 0
    (out / "fedavg.ckpt").write_bytes(b"garbage")
    from feddip_kernels.fl import simulation

    def never(*a, **k):
        raise AssertionError("a run started before every checkpoint was checked")

    monkeypatch.setattr(simulation, "run_simulation", never)
    err = _error(capsys, args + ["--resume", "--rounds", "4"])
    assert "fedavg.ckpt: 7 bytes is shorter than a header" in err
    # a checkpoint of other settings: the message names them
    err = _error(capsys, args + ["--resume", "--rounds", "4", "--algorithm", "feddip", "--lr", "0.05"])
    assert "lr 0.1 there, 0.05 here" in err


def test_plain_coding_keeps_lossless_values():
    # The quick preset's int4-ans belongs to its compact coding; --coding plain sends raw values.
    from feddip_kernels.fl.cli import _configs

    configs, _ = _configs(parser().parse_args(["simulate", "--coding", "plain"]))
    assert [(c.algorithm, c.values, c.coding) for c in configs] == [("feddip", "raw", "plain"),
                                                                     ("fedavg", "raw", "plain")]
    configs, _ = _configs(parser().parse_args(["simulate"]))
    assert [(c.algorithm, c.values, c.coding) for c in configs] == [("feddip", "int4-ans", "compact"),
                                                                     ("fedavg", "raw", "compact")]


def test_threads_are_left_as_they_were(tmp_path):
    import torch

    import feddip_kernels as fk

    before = torch.get_num_threads(), fk.get_num_threads()
    assert main(_TINY + ["--algorithm", "fedavg", "--rounds", "1", "--out", str(tmp_path / "o"), "--quiet"]) == 0
    assert (torch.get_num_threads(), fk.get_num_threads()) == before
