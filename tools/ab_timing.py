"""Before and after a change, in one run: the same measurements of the library's hot paths, timed
in child processes that import the library from each of two checkouts (each built in place), the
checkouts taking turns round after round, so that both see the same machine. Prints each
measurement's median over rounds for both and the ratio after / before.

    python tools/ab_timing.py BEFORE_DIR AFTER_DIR [--rounds 7]

Measurements (ResNet-18's weight shapes, 5% kept, the library's default threads): global top-k
masks, the threshold alone, masked_ef_step_many with packed masks, encode_model and decode_model
into buffers, and per-call costs on small inputs: masked_ef_step on a 1,000-element layer and
FedDIPSGD.step of a three-layer model (torch).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

CHILD = r'''
import json, statistics, sys, time
import numpy as np
import feddip_kernels as fk
sys.path.insert(0, BENCH_DIR)
from conftest import resnet18_weights

def med(fn, n):
    fn()
    ts = []
    for _ in range(n):
        t0 = time.perf_counter(); fn(); ts.append(time.perf_counter() - t0)
    return statistics.median(ts)

ws = resnet18_weights()
k = round(0.05 * sum(w.size for w in ws))
masks = fk.global_topk_masks(ws, k)
bits = [fk.pack_mask(m) for m in masks]
gs = [np.full_like(w, 1e-3) for w in ws]
outs = [np.empty_like(w) for w in ws]
norms = [None] * len(ws)
sparse = {f"w{i}": np.where(m, w, np.float32(0)) for i, (w, m) in enumerate(zip(ws, masks))}
msg = fk.encode_model(sparse)
bufs = {name: np.empty_like(a) for name, a in sparse.items()}

def step():
    norms[:] = fk.masked_ef_step_many(ws, gs, mask_bits=bits, lr=1e-6, weight_decay=0.0, lam=0.0,
                                      pruned_outs=outs, norms=norms)

small_w, small_g = np.ones(1000, np.float32), np.full(1000, 1e-6, np.float32)
small_m = np.arange(1000) % 3 == 0
out = {
    "global_topk_masks": med(lambda: fk.global_topk_masks(ws, k), 15),
    "global_magnitude_threshold": med(lambda: fk.global_magnitude_threshold(ws, k), 15),
    "masked_ef_step_many": med(step, 15),
    "encode_model": med(lambda: fk.encode_model(sparse), 15),
    "decode_model into buffers": med(lambda: fk.decode_model(msg, out=bufs), 15),
    "masked_ef_step, 1,000 elements": med(lambda: fk.masked_ef_step(small_w, small_g, small_m, lr=1e-6,
                                                                    weight_decay=0.0, lam=0.0), 300),
}
try:
    import torch
    from feddip_kernels.integrations.pytorch import FedDIPSGD
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    opt = FedDIPSGD(model.parameters(), lr=1e-3, weight_decay=5e-4, lam=1e-3)
    opt.set_masks({model[0].weight: torch.rand(64, 64) < 0.3, model[2].weight: torch.rand(10, 64) < 0.3})
    for p in model.parameters():
        p.grad = torch.full_like(p, 1e-4)
    out["FedDIPSGD.step, 3 layers"] = med(opt.step, 300)
except ImportError:
    pass
print(json.dumps(out))
'''


def run(checkout: str) -> dict[str, float]:
    env = dict(os.environ, PYTHONPATH=checkout)
    code = CHILD.replace("BENCH_DIR", repr(os.path.join(checkout, "benchmarks")))
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=checkout, capture_output=True, text=True,
                          check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("before")
    ap.add_argument("after")
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    times: dict[str, dict[str, list[float]]] = {"before": {}, "after": {}}
    for r in range(args.rounds):
        for side in (("before", "after") if r % 2 == 0 else ("after", "before")):
            for name, t in run(getattr(args, side)).items():
                times[side].setdefault(name, []).append(t)
    print(f"{'measurement':34s} {'before':>11s} {'after':>11s} {'after/before':>13s}")
    for name, ts in times["before"].items():
        b, a = statistics.median(ts), statistics.median(times["after"].get(name, [float("nan")]))
        unit, scale = ("ms", 1e3) if b >= 1e-3 else ("us", 1e6)
        print(f"{name:34s} {b * scale:8.3f} {unit} {a * scale:8.3f} {unit} {a / b:12.3f}x")


if __name__ == "__main__":
    main()
