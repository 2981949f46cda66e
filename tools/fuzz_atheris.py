"""Coverage-guided fuzzing of decode_model and the native Golomb and rANS decoders with atheris (libFuzzer).

    python tools/fuzz_atheris.py -max_total_time=600 tests/fuzz_corpus   # a 10-minute campaign
    python tools/fuzz_atheris.py --write-corpus tests/fuzz_corpus         # (re)write the seed corpus

The corpus holds valid messages of every kind (positions in the tensor or relative to a shared
mask, every position and value codec, the entropy-coded ones included, chunked Golomb positions
of version 2, streams of version 3, empty and 0-d tensors, float32 and float64, and for the
entropy-coded codecs one dense tensor whose block has 32 lanes at 2^12 slots, the native
decoder's vector loop), each stored as its body: the harness appends the right CRC-32C, so that
mutations get past the checksum and reach the parser, and with the input's first byte odd it also
decodes the input as it is (exercising the checksum itself). Every input is decoded by every
backend, with and without the shared mask the seeds use, by decode_model and by decode_stream
(from a file object), with the same outcome in every backend (the same tensors or the same
message); its tail is fed to the native Golomb decoder with parameters from its head, and to
every backend's rANS decoder (ans_decode) with a valid model built from its head (the decoders'
contract: the caller checks the model), which must agree. Anything but CodecError (ValueError
from the bare decoders), backends that disagree, or an output above the size limit, is a crash:
libFuzzer stops and writes the input to crash-<hash>. Python code is instrumented for coverage
(feddip_kernels); libFuzzer's `cov:` counts edges of that code.
"""

from __future__ import annotations

import io
import os
import struct
import sys

import numpy as np

LIMIT = 1 << 22
SHAPES = [(20, 30), (100,), (3, 4, 5), (0,), (1,), (7, 0), ()]
FIXED_WIDTH = ("raw", "fp16", "bf16", "int8")
ENTROPY_CODED = ("ans", "auto", "fp16-ans", "bf16-ans", "int4-ans", "int8-ans")


def _shared_masks() -> dict:
    """The shared mask every seed relative to a mask is coded against (fixed, so the harness can
    pass it as the reference)."""
    rng = np.random.default_rng(1)
    out = {f"t{i}": rng.random(s) < 0.3 for i, s in enumerate(SHAPES)}
    out["f64"] = rng.random((9, 11)) < 0.3
    return out


def ans_case(data: bytes):
    """(stream, raw, n, model) for ans_decode from an input: a valid model from its first 8 bytes
    (width, shift, precision, lanes, symbols and their frequencies, from the counts that follow),
    n from 2 of them (as many as the raw bits in half the rest hold, at most 4096), the raw bits
    that n needs at the end, the stream before them. None for an input shorter than its head."""
    from feddip_kernels._contract import AnsModel
    from feddip_kernels.codecs import entropy

    if len(data) < 8:
        return None
    word_bits = 1 + data[0] % 64
    shift = data[1] % word_bits
    prob_bits = 1 + data[2] % 15
    lanes = 1 + data[3] % 32
    fit = (((1 << (word_bits - 1)) - 1) >> shift) + 1  # the symbols words of this width hold
    n_symbols = 1 + data[6] % min(64, fit, 1 << prob_bits)
    counts = np.frombuffer(data[8 : 8 + n_symbols].ljust(n_symbols, b"\x01"), dtype=np.uint8).astype(np.uint64)
    if not counts.any() or int((counts > 0).sum()) > 1 << prob_bits:
        counts = np.ones(n_symbols, np.uint64)
    base = data[7] % (fit - n_symbols + 1)
    model = AnsModel(word_bits, shift, base, entropy._normalise(counts, prob_bits), prob_bits, lanes)
    rest = data[8 + n_symbols :]
    # n from 2 bytes, up to 4096 and as many as half the rest's bytes hold in raw bits
    n = struct.unpack_from("<H", data, 4)[0] % (min(4096, 4 * len(rest) // (shift + 1)) + 1)
    raw_len = entropy.raw_len(n, shift)
    raw = bytearray(rest[max(0, len(rest) - raw_len) :].rjust(raw_len, b"\x00"))
    stream = bytearray(rest[: max(0, len(rest) - raw_len)])
    # Unless the head's flags (the top bits of its lanes byte) say otherwise, the stream's length,
    # its states and the raw bits' padding are made valid, so that most inputs reach the symbols.
    if not data[3] & 0x80 and len(stream) >= 4 * lanes and (len(stream) - 4 * lanes) % 2:
        del stream[-1:]
    if not data[3] & 0x40 and len(stream) >= 4 * lanes:
        states = np.frombuffer(bytes(stream[: 4 * lanes]), dtype="<u4") % np.uint32((1 << 31) - (1 << 15))
        stream[: 4 * lanes] = (states + np.uint32(1 << 15)).astype("<u4").tobytes()
    if not data[3] & 0x20 and raw and (n * (shift + 1)) % 8:
        raw[-1] &= (1 << ((n * (shift + 1)) % 8)) - 1
    return bytes(stream), bytes(raw), n, model


def write_corpus(directory: str) -> int:
    import feddip_kernels as fk

    rng = np.random.default_rng(0)
    w = {f"t{i}": rng.standard_normal(s).astype(np.float32) * (rng.random(s) < 0.1) for i, s in enumerate(SHAPES)}
    w["f64"] = rng.standard_normal((9, 11))
    shared = _shared_masks()
    subset = {k: m & (rng.random(m.shape) < 0.5) for k, m in shared.items()}
    os.makedirs(directory, exist_ok=True)
    n = 0
    for values in FIXED_WIDTH + ENTROPY_CODED:
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
    # Entropy-coded values of one dense tensor: 2100 values, a block of 32 lanes at 2^12 slots.
    dense = {"v": rng.standard_normal(2100).astype(np.float32) + np.float32(0.05)}
    for values in ENTROPY_CODED:
        msg = fk.encode_model(dense, positions="bitmask", values=values)
        with open(os.path.join(directory, f"dense-{values}"), "wb") as f:
            f.write(msg[:-4])
        buf = io.BytesIO()
        fk.encode_stream(dense, buf, positions="bitmask", values=values, chunk_elems=4096)
        with open(os.path.join(directory, f"stream-dense-{values}"), "wb") as f:
            f.write(buf.getvalue()[:-4])
        n += 2
    # Tensors that travel whole (integer, bool, float16, complex records) beside a coded one.
    whole = {"n": np.array(7, np.int64), "flags": rng.random((3, 5)) < 0.5,
             "h": rng.standard_normal(6).astype(np.float16), "u": rng.integers(0, 255, (4, 4), dtype=np.uint8),
             "c": rng.standard_normal(3).astype(np.complex64), "w": w["t0"]}
    with open(os.path.join(directory, "whole-dtypes"), "wb") as f:
        f.write(fk.encode_model(whole)[:-4])
    return n + 1


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

    kernels = {be: _backend.kernels(be) for be in backends}

    def outcome(decode, message: bytes, reference, backend: str):
        try:
            out = decode(message, reference=reference, max_bytes=LIMIT, backend=backend)
        except fk.CodecError as e:
            return f"CodecError: {e}"
        if any(t.size * t.itemsize > LIMIT for t in out.tensors.values()):
            raise AssertionError("decoded tensors above the size limit")
        return [(k, t.dtype.str, t.shape, t.tobytes()) for k, t in out.tensors.items()]

    def ans_outcome(k, case) -> str | bytes:
        stream, raw, n, model = case
        try:
            return k.ans_decode(stream, raw, n, **model._asdict()).tobytes()
        except ValueError as e:
            return f"ValueError: {e}"

    def one_input(data: bytes) -> None:
        sealed = data + struct.pack("<I", codecs.crc32c(data))
        inputs = [sealed, data] if data[:1] and data[0] & 1 else [sealed]
        for message in inputs:
            for reference in (shared, None):
                for decode in decoders:
                    seen = {backend: outcome(decode, message, reference, backend) for backend in backends}
                    if len({repr(o) for o in seen.values()}) > 1:
                        raise AssertionError("backends disagree: " + "; ".join(
                            f"{be}: {o if isinstance(o, str) else 'decoded'}" for be, o in seen.items()))
        case = ans_case(data)
        if case is not None:
            seen = {backend: ans_outcome(k, case) for backend, k in kernels.items()}
            if len(set(seen.values())) > 1:
                raise AssertionError("ans_decode backends disagree: " + "; ".join(
                    f"{be}: {o if isinstance(o, str) else 'decoded'}" for be, o in seen.items()))
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
