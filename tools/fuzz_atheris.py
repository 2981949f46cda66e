"""Coverage-guided fuzzing of decode_model and the native Golomb decoder with atheris (libFuzzer).

    python tools/fuzz_atheris.py -max_total_time=600 tests/fuzz_corpus   # a 10-minute campaign
    python tools/fuzz_atheris.py --write-corpus tests/fuzz_corpus         # (re)write the seed corpus

The corpus holds valid messages of every kind (positions in the tensor or relative to a shared
mask, every position and value codec, chunked Golomb positions of version 2, streams of version
3, empty and 0-d tensors, float32 and float64), each stored as its body: the harness appends the
right CRC-32C, so that mutations get past the checksum and reach the parser, and with the input's
first byte odd it also decodes the input as it is (exercising the checksum itself). Every input
is decoded by every backend, with and without the shared mask the seeds use, by decode_model and
by decode_stream (from a file object), and its tail is fed to the native Golomb decoder with
parameters from its head. Anything but CodecError (ValueError from the bare Golomb decoder), or
an output above the size limit, is a crash: libFuzzer stops and writes the input to
crash-<hash>. Python code is instrumented for coverage (feddip_kernels); libFuzzer's `cov:`
counts edges of that code.
"""

from __future__ import annotations

import io
import os
import struct
import sys

import numpy as np

LIMIT = 1 << 22
SHAPES = [(20, 30), (100,), (3, 4, 5), (0,), (1,), (7, 0), ()]


def _shared_masks() -> dict:
    """The shared mask every seed relative to a mask is coded against (fixed, so the harness can
    pass it as the reference)."""
    rng = np.random.default_rng(1)
    out = {f"t{i}": rng.random(s) < 0.3 for i, s in enumerate(SHAPES)}
    out["f64"] = rng.random((9, 11)) < 0.3
    return out


def write_corpus(directory: str) -> int:
    import feddip_kernels as fk

    rng = np.random.default_rng(0)
    w = {f"t{i}": rng.standard_normal(s).astype(np.float32) * (rng.random(s) < 0.1) for i, s in enumerate(SHAPES)}
    w["f64"] = rng.standard_normal((9, 11))
    shared = _shared_masks()
    subset = {k: m & (rng.random(m.shape) < 0.5) for k, m in shared.items()}
    os.makedirs(directory, exist_ok=True)
    n = 0
    for values in ("raw", "fp16", "bf16", "int8"):
        for positions in ("bitmask", "csr", "golomb", "auto", "all"):
            kinds = [("full", {}), ("shared", dict(masks=shared, reference=shared)),
                     ("subset", dict(masks=subset, reference=shared))]
            for kind, kw in kinds:
                if positions == "csr" and kind != "full":
                    continue  # CSR codes positions in the tensor only
                if positions == "all" and kind != "shared":
                    continue  # 'all' needs every position of the domain kept
                msg = fk.encode_model(w, positions=positions, values=values, **kw)
                with open(os.path.join(directory, f"{kind}-{positions}-{values}"), "wb") as f:
                    f.write(msg[:-4])
                n += 1
        # Version 2: Golomb positions in runs of 16 elements (chunk tables).
        from feddip_kernels.codecs import model

        chunk, model.CHUNK_ELEMS = model.CHUNK_ELEMS, 16
        try:
            msg = fk.encode_model(w, positions="golomb", values=values)
        finally:
            model.CHUNK_ELEMS = chunk
        with open(os.path.join(directory, f"chunked-golomb-{values}"), "wb") as f:
            f.write(msg[:-4])
        n += 1
        # Version 3 (streams) in chunks of 16 elements, in the tensor's index space and relative
        # to the shared mask.
        for kind, kw in (("stream-full", {}), ("stream-subset", dict(masks=subset, reference=shared))):
            buf = io.BytesIO()
            fk.encode_stream(w, buf, values=values, chunk_elems=16, **kw)
            with open(os.path.join(directory, f"{kind}-{values}"), "wb") as f:
                f.write(buf.getvalue()[:-4])
            n += 1
    return n


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--write-corpus":
        print(f"wrote {write_corpus(sys.argv[2])} seeds to {sys.argv[2]}")
        return 0
    import atheris

    with atheris.instrument_imports(include=["feddip_kernels"]):
        import feddip_kernels as fk
        from feddip_kernels import _backend, codecs

    backends = fk.available_backends()
    shared = _shared_masks()
    native = _backend.native_module()
    decoders = [fk.decode_model, lambda d, **kw: fk.decode_stream(io.BytesIO(d), **kw)]

    def one_input(data: bytes) -> None:
        sealed = data + struct.pack("<I", codecs.crc32c(data))
        inputs = [sealed, data] if data[:1] and data[0] & 1 else [sealed]
        for message in inputs:
            for backend in backends:
                for reference in (shared, None):
                    for decode in decoders:
                        try:
                            out = decode(message, reference=reference, max_bytes=LIMIT, backend=backend)
                        except fk.CodecError:
                            continue
                        if any(t.size * t.itemsize > LIMIT for t in out.tensors.values()):
                            raise AssertionError("decoded tensors above the size limit")
        if native is not None and len(data) >= 12:
            n, nnz, m = struct.unpack_from("<IIH", data)
            n %= 1 << 16
            try:
                native.golomb_decode(data[10:], n, nnz % (n + 1), m)
            except ValueError:
                pass

    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()
    return 0


if __name__ == "__main__":
    sys.exit(main())
