"""The message's checksum, CRC-32C (docs/wire-format.md, `crc`): the check value, the native CRC's
lanes and pieces a thread, and the join that copies and checksums a message's pieces."""

import numpy as np
import pytest

import feddip_kernels as fk
from feddip_kernels import _backend, codecs, reference


def test_crc32c_check_value(backend):
    assert codecs.crc32c(b"123456789", backend=backend) == 0xE3069283
    assert codecs.crc32c(b"56789", codecs.crc32c(b"1234", backend=backend), backend=backend) == 0xE3069283
    assert codecs.crc32c(b"", backend=backend) == 0


@pytest.mark.parametrize("n", [8 * 4096 * 3 - 1, 4096 * 3, 4096 * 3 + 13, 100_003])
def test_crc32c_lanes_match_the_reference(backend, n):
    # The native CRC runs three 4 KiB lanes side by side from 12 KiB and joins their registers.
    data = np.random.default_rng(n).integers(0, 256, n, dtype=np.uint8).tobytes()
    want = reference.crc32c(data)
    assert codecs.crc32c(data, backend=backend) == want
    assert codecs.crc32c(data[n // 3:], codecs.crc32c(data[: n // 3], backend=backend), backend=backend) == want


def test_crc32c_in_pieces_a_thread_is_exact():
    # From 256 KiB the native CRC takes a piece a thread and joins them: every thread count and
    # every starting register give the one-thread result.
    native = pytest.importorskip("feddip_kernels._core")
    rng = np.random.default_rng(3)
    try:
        for n in ((1 << 18) - 1, 1 << 18, (1 << 18) + 7, 3_000_017):
            data = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
            results = set()
            for threads in (1, 2, 3, 5):
                fk.set_num_threads(threads)
                results.add((native.crc32c(data), native.crc32c(data, 0x12345678)))
            assert len(results) == 1, n
            fk.set_num_threads(1)
            assert results.pop()[0] == native.crc32c(data[n // 2:], native.crc32c(data[: n // 2]))
    finally:
        fk.set_num_threads(0)


@pytest.mark.parametrize("sizes", [[], [0], [5, 0, 9], [1 << 18, 3, (1 << 18) + 5], [3_000_001, 77, 1_000_003]])
def test_join_crc32c_matches_the_reference(backend, sizes):
    # The native join copies pieces of 256 KiB on every thread and checksums each copy; the
    # registers are joined in order. Every thread count gives the one message.
    rng = np.random.default_rng(len(sizes))
    parts = [rng.integers(0, 256, s, dtype=np.uint8) for s in sizes]
    body = b"".join(p.tobytes() for p in parts)
    want = body + reference.crc32c(body).to_bytes(4, "little") if sum(sizes) < 100_000 else None
    k = _backend.kernels(backend)
    try:
        got = set()
        for threads in (1, 2, 3):
            fk.set_num_threads(threads)
            got.add(k.join_crc32c([*parts[:1], *(p.tobytes() for p in parts[1:])]))
    finally:
        fk.set_num_threads(0)
    assert len(got) == 1
    msg = got.pop()
    assert msg[:-4] == body and int.from_bytes(msg[-4:], "little") == k.crc32c(body)
    if want is not None:
        assert msg == want
