"""The GPU evidence (issues 10, 11 and 30), as one script for a machine with a CUDA device (the
device tool):

1. FedDIPSGD's step (the one-launch Triton kernel, and the per-layer eager torch operations it
   replaced) against torch.optim.SGD(fused=True) on ResNet-18's weights (target: at most 1.3x the
   fused SGD time), with momentum 0 and 0.9;
2. global top-k masks of ResNet-18's weights on the device (the Triton radix select, and the torch
   operations it replaced) against torch.topk on the concatenated |w| (target: 3x faster);
3. encode_model of a 95%-sparse ResNet-18 from device tensors against a plain .cpu() copy of the
   dense tensors (target: 3x faster);
4. `feddip simulate` rounds of FedDIP and FedAvg on the built-in CIFAR-shaped synthetic set with
   AlexNet and ResNet-18 at the paper's client settings (50 clients of 1,000 images, 5 a round,
   5 local epochs, batch 128) on the device: results.json and the plot of each model under --out's
   folder, and FedDIP's round time over FedAvg's (medians of the rounds after the first; target at
   most 1.1x); `profile` adds a cProfile of two rounds of each (AlexNet) to profile.txt;
5. issue 11's thread table on the host's cores (--thread-table): ResNet-18's weights on the CPU at
   1, 2, 4, 8 and 16 threads via fk.set_num_threads: global top-k masks (also the threshold alone,
   and the masks written into arrays already faulted in), encode_model (5% kept), decode_model
   into buffers, masked_ef_step (one call a layer) and masked_ef_step_many (one call; also with
   each loop and each kind of store it could run with) against torch.optim.SGD(fused=True) with as
   many torch threads; then, on all the host's threads, one large float32 tensor (1e7 and 1e8
   elements): the global threshold against max |w| (one streaming read of the same bytes), and
   encode_model / decode_model at 5% density; and the step with each loop and each kind of store
   against fused SGD, ResNet-18's layers cut to 2%, 25% and all of their size, on 1 thread and all.

    python tools/gpu_evidence.py --device cuda --out $OUT [--parts step,topk,encode,fl,profile]

It runs on the CPU too (`--device cpu`, for checking the script itself; the figures mean nothing
there). Prints one line per measurement and writes them all to gpu.json in --out.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import statistics
import time

import numpy as np
import torch

import feddip_kernels as fk
from feddip_kernels import _backend
from feddip_kernels.fl.models import make_model, prunable_parameters
from feddip_kernels.integrations.pytorch import FedDIPSGD


def timed(fn, device: torch.device, repeat: int) -> float:
    """Median seconds of fn() over `repeat` runs after two warm-ups, synchronising the device."""

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(2):
        fn()
    sync()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def interleaved(fns: dict, device: torch.device, rounds: int, calls: int = 1) -> dict[str, float]:
    """Median seconds a call of each function, timed in rounds that call every function `calls`
    times between two device synchronisations, the functions one after another in each round."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times[name].append((time.perf_counter() - t0) / calls)
    return {name: statistics.median(ts) for name, ts in times.items()}


def resnet18(device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)
    return make_model("resnet18", 3, 100).to(device)


def step_benchmark(device: torch.device, repeat: int, steps: int = 10) -> dict:
    """Each optimizer on its own copy of ResNet-18 (global top-k masks at 5% for FedDIPSGD), timed in
    interleaved rounds of `steps` steps between two device synchronisations; medians per step."""
    out: dict = {}
    for momentum in (0.0, 0.9):
        hyper = dict(lr=1e-3, weight_decay=5e-4, momentum=momentum)
        makers = {
            "torch.optim.SGD(fused=True)": lambda ps, hyper=hyper: torch.optim.SGD(ps, **hyper, fused=True),
            "torch.optim.SGD(foreach=True)": lambda ps, hyper=hyper: torch.optim.SGD(ps, **hyper, foreach=True),
            "FedDIPSGD (Triton, one launch a step)": lambda ps, hyper=hyper: FedDIPSGD(ps, **hyper, lam=1e-3),
            "FedDIPSGD per layer, eager torch": lambda ps, hyper=hyper: FedDIPSGD(
                ps, **hyper, lam=1e-3, device_kernels="torch", compile=False
            ),
        }
        opts = {}
        for name, make in makers.items():
            model = resnet18(device)
            params = list(model.parameters())
            for p in params:
                p.grad = torch.randn_like(p) * 1e-3
            try:
                opt = make(params)
                if isinstance(opt, FedDIPSGD):
                    weights = list(prunable_parameters(model).values())
                    masks = fk.global_topk_masks([w.detach() for w in weights], density=0.05)
                    opt.set_masks(dict(zip(weights, masks)))
                for _ in range(3):
                    opt.step()
                torch.cuda.synchronize(device) if device.type == "cuda" else None
                opts[name] = opt
            except Exception as e:  # noqa: BLE001 - recorded, the other measurements go on
                out[f"{name}, momentum {momentum}"] = f"failed: {type(e).__name__}: {e}"
        medians = interleaved({name: opt.step for name, opt in opts.items()}, device, repeat, steps)
        for name, opt in opts.items():
            for _, table, *_ in getattr(opt, "_triton_tables", {}).values():
                out[f"{name}, momentum {momentum}: CUDA graph"] = table.graph_error or "replayed"
        base = medians["torch.optim.SGD(fused=True)"]
        for name, t in medians.items():
            out[f"{name}, momentum {momentum}"] = t
            out[f"{name}, momentum {momentum} / fused SGD"] = t / base
    return out


def topk_benchmark(device: torch.device, repeat: int) -> dict:
    """Global top-k masks at 5% of ResNet-18's weights: ours (the Triton radix select where Triton
    imports, at a few block sizes; and the torch operations it replaced) against torch.topk on
    the concatenated |w|, in interleaved rounds; the masks checked against the host's first."""
    from feddip_kernels import _torch_kernels

    weights = [w.detach() for w in prunable_parameters(resnet18(device)).values()]
    n = sum(w.numel() for w in weights)
    k = round(0.05 * n)

    def baseline() -> list[torch.Tensor]:
        flat = torch.cat([w.abs().reshape(-1) for w in weights])
        tau = torch.topk(flat, k, sorted=False).values.min()
        return [w.abs() >= tau for w in weights]

    host = fk.global_topk_masks([w.cpu().numpy() for w in weights], k)
    ours = fk.global_topk_masks(weights, k)
    assert all(np.array_equal(m.cpu().numpy(), h) for m, h in zip(ours, host)), "device masks differ from the host's"
    fns = {"torch.topk on the concatenated |w|": baseline,
           "fk.global_topk_masks": lambda: fk.global_topk_masks(weights, k),
           "torch operations (before)": lambda: _torch_kernels.torch_topk_masks(weights, k)}
    radix = _torch_kernels.radix_select(weights, k)
    out: dict = {"elements": n, "k": k, "radix select": radix is not None}
    if radix is not None:
        for block, digits in ((4096, (8, 8, 8, 7)), (16384, (11, 11, 9)), (1024, (11, 11, 9))):
            def variant(block: int = block, digits: tuple = digits) -> list[torch.Tensor]:
                old = radix.BLOCK, radix.DIGIT_BITS
                radix.BLOCK, radix.DIGIT_BITS = block, digits
                try:
                    return radix.topk_masks(weights, k)
                finally:
                    radix.BLOCK, radix.DIGIT_BITS = old
            fns[f"radix select, block {block}, digits {digits}"] = variant
    for name, fn in fns.items():  # warm-up (compiles, records the graphs), and every way's masks checked
        for _ in range(3):
            got = fn()
        if name != "torch.topk on the concatenated |w|":
            assert all(np.array_equal(m.cpu().numpy(), h) for m, h in zip(got, host)), f"{name}: masks differ"
    if radix is not None:
        out["graphs"] = {f"block {key[0]}, digits {key[1]}": p.graph_error or "replayed"
                         for key, p in radix._plans.items()}
    out.update(interleaved(fns, device, 3 * repeat))
    base = out["torch.topk on the concatenated |w|"]
    for name in fns:
        out[f"{name}: speed-up"] = base / out[name]
    out["speed-up"] = out["fk.global_topk_masks: speed-up"]
    out["GB/s of |w| read"] = 4 * n / out["fk.global_topk_masks"] / 1e9
    return out


def encode_benchmark(device: torch.device, repeat: int) -> dict:
    """encode_model of ResNet-18 pruned to 5% (w * mask: -0.0 at about half the pruned places, sent
    as zero signs by default) from device tensors, against a plain .cpu() of the dense tensors and
    encode_model of host copies; also without the zero signs. Messages checked against the host's."""
    from feddip_kernels._torch_golomb import time_encode_model

    model = resnet18(device)
    state = {k: v.detach() for k, v in model.state_dict().items() if v.is_floating_point()}
    weights = {k: state[k] for k in prunable_parameters(model)}
    masks = fk.global_topk_masks(list(weights.values()), density=0.05)
    with torch.no_grad():
        for w, m in zip(weights.values(), masks):
            w.mul_(m)
    out: dict = {"dense_bytes": sum(v.numel() * v.element_size() for v in state.values()),
                 "message_bytes": len(fk.encode_model(state))}
    for name, options in (("default", {}), ("signed_zeros=False", {"signed_zeros": False})):
        row = time_encode_model(state, repeats=repeat, **options)  # ms; asserts the host's message
        out[name] = row
    out["speed-up"] = out["default"]["speedup"]
    return out


def step_ways(native, step) -> dict:
    """Each way the native step can run on this CPU ({"<loop> loop, <stores> stores": fn}): fn
    runs `step` with that loop and that kind of store, fixed. Call them inside fixed_ways(native)."""
    loops = ("avx512", "avx2") if native._isa() == "avx512" else (native._isa(),)
    ways = {}
    for loop in loops:
        for stores in ("stream", "cache"):
            def way(loop: str = loop, stores: str = stores) -> None:
                native._isa(loop)
                native._step_stores(stores)
                step()
            ways[f"{loop} loop, {stores} stores"] = way
    return ways


@contextlib.contextmanager
def fixed_ways(native):
    """The step's loop timing off while step_ways' functions run; its settings as they were after."""
    native._step_tuning(False)
    try:
        yield
    finally:
        native._isa("avx512")
        native._step_stores("stream")
        native._step_tuning(True)


def thread_table(repeat: int) -> dict:
    """Issue 11's table: the CPU kernels on ResNet-18's weights at 1 .. 16 threads (as the host has)."""

    cpu = torch.device("cpu")
    weights = [w.detach().clone() for w in prunable_parameters(resnet18(cpu)).values()]
    arrays = [w.numpy() for w in weights]
    k = round(0.05 * sum(a.size for a in arrays))
    masks = fk.global_topk_masks(arrays, k)
    sparse = {
        f"w{i}": np.where(m, a, np.float32(0)) for i, (a, m) in enumerate(zip(arrays, masks))
    }  # +0.0 off the mask
    msg = fk.encode_model(sparse)
    bufs = {name: np.empty_like(a) for name, a in sparse.items()}
    grads = [np.random.default_rng(i).standard_normal(a.shape).astype(np.float32) * 1e-3 for i, a in enumerate(arrays)]
    pruned = [np.empty_like(a) for a in arrays]
    params = [torch.nn.Parameter(torch.from_numpy(a.copy())) for a in arrays]
    for p, g in zip(params, grads):
        p.grad = torch.from_numpy(g)
    sgd = torch.optim.SGD(params, lr=1e-3, weight_decay=5e-4, fused=True)
    norms = [fk.masked_norm(a, m) for a, m in zip(arrays, masks)]

    def ef_steps() -> None:  # each step hands its norm to the next, as FedDIPSGD does: one pass a layer
        for i, (a, g, m, o) in enumerate(zip(arrays, grads, masks, pruned)):
            norms[i] = fk.masked_ef_step(a, g, m, lr=1e-3, weight_decay=5e-4, lam=1e-3, pruned_out=o, norm=norms[i])

    bits = [fk.pack_mask(m) for m in masks]

    def ef_steps_many() -> None:  # all layers in one call, masks as packed bits (what FedDIPSGD does)
        norms[:] = fk.masked_ef_step_many(arrays, grads, mask_bits=bits, lr=1e-3, weight_decay=5e-4, lam=1e-3,
                                          pruned_outs=pruned, norms=norms)

    native = _backend.kernels("native")

    def step_as_it_runs_and_each_way() -> dict:
        # The step as it runs (streaming stores; on AVX-512 CPUs the loop chosen by timing, settled
        # first), then each way it could run, so that a run on a new machine shows which pays there.
        for _ in range(2 + 2 * 4 + 2):  # past the loop timing's untimed call and four calls of each loop
            ef_steps_many()
        row = {"masked_ef_step_many, packed masks": timed(ef_steps_many, cpu, repeat)}
        tuned = [c for c in native._step_tuning_choices() if c[1] == fk.get_num_threads()]
        if tuned:
            row["loop chosen by timing"] = tuned[-1][2]
        with fixed_ways(native):
            for name, way in step_ways(native, ef_steps_many).items():
                row[f"masked_ef_step_many, {name}"] = timed(way, cpu, repeat)
        return row

    out_masks = [np.ones(a.shape, dtype=bool) for a in arrays]
    out = {}
    for t in (1, 2, 4, 8, 16):
        if t > (os.cpu_count() or 1):
            break
        fk.set_num_threads(t)
        torch.set_num_threads(t)
        fallbacks = native._sample_fallbacks()
        row = {
            "global_topk_masks": timed(lambda: fk.global_topk_masks(arrays, k), cpu, repeat),
            # calls (of repeat + 2) that left the one-pass fast path for the radix passes
            "top-k fallbacks": native._sample_fallbacks() - fallbacks,
            # the same pass without masks, and writing masks already faulted in: which part scales
            "global threshold": timed(lambda: fk.global_magnitude_threshold(arrays, k), cpu, repeat),
            "topk masks into written masks": timed(lambda: native.topk_masks(arrays, out_masks, k), cpu, repeat),
            "encode_model": timed(lambda: fk.encode_model(sparse), cpu, repeat),
            "decode_model into buffers": timed(lambda: fk.decode_model(msg, out=bufs), cpu, repeat),
            "masked_ef_step": timed(ef_steps, cpu, repeat),
            **step_as_it_runs_and_each_way(),
            "SGD(fused=True)": timed(sgd.step, cpu, repeat),
        }
        out[t] = row
        print("threads", t, json.dumps(row), flush=True)
    fk.set_num_threads(0)
    return out


def step_ways_by_size(repeat: int, fractions: tuple = (0.02, 0.25, 1.0), threads_list: tuple = ()) -> dict:
    """The error-feedback step (ResNet-18's layers cut to a fraction of their size, momentum 0, masks
    at 5% as packed bits) against fused SGD, at 1 thread and all the host's, with each loop and each
    kind of store: whether cached stores or the AVX-512 loop pay where the arrays stay in cache."""
    native = _backend.kernels("native")
    cpu = torch.device("cpu")
    full = [w.detach().clone().numpy() for w in prunable_parameters(resnet18(cpu)).values()]
    out = {}
    for threads in threads_list or sorted({1, os.cpu_count() or 1}):
        fk.set_num_threads(threads)
        torch.set_num_threads(threads)
        for frac in fractions:
            ws = [np.ascontiguousarray(w.ravel()[: max(64, int(w.size * frac))]) for w in full]
            gs = [np.full_like(w, 1e-3) for w in ws]
            bits = [fk.pack_mask(m) for m in fk.global_topk_masks(ws, density=0.05)]
            pruned = [np.empty_like(w) for w in ws]
            norms: list = [None] * len(ws)

            def step(ws=ws, gs=gs, bits=bits, pruned=pruned, norms=norms) -> None:
                norms[:] = fk.masked_ef_step_many(ws, gs, mask_bits=bits, lr=1e-3, weight_decay=5e-4, lam=1e-3,
                                                  pruned_outs=pruned, norms=norms)

            params = [torch.nn.Parameter(torch.from_numpy(w.copy())) for w in ws]
            for p, g in zip(params, gs):
                p.grad = torch.from_numpy(g)
            sgd = torch.optim.SGD(params, lr=1e-3, weight_decay=5e-4, fused=True)
            with fixed_ways(native):  # each call 4 times back to back: what stays in cache does
                row = interleaved({"SGD(fused=True)": sgd.step, **step_ways(native, step)}, cpu, repeat, calls=4)
            row = {name: t / row["SGD(fused=True)"] if name != "SGD(fused=True)" else t for name, t in row.items()}
            row["elements"] = sum(w.size for w in ws)
            out[f"{threads} threads, {frac} of ResNet-18"] = row
            print("step ways", threads, frac, json.dumps(row), flush=True)
    fk.set_num_threads(0)
    return out


def one_tensor(repeat: int) -> dict:
    """Issue 11's single-tensor figures on all the host's threads (fk's default)."""
    cpu = torch.device("cpu")
    out = {"threads": fk.get_num_threads()}
    rng = np.random.default_rng(0)
    for n in (10**7, 10**8):
        a = rng.standard_normal(n, dtype=np.float32)
        k = n // 20
        row = {"max |w| (read roofline)": timed(lambda a=a: fk.max_magnitude([a]), cpu, repeat),
               "global threshold, k = 5%": timed(lambda a=a, k=k: fk.global_magnitude_threshold([a], k), cpu, repeat)}
        row["threshold GB/s of |w|"] = a.nbytes / row["global threshold, k = 5%"] / 1e9
        row["threshold / read rate"] = row["max |w| (read roofline)"] / row["global threshold, k = 5%"]
        sparse = {"w": a * fk.global_topk_masks([a], k)[0]}
        msg = fk.encode_model(sparse)
        buf = {"w": np.empty_like(a)}
        row["encode_model"] = timed(lambda sparse=sparse: fk.encode_model(sparse), cpu, repeat)
        row["decode_model into a buffer"] = timed(lambda msg=msg, buf=buf: fk.decode_model(msg, out=buf), cpu, repeat)
        row["encode G elements/s"] = n / row["encode_model"] / 1e9
        out[n] = row
        print("one tensor", n, json.dumps(row), flush=True)
    return out


# The paper's client settings (docs/protocol.md): 50 clients of 1,000 images (CIFAR-10's
# 50,000), 5 a round, 5 local epochs of batch 128; a mask update every second round so that the
# short run prunes.
PAPER_CLIENTS = ["--preset", "paper", "--data", "synthetic-cifar10", "--synthetic-train", "50000",
                 "--synthetic-test", "2000", "--mask-every", "2"]


def fl_rounds(device: str, rounds: int, out_dir: str, models: tuple = ("alexnet", "resnet18"),
              extra: tuple = ()) -> dict:
    """`feddip simulate` of FedDIP and FedAvg per model into out_dir/<model>/ (results.json, the
    plot), after a one-round warm-up of each (kernels compiled, cuDNN tuned); FedDIP's round time
    over FedAvg's from the rounds after the first (medians)."""
    from feddip_kernels.fl.cli import main as feddip

    out: dict = {}
    for model in models:
        where = os.path.join(out_dir, model)
        common = [*PAPER_CLIENTS, "--model", model, "--device", device, "--quiet", *extra]
        feddip(["simulate", *common, "--algorithm", "feddip,fedavg", "--rounds", "1", "--local-epochs", "1",
                "--out", os.path.join(out_dir, "warm-up")])
        t0 = time.perf_counter()
        code = feddip(["simulate", *common, "--algorithm", "feddip,fedavg", "--rounds", str(rounds), "--out", where])
        row: dict = {"exit": code, "seconds": time.perf_counter() - t0}
        with open(os.path.join(where, "results.json")) as f:
            runs = json.load(f)["runs"]
        for alg, run in runs.items():
            hist = run["history"]
            later = hist[1:] or hist
            row[alg] = {
                "accuracy": [round(100 * h["accuracy"], 2) for h in hist],
                "round seconds": [round(h["time_round"], 3) for h in hist],
                **{f"median {k}": statistics.median(h[f"time_{k}"] for h in later)
                   for k in ("round", "train", "encode", "prune", "evaluate")},
                "MB sent": hist[-1]["bytes_total"] / 1e6,
            }
        if "feddip" in row and "fedavg" in row:
            row["feddip / fedavg round"] = row["feddip"]["median round"] / row["fedavg"]["median round"]
        out[model] = row
        print("fl", model, json.dumps(row), flush=True)
    shutil.rmtree(os.path.join(out_dir, "warm-up"), ignore_errors=True)
    return out


def fl_profile(device: str, out_path: str, model: str = "alexnet", rounds: int = 2, extra: tuple = ()) -> dict:
    """cProfile of `rounds` rounds of FedDIP and of FedAvg (the top functions by own time and by
    total time) into out_path: where a round's host time goes."""
    import cProfile
    import io
    import pstats

    from feddip_kernels.fl.cli import main as feddip

    out: dict = {}
    scratch = os.path.join(os.path.dirname(out_path), "profile-run")
    with open(out_path, "w") as f:
        for alg in ("feddip", "fedavg"):
            prof = cProfile.Profile()
            t0 = time.perf_counter()
            prof.enable()
            feddip(["simulate", *PAPER_CLIENTS, "--model", model, "--device", device, "--quiet", *extra,
                    "--algorithm", alg, "--rounds", str(rounds), "--out", scratch])
            prof.disable()
            out[alg] = time.perf_counter() - t0
            for order in ("tottime", "cumulative"):
                text = io.StringIO()
                pstats.Stats(prof, stream=text).sort_stats(order).print_stats(30)
                f.write(f"==== {alg}, {model}, {rounds} rounds, by {order}\n{text.getvalue()}\n")
    shutil.rmtree(scratch, ignore_errors=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=5, help="FL rounds of each algorithm and model")
    ap.add_argument("--models", default="alexnet,resnet18", help="models of the FL rounds, comma-separated")
    ap.add_argument("--out", default="gpu_evidence", help="folder for gpu.json, the FL results and the profile")
    ap.add_argument("--fl-args", default="", help="flags appended to the FL runs' (e.g. a smaller run to check the "
                                                  "script on the CPU: '--synthetic-train 2000 --clients 4')")
    ap.add_argument("--thread-table", action="store_true", help="also issue 11's CPU thread table (item 5)")
    ap.add_argument("--parts", default="step,topk,encode,fl,profile", help="measurements to run, comma-separated")
    args = ap.parse_args()
    device = torch.device(args.device)
    os.makedirs(args.out, exist_ok=True)
    facts = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
             "torch": torch.__version__, "feddip_kernels": fk.__version__, "backends": fk.available_backends(),
             "fk threads": fk.get_num_threads(), "torch threads": torch.get_num_threads(), "cpus": os.cpu_count()}
    try:
        import triton

        facts["triton"] = triton.__version__
    except ImportError:
        facts["triton"] = None
    print(json.dumps(facts), flush=True)
    results: dict = {"facts": facts}
    out_json = os.path.join(args.out, "gpu.json")
    extra = tuple(args.fl_args.split())
    parts = {"step": lambda: step_benchmark(device, args.repeat), "topk": lambda: topk_benchmark(device, args.repeat),
             "encode": lambda: encode_benchmark(device, args.repeat),
             "fl": lambda: fl_rounds(args.device, args.rounds, args.out, tuple(args.models.split(",")), extra),
             "profile": lambda: fl_profile(args.device, os.path.join(args.out, "profile.txt"), extra=extra)}
    for name in filter(None, args.parts.split(",")):
        t0 = time.perf_counter()
        try:
            results[name] = parts[name]()
        except Exception as e:  # noqa: BLE001 - recorded; the other parts still run
            import traceback

            traceback.print_exc()
            results[name] = f"failed: {type(e).__name__}: {e}"
        print(name, f"({time.perf_counter() - t0:.0f} s)", json.dumps(results[name], default=float), flush=True)
        with open(out_json, "w") as f:
            json.dump(results, f, indent=1, default=float)
    if args.thread_table:
        results["threads"] = thread_table(args.repeat)
        results["one tensor"] = one_tensor(max(3, args.repeat // 4))
        results["step ways by size"] = step_ways_by_size(args.repeat)
        with open(out_json, "w") as f:
            json.dump(results, f, indent=1, default=float)


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
