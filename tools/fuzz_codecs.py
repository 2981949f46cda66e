"""Long mutation-fuzzing campaign for decode_model (the tests run a short one through hypothesis).

    python tools/fuzz_codecs.py --seconds 600 --seed 1

Valid messages of every kind (positions in the tensor or relative to a shared mask, every position
and value codec, the entropy-coded ones included, chunked versions 2 and 3, empty and 0-d tensors,
float32 and float64) are mutated (bytes overwritten, bits flipped, truncated, bytes inserted),
resealed with a correct CRC so that the parser goes past the checksum, and decoded with every
backend (the native one under every instruction set its CPU has), with and without the reference
mask; version 3 messages (streams) also by decode_stream from a file object. Entropy-coded values
also come as one dense tensor of 2500 values: a block of 32 lanes at 2^12 slots (the encoder's
usual model, and the native decoder's vector loop) that most mutations land in. Anything but a
CodecError, an output above the size limit, or backends that disagree (other tensors, or another
error message) is reported; the exit status is 1 if there was one.
"""

from __future__ import annotations

import argparse
import io
import struct
import sys
import time
import traceback

import numpy as np

import feddip_kernels as fk
from feddip_kernels import codecs

LIMIT = 1 << 22
FIXED_WIDTH = ("raw", "fp16", "bf16", "int8")
ENTROPY_CODED = ("ans", "auto", "fp16-ans", "bf16-ans", "int4-ans", "int8-ans")


def messages(rng: np.random.Generator) -> list[tuple[bytes, dict | None]]:
    shapes = [(20, 30), (100,), (3, 4, 5), (0,), (1,), (7, 0), ()]
    w = {f"t{i}": rng.standard_normal(s).astype(np.float32) * (rng.random(s) < 0.1) for i, s in enumerate(shapes)}
    w["f64"] = rng.standard_normal((9, 11))
    shared = {k: rng.random(v.shape) < 0.3 for k, v in w.items()}
    subset = {k: m & (rng.random(m.shape) < 0.5) for k, m in shared.items()}
    out: list[tuple[bytes, dict | None]] = []
    for values in FIXED_WIDTH + ENTROPY_CODED:
        for positions in ("bitmask", "csr", "golomb", "auto"):
            out.append((fk.encode_model(w, positions=positions, values=values), None))
            if positions in ("golomb", "auto"):  # version 2: the same tensors in runs of 16 elements
                chunk, codecs.model.CHUNK_ELEMS = codecs.model.CHUNK_ELEMS, 16
                try:
                    out.append((fk.encode_model(w, positions=positions, values=values), None))
                finally:
                    codecs.model.CHUNK_ELEMS = chunk
            if positions != "csr":  # CSR codes positions in the tensor only
                out.append(
                    (fk.encode_model(w, masks=shared, reference=shared, positions=positions, values=values), shared)
                )
                out.append(
                    (fk.encode_model(w, masks=subset, reference=shared, positions=positions, values=values), shared)
                )
                # Version 3 (streams), in chunks of 16 elements.
                out.append((stream(w, positions=positions, values=values, chunk_elems=16), None))
                out.append(
                    (
                        stream(w, masks=subset, reference=shared, positions=positions, values=values, chunk_elems=16),
                        shared,
                    )
                )
    dense = {"v": rng.standard_normal(2500).astype(np.float32) + np.float32(0.05)}  # no zeros: 2500 values
    for values in ENTROPY_CODED:
        out.append((fk.encode_model(dense, positions="bitmask", values=values), None))
        out.append((stream(dense, positions="bitmask", values=values, chunk_elems=4096), None))
    # Tensors that travel whole (integer, bool, float16 and complex records) beside coded ones.
    whole = {"n": np.array(7, np.int64), "flags": rng.random((3, 5)) < 0.5,
             "h": rng.standard_normal(6).astype(np.float16), "u": rng.integers(0, 255, (4, 4), dtype=np.uint8),
             "c": rng.standard_normal(3).astype(np.complex64), "w": w["t0"]}
    out.append((fk.encode_model(whole), None))
    out.append((fk.encode_model(whole, values="auto"), None))
    return out + invalid_seeds(w, shared)


def stream(w: dict, **kw) -> bytes:
    f = io.BytesIO()
    fk.encode_stream(w, f, **kw)
    return f.getvalue()


def invalid_seeds(w: dict, shared: dict) -> list[tuple[bytes, dict | None]]:
    """Messages one field away from valid, which the decoder must refuse: a non-zero reserved header
    field, and CSR positions coded relative to a shared mask (the format allows CSR in domain 0 only)."""
    msg = fk.encode_model(w)
    reserved = msg[:6] + b"\x01\x00" + msg[8:-4]
    shared_2d = {"t0": shared["t0"]}
    body = bytearray(fk.encode_model({"t0": w["t0"]}, masks=shared_2d, reference=shared_2d, positions="bitmask")[:-4])
    name_len = struct.unpack_from("<H", body, 12)[0]
    fields = 15 + name_len + 8 * body[14 + name_len]
    body[fields + 2] = codecs.POSITIONS["csr"]  # the record's positions codec, its domain being 1
    return [(reseal(reserved), None), (reseal(bytes(body)), shared_2d)]


def reseal(body: bytes) -> bytes:
    return body + struct.pack("<I", codecs.crc32c(body))


def mutate(rng: np.random.Generator, body: bytearray) -> bytearray:
    op = rng.integers(4)
    if op == 0:
        for _ in range(rng.integers(1, 5)):
            body[rng.integers(len(body))] = rng.integers(256)
    elif op == 1:
        body[rng.integers(len(body))] ^= 1 << int(rng.integers(8))
    elif op == 2:
        del body[rng.integers(len(body)):]
    else:
        i = int(rng.integers(len(body)))
        body[i:i] = rng.integers(0, 256, int(rng.integers(1, 9)), dtype=np.uint8).tobytes()
    return body


def isas() -> list:
    """The instruction sets the native backend may be capped to on this CPU (its `_isa`)."""
    from feddip_kernels import _backend

    native = _backend.native_module()
    if native is None:
        return []
    before = native._isa()
    found = [isa for isa in ("avx512", "avx2", "generic") if native._isa(isa) == isa]
    native._isa(before)
    return found


def outcome(decode, data: bytes, reference, backend: str):
    """What a decoder makes of the bytes: the tensors' bytes, or the CodecError's message."""
    try:
        out = decode(data, reference=reference, max_bytes=LIMIT, backend=backend)
    except fk.CodecError as e:
        return f"CodecError: {e}"
    if any(t.size * t.itemsize > LIMIT for t in out.tensors.values()):
        raise AssertionError("decoded tensors above the size limit")
    return [(k, t.dtype.str, t.shape, t.tobytes()) for k, t in out.tensors.items()]


def decoders(data: bytes) -> list:
    """decode_model, and for what claims to be a stream (version 3) decode_stream too."""
    if data[4:5] != bytes([codecs.STREAM_VERSION]):
        return [fk.decode_model]
    return [fk.decode_model, lambda d, **kw: fk.decode_stream(io.BytesIO(d), **kw)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    cases = messages(rng)
    from feddip_kernels import _backend

    native = _backend.native_module()
    runs = [(be, isa) for be in fk.available_backends() for isa in (isas() if be == "native" else [None])]
    decodes = failures = 0
    end = time.monotonic() + args.seconds
    while time.monotonic() < end:
        msg, shared = cases[rng.integers(len(cases))]
        data = reseal(bytes(mutate(rng, bytearray(msg[:-4]))))
        for reference in (shared, None) if shared is not None else (None,):
            for decode in decoders(data):
                seen = {}
                for backend, isa in runs:
                    decodes += 1
                    before = native._isa() if isa else None
                    if isa:
                        native._isa(isa)
                    try:
                        seen[backend if isa is None else f"{backend}/{isa}"] = outcome(decode, data, reference, backend)
                    except Exception:
                        failures += 1
                        print(f"backend {backend} {isa or ''}, reference {reference is not None}, "
                              f"message {data.hex()}")
                        traceback.print_exc()
                    finally:
                        if isa:
                            native._isa(before)
                if len({repr(o) for o in seen.values()}) > 1:
                    failures += 1
                    print(f"backends disagree, reference {reference is not None}, message {data.hex()}: "
                          + "; ".join(f"{be}: {o if isinstance(o, str) else 'decoded'}" for be, o in seen.items()))
    print(f"{decodes} decodes, {failures} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
