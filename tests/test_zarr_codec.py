import numpy as np
import pytest

zarr = pytest.importorskip("zarr", minversion="3")
from zarr.registry import get_codec_class  # noqa: E402
from zarr.storage import MemoryStore  # noqa: E402

from feddip_kernels.codecs import CodecError  # noqa: E402
from feddip_kernels.integrations.zarr3 import NAME, SparseZarrCodec  # noqa: E402


def sparse(shape, density, dtype, seed=0):
    rng = np.random.default_rng(seed)
    a = np.where(rng.random(shape) < density, rng.standard_normal(shape), 0.0).astype(dtype)
    a.reshape(-1)[:4] = [-0.0, np.nan, np.inf, -np.inf]
    return a


def chunk_keys(store):
    keys = [k for k in store._store_dict if k.split("/")[0] == "c"]
    assert keys
    return keys


def make(store, a, config, chunks=(64, 48)):
    return zarr.create_array(store=store, shape=a.shape, chunks=chunks, dtype=a.dtype, fill_value=0,
                             serializer={"name": NAME, "configuration": config}, compressors=None)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("positions", ["auto", "golomb", "bitmask", "csr"])
def test_chunked_sparse_array_round_trips_bit_for_bit(dtype, positions):
    a = sparse((150, 100), 0.05, dtype)  # edge chunks are partial
    store = MemoryStore()
    z = make(store, a, {"positions": positions, "values": "raw"})
    z[:] = a
    back = zarr.open_array(store)
    assert back.metadata.codecs == (SparseZarrCodec(positions=positions, values="raw"),)
    got = back[:]
    assert got.dtype == a.dtype and got.tobytes() == a.tobytes()
    assert back[10:70, 90:].tobytes() == np.ascontiguousarray(a[10:70, 90:]).tobytes()
    stored = sum(len(store._store_dict[k].to_bytes()) for k in chunk_keys(store))
    assert stored < 0.2 * a.nbytes  # the kept values and their positions, not dense chunks


def test_configuration_is_documented_json_and_round_trips():
    codec = SparseZarrCodec(positions="golomb", values="fp16")
    assert codec.to_dict() == {"name": "feddip_sparse", "configuration": {"positions": "golomb", "values": "fp16"}}
    assert SparseZarrCodec.from_dict(codec.to_dict()) == codec
    assert SparseZarrCodec.from_dict({"name": "feddip_sparse"}) == SparseZarrCodec()
    assert get_codec_class(NAME) is SparseZarrCodec  # through the entry point
    with pytest.raises(ValueError, match="positions"):
        SparseZarrCodec(positions="zip")
    with pytest.raises(ValueError, match="unknown"):
        SparseZarrCodec.from_dict({"name": NAME, "configuration": {"level": 3}})


def test_lossy_values_and_a_following_compressor():
    a = sparse((80, 80), 0.1, np.float32)[1:, 1:]
    a[~np.isfinite(a)] = 1.0
    store = MemoryStore()
    z = zarr.create_array(store=store, shape=a.shape, chunks=(40, 40), dtype=a.dtype, fill_value=0,
                          serializer=SparseZarrCodec(values="fp16"), compressors=[zarr.codecs.ZstdCodec()])
    z[:] = a
    np.testing.assert_allclose(zarr.open_array(store)[:], a, rtol=1e-3, atol=1e-4)


def test_non_float_arrays_are_refused():
    with pytest.raises(ValueError, match="float32 and float64"):
        zarr.create_array(store=MemoryStore(), shape=(4,), dtype="int32", serializer=SparseZarrCodec())


def test_a_corrupt_chunk_is_an_error():
    a = sparse((64, 48), 0.1, np.float32)
    store = MemoryStore()
    make(store, a, {})[:] = a
    key = chunk_keys(store)[0]
    raw = bytearray(store._store_dict[key].to_bytes())
    raw[len(raw) // 2] ^= 1
    store._store_dict[key] = type(store._store_dict[key]).from_bytes(bytes(raw))
    with pytest.raises(CodecError, match="checksum"):
        zarr.open_array(store)[:]
