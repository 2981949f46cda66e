"""Version 2: a large tensor's Golomb positions in chunks (docs/wire-format.md, "Version 2 adds
chunks"); version 3, the streams, is tests/test_stream.py."""

import struct

import numpy as np
import pytest
from codec_helpers import _reseal, sparse_arrays
from hypothesis import given, strategies as st

import feddip_kernels as fk
from feddip_kernels import codecs


@pytest.fixture
def small_chunks(monkeypatch):
    """Runs of 64 elements, so that small tensors take the chunked (version 2) layout."""
    monkeypatch.setattr(codecs.model, "CHUNK_ELEMS", 64)
    return 64


@given(sparse_arrays(), st.sampled_from(["auto", "golomb", "bitmask"]))
def test_chunked_messages_round_trip_in_every_backend(a, positions):
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(codecs.model, "CHUNK_ELEMS", 8)  # hypothesis' arrays (up to 729 elements) span runs
        msgs = {be: fk.encode_model({"w": a, "b": np.ones(5, np.float32)}, positions=positions, backend=be)
                for be in fk.available_backends()}
        assert len(set(msgs.values())) == 1  # the same bytes from every backend
        msg = next(iter(msgs.values()))
        assert msg[4] == (2 if positions == "golomb" and a.size > 8 else 1 if positions == "bitmask" else msg[4])
        for be in fk.available_backends():
            out = fk.decode_model(msg, backend=be)
            np.testing.assert_array_equal(out.tensors["w"], a)
            np.testing.assert_array_equal(out.masks["w"], a != 0)


def test_version_follows_chunking_and_version_1_still_decodes(small_chunks):
    rng = np.random.default_rng(3)
    w = np.where(rng.random(1000) < 0.05, rng.standard_normal(1000), 0).astype(np.float32)
    v2 = fk.encode_model({"w": w}, positions="golomb")
    assert v2[4] == 2
    assert fk.encode_model({"w": w[:64]}, positions="golomb")[4] == 1  # one run: version 1
    assert fk.encode_model({"w": w}, positions="bitmask")[4] == 1
    codecs.model.CHUNK_ELEMS = 1 << 22
    v1 = fk.encode_model({"w": w}, positions="golomb")
    assert v1[4] == 1
    for msg in (v1, v2):
        np.testing.assert_array_equal(fk.decode_model(msg).tensors["w"], w)


def test_a_large_tensor_in_runs_costs_under_half_a_percent_more():
    rng = np.random.default_rng(5)
    n = 3 * (1 << 22) + 12345
    w = np.zeros(n, np.float32)
    idx = rng.choice(n, n // 20, replace=False)
    w[idx] = rng.standard_normal(idx.size).astype(np.float32)
    v2 = fk.encode_model({"w": w})
    assert v2[4] == 2
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(codecs.model, "CHUNK_ELEMS", 1 << 30)
        v1 = fk.encode_model({"w": w})
    assert v1[4] == 1 and len(v2) <= 1.005 * len(v1)
    np.testing.assert_array_equal(fk.decode_model(v2).tensors["w"], w)
    out = np.full(n, 7.0, np.float32)
    fk.decode_model(v2, out={"w": out})
    np.testing.assert_array_equal(out, w)


def _chunk_table_at(msg: bytes) -> int:
    """Offset of the first record's chunk table in a one-tensor message named "w" of ndim 1."""
    return codecs.format.HEADER.size + 2 + 1 + 1 + 8 + codecs.format.RECORD.size + 4


@pytest.mark.parametrize("field, value, match", [
    (0, 63, "chunk 0 has size"),  # not a multiple of 8
    (0, 0, "chunk 0 has size"),
    (1, 65, "chunk 0 has size"),  # more positions than elements
    (2, 0, "parameter 0"),
    (0, 72, "add up"),
    (3, 10**9, "add up"),
])
def test_inconsistent_chunk_tables_are_refused(small_chunks, field, value, match):
    rng = np.random.default_rng(1)
    w = np.where(rng.random(300) < 0.1, 1.0, 0.0).astype(np.float32)
    msg = bytearray(fk.encode_model({"w": w}, positions="golomb")[:-4])
    at = _chunk_table_at(msg)
    assert struct.unpack_from("<I", msg, at - 4)[0] == 5  # 300 elements in runs of 64
    entry = list(codecs.format.CHUNK.unpack_from(msg, at))
    entry[field] = value
    codecs.format.CHUNK.pack_into(msg, at, *entry)
    with pytest.raises(fk.CodecError, match=match):
        fk.decode_model(_reseal(bytes(msg)))


def test_chunks_are_only_for_golomb_in_the_own_index_space(small_chunks):
    rng = np.random.default_rng(2)
    w = np.where(rng.random(300) < 0.1, 1.0, 0.0).astype(np.float32)
    msg = bytearray(fk.encode_model({"w": w}, positions="golomb")[:-4])
    rec_at = codecs.format.HEADER.size + 2 + 1 + 1 + 8
    fields = list(codecs.format.RECORD.unpack_from(msg, rec_at))
    for i, v in ((2, codecs.POSITIONS["bitmask"]), (8, 3)):  # positions codec; the record's Golomb parameter
        bad = bytearray(msg)
        f = list(fields)
        f[i] = v
        codecs.format.RECORD.pack_into(bad, rec_at, *f)
        with pytest.raises(fk.CodecError, match="chunks are for Golomb"):
            fk.decode_model(_reseal(bytes(bad)))
    # A version 1 reader's view: the same bytes labelled version 1 do not parse.
    bad = bytearray(msg)
    bad[4] = 1
    with pytest.raises(fk.CodecError):
        fk.decode_model(_reseal(bytes(bad)))
