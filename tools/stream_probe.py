"""Move a model of several GiB through a stream on disk and measure the memory it takes.

    python tools/stream_probe.py --gib 2.2 --dir /tmp/probe --out probe.json

A float32 tensor of about --gib GiB (95% of its elements non-zero, so the message is nearly as
large) and a small one are written to a file mapped into memory; encode_stream writes them to a
message file, decode_stream reads it back into a second mapped file, and the result is checked
block by block. The mapped files' pages are the caller's tensors and output buffers (file-backed
memory); what the codecs themselves allocate is anonymous memory, sampled (RssAnon in
/proc/self/status) every millisecond during each stage. Linux only. Prints and writes a JSON
report: message size, each stage's seconds and peak anonymous memory above the start.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time

import numpy as np

import feddip_kernels as fk

BLOCK = 1 << 24  # elements generated or checked at once


def pattern(start: int, stop: int) -> np.ndarray:
    """Elements [start, stop) of the big tensor: every 20th zero, the rest distinct non-zeros."""
    i = np.arange(start, stop, dtype=np.int64)
    return np.where(i % 20 == 0, 0, (i % 9973) - 4986.5).astype(np.float32)


def rss_anon() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon in /proc/self/status")


class Peak:
    """The highest RssAnon seen while the block runs, sampled on a thread."""

    def __enter__(self) -> "Peak":
        self.start = self.peak = rss_anon()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        self.t0 = time.perf_counter()
        return self

    def _sample(self) -> None:
        while not self.done.wait(0.001):
            self.peak = max(self.peak, rss_anon())

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.t0
        self.done.set()
        self.thread.join()
        self.peak = max(self.peak, rss_anon())

    @property
    def above_start(self) -> int:
        return self.peak - self.start


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gib", type=float, default=2.2, help="size of the big tensor, GiB of float32")
    ap.add_argument("--dir", required=True, help="directory for the three files (removed after)")
    ap.add_argument("--out", help="write the JSON report here too")
    args = ap.parse_args()
    n = int(args.gib * (1 << 30)) // 4
    os.makedirs(args.dir, exist_ok=True)
    src, msg, dst = (os.path.join(args.dir, f) for f in ("tensor.f32", "message.fdkw", "decoded.f32"))
    report: dict = {"elements": n, "tensor_bytes": 4 * n, "threads": fk.get_num_threads()}
    try:
        w = np.memmap(src, dtype=np.float32, mode="w+", shape=(n,))
        for s in range(0, n, BLOCK):
            w[s : s + BLOCK] = pattern(s, min(n, s + BLOCK))
        w.flush()
        del w
        small = np.linspace(-1, 1, 1000, dtype=np.float32)
        tensors = {"big": np.memmap(src, dtype=np.float32, mode="r", shape=(n,)), "small": small}
        with Peak() as enc, open(msg, "wb") as f:
            written = fk.encode_stream(tensors, f)
        report["message_bytes"] = written
        report["encode"] = {"seconds": enc.seconds, "peak_anon_bytes": enc.above_start}
        out = np.memmap(dst, dtype=np.float32, mode="w+", shape=(n,))
        small_out = np.empty_like(small)
        if written > fk.codecs.DEFAULT_MAX_BYTES:  # over the default limit: refused, naming it
            try:
                with open(msg, "rb") as f:
                    fk.decode_stream(f, out={"big": out, "small": small_out})
                report["default_limit_error"] = None
            except fk.CodecError as e:
                report["default_limit_error"] = str(e)
        with Peak() as dec, open(msg, "rb") as f:
            fk.decode_stream(f, out={"big": out, "small": small_out}, max_bytes=4 * n + small.nbytes)
            report["trailing_bytes"] = len(f.read())
        report["decode"] = {"seconds": dec.seconds, "peak_anon_bytes": dec.above_start}
        out.flush()
        report["identical"] = bool(np.array_equal(small_out, small)) and all(
            np.array_equal(out[s : s + BLOCK], pattern(s, min(n, s + BLOCK))) for s in range(0, n, BLOCK))
        del out, tensors
    finally:
        for path in (src, msg, dst):
            if os.path.exists(path):
                os.remove(path)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return 0 if report["identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
