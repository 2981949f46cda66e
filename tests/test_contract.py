"""Every backend module meets the kernel contract (_contract.Kernels): the same functions, the same
parameter names and kinds (keyword-only where the contract says so), the same return types and
the same error messages for the same bad data."""

import inspect
import re

import numpy as np
import pytest

from feddip_kernels import _backend
from feddip_kernels._contract import NAMES, Kernels

BACKENDS = _backend.available_backends()


def contract_params(name):
    sig = inspect.signature(getattr(Kernels, name))
    return [(p.name, p.kind) for p in list(sig.parameters.values())[1:]]  # without self


def backend_params(fn):
    fn = getattr(fn, "py_func", fn)  # a numba dispatcher's Python function
    try:
        return [(p.name, p.kind) for p in inspect.signature(fn).parameters.values()]
    except ValueError:  # a pybind11 function: its signature is the docstring's first line
        head = fn.__doc__.splitlines()[0]
        inner = head[head.index("(") + 1 : head.rindex(") ->")]
        params, kind = [], inspect.Parameter.POSITIONAL_OR_KEYWORD
        for part in re.split(r",\s*(?![^\[]*\])", inner):
            part = part.strip()
            if part == "*":
                kind = inspect.Parameter.KEYWORD_ONLY
            elif part:
                params.append((part.split(":")[0].strip(), kind))
        return params


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", NAMES)
def test_signature_meets_the_contract(backend, name):
    module = _backend.kernels(backend)
    assert hasattr(module, name), f"{backend} lacks {name}"
    got, want = backend_params(getattr(module, name)), contract_params(name)
    # The native core may add keyword-only tuning knobs (n_threads) after the contract's parameters.
    extra = got[len(want):]
    assert got[: len(want)] == want, f"{backend}.{name}: {got} != {want}"
    assert all(kind == inspect.Parameter.KEYWORD_ONLY and pname == "n_threads" for pname, kind in extra), extra


def test_the_contract_lists_every_kernel_the_public_layer_calls():
    assert set(NAMES) == {
        "magnitude_threshold", "topk_masks", "max_magnitude", "masked_norm", "masked_ef_step", "masked_ef_step_many",
        "pack_bits", "unpack_bits", "count_bits", "select_bits", "deposit_bits", "sparsify", "densify", "golomb_parameter", "golomb_encode", "golomb_decode",
        "golomb_encode_many", "golomb_decode_many", "crc32c", "join_crc32c",
    }


def calls():
    rng = np.random.default_rng(0)
    w = rng.standard_normal(37).astype(np.float32)
    mask = rng.random(37) < 0.3
    bits = np.packbits(mask, bitorder="little")
    return {
        "magnitude_threshold": lambda k: k.magnitude_threshold([w, w[:5].copy()], 4),
        "topk_masks": lambda k: k.topk_masks([w], [np.zeros(37, bool)], 4),
        "max_magnitude": lambda k: k.max_magnitude([w, w[:5].copy()]),
        "masked_norm": lambda k: k.masked_norm(w, bits, p=2, mask_packed=True),
        "masked_ef_step": lambda k: k.masked_ef_step(
            w.copy(), w, mask, momentum_buffer=None, pruned_out=None, lr=0.1, weight_decay=0.0, lam=0.01,
            momentum=0.0, p=2, norm=None),
        "masked_ef_step_many": lambda k: k.masked_ef_step_many(
            [w.copy(), w[:9].copy()], [w, w[:9].copy()], [mask, None], momentum_buffers=[None, np.zeros(9, np.float32)],
            pruned_outs=[np.zeros(37, np.float32), None], lr=0.1, weight_decay=0.0, lam=0.01, momentum=0.5, p=2,
            norms=[None, 1.0]),
        "pack_bits": lambda k: k.pack_bits(mask),
        "unpack_bits": lambda k: k.unpack_bits(bits, 37),
        "count_bits": lambda k: k.count_bits(bits, 37),
        # The plain call (two items) and with negative_zeros (a third: None, or packed positions),
        # with and without a mask.
        "sparsify": lambda k: (k.sparsify(w, mask), k.sparsify(w, None, negative_zeros=True),
                               k.sparsify(-np.zeros(9, np.float32), None, negative_zeros=True),
                               k.sparsify(-w, mask, negative_zeros=True)),
        "select_bits": lambda k: k.select_bits(np.packbits(mask & (w > 0), bitorder="little"), bits, 37),
        "deposit_bits": lambda k: k.deposit_bits(np.array([0b1011, 0x5], np.uint8), bits, 37),
        "densify": lambda k: k.densify(bits, 37, w[: int(mask.sum())].copy()),
        "golomb_parameter": lambda k: k.golomb_parameter(5, 37),
        "golomb_encode": lambda k: k.golomb_encode(bits, 37, 3),
        "golomb_decode": lambda k: k.golomb_decode(bytes(k.golomb_encode(bits, 37, 3)), 37, int(mask.sum()), 3),
        "golomb_encode_many": lambda k: k.golomb_encode_many([(bits, 37, 3)]),
        "golomb_decode_many": lambda k: k.golomb_decode_many([(b"\x01", 8, 1, 1)]),
        "crc32c": lambda k: k.crc32c(b"123456789"),
        "join_crc32c": lambda k: k.join_crc32c([b"1234", np.frombuffer(b"56789", np.uint8)]),
    }


def shape_of(x):
    """The type structure of a result, for comparing backends (ints and bools as int)."""
    if isinstance(x, (list, tuple)):
        return (type(x).__name__, tuple(shape_of(v) for v in x))
    if isinstance(x, np.ndarray):
        return ("ndarray", x.dtype.str, x.shape)
    if isinstance(x, (bytes, bytearray)):
        return "bytes"
    if isinstance(x, (bool, int, np.integer)):
        return "int"
    return type(x).__name__


@pytest.mark.parametrize("name", NAMES)
def test_return_types_are_the_same_in_every_backend(name):
    call = calls()[name]
    results = {be: call(_backend.kernels(be)) for be in BACKENDS}
    shapes = {be: shape_of(r) for be, r in results.items()}
    assert len(set(map(repr, shapes.values()))) == 1, shapes
    if name in ("magnitude_threshold", "max_magnitude", "masked_norm", "masked_ef_step"):
        assert all(type(r) is float for r in results.values())
    if name == "topk_masks":
        assert all(r is None for r in results.values())
    if name == "sparsify":  # the plain call's result is what it was before the flag
        assert [len(r) for r in results["numpy"]] == [2, 3, 3, 3]
        assert [r[2] is None for r in results["numpy"][1:]] == [True, False, True]


CORRUPT_GOLOMB = [
    (b"", 8, 1, 1),  # truncated
    (b"\x00\x00", 8, 1, 1),  # quotient past the end
    (b"\x03", 8, 1, 1),  # bits left after the last code
    (b"\x01\x00", 8, 1, 1),  # a byte left after the last code
    (b"\x01", 4, 5, 1),  # more positions than elements
    (b"\x01", 8, 1, 0),  # parameter 0
]


@pytest.mark.parametrize("stream", CORRUPT_GOLOMB)
def test_corrupt_golomb_streams_give_the_same_error_in_every_backend(stream):
    messages = {}
    for be in BACKENDS:
        with pytest.raises(ValueError) as e:
            _backend.kernels(be).golomb_decode(*stream)
        messages[be] = str(e.value)
    assert len(set(messages.values())) == 1, messages


def test_auto_is_one_of_the_backends():
    assert _backend.kernels("auto") is _backend.kernels(BACKENDS[0])
    with pytest.raises(ValueError, match="backend must be one of"):
        _backend.kernels("cuda")


def test_the_native_stub_lists_exactly_the_native_functions():
    import ast
    import pathlib

    native = pytest.importorskip("feddip_kernels._core")
    stub = pathlib.Path(_backend.__file__).with_name("_core.pyi")
    tree = ast.parse(stub.read_text())
    stubbed = {n.name: [a.arg for a in n.args.args + n.args.kwonlyargs] for n in tree.body if isinstance(n, ast.FunctionDef)}
    functions = {k for k in dir(native) if callable(getattr(native, k)) and not k.startswith("__")}
    assert set(stubbed) == functions
    for name, args in stubbed.items():
        assert [p for p, _ in backend_params(getattr(native, name))] == args, name


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 63, 64, 65, 127, 128, 129, 1000])
def test_select_and_deposit_bits_match_the_reference(backend, n):
    from feddip_kernels import reference

    k = _backend.kernels(backend)
    rng = np.random.default_rng(n)
    for density in (0.0, 0.3, 1.0):
        ref = rng.random(n) < density
        sub = ref & (rng.random(n) < 0.5)
        b, r = np.packbits(sub, bitorder="little"), np.packbits(ref, bitorder="little")
        picked = k.select_bits(b, r, n)
        assert picked.tobytes() == reference.select_bits(b, r, n).tobytes()
        assert picked.tobytes() == np.packbits(sub[ref], bitorder="little").tobytes()
        assert k.deposit_bits(picked, r, n).tobytes() == b.tobytes()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n", [63, 64, 65, 127, 128, 1000, (1 << 16) * 64 + 3, 300_007])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sparsify_and_densify_match_the_reference(backend, n, dtype):
    # Sizes either side of a 64-element word and of a parallel block (2^16 words), densities from
    # none to all, into fresh arrays and into an output at an odd offset (the native float32 path
    # streams aligned lines and falls back for the rest).
    from feddip_kernels import reference

    k = _backend.kernels(backend)
    rng = np.random.default_rng(n)
    for density in (0.0, 0.05, 0.5, 1.0):
        x = np.where(rng.random(n) < density, rng.standard_normal(n), 0.0).astype(dtype)
        bits, vals = k.sparsify(x, None)
        ref_bits, ref_vals = reference.sparsify(x, None)
        assert bits.tobytes() == ref_bits.tobytes() and vals.tobytes() == ref_vals.tobytes()
        vals = vals.copy()  # the values end where their array ends: nothing past it may be read
        assert k.densify(bits, n, vals).tobytes() == x.tobytes()
        store = np.full(n + 1, np.nan, dtype)
        out = store[1:]  # 4 or 8 bytes off the allocation's alignment
        k.densify(bits, n, vals, out)
        assert out.tobytes() == x.tobytes()


def _step_many_variants():
    """Calls of masked_ef_step_many that differ in what they hand the kernel: dtypes mixed across
    layers (the native binding once refused them), masks bool or packed, layers empty or absent."""
    rng = np.random.default_rng(3)

    def layer(n, dtype, masked, packed, momentum):
        w = rng.standard_normal(n).astype(dtype)
        m = rng.random(n) < 0.4
        mask = (np.packbits(m, bitorder="little") if packed else m) if masked else None
        return w, rng.standard_normal(n).astype(dtype), mask, np.zeros(n, dtype) if momentum else None, np.zeros(n, dtype)

    for dtypes in ([np.float32, np.float64], [np.float64, np.float32, np.float64], [np.float64], []):
        for packed in (False, True):
            for sizes in ([37, 0, 1000], [1, 129, 5]):
                yield dtypes, packed, [layer(n, dt, i % 2 == 0, packed, True) for i, (n, dt) in enumerate(zip(sizes, dtypes))]


@pytest.mark.parametrize("variant", range(16))
def test_what_one_backend_accepts_every_backend_accepts_alike(variant):
    dtypes, packed, layers = list(_step_many_variants())[variant]
    results = {}
    for be in BACKENDS:
        copies = [[None if a is None else a.copy() for a in L] for L in layers]
        try:
            norms = _backend.kernels(be).masked_ef_step_many(
                [c[0] for c in copies], [c[1] for c in copies], [c[2] for c in copies],
                momentum_buffers=[c[3] for c in copies], pruned_outs=[c[4] for c in copies], lr=0.1,
                weight_decay=1e-3, lam=0.01, momentum=0.9, p=2, norms=[None] * len(copies), mask_packed=packed)
            results[be] = ("ok", norms, copies)
        except (ValueError, TypeError) as e:
            results[be] = (type(e).__name__, str(e))
    kinds = {be: r[0] for be, r in results.items()}
    assert set(kinds.values()) == {"ok"}, (dtypes, kinds, results)
    ref = results["numpy"]
    for be, (_, norms, copies) in results.items():
        np.testing.assert_allclose(norms, ref[1], rtol=1e-5)
        for got, want in zip(copies, ref[2]):
            for a, b in zip(got, want):
                if a is not None:
                    assert a.dtype == b.dtype
                    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
