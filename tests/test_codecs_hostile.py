"""Untrusted input: what decoders reject, with CodecError (docs/wire-format.md, "Decoders reject"),
found by mutation, truncation and coverage-guided fuzzing, and checked before allocating; and
buffers the native code must not read past or misread (strided views, misaligned arrays)."""

import struct

import numpy as np
import pytest
from codec_helpers import _reseal, mutated_body
from hypothesis import HealthCheck, given, settings, strategies as st

import feddip_kernels as fk
from feddip_kernels import codecs, reference


def _sample_messages() -> list[tuple[bytes, dict | None]]:
    """(message, reference mask) pairs of every kind: positions in the tensor or relative to a shared
    mask (values only, or a subset of it), every value codec, empty and 0-d tensors."""
    rng = np.random.default_rng(6)
    shapes = [(20, 30), (100,), (3, 4, 5), (0,), ()]
    w = {f"t{i}": rng.standard_normal(s).astype(np.float32) * (rng.random(s) < 0.1) for i, s in enumerate(shapes)}
    w["d"] = rng.standard_normal((6, 7))
    shared = {k: rng.random(v.shape) < 0.3 for k, v in w.items()}
    subset = {k: m & (rng.random(m.shape) < 0.5) for k, m in shared.items()}
    out: list[tuple[bytes, dict | None]] = [
        (fk.encode_model(w, positions=p), None) for p in ["bitmask", "csr", "golomb", "auto"]
    ]
    for values in ["raw", "fp16", "bf16", "int8"]:
        out.append((fk.encode_model(w, masks=shared, reference=shared, values=values), shared))
        out.append((fk.encode_model(w, masks=subset, reference=shared, values=values), shared))
    return out


MESSAGES = _sample_messages()


@settings(suppress_health_check=[HealthCheck.too_slow], max_examples=300)
@given(st.sampled_from(MESSAGES), st.data())
def test_fuzz_mutations_raise_codec_error_only(case, data):
    msg, reference = case
    body = mutated_body(msg, data)
    for sealed in (_reseal(bytes(body)), bytes(body) + msg[-4:]):
        for ref in (reference, None):
            try:
                out = fk.decode_model(sealed, reference=ref, max_bytes=1 << 24)
            except fk.CodecError:
                continue
            assert all(t.size * t.itemsize <= 1 << 24 for t in out.tensors.values())


@given(st.sampled_from(MESSAGES), st.data())
def test_fuzz_truncation(case, data):
    msg, reference = case
    cut = data.draw(st.integers(0, len(msg) - 1))
    with pytest.raises(fk.CodecError):
        fk.decode_model(msg[:cut], reference=reference)
    with pytest.raises(fk.CodecError):
        fk.decode_model(_reseal(msg[: max(0, cut - 4)]), reference=reference)


@given(st.binary(max_size=200))
def test_fuzz_random_bytes(blob):
    with pytest.raises(fk.CodecError):
        fk.decode_model(blob)
    sealed = _reseal(codecs.MAGIC + bytes([1, 0, 0, 0]) + blob)
    try:
        fk.decode_model(sealed, max_bytes=1 << 20)
    except fk.CodecError:
        pass


def test_fuzz_campaign_tool_runs_clean():
    # tools/fuzz_codecs.py is the long campaign (run it for minutes); here two seconds of it.
    import subprocess
    import sys
    from pathlib import Path

    tool = Path(__file__).resolve().parent.parent / "tools" / "fuzz_codecs.py"
    done = subprocess.run([sys.executable, str(tool), "--seconds", "2", "--seed", "7"], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert done.stdout.strip().endswith(" 0 failures")


def test_coverage_guided_fuzzing_short_run(tmp_path):
    # tools/fuzz_atheris.py: libFuzzer through atheris, from the committed seed corpus (copied, as
    # libFuzzer adds the inputs it finds to its corpus directory). Any crash fails the run.
    pytest.importorskip("atheris")
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).parent.parent
    corpus = tmp_path / "corpus"
    shutil.copytree(root / "tests" / "fuzz_corpus", corpus)
    # libFuzzer's RSS limit (2 GB) is checked against the process's high-water mark, which a child
    # takes over from this process at exec: 2 GB above what this test process has reached.
    import resource

    limit = 2048 + resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    run = subprocess.run(
        [sys.executable, str(root / "tools" / "fuzz_atheris.py"), "-max_total_time=8", "-timeout=20",
         f"-rss_limit_mb={limit}", str(corpus)],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    assert "Done" in run.stderr and not list(tmp_path.glob("crash-*"))
    assert len(list(corpus.iterdir())) >= 152


def test_bad_header_fields():
    msg = fk.encode_model({"w": np.ones(4, np.float32)})
    with pytest.raises(fk.CodecError, match="magic"):
        fk.decode_model(_reseal(b"XXXX" + msg[4:-4]))
    with pytest.raises(fk.CodecError, match="version"):
        fk.decode_model(_reseal(msg[:4] + b"\x09" + msg[5:-4]))
    with pytest.raises(fk.CodecError, match="checksum"):
        fk.decode_model(msg[:-1] + bytes([msg[-1] ^ 1]))
    with pytest.raises(fk.CodecError, match="unexpected bytes"):
        fk.decode_model(_reseal(msg[:-4] + b"\x00"))


def test_nonzero_reserved_header_field_is_rejected():
    msg = fk.encode_model({"w": np.ones(4, np.float32)})
    with pytest.raises(fk.CodecError, match="reserved"):
        fk.decode_model(_reseal(msg[:6] + b"\x01\x00" + msg[8:-4]))


def _record_offsets(msg: bytes) -> dict:
    """Byte offsets of the first record's fields (name and shape of any length)."""
    name_len = struct.unpack_from("<H", msg, 12)[0]
    ndim = msg[14 + name_len]
    shape_at = 15 + name_len
    fields = shape_at + 8 * ndim
    return {"shape": shape_at, "domain": fields + 1, "positions": fields + 2}


def test_shape_whose_size_overflows_is_a_codec_error():
    # (0, 2**62) holds no element, so the size check passed, and NumPy refused the shape later.
    body = bytearray(fk.encode_model({"w": np.zeros((0, 3), np.float32)})[:-4])
    struct.pack_into("<Q", body, _record_offsets(bytes(body))["shape"] + 8, 1 << 62)
    with pytest.raises(fk.CodecError, match="too large"):
        fk.decode_model(_reseal(bytes(body)))
    fine = fk.decode_model(fk.encode_model({"w": np.zeros((0, 1 << 20), np.float32)}))
    assert fine.tensors["w"].shape == (0, 1 << 20)


def test_reference_of_another_shape_is_a_codec_error():
    # Found by fuzzing: a message whose shape disagrees with the receiver's mask raised ValueError.
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    shared = {"a": a > 5}
    msg = fk.encode_model({"a": a}, masks=shared, reference=shared)
    with pytest.raises(fk.CodecError, match="elements"):
        fk.decode_model(msg, reference={"a": np.ones(10, bool)})


def test_size_limit_checked_before_allocating():
    huge = bytearray(fk.encode_model({"w": np.zeros(4, np.float32)}))
    body = huge[:-4]
    # shape u64 sits after header (12) + name_len (2) + name (1) + ndim (1)
    struct.pack_into("<Q", body, 16, 1 << 60)
    with pytest.raises(fk.CodecError, match="exceed max_bytes=2147483648; pass a larger max_bytes to decode_model"):
        fk.decode_model(_reseal(bytes(body)))
    with pytest.raises(fk.CodecError, match="max_bytes=100"):
        fk.decode_model(fk.encode_model({"w": np.zeros(1000, np.float32)}), max_bytes=100)


def test_expected_schema_is_checked_before_allocating():
    w = {"a": np.ones((3, 4), np.float32), "b": np.ones(5)}
    msg = fk.encode_model(w)
    schema = {"a": ((3, 4), np.float32), "b": ((5,), np.float64)}
    out = fk.decode_model(msg, expect=schema)
    assert set(out.tensors) == {"a", "b"}
    bad = [
        ({"a": ((3, 4), np.float32)}, "other tensors"),
        ({**schema, "c": ((1,), np.float32)}, "missing \\['c'\\]"),
        ({**schema, "a": ((4, 3), np.float32)}, "expected \\(4, 3\\)"),
        ({**schema, "b": ((5,), np.float32)}, "float32"),
    ]
    for expect, match in bad:
        with pytest.raises(fk.CodecError, match=match):
            fk.decode_model(msg, expect=expect, max_bytes=100)  # refused by the schema, not the limit


# Every binding that reads a buffer, given views whose bytes are not ptr .. ptr + size: the
# native module must refuse them or read them right, never read outside the view.
def _strided_views():
    base = np.arange(256, dtype=np.uint8)
    return {
        "reversed": memoryview(base)[::-1],
        "stepped": memoryview(base)[::3],
        "offset": memoryview(base)[5:133],
        "2-d column": memoryview(base.reshape(16, 16)[:, 3]),
        "numpy reversed": base[::-1],
    }


@pytest.mark.parametrize("kind", list(_strided_views()))
def test_native_bindings_never_read_outside_a_strided_view(kind):
    from feddip_kernels import _core

    view = _strided_views()[kind]
    logical = np.asarray(view).tobytes()
    bits = np.frombuffer(logical, np.uint8)
    calls = {
        "crc32c": (lambda v: _core.crc32c(v), lambda: reference.crc32c(logical)),
        "golomb_decode": (
            lambda v: bytes(_core.golomb_decode(v, 8 * len(logical), 3, 1)),
            lambda: bytes(_core.golomb_decode(logical, 8 * len(logical), 3, 1)),
        ),
        "golomb_decode_many": (
            lambda v: bytes(_core.golomb_decode_many([(v, 8 * len(logical), 3, 1)])[0][0]),
            lambda: bytes(_core.golomb_decode_many([(logical, 8 * len(logical), 3, 1)])[0][0]),
        ),
        "pack_bits": (
            lambda v: bytes(_core.pack_bits(np.asarray(v).view(bool))),
            lambda: bytes(_core.pack_bits(bits.astype(bool))),
        ),
        "unpack_bits": (
            lambda v: _core.unpack_bits(np.asarray(v), 8 * len(logical)).tobytes(),
            lambda: _core.unpack_bits(bits, 8 * len(logical)).tobytes(),
        ),
        "count_bits": (
            lambda v: _core.count_bits(np.asarray(v), 8 * len(logical)),
            lambda: _core.count_bits(bits, 8 * len(logical)),
        ),
        "golomb_encode": (
            lambda v: _core.golomb_encode(np.asarray(v), 8 * len(logical), 4),
            lambda: _core.golomb_encode(bits, 8 * len(logical), 4),
        ),
        "densify": (
            lambda v: _core.densify(
                np.asarray(v), 8 * len(logical), np.ones(int(np.unpackbits(bits).sum()), np.float32)
            ).tobytes(),
            lambda: _core.densify(
                bits, 8 * len(logical), np.ones(int(np.unpackbits(bits).sum()), np.float32)
            ).tobytes(),
        ),
    }
    def outcome(f, *args):
        try:
            return f(*args)
        except ValueError as e:
            return f"ValueError: {e}"

    for name, (native, expected) in calls.items():
        got = outcome(native, view)
        if not (isinstance(got, str) and "contiguous" in got):  # refused, or read right
            assert got == outcome(expected), name
    # The public function reads any view in logical order, the same in every backend.
    for be in fk.available_backends():
        assert codecs.crc32c(view, backend=be) == reference.crc32c(logical)


def _misaligned(a: np.ndarray) -> np.ndarray:
    buf = bytearray(a.nbytes + 1)
    out = np.frombuffer(buf, dtype=a.dtype, count=a.size, offset=1).reshape(a.shape)
    out[...] = a
    assert not out.flags.aligned or a.itemsize == 1
    return out


def test_misaligned_inputs_are_read_through_aligned_copies(backend):
    # Views into byte buffers at odd offsets are valid NumPy arrays; native kernels must not read
    # them in place (undefined behaviour in C++, found with -fsanitize=undefined).
    rng = np.random.default_rng(8)
    a = (rng.standard_normal((7, 9)) * (rng.random((7, 9)) < 0.3)).astype(np.float32)
    msg = fk.encode_model({"a": _misaligned(a)}, backend=backend)
    assert msg == fk.encode_model({"a": a}, backend=backend)
    np.testing.assert_array_equal(fk.decode_model(msg, backend=backend).tensors["a"], a)
    assert fk.global_magnitude_threshold([_misaligned(a)], 5, backend=backend) == fk.global_magnitude_threshold([a], 5)
    w1, w2 = a.copy(), a.copy()
    fk.masked_ef_step(w1, a, a != 0, lr=0.1, backend=backend)
    fk.masked_ef_step(w2, _misaligned(a), _misaligned(a != 0), lr=0.1, backend=backend)
    np.testing.assert_array_equal(w1, w2)
    with pytest.raises(ValueError, match="aligned"):
        fk.masked_ef_step(_misaligned(a), a, lr=0.1, backend=backend)
