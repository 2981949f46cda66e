"""Command line: `feddip info` (backends, build) and `feddip prune` (global top-k on model-sized
random weights, timed per backend)."""

from __future__ import annotations

import argparse
import time
from typing import Optional, Sequence

import numpy as np

from . import _backend, __version__
from .pruning import global_topk_masks


def _info(_: argparse.Namespace) -> int:
    core = _backend.native_module()
    print(f"feddip-kernels {__version__}")
    print(f"backends: {', '.join(_backend.available_backends())}")
    print(f"native OpenMP: {bool(core and core.openmp)}")
    return 0


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


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="feddip", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="show version and available backends").set_defaults(fn=_info)
    p = sub.add_parser("prune", help="time global magnitude top-k on random weights per backend")
    p.add_argument("--elements", type=int, default=11_172_032)
    p.add_argument("--tensors", type=int, default=21)
    p.add_argument("--density", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(fn=_prune)
    args = parser.parse_args(argv)
    return args.fn(args)
