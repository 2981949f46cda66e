"""Streams (wire format version 3): encode_stream / decode_stream through file objects, and
decode_model reading the same bytes."""

import io
import json
import os
import shutil
import struct
import subprocess
import sys
import threading
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from codec_helpers import _reseal, bit_patterns, mutated_body, sparse_arrays
from hypothesis import HealthCheck, given, settings, strategies as st

import feddip_kernels as fk
from feddip_kernels import codecs
from feddip_kernels.codecs.format import HEADER, SIGNS, STREAM_CHUNK, STREAM_RECORD

ROOT = Path(__file__).resolve().parent.parent
POSITIONS = ["auto", "all", "bitmask", "golomb"]
VALUES = ["raw", "fp16", "bf16", "int8"]


def stream(tensors, **kw) -> bytes:
    f = io.BytesIO()
    n = fk.encode_stream(tensors, f, **kw)
    assert n == len(f.getvalue())
    return f.getvalue()


def model(rng: np.random.Generator) -> dict:
    shapes = [(20, 30), (100,), (3, 4, 5), (0,), (1,), (7, 0), ()]
    w = {f"t{i}": rng.standard_normal(s).astype(np.float32) * (rng.random(s) < 0.1) for i, s in enumerate(shapes)}
    w["f64"] = rng.standard_normal((9, 11))
    return w


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(sparse_arrays(), st.sampled_from(["auto", "bitmask", "golomb"]), st.sampled_from([8, 16, 64, 1 << 22]))
def test_round_trip_is_lossless_in_every_backend_with_the_same_bytes(a, positions, chunk):
    tensors = {"w": a, "b": np.ones(5, np.float32)}
    msgs = {be: stream(tensors, positions=positions, chunk_elems=chunk, backend=be) for be in fk.available_backends()}
    assert len(set(msgs.values())) == 1
    msg = next(iter(msgs.values()))
    assert msg[4] == 3
    for be in fk.available_backends():
        for out in (fk.decode_stream(io.BytesIO(msg), masks=True, backend=be), fk.decode_model(msg, backend=be)):
            assert out.tensors["w"].dtype == a.dtype and out.tensors["w"].shape == a.shape
            np.testing.assert_array_equal(out.tensors["w"], a)
            np.testing.assert_array_equal(out.masks["w"], a != 0)
            np.testing.assert_array_equal(out.tensors["b"], tensors["b"])


@pytest.mark.parametrize("values", VALUES)
@pytest.mark.parametrize("positions", ["auto", "bitmask", "golomb"])
def test_values_decode_as_encode_model_s_do(positions, values):
    # Lossy values are the same numbers as in a version 1 message except int8, scaled per chunk:
    # there its error is within half a step of the chunk's own scale.
    w = model(np.random.default_rng(1))
    got = fk.decode_stream(io.BytesIO(stream(w, positions=positions, values=values, chunk_elems=64)))
    want = fk.decode_model(fk.encode_model(w, positions=positions, values=values))
    for name, a in w.items():
        if values == "int8":
            for s in range(0, a.size, 64):
                piece = a.reshape(-1)[s : s + 64]
                scale = np.float32(np.abs(piece).max() / 127) if piece.any() else 1.0
                np.testing.assert_allclose(got.tensors[name].reshape(-1)[s : s + 64], piece, atol=scale * 0.5001)
        else:
            np.testing.assert_array_equal(got.tensors[name], want.tensors[name])


def test_positions_relative_to_a_shared_mask_per_chunk():
    rng = np.random.default_rng(2)
    w = model(rng)
    shared = {k: rng.random(np.shape(v)) < 0.3 for k, v in w.items()}
    subset = {k: m & (rng.random(m.shape) < 0.5) for k, m in shared.items()}
    for masks in (shared, subset):
        for positions in ("auto", "bitmask", "golomb"):
            msg = stream(w, masks=masks, reference=shared, positions=positions, chunk_elems=16)
            got = fk.decode_stream(io.BytesIO(msg), reference=shared, masks=True)
            for name, a in w.items():
                np.testing.assert_array_equal(got.masks[name], masks[name])
                np.testing.assert_array_equal(got.tensors[name], np.where(masks[name], a, 0))
    # Sending exactly the shared mask's positions costs no position bytes at all.
    assert len(stream(w, masks=shared, reference=shared)) < len(stream(w, masks=shared))
    msg = stream(w, masks=shared, reference=shared, positions="all")
    with pytest.raises(fk.CodecError, match="reference"):
        fk.decode_stream(io.BytesIO(msg))
    with pytest.raises(fk.CodecError, match="elements"):
        fk.decode_stream(io.BytesIO(msg), reference={**shared, "t0": np.ones(5, bool)})
    other = {**shared, "t0": ~shared["t0"]}
    with pytest.raises(fk.CodecError, match="reference mask has"):
        fk.decode_stream(io.BytesIO(msg), reference=other)


def test_a_chunk_that_is_not_a_subset_of_its_reference_is_coded_in_its_own_space():
    a = np.arange(1, 33, dtype=np.float32)
    ref = np.zeros(32, bool)
    ref[:16] = True  # chunk 0 (elements 0-15) is within the reference, chunk 1 is not
    masks = {"a": ref | (np.arange(32) == 20)}
    msg = stream({"a": a}, masks=masks, reference={"a": ref}, chunk_elems=16)
    chunk0 = HEADER.size + 2 + 1 + 1 + 8 + STREAM_RECORD.size
    assert msg[chunk0] == codecs.DOMAIN_REFERENCE
    assert msg[chunk0 + STREAM_CHUNK.size + 16 * 4] == codecs.DOMAIN_FULL
    got = fk.decode_stream(io.BytesIO(msg), reference={"a": ref})
    np.testing.assert_array_equal(got.tensors["a"], np.where(masks["a"], a, 0))


def test_options_are_checked():
    w = {"w": np.ones(10, np.float32)}
    for bad in (0, 12, 7, 1 << 25, True, 16.0):
        with pytest.raises(ValueError, match="chunk_elems"):
            stream(w, chunk_elems=bad)
    with pytest.raises(ValueError, match="not offered in streams"):
        stream(w, positions="csr")
    with pytest.raises(ValueError, match="values"):
        stream(w, values="fp8")
    with pytest.raises(ValueError, match="'all'"):
        stream({"w": np.array([0, 1], np.float32)}, positions="all")
    with pytest.raises(TypeError, match="float32 or float64"):
        stream({"w": np.ones(3, np.int32)})
    with pytest.raises(ValueError, match="masks"):
        stream(w, masks={"w": np.ones(3, bool)})


def test_decode_model_reads_streams_and_decode_stream_points_version_1_to_it():
    w = model(np.random.default_rng(3))
    msg = stream(w, chunk_elems=32)
    assert set(fk.decode_model(msg).tensors) == set(w)
    with pytest.raises(fk.CodecError, match="unexpected bytes"):
        fk.decode_model(msg[:-4] + b"\0" + struct.pack("<I", codecs.crc32c(msg[:-4] + b"\0")))
    with pytest.raises(fk.CodecError, match="checksum"):
        fk.decode_model(msg[:-5] + bytes([msg[-5] ^ 1]) + msg[-4:])
    with pytest.raises(fk.CodecError, match="decode_model"):
        fk.decode_stream(io.BytesIO(fk.encode_model(w)))


def test_messages_back_to_back_and_the_file_left_just_past_each():
    rng = np.random.default_rng(4)
    first, second = model(rng), {"x": rng.standard_normal(1000).astype(np.float32)}
    f = io.BytesIO()
    fk.encode_stream(first, f, chunk_elems=64)
    end = f.tell()
    fk.encode_stream(second, f)
    f.write(b"tail")
    f.seek(0)
    a = fk.decode_stream(f)
    assert f.tell() == end
    b = fk.decode_stream(f)
    assert f.read() == b"tail"
    np.testing.assert_array_equal(a.tensors["t0"], first["t0"])
    np.testing.assert_array_equal(b.tensors["x"], second["x"])


class Trickle(io.RawIOBase):
    """A raw file that reads or writes at most 7 bytes a call (as pipes and sockets may)."""

    def __init__(self, data: bytes = b"") -> None:
        self.data, self.pos, self.sink = data, 0, bytearray()

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        n = min(len(b), 7, len(self.data) - self.pos)
        b[:n] = self.data[self.pos : self.pos + n]
        self.pos += n
        return n

    def write(self, b) -> int:
        n = min(len(b), 7)
        self.sink += bytes(b[:n])
        return n


class ReadOnly:
    """A file object with read and nothing else."""

    def __init__(self, data: bytes) -> None:
        self.f = io.BytesIO(data)

    def read(self, n: int) -> bytes:
        return self.f.read(n)


def test_short_reads_and_writes_and_objects_with_only_read():
    w = model(np.random.default_rng(5))
    msg = stream(w, chunk_elems=64)
    t = Trickle()
    assert fk.encode_stream(w, t, chunk_elems=64) == len(msg) and bytes(t.sink) == msg
    for f in (Trickle(msg), ReadOnly(msg)):
        np.testing.assert_array_equal(fk.decode_stream(f).tensors["f64"], w["f64"])


class WouldBlock(io.RawIOBase):
    """A non-blocking raw file: takes at most 5 bytes a call, and every third call would block
    (None: nothing taken, as io.RawIOBase.write says)."""

    def __init__(self) -> None:
        self.sink, self.calls = bytearray(), 0

    def writable(self) -> bool:
        return True

    def write(self, b):
        self.calls += 1
        if self.calls % 3 == 0:
            return None
        n = min(len(b), 5)
        self.sink += bytes(b[:n])
        return n


def test_a_raw_write_that_would_block_raises_instead_of_losing_bytes():
    # Before, None counted as "took it all": the message went on with the bytes missing.
    w = model(np.random.default_rng(5))
    msg = stream(w, chunk_elems=64)
    f = WouldBlock()
    with pytest.raises(BlockingIOError, match="WouldBlock.write returned None") as e:
        fk.encode_stream(w, f, chunk_elems=64)
    assert e.value.characters_written == len(f.sink) == 10  # two short writes, then would block
    assert msg.startswith(bytes(f.sink))


class Claims:
    """A writer that takes everything and returns `answer`."""

    def __init__(self, answer) -> None:
        self.answer, self.sink = answer, bytearray()

    def write(self, b):
        self.sink += bytes(b)
        return self.answer(len(b)) if callable(self.answer) else self.answer


@pytest.mark.parametrize("answer, error", [
    (lambda n: n + 1, OSError), (0, OSError), (-1, OSError), ("all", TypeError), (True, TypeError), (1.0, TypeError),
])
def test_a_write_that_misreports_what_it_took_is_an_error(answer, error):
    with pytest.raises(error, match="Claims.write"):
        fk.encode_stream({"a": np.ones(10, np.float32)}, Claims(answer))
    f = Claims(lambda n: np.int64(n))  # any integer type is a count
    assert fk.encode_stream({"a": np.ones(10, np.float32)}, f) == len(f.sink)


def test_a_writer_that_returns_nothing_has_taken_it_all_unless_it_is_a_raw_file():
    """codecs.StreamWriter and tarfile's streams return None from write having taken everything;
    only an io.RawIOBase's None means "would block" (above)."""
    w = model(np.random.default_rng(7))
    f = Claims(None)
    assert fk.encode_stream(w, f, chunk_elems=64) == len(f.sink)
    assert bytes(f.sink) == stream(w, chunk_elems=64)


def test_through_a_pipe_that_cannot_seek():
    rng = np.random.default_rng(6)
    w = {"a": rng.standard_normal((300, 301)).astype(np.float32) * (rng.random((300, 301)) < 0.05)}
    r, wr = os.pipe()
    with open(r, "rb") as reader, open(wr, "wb") as writer:
        sender = threading.Thread(target=lambda: (fk.encode_stream(w, writer, chunk_elems=4096), writer.flush()))
        sender.start()
        got = fk.decode_stream(reader)
        sender.join()
    np.testing.assert_array_equal(got.tensors["a"], w["a"])


def test_out_expect_and_the_limit():
    rng = np.random.default_rng(7)
    w = {"a": rng.standard_normal((40, 50)).astype(np.float32), "b": rng.standard_normal(7)}
    msg = stream(w, chunk_elems=256)
    out = {"a": np.full((40, 50), 9, np.float32)}
    got = fk.decode_stream(io.BytesIO(msg), out=out)
    assert got.tensors["a"] is out["a"]
    np.testing.assert_array_equal(out["a"], w["a"])
    with pytest.raises(TypeError, match="dtype"):
        fk.decode_stream(io.BytesIO(msg), out={"a": np.empty((40, 50))})
    shared = np.empty(3000, np.float64)
    with pytest.raises(ValueError, match="share memory"):
        fk.decode_stream(io.BytesIO(msg), out={"a": shared[:2000].view(np.float32)[:2000], "b": shared[:7]})
    expect = {"a": ((40, 50), np.float32), "b": ((7,), np.float64)}
    assert set(fk.decode_stream(io.BytesIO(msg), expect=expect).tensors) == {"a", "b"}
    for wrong in ({"a": expect["a"]}, {**expect, "c": ((1,), np.float32)}, {**expect, "b": ((8,), np.float64)}):
        with pytest.raises(fk.CodecError, match="expected"):
            fk.decode_stream(io.BytesIO(msg), expect=wrong)
    with pytest.raises(fk.CodecError, match="max_bytes=8055; pass a larger max_bytes to decode_stream"):
        fk.decode_stream(io.BytesIO(msg), max_bytes=8055)
    assert fk.decode_stream(io.BytesIO(msg), max_bytes=8056).tensors["b"].size == 7


def test_one_and_two_threads_give_the_same_bytes_and_tensors():
    rng = np.random.default_rng(8)
    w = {"a": rng.standard_normal(100_000).astype(np.float32) * (rng.random(100_000) < 0.05),
         **{f"s{i}": rng.standard_normal(50).astype(np.float32) for i in range(5)}}
    try:
        fk.set_num_threads(1)
        one = stream(w, chunk_elems=4096)
        fk.set_num_threads(2)
        two = stream(w, chunk_elems=4096)
        got = fk.decode_stream(io.BytesIO(two))
    finally:
        fk.set_num_threads(0)
    assert one == two
    for name, a in w.items():
        np.testing.assert_array_equal(got.tensors[name], a)


# ----------------------------------------------------------------- untrusted input


def _messages() -> list[tuple[bytes, dict | None]]:
    rng = np.random.default_rng(9)
    w = model(rng)
    shared = {k: rng.random(np.shape(v)) < 0.3 for k, v in w.items()}
    subset = {k: m & (rng.random(m.shape) < 0.5) for k, m in shared.items()}
    out: list[tuple[bytes, dict | None]] = []
    for values in VALUES:
        out.append((stream(w, values=values, chunk_elems=16), None))
        out.append((stream(w, masks=subset, reference=shared, values=values, chunk_elems=16), shared))
    out += [(stream(w, positions=p, chunk_elems=16), None) for p in ("bitmask", "golomb")]
    return out


MESSAGES = _messages()


def _decode_both(msg: bytes, reference, limit: int = 1 << 24):
    """decode_model and decode_stream of the same bytes: both refuse or both return the same."""
    results = []
    for decode in (lambda: fk.decode_model(msg, reference=reference, max_bytes=limit),
                   lambda: fk.decode_stream(io.BytesIO(msg), reference=reference, max_bytes=limit, masks=True)):
        try:
            results.append(decode())
        except fk.CodecError:
            results.append(None)
    a, b = results
    assert (a is None) == (b is None)
    if a is not None:
        assert a.tensors.keys() == b.tensors.keys()
        for name in a.tensors:
            np.testing.assert_array_equal(a.tensors[name], b.tensors[name])
            np.testing.assert_array_equal(a.packed[name], b.packed[name])
    return a


@settings(suppress_health_check=[HealthCheck.too_slow], max_examples=300)
@given(st.sampled_from(MESSAGES), st.data())
def test_fuzz_mutations_raise_codec_error_only(case, data):
    msg, reference = case
    body = mutated_body(msg, data)
    for ref in (reference, None):
        _decode_both(_reseal(bytes(body)), ref)
        assert _decode_both(bytes(body) + msg[-4:], ref) is None or bytes(body) == msg[:-4]


@given(st.sampled_from(MESSAGES), st.data())
def test_fuzz_truncation(case, data):
    msg, reference = case
    cut = data.draw(st.integers(0, len(msg) - 1))
    with pytest.raises(fk.CodecError):
        fk.decode_stream(io.BytesIO(msg[:cut]), reference=reference)
    assert _decode_both(_reseal(msg[: max(0, cut - 4)]), reference) is None


def test_every_flipped_byte_is_refused():
    msg, reference = MESSAGES[1]
    for i in range(len(msg)):
        bad = bytearray(msg)
        bad[i] ^= 0x40
        with pytest.raises(fk.CodecError):
            fk.decode_stream(io.BytesIO(bytes(bad)), reference=reference)


_PAYLOAD = b"\x03\x00" + np.ones(2, np.float32).tobytes()  # the hand-built chunk's positions and values


def _one_chunk(**fields) -> bytes:
    """A resealed one-tensor stream ("w", 16 float32 elements, one chunk) with its record's and
    chunk's fields set as given; positions and values payloads follow as given."""
    rec = dict(dtype=1, values=0, reserved=0, chunk_elems=16)
    chunk = dict(domain=0, positions=1, signs=0, creserved=0, d=16, nnz=2, m=0, scale=0.0, pos_len=2)
    payload = fields.pop("payload", b"\x03\x00" + np.ones(2, np.float32).tobytes())
    for key, value in fields.items():
        (rec if key in rec else chunk)[key] = value
    body = (HEADER.pack(b"FDKW", 3, 0, 0, 1) + struct.pack("<H1sBQ", 1, b"w", 1, 16)
            + STREAM_RECORD.pack(*rec.values()) + STREAM_CHUNK.pack(*chunk.values()) + payload)
    return _reseal(body)


def test_the_hand_built_chunk_is_valid():
    got = _decode_both(_one_chunk(), None)
    np.testing.assert_array_equal(got.tensors["w"], [1, 1] + [0] * 14)


@pytest.mark.parametrize("fields, error", [
    (dict(dtype=3), "dtype"),
    (dict(values=9), "values codec"),
    (dict(reserved=1), "reserved"),
    (dict(chunk_elems=12), "chunks of 12"),
    (dict(chunk_elems=0), "chunks of 0"),
    (dict(chunk_elems=1 << 25), "chunks of"),
    (dict(domain=2), "unknown domain"),
    (dict(positions=7), "positions codec"),
    (dict(creserved=1), "reserved"),
    (dict(positions=2), "CSR"),
    (dict(d=15), "domain of 15"),
    (dict(domain=1, d=17), "domain of 17"),
    (dict(nnz=17), "17 values"),
    (dict(m=1), "Golomb parameter 1"),
    (dict(positions=3, m=0), "Golomb parameter 0"),
    (dict(scale=1.0), "scale"),
    (dict(pos_len=3), "3 bytes of positions, 2 expected"),
    (dict(positions=0, pos_len=2), "2 bytes of positions, 0 expected"),
    (dict(positions=3, m=1, pos_len=5), "at most"),
    (dict(positions=3, m=4, nnz=16, pos_len=1), "shorter than one bit"),
    (dict(nnz=3, payload=b"\x03\x00" + np.ones(3, np.float32).tobytes()), "different number of positions"),
    (dict(payload=b"\x03\x80" + np.ones(2, np.float32).tobytes()), "different number"),
    (dict(domain=1), "shared mask"),
    (dict(signs=2), "signs"),
    (dict(signs=1), "truncated"),  # no zero-sign block after the values
    # zero-sign blocks: codec, count, golomb_m, length, then the payload
    (dict(signs=1, payload=_PAYLOAD + SIGNS.pack(2, 1, 0, 0)), "unknown positions codec 2"),
    (dict(signs=1, payload=_PAYLOAD + SIGNS.pack(1, 15, 0, 2) + b"\xfc\xff"), "15 negative zeros for 14 zeros"),
    (dict(signs=1, payload=_PAYLOAD + SIGNS.pack(1, 0, 0, 2) + b"\x00\x00"), "0 negative zeros"),
    (dict(signs=1, payload=_PAYLOAD + SIGNS.pack(1, 1, 3, 2) + b"\x04\x00"), "Golomb parameter 3"),
    (dict(signs=1, payload=_PAYLOAD + SIGNS.pack(1, 1, 0, 3) + b"\x04\x00\x00"), "3 bytes of bitmask"),
    (dict(signs=1, payload=_PAYLOAD + SIGNS.pack(1, 1, 0, 2) + b"\x01\x00"), "positions that hold values"),
    (dict(signs=1, payload=_PAYLOAD + SIGNS.pack(1, 2, 0, 2) + b"\x04\x00"), "different number of positions"),
    (dict(signs=1, payload=_PAYLOAD + SIGNS.pack(3, 1, 1, 9) + bytes(9)), "9 bytes of Golomb positions for 1"),
])
def test_every_record_and_chunk_rule_is_enforced(fields, error):
    msg = _one_chunk(**fields)
    for decode in (lambda: fk.decode_model(msg), lambda: fk.decode_stream(io.BytesIO(msg))):
        with pytest.raises(fk.CodecError, match=error):
            decode()


def test_a_length_in_the_stream_allocates_only_what_arrives():
    # A chunk claiming a 100 MB bitmask is refused as truncated after the few bytes that came,
    # without a buffer of its claimed size.
    d = 1 << 24
    body = (HEADER.pack(b"FDKW", 3, 0, 0, 1) + struct.pack("<H1sBQ", 1, b"w", 1, d)
            + STREAM_RECORD.pack(1, 0, 0, d) + STREAM_CHUNK.pack(0, 1, 0, 0, d, 0, 0, 0.0, d // 8) + b"\0" * 1000)
    tracemalloc.start()
    try:
        with pytest.raises(fk.CodecError, match="truncated"):
            fk.decode_stream(io.BytesIO(body), max_bytes=4 * d)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * d + (4 << 20)  # the output tensor (which the limit allowed) and a small buffer


# ------------------------------------------------------------------ a model over 2 GiB


def test_a_message_over_2_gib_moves_through_in_bounded_memory(tmp_path):
    # tools/stream_probe.py: a 2.2 GiB float32 tensor on disk (memory-mapped) is encoded into a
    # 2.16 GiB message file and decoded into a memory-mapped output; the codecs' own (anonymous)
    # memory is sampled throughout. Needs three files of 2.2 GB.
    if not sys.platform.startswith("linux"):
        pytest.skip("the probe reads RssAnon from /proc (Linux)")
    free = shutil.disk_usage(tmp_path).free
    if free < 8 << 30:
        pytest.skip(f"needs 8 GiB of free disk for the probe's three files, {free >> 20} MiB free")
    report_path = tmp_path / "probe.json"
    subprocess.run([sys.executable, str(ROOT / "tools" / "stream_probe.py"), "--gib", "2.2", "--dir",
                    str(tmp_path / "files"), "--out", str(report_path)], check=True, capture_output=True,
                   timeout=600)
    report = json.loads(report_path.read_text())
    assert report["identical"] and report["trailing_bytes"] == 0
    assert report["message_bytes"] > 2 << 30
    assert "max_bytes" in report["default_limit_error"]
    for stage in ("encode", "decode"):  # a few chunks a thread, not the model
        assert report[stage]["peak_anon_bytes"] < 256 << 20, report


def test_a_chunk_with_a_zero_sign_block_decodes_its_negative_zeros():
    msg = _one_chunk(signs=1, payload=_PAYLOAD + SIGNS.pack(1, 1, 0, 2) + b"\x04\x00")
    got = _decode_both(msg, None)
    want = np.array([1, 1, -0.0] + [0] * 13, np.float32)
    assert got.tensors["w"].tobytes() == want.tobytes()


def test_a_model_pruned_by_w_times_mask_comes_back_with_its_negative_zeros():
    """The audit's case for streams: every -0.0 of a model pruned as w * mask came back +0.0."""
    rng = np.random.default_rng(5)
    model = {f"conv{i}": rng.standard_normal(s).astype(np.float32) * (rng.random(s) < 0.05)
             for i, s in enumerate([(16, 3, 5, 5), (32, 16, 3, 3), (10, 512)])}
    assert any(np.signbit(v[v == 0]).any() for v in model.values())
    for be in fk.available_backends():
        msg = stream(model, chunk_elems=1024, backend=be)
        for out in (fk.decode_stream(io.BytesIO(msg), backend=be), fk.decode_model(msg, backend=be)):
            for name, a in model.items():
                assert out.tensors[name].tobytes() == a.tobytes(), (be, name)


@settings(suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(bit_patterns(), st.sampled_from(["auto", "bitmask", "golomb"]), st.sampled_from([8, 64, 1024, 1 << 20]),
       st.sampled_from(["values", "reference", "mask+signs"]), st.booleans())
def test_lossless_stream_settings_give_back_the_same_bytes(a, positions, chunk, mode, into):
    """Raw values without a mask (and with one, signed_zeros=True, when its outside holds only
    zeros) give back the same bits: -0.0, NaN payloads, infinities, subnormals; every backend
    writes the same bytes."""
    flat = a.reshape(-1)
    kw = dict(positions=positions, chunk_elems=chunk)
    if mode == "reference":
        kw["reference"] = {"w": (flat != 0).reshape(a.shape) | (np.arange(flat.size) % 3 == 0).reshape(a.shape)}
    if mode == "mask+signs":
        kw["masks"] = {"w": a != 0}  # NaN included; the -0.0 outside it are sent with signed_zeros=True
        kw["signed_zeros"] = True
    msgs = {be: stream({"w": a}, backend=be, **kw) for be in fk.available_backends()}
    assert len(set(msgs.values())) == 1
    msg = next(iter(msgs.values()))
    dec = {k: v for k, v in kw.items() if k == "reference"}
    for be in fk.available_backends():
        out = {"w": np.full(a.shape, 7, a.dtype)} if into else None
        for got in (
            fk.decode_stream(io.BytesIO(msg), out=out, backend=be, **dec),
            fk.decode_model(msg, backend=be, **dec),
        ):
            assert got.tensors["w"].dtype == a.dtype and got.tensors["w"].tobytes() == a.tobytes(), (be, mode)


def test_a_stream_without_negative_zeros_keeps_its_bytes():
    """Chunks without -0.0 are written as before the zero-sign block existed (signs byte 0)."""
    rng = np.random.default_rng(1)
    x = {"w": np.where(rng.random(5000) < 0.1, rng.standard_normal(5000), 0.0).astype(np.float32)}
    assert stream(x, chunk_elems=512) == stream(x, chunk_elems=512, signed_zeros=False)
    with pytest.raises(TypeError, match="signed_zeros"):
        stream(x, signed_zeros=1)
