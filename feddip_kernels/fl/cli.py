"""Command line: `feddip simulate` (FL simulation: FedDIP, FedDP, FedAvg), `feddip info` (backends,
build) and `feddip prune` (global top-k on model-sized random weights, timed per backend)."""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from typing import Any, Callable, Optional, Sequence

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


def _algorithms(spec: str) -> list[str]:
    """--algorithm: 'all', or a comma list (spaces after commas allowed), each name once."""
    from .state import ALGORITHMS

    if spec.strip() == "all":
        return list(ALGORITHMS)
    names = [a.strip() for a in spec.split(",")]
    for a in names:
        if a not in ALGORITHMS:
            raise ValueError(f"--algorithm: {a!r} is not one of {', '.join(ALGORITHMS)} (or all)")
    if len(set(names)) != len(names):
        raise ValueError(f"--algorithm: {spec!r} names an algorithm twice")
    return names


def _values_per_algorithm(spec: Optional[str], algorithms: list[str],
                          defaults: Optional[dict[str, str]] = None) -> dict[str, str]:
    """'fp16' for every algorithm, or 'feddip=fp16,fedavg=raw' (unnamed algorithms: their
    default), over the defaults (the preset's; raw where it names none). None: the defaults."""
    out = {alg: (defaults or {}).get(alg, "raw") for alg in algorithms}
    if spec is None:
        return out
    if "=" not in spec:
        if spec.strip() not in VALUE_CODECS:
            raise ValueError(f"--values: {spec.strip()!r} is not one of {', '.join(VALUE_CODECS)}")
        return {alg: spec.strip() for alg in algorithms}
    for item in spec.split(","):
        alg, _, codec = (x.strip() for x in item.partition("="))
        if alg not in algorithms:
            raise ValueError(f"--values: {alg!r} is not among the algorithms run ({', '.join(algorithms)})")
        if codec not in VALUE_CODECS:
            raise ValueError(f"--values: {codec!r} is not one of {', '.join(VALUE_CODECS)}")
        out[alg] = codec
    return out


# Settings a preset provides; a flag given on the command line overrides its preset's value.
_PRESET_KEYS = ("clients", "clients_per_round", "rounds", "local_epochs", "batch_size", "lr", "lr_decay", "momentum",
                "weight_decay", "s0", "sp", "horizon", "mask_every", "lambda_max", "lambda_segments", "coding")
# A sparsity ramp shorter than this many rounds prunes faster than training recovers (a 5-round
# ramp to 95% cost FedDIP 59 accuracy points on the synthetic set): the run warns.
_SHORT_RAMP = 10


def _settings(args: argparse.Namespace) -> dict:
    from .state import PRESETS

    out = {k: getattr(args, k) if getattr(args, k) is not None else PRESETS[args.preset][k] for k in _PRESET_KEYS}
    if args.all_clients:
        out["clients_per_round"] = None
    # The paper averages with equal weights on IID splits and by sample count on non-IID ones.
    out["weighting"] = args.weighting or ("equal" if args.partition == "iid" else "samples")
    out["residual_feedback"] = not args.no_residual_feedback
    return out


def _device(name: str) -> str:
    """The torch device for --device: cpu, cuda[:N], or auto (cuda when torch sees one)."""
    if name == "cpu":
        return name
    if name != "auto" and not re.fullmatch(r"cuda(:[0-9]+)?", name):
        raise ValueError(f"--device must be cpu, cuda, cuda:N or auto, got {name!r}")
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if not torch.cuda.is_available():
        raise ValueError(f"--device {name}: torch sees no CUDA device (this torch build: {torch.__version__})")
    return name


def _configs(args: argparse.Namespace) -> tuple[list[Any], dict]:
    """Every run's SimulationConfig and the settings, all checked before anything runs."""
    import dataclasses

    from .data import SYNTHETIC
    from .state import PRESETS, SimulationConfig

    algorithms = _algorithms(args.algorithm)
    settings = _settings(args)
    # A preset's lossy values belong to its compact coding: with --coding plain they would
    # quantise the whole model on every transfer, so plain runs keep lossless values.
    defaults = PRESETS[args.preset]["values"] if settings["coding"] == "compact" else {}
    values = _values_per_algorithm(args.values, algorithms, defaults)
    if args.rounding != "nearest" and not (settings["coding"] == "compact"
                                           and any(v in QUANTISED for v in values.values())):
        raise ValueError("--rounding stochastic: no run quantises its values (it needs --coding compact and "
                         "int2-ans .. int8-ans values)")
    if not 0 <= args.threads <= MAX_THREADS:
        raise ValueError(f"--threads must be from 0 to {MAX_THREADS}, got {args.threads}")
    if args.partition == "dirichlet" and not (args.alpha > 0 and np.isfinite(args.alpha)):
        raise ValueError(f"--alpha must be a positive number, got {args.alpha}")
    if args.data in SYNTHETIC and (args.synthetic_train < 1 or args.synthetic_test < 1):
        raise ValueError("--synthetic-train and --synthetic-test must be >= 1")
    if args.data not in SYNTHETIC and not os.path.isdir(args.data):
        raise ValueError(f"--data: {args.data!r} is neither a directory nor one of the built-in sets "
                         f"({', '.join(SYNTHETIC)})")
    if args.engine == "flower":
        from importlib.util import find_spec

        if find_spec("flwr") is None or find_spec("ray") is None:
            raise ValueError("--engine flower needs Flower's simulation runtime: pip install 'flwr[simulation]'")
        if args.checkpoint or args.resume:
            raise ValueError("--checkpoint and --resume work with --engine builtin only")
    configs = []
    for alg in algorithms:
        cfg = SimulationConfig(algorithm=alg, model=args.model, values=values[alg], seed=args.seed, **settings)
        if cfg.compact and cfg.values in QUANTISED:  # stochastic rounding: for the runs that quantise
            cfg = dataclasses.replace(cfg, rounding=args.rounding)
        configs.append(cfg)
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise ValueError(f"--out: {args.out!r} exists and is not a directory")
    if args.resume:  # every run's checkpoint, before any run starts
        from .checkpoint import check_checkpoint

        for cfg in configs:
            path = os.path.join(args.out, f"{cfg.algorithm}.ckpt")
            if os.path.exists(path):
                check_checkpoint(path, cfg)
    return configs, settings


def _warnings(args: argparse.Namespace, configs: list[Any]) -> list[str]:
    """What the run will do that its user may not mean."""
    out = []
    pruned = [c for c in configs if c.algorithm != "fedavg"]
    if pruned:
        cfg = pruned[0]
        ramp = cfg.horizon or cfg.rounds
        if ramp < _SHORT_RAMP and cfg.sp > cfg.s0:
            out.append(f"the sparsity ramp ({cfg.s0:g} -> {cfg.sp:g}, pruning every {cfg.mask_every} rounds) runs "
                       f"over {ramp} rounds: so steep a ramp costs much accuracy; "
                       + ("a larger --horizon N" if cfg.horizon else "--horizon N") + " spreads it over N "
                       "rounds (a shorter run stops part way)")
    return out


def _data(args: argparse.Namespace) -> tuple[Any, Any, str]:
    """(train, test, the data set's name for the report)."""
    from . import load_dataset, synthetic_dataset
    from .data import SYNTHETIC

    if args.data in SYNTHETIC:
        shape, classes, augment = SYNTHETIC[args.data]
        train, test = synthetic_dataset(args.synthetic_train, args.synthetic_test, classes, seed=args.seed, shape=shape)
        train.augment = augment
        return train, test, args.data
    train, test = load_dataset(args.data)
    return train, test, os.path.abspath(args.data)


# The fields of results.json's per-round rows, as a reader meets them.
ROW_FIELDS = {
    "round": "rounds done (1, 2, ...)",
    "accuracy": "test accuracy of the global model after the round (0..1)",
    "loss": "mean test cross-entropy of the global model",
    "sparsity": "share of the pruned tensors' weights that are zero in the global model",
    "sparsity_target": "the schedule's s_t in the rounds that prune (null in the others)",
    "lr": "the clients' learning rate this round",
    "lambda": "the regulariser's strength this round",
    "bytes_up": "bytes the clients sent this round (encoded messages, everything counted)",
    "bytes_down": "bytes the server sent this round",
    "bytes_cumulative": "bytes both ways in rounds 1 .. this one",
    "bytes_authors": "this round's bytes as the FedDIP authors count them: 32 (1 - s) n bits a model, "
                     "no index cost, both ways",
    "clients": "clients sampled this round",
    "clients_failed": "of them, those whose training or upload failed (why: failures)",
    "failures": "one line per failed client",
    "time_train": "seconds of local training this round (all clients, one after another)",
    "time_prune": "seconds of the server's aggregation and pruning",
    "time_encode": "seconds of encoding and decoding messages",
    "time_evaluate": "seconds of evaluating the global model",
    "time_round": "the round's wall time, seconds",
}

# What the time fields measure with --engine flower (clients train in parallel, in Ray actors).
_FLOWER_FIELDS = {
    "time_train": "seconds from sending the round's messages to the last reply (clients train in parallel, each "
                  "decoding and encoding its own messages)",
    "time_encode": "seconds of the server's encoding of the downlinks and decoding of the uploads",
}


def _rows(history: list[dict]) -> list[dict]:
    """History rows as results.json names them (bytes_total: bytes_cumulative)."""
    return [{("bytes_cumulative" if k == "bytes_total" else k): v for k, v in row.items()} for row in history]


def _simulate(args: argparse.Namespace) -> int:
    """`feddip simulate`; a --threads N run leaves the process's thread counts as it found them
    (torch's; the library's back at its default), as `main` may be called from a program."""
    if not args.threads:
        return _simulate_runs(args)
    import torch

    saved = torch.get_num_threads()
    try:
        return _simulate_runs(args)
    finally:
        torch.set_num_threads(saved)
        set_num_threads(0)


def _simulate_runs(args: argparse.Namespace) -> int:
    import dataclasses
    import datetime
    import json

    configs, settings = _configs(args)  # every setting checked before any work
    device = _device(args.device)
    for warning in _warnings(args, configs):
        print(f"feddip simulate: warning: {warning}", file=sys.stderr, flush=True)
    algorithms = [c.algorithm for c in configs]
    threads = f"{args.threads}" if args.threads else f"auto ({os.cpu_count()} cores)"
    print(f"feddip simulate: preset {args.preset}, data {args.data}, {args.model}, algorithms {', '.join(algorithms)}"
          f", {settings['rounds']} rounds, threads {threads}, device {device}, engine {args.engine}, output {args.out}",
          flush=True)

    from .data import dirichlet_partition, iid_partition
    from .report import plot_histories
    from .simulation import run_simulation

    started = datetime.datetime.now(datetime.timezone.utc)
    train, test, data_name = _data(args)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
        set_num_threads(args.threads)
    clients = settings["clients"]
    if args.partition == "iid":
        parts = iid_partition(len(train), clients, seed=args.seed)
    else:
        parts = dirichlet_partition(train.y, clients, args.alpha, seed=args.seed)
    os.makedirs(args.out, exist_ok=True)
    # A progress bar only on a terminal: written to a file its redraws would mix with the lines.
    tty = sys.stdout.isatty() and sys.stderr.isatty()
    try:
        from tqdm import tqdm
    except ImportError:  # the progress bar is optional
        tqdm = None
    results: dict[str, Any] = {
        "command": ["feddip", *args.argv], "started": started.isoformat(timespec="seconds"),
        "versions": _versions(), "preset": args.preset, "data": data_name,
        "train_examples": len(train), "test_examples": len(test), "partition": args.partition,
        **({"alpha": args.alpha} if args.partition == "dirichlet" else {}),
        "device": device, "threads": args.threads, "engine": args.engine,
        "fields": {**ROW_FIELDS, **(_FLOWER_FIELDS if args.engine == "flower" else {})}, "runs": {},
    }
    for cfg in configs:
        alg = cfg.algorithm
        use_bar = tqdm is not None and tty and not args.quiet
        bar = tqdm(total=cfg.rounds, desc=alg, unit="round") if use_bar else None

        def log(row: dict, alg: str = alg, bar: Any = bar) -> None:
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
                bar.write(line)
            elif not args.quiet:
                print(line, flush=True)

        ckpt = os.path.join(args.out, f"{alg}.ckpt") if args.checkpoint or args.resume else None
        if args.resume and ckpt and not os.path.exists(ckpt):
            print(f"feddip simulate: no checkpoint {ckpt} to resume {alg} from: starting it afresh", flush=True)
        if args.engine == "flower":  # the same run through Flower's Simulation Runtime (fl.flower_engine)
            from .flower_engine import run_flower

            state = run_flower(cfg, train, test, parts, on_round=log, device=device, threads=args.threads or 1)
        else:
            state = run_simulation(cfg, train, test, parts, checkpoint=ckpt, resume=args.resume, on_round=log,
                                   device=device, adapt_threads=args.threads == 0)
        if bar is not None:
            bar.close()
        results["runs"][alg] = {"config": dataclasses.asdict(cfg), "history": _rows(state.history)}
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
                "bytes_ratio": base["bytes_cumulative"] / last["bytes_cumulative"],
            }
            if alg != "fedavg":
                print(f"{alg} vs fedavg: {run['vs_fedavg']['accuracy_points']:+.2f} accuracy points, "
                      f"{run['vs_fedavg']['bytes_ratio']:.1f}x fewer bytes")
    results["finished"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    cfg = configs[0]
    sampled = f"{cfg.clients_per_round} a round" if cfg.clients_per_round else "all every round"
    title = (f"{args.model} on {os.path.basename(data_name.rstrip('/'))}, preset {args.preset}: {clients} clients"
             f" ({sampled}), {cfg.rounds} rounds, {args.partition}"
             + (f" (alpha {args.alpha:g})" if args.partition == "dirichlet" else "")
             + f", target sparsity {cfg.sp:g}")
    plot_histories({a: r["history"] for a, r in runs.items()}, os.path.join(args.out, "results.png"), title=title)
    print(f"wrote {os.path.join(args.out, 'results.json')} and results.png")
    return 0


def parser() -> argparse.ArgumentParser:
    """The `feddip` command line's parser (its subcommands and every flag, with help)."""
    parser = argparse.ArgumentParser(prog="feddip", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="show version and available backends").set_defaults(fn=_info)
    p = sub.add_parser("prune", help="time global magnitude top-k on random weights per backend")
    p.add_argument("--elements", type=int, default=11_164_352,
                   help="weights in all, ResNet-18's by default (default: %(default)s)")
    p.add_argument("--tensors", type=int, default=21, help="tensors they are split into (default: %(default)s)")
    p.add_argument("--density", type=float, default=0.05, help="share of the weights kept (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights (default: %(default)s)")
    p.set_defaults(fn=_prune)

    from .state import PRESETS

    def preset(key: str, show: Callable[[Any], str] = str) -> str:
        return "(preset quick " + ", ".join(
            f"{name} {show(PRESETS[name][key])}" if i else show(PRESETS[name][key])
            for i, name in enumerate(("quick", "paper", "compact"))) + ")"

    p = sub.add_parser("simulate", help="run a federated-learning simulation (needs the [fl] extra)",
                       description="Simulate FedDIP, its ablations and FedAvg; every transfer is encoded and its "
                                   "bytes counted. Writes results.json and results.png to --out.")
    p.add_argument("--algorithm", default="feddip,fedavg",
                   help="feddip, feddp (no regulariser), feddip-noef (no error feedback), fedavg, a comma list, or "
                        "all (default: %(default)s)")
    p.add_argument("--data", default="synthetic",
                   help="directory of CIFAR-10/100 (binary or python version) or MNIST-style IDX files; or a built-in "
                        "set: synthetic (1x28x28, 10 classes), synthetic-cifar10 or synthetic-cifar100 (3x32x32, "
                        "10 or 100 classes, augmented in training as CIFAR is) (default: %(default)s)")
    p.add_argument("--synthetic-train", type=int, default=20000,
                   help="training examples of a built-in set (default: %(default)s)")
    p.add_argument("--synthetic-test", type=int, default=1000,
                   help="test examples of a built-in set (default: %(default)s)")
    p.add_argument("--model", default="lenet5", choices=["lenet5", "alexnet", "resnet18"],
                   help="the network (default: %(default)s)")
    p.add_argument(
        "--preset",
        default="quick",
        choices=["quick", "paper", "compact"],
        help="settings to start from: paper = the FedDIP paper's setup (50 clients, 5 a round, 1000 rounds, "
        "5 epochs, batch 128, lr 0.1*0.998^t, no momentum, s0 0.5 -> sp 0.95, R 5); compact = paper's over "
        "150 rounds with the schedules over 15 (--horizon 15) and --coding compact, values int4-ans for the "
        "FedDIP family (raw for fedavg); quick = compact's coding on a run of minutes: 10 clients, all every "
        "round, 20 rounds, 1 epoch, batch 64, R 2. Flags override it (default: %(default)s)",
    )
    p.add_argument("--clients", type=int, help="clients the data is split over " + preset("clients"))
    p.add_argument("--clients-per-round", type=int,
                   help="clients sampled each round " + preset("clients_per_round", lambda v: "all" if v is None
                                                               else str(v)))
    p.add_argument("--all-clients", action="store_true", help="every client trains every round")
    p.add_argument("--partition", default="iid", choices=["iid", "dirichlet"],
                   help="how the training set is split over the clients (default: %(default)s)")
    p.add_argument("--alpha", type=float, default=0.5,
                   help="Dirichlet concentration of --partition dirichlet; smaller is less IID (default: %(default)s)")
    p.add_argument("--weighting", choices=["equal", "samples"],
                   help="averaging weights (default: equal for iid, by sample count for dirichlet)")
    p.add_argument("--rounds", type=int, help="communication rounds " + preset("rounds"))
    p.add_argument("--local-epochs", type=int, help="epochs each client trains a round " + preset("local_epochs"))
    p.add_argument("--batch-size", type=int, help="local mini-batch size " + preset("batch_size"))
    p.add_argument("--lr", type=float, help="the clients' learning rate in round 0 " + preset("lr"))
    p.add_argument("--lr-decay", type=float, help="learning-rate decay a round, lr_t = lr * decay^t "
                   + preset("lr_decay"))
    p.add_argument("--momentum", type=float, help="SGD momentum " + preset("momentum"))
    p.add_argument("--weight-decay", type=float, help="SGD weight decay " + preset("weight_decay"))
    p.add_argument("--s0", type=float, help="initial sparsity " + preset("s0"))
    p.add_argument("--sp", type=float, help="final sparsity " + preset("sp"))
    p.add_argument("--horizon", "--prune-rounds", dest="horizon", type=int,
                   help="rounds over which the sparsity and lambda schedules run " + preset(
                       "horizon", lambda v: "the run" if v is None else str(v)))
    p.add_argument("--mask-every", type=int, help="R: prune every R rounds " + preset("mask_every"))
    p.add_argument("--lambda-max", type=float, help="the regulariser's largest strength " + preset("lambda_max"))
    p.add_argument("--lambda-segments", type=int, help="Q: segments of the lambda schedule "
                   + preset("lambda_segments"))
    p.add_argument(
        "--values", default=None,
        help="value codec of every transfer: raw (lossless fp32), ans (lossless, entropy-coded), auto, fp16, "
             "bf16, int8, or entropy-coded fp16-ans, bf16-ans, int2-ans .. int8-ans; or per algorithm, e.g. "
             "feddip=int4-ans,fedavg=raw (algorithms not named keep the preset's: int4-ans for the FedDIP family "
             "in quick and compact, raw otherwise)",
    )
    p.add_argument("--coding", choices=["plain", "compact"],
                   help="plain: transfers carry the model; compact (with lossy --values): the difference from "
                        "what the other end holds, quantised, its error carried to the next contact "
                        + preset("coding"))
    p.add_argument("--rounding", default="nearest", choices=["nearest", "stochastic"],
                   help="rounding of the compact coding's int2-ans .. int8-ans values (other runs round to nearest; "
                        "default: %(default)s)")
    p.add_argument("--no-residual-feedback", action="store_true",
                   help="compact coding: drop each upload's quantisation error rather than carry it")
    p.add_argument("--device", default="cpu",
                   help="where clients train: cpu, cuda (or cuda:N), or auto (cuda when available); the server's "
                        "state and the messages stay on the host (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the data split, initial model, masks and sampling (default: %(default)s)")
    p.add_argument("--engine", default="builtin", choices=["builtin", "flower"],
                   help="what runs the rounds: builtin, the library's own loop, or flower, Flower's Simulation Runtime "
                        "(Ray; needs flwr[simulation]) with the FedDIP strategy and mod: the same global models for "
                        "the same --threads N, clients training in parallel, one Ray actor each (no --checkpoint) "
                        "(default: %(default)s)")
    p.add_argument("--threads", type=int, default=0,
                   help="threads of torch's training and of the library's kernels (0, the default: the cores, "
                        "and one while another process holds them). torch's reductions, and so a run's last "
                        "bits, depend on its thread count: give N for bit-reproducible runs")
    p.add_argument("--out", default="runs/latest",
                   help="directory for results.json, results.png, checkpoints (default: %(default)s)")
    p.add_argument("--checkpoint", action="store_true", help="checkpoint each run's state every round")
    p.add_argument("--resume", action="store_true",
                   help="continue from the checkpoints in --out (and keep checkpointing); a larger --rounds "
                        "extends a finished run")
    p.add_argument("--quiet", action="store_true", help="no per-round lines or progress bar")
    p.set_defaults(fn=_simulate)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """`feddip` with `argv` (default: the process's arguments); the exit status."""
    args = parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return args.fn(args)
    except (ValueError, FileNotFoundError) as e:  # bad settings or data: a message, not a traceback
        print(f"feddip {args.command}: error: {e}", file=sys.stderr)
        return 2
