"""Command line: `feddip simulate` (FL simulation: FedDIP, FedDP, FedAvg), `feddip info` (backends,
build) and `feddip prune` (global top-k on model-sized random weights, timed per backend)."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Optional, Sequence

import numpy as np

from .. import __version__, _backend
from .._backend import MAX_THREADS, set_num_threads
from ..codecs import VALUE_CODECS
from ..codecs.values import QUANTISED
from ..pruning import global_topk_masks


def _info(_: argparse.Namespace) -> int:
    core = _backend.native_module()
    print(f"feddip-kernels {__version__}")
    print(f"backends: {', '.join(_backend.available_backends())}")
    print(f"native OpenMP: {bool(core and core.openmp)}")
    return 0


def _versions() -> dict[str, str]:
    """The versions that decide a run's numbers, for results.json."""
    import platform

    import torch

    return {"feddip-kernels": __version__, "torch": torch.__version__, "numpy": np.__version__,
            "python": platform.python_version()}


def _prune(args: argparse.Namespace) -> int:
    rng = np.random.default_rng(args.seed)
    sizes = [args.elements // args.tensors] * args.tensors
    ws = [rng.standard_normal(n, dtype=np.float32) for n in sizes]
    n = sum(sizes)
    for be in _backend.available_backends():
        global_topk_masks(ws, density=args.density, backend=be)  # warm-up (numba compiles here)
        t0 = time.perf_counter()
        masks = global_topk_masks(ws, density=args.density, backend=be)
        dt = time.perf_counter() - t0
        kept = sum(int(m.sum()) for m in masks)
        print(f"{be:>7}: kept {kept:,} of {n:,} in {dt * 1e3:8.2f} ms ({4 * n / dt / 1e9:.2f} GB/s)")
    return 0


def _values_per_algorithm(spec: Optional[str], algorithms: list[str],
                          defaults: Optional[dict[str, str]] = None) -> dict[str, str]:
    """'fp16' for every algorithm, or 'feddip=fp16,fedavg=raw' (unnamed algorithms: their
    default), over the defaults (the preset's; raw where it names none). None: the defaults."""
    out = {alg: (defaults or {}).get(alg, "raw") for alg in algorithms}
    if spec is None:
        return out
    if "=" not in spec:
        if spec not in VALUE_CODECS:
            raise SystemExit(f"--values: {spec!r} is not one of {', '.join(VALUE_CODECS)}")
        return {alg: spec for alg in algorithms}
    for item in spec.split(","):
        alg, _, codec = item.partition("=")
        if alg not in algorithms:
            raise SystemExit(f"--values: {alg!r} is not among the algorithms run ({', '.join(algorithms)})")
        if codec not in VALUE_CODECS:
            raise SystemExit(f"--values: {codec!r} is not one of {', '.join(VALUE_CODECS)}")
        out[alg] = codec
    return out


# Settings a preset provides; a flag given on the command line overrides its preset's value.
_PRESET_KEYS = ("clients", "clients_per_round", "rounds", "local_epochs", "batch_size", "lr", "lr_decay", "momentum",
                "weight_decay", "s0", "sp", "horizon", "mask_every", "lambda_max", "lambda_segments", "coding")


def _settings(args: argparse.Namespace) -> dict:
    from .simulation import PRESETS

    out = {k: getattr(args, k) if getattr(args, k) is not None else PRESETS[args.preset][k] for k in _PRESET_KEYS}
    if args.all_clients:
        out["clients_per_round"] = None
    # The paper averages with equal weights on IID splits and by sample count on non-IID ones.
    out["weighting"] = args.weighting or ("equal" if args.partition == "iid" else "samples")
    out["residual_feedback"] = not args.no_residual_feedback
    return out


def _device(name: str) -> str:
    """The torch device for --device: cpu, cuda[:N], or auto (cuda when torch sees one)."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return name
    if name.split(":")[0] != "cuda":
        raise ValueError(f"--device must be cpu, cuda, cuda:N or auto, got {name!r}")
    if not torch.cuda.is_available():
        raise ValueError(f"--device {name}: torch sees no CUDA device (this torch build: {torch.__version__})")
    return name


def _simulate(args: argparse.Namespace) -> int:
    import dataclasses
    import json
    import os

    from . import SimulationConfig, dirichlet_partition, iid_partition, load_dataset, run_simulation, synthetic_dataset
    from .data import SYNTHETIC
    from .report import plot_histories
    from .simulation import ALGORITHMS, PRESETS

    try:
        from tqdm import tqdm
    except ImportError:  # the progress bar is optional
        tqdm = None

    if args.data in SYNTHETIC:
        shape, classes, augment = SYNTHETIC[args.data]
        train, test = synthetic_dataset(args.synthetic_train, args.synthetic_test, classes, seed=args.seed, shape=shape)
        train.augment = augment
        data_name = args.data
    else:
        train, test = load_dataset(args.data)
        data_name = os.path.abspath(args.data)
    settings = _settings(args)
    device = _device(args.device)
    if not 0 <= args.threads <= MAX_THREADS:
        raise ValueError(f"--threads must be from 0 to {MAX_THREADS}, got {args.threads}")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
        set_num_threads(args.threads)
    clients = settings["clients"]
    if args.partition == "iid":
        parts = iid_partition(len(train), clients, seed=args.seed)
    else:
        parts = dirichlet_partition(train.y, clients, args.alpha, seed=args.seed)
    algorithms = list(ALGORITHMS) if args.algorithm == "all" else args.algorithm.split(",")
    values = _values_per_algorithm(args.values, algorithms, PRESETS[args.preset]["values"])
    if args.rounding != "nearest" and not (settings["coding"] == "compact"
                                           and any(v in QUANTISED for v in values.values())):
        raise SystemExit("--rounding stochastic: no run quantises its values (it needs --coding compact and "
                         "int2-ans .. int8-ans values)")
    os.makedirs(args.out, exist_ok=True)
    results = {"data": data_name, "partition": args.partition, "alpha": args.alpha, "device": device,
               "threads": args.threads, "command": ["feddip", *args.argv], "versions": _versions(), "runs": {}}
    for alg in algorithms:
        cfg = SimulationConfig(algorithm=alg, model=args.model, values=values[alg], seed=args.seed, **settings)
        if cfg.compact and cfg.values in QUANTISED:  # stochastic rounding: for the runs that quantise
            cfg = dataclasses.replace(cfg, rounding=args.rounding)
        bar = tqdm(total=cfg.rounds, desc=alg, unit="round", disable=args.quiet or tqdm is None) if tqdm else None

        def log(row: dict, alg: str = alg, bar=bar) -> None:
            line = (
                f"{alg} round {row['round']:3d}  acc {100 * row['accuracy']:6.2f}%  sparsity {row['sparsity']:.3f}  "
                f"up {row['bytes_up'] / 1e3:9.1f} kB  down {row['bytes_down'] / 1e3:9.1f} kB  "
                f"train {row['time_train']:.2f}s prune {row['time_prune']:.3f}s encode {row['time_encode']:.3f}s "
                f"round {row['time_round']:.2f}s"
                + (
                    f"  {row['clients_failed']} client(s) failed: {'; '.join(row['failures'])}"
                    if row["clients_failed"]
                    else ""
                )
            )
            if bar is not None:
                bar.update(1)
            if args.quiet:
                return
            if bar is not None:
                bar.write(line)
            else:
                print(line, flush=True)

        ckpt = os.path.join(args.out, f"{alg}.ckpt") if args.checkpoint else None
        state = run_simulation(cfg, train, test, parts, checkpoint=ckpt, resume=args.resume, on_round=log,
                               device=device, adapt_threads=args.threads == 0)
        if bar is not None:
            bar.close()
        results["runs"][alg] = {"config": dataclasses.asdict(cfg), "history": state.history}
        last = state.history[-1]
        print(f"{alg}: final accuracy {100 * last['accuracy']:.2f}%, sparsity {last['sparsity']:.3f}, "
              f"{last['bytes_total'] / 1e6:.2f} MB sent", flush=True)
    runs = results["runs"]
    if "fedavg" in runs:
        base = runs["fedavg"]["history"][-1]
        for alg, run in runs.items():
            last = run["history"][-1]
            run["vs_fedavg"] = {
                "accuracy_points": 100 * (last["accuracy"] - base["accuracy"]),
                "bytes_ratio": base["bytes_total"] / last["bytes_total"],
            }
            if alg != "fedavg":
                print(f"{alg} vs fedavg: {run['vs_fedavg']['accuracy_points']:+.2f} accuracy points, "
                      f"{run['vs_fedavg']['bytes_ratio']:.1f}x fewer bytes")
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    plot_histories({a: r["history"] for a, r in runs.items()}, os.path.join(args.out, "results.png"),
                   title=f"{args.model} on {os.path.basename(data_name)}, {clients} clients")
    print(f"wrote {os.path.join(args.out, 'results.json')} and results.png")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="feddip", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="show version and available backends").set_defaults(fn=_info)
    p = sub.add_parser("prune", help="time global magnitude top-k on random weights per backend")
    p.add_argument("--elements", type=int, default=11_164_352)
    p.add_argument("--tensors", type=int, default=21)
    p.add_argument("--density", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(fn=_prune)

    p = sub.add_parser("simulate", help="run a federated-learning simulation (needs the [fl] extra)")
    p.add_argument("--algorithm", default="all",
                   help="feddip, feddp (no regulariser), feddip-noef (no error feedback), fedavg, a comma list, or all")
    p.add_argument("--data", default="synthetic",
                   help="directory of CIFAR-10/100 (binary or python version) or MNIST-style IDX files; or a built-in "
                        "set: synthetic (1x28x28, 10 classes), synthetic-cifar10 or synthetic-cifar100 (3x32x32, "
                        "10 or 100 classes, augmented in training as CIFAR is)")
    p.add_argument("--synthetic-train", type=int, default=20000)
    p.add_argument("--synthetic-test", type=int, default=1000)
    p.add_argument("--model", default="lenet5", choices=["lenet5", "alexnet", "resnet18"])
    p.add_argument(
        "--preset",
        default="quick",
        choices=["quick", "paper", "compact"],
        help="settings to start from: paper = the FedDIP paper's setup (50 clients, 5 a round, 1000 rounds, "
        "5 epochs, batch 128, lr 0.1*0.998^t, no momentum, s0 0.5 -> sp 0.95, R 5); quick = the same "
        "algorithm on 10 clients, all every round, 20 rounds, 1 epoch, batch 64, R 2; compact = paper's over "
        "150 rounds with the schedules over 15 (--horizon 15) and --coding compact, values int4-ans for the "
        "FedDIP family (raw for fedavg). Flags override it",
    )
    p.add_argument("--clients", type=int)
    p.add_argument("--clients-per-round", type=int)
    p.add_argument("--all-clients", action="store_true", help="every client trains every round")
    p.add_argument("--partition", default="iid", choices=["iid", "dirichlet"])
    p.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration (non-IID)")
    p.add_argument("--weighting", choices=["equal", "samples"],
                   help="averaging weights (default: equal for iid, by sample count for dirichlet)")
    p.add_argument("--rounds", type=int)
    p.add_argument("--local-epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--lr-decay", type=float)
    p.add_argument("--momentum", type=float)
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--s0", type=float, help="initial sparsity")
    p.add_argument("--sp", type=float, help="final sparsity")
    p.add_argument("--horizon", "--prune-rounds", dest="horizon", type=int,
                   help="rounds over which the sparsity and lambda schedules run (default: the whole run)")
    p.add_argument("--mask-every", type=int, help="R: prune every R rounds")
    p.add_argument("--lambda-max", type=float)
    p.add_argument("--lambda-segments", type=int, help="Q: segments of the lambda schedule")
    p.add_argument(
        "--values", default=None,
        help="value codec of every transfer: raw (lossless fp32), ans (lossless, entropy-coded), auto, fp16, "
             "bf16, int8, or entropy-coded fp16-ans, bf16-ans, int2-ans .. int8-ans; or per algorithm, e.g. "
             "feddip=int4-ans,fedavg=raw (algorithms not named keep the preset's: raw, but for compact's)",
    )
    p.add_argument("--coding", choices=["plain", "compact"],
                   help="plain: transfers carry the model; compact (with lossy --values): the difference from "
                        "what the other end holds, quantised, its error carried to the next contact "
                        "(default: the preset's)")
    p.add_argument("--rounding", default="nearest", choices=["nearest", "stochastic"],
                   help="rounding of the compact coding's int2-ans .. int8-ans values (other runs round to nearest)")
    p.add_argument("--no-residual-feedback", action="store_true",
                   help="compact coding: drop each upload's quantisation error rather than carry it")
    p.add_argument("--device", default="cpu",
                   help="where clients train: cpu, cuda (or cuda:N), or auto (cuda when available); the server's "
                        "state and the messages stay on the host")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0,
                   help="threads of torch's training and of the library's kernels (0, the default: the cores, "
                        "and one while another process holds them). torch's reductions, and so a run's last "
                        "bits, depend on its thread count: give N for bit-reproducible runs")
    p.add_argument("--out", default="runs/latest", help="directory for results.json, results.png, checkpoints")
    p.add_argument("--checkpoint", action="store_true", help="checkpoint the server state every round")
    p.add_argument("--resume", action="store_true",
                   help="continue from the checkpoints in --out; a larger --rounds extends a finished run")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(fn=_simulate)
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return args.fn(args)
    except (ValueError, FileNotFoundError) as e:  # bad settings or data: a message, not a traceback
        print(f"feddip {args.command}: error: {e}", file=sys.stderr)
        return 2
