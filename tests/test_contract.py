"""Every backend module meets the kernel contract (_contract.Kernels): the same functions, the same
parameter names and kinds (keyword-only where the contract says so), the same return types and
the same error messages for the same bad data; and the device kernels (_torch_kernels) meet its
device part (_contract.DeviceKernels) and accept and refuse what the host kernels do."""

import inspect

import numpy as np
import pytest

import feddip_kernels as fk
from feddip_kernels import _backend, reference
from feddip_kernels._contract import DEVICE_NAMES, NAMES, SHARED_NAMES, DeviceKernels, Kernels
from feddip_kernels.codecs.entropy import plan

BACKENDS = _backend.available_backends()


def contract_params(name):
    sig = inspect.signature(getattr(Kernels, name))
    return [(p.name, p.kind) for p in list(sig.parameters.values())[1:]]  # without self


def _top_level(text):
    """The comma-separated parts of a parameter list, commas inside brackets (nested types) kept."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += (ch == "[") - (ch == "]")
        if ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    return [*parts, text[start:]]


def backend_params(fn):
    fn = getattr(fn, "py_func", fn)  # a numba dispatcher's Python function
    try:
        return [(p.name, p.kind) for p in inspect.signature(fn).parameters.values()]
    except ValueError:  # a pybind11 function: its signature is the docstring's first line
        head = fn.__doc__.splitlines()[0]
        inner = head[head.index("(") + 1 : head.rindex(") ->")]
        params, kind = [], inspect.Parameter.POSITIONAL_OR_KEYWORD
        for part in _top_level(inner):
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
        "pack_bits", "unpack_bits", "count_bits", "select_bits", "deposit_bits", "sparsify", "densify",
        "golomb_parameter", "golomb_encode", "golomb_decode", "golomb_encode_many", "golomb_decode_many",
        "ans_histogram", "ans_encode", "ans_decode", "ans_encode_many", "ans_decode_many",
        "crc32c", "join_crc32c",
    }


def calls():
    rng = np.random.default_rng(0)
    w = rng.standard_normal(37).astype(np.float32)
    mask = rng.random(37) < 0.3
    bits = np.packbits(mask, bitorder="little")
    words = w.view(np.uint32)
    model = plan(reference, words, 32)
    coded = reference.ans_encode(words, **model._asdict())
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
        "ans_histogram": lambda k: k.ans_histogram(words, word_bits=32, max_symbols=16),
        "ans_encode": lambda k: k.ans_encode(words, **model._asdict()),
        "ans_decode": lambda k: k.ans_decode(*coded, 37, **model._asdict()),
        "ans_encode_many": lambda k: k.ans_encode_many([(words, model)]),
        "ans_decode_many": lambda k: k.ans_decode_many([(*coded, 37, model)]),
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
    stubbed = {
        n.name: [a.arg for a in n.args.args + n.args.kwonlyargs] for n in tree.body if isinstance(n, ast.FunctionDef)
    }
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
        return (
            w,
            rng.standard_normal(n).astype(dtype),
            mask,
            np.zeros(n, dtype) if momentum else None,
            np.zeros(n, dtype),
        )

    for dtypes in ([np.float32, np.float64], [np.float64, np.float32, np.float64], [np.float64], []):
        for packed in (False, True):
            for sizes in ([37, 0, 1000], [1, 129, 5]):
                yield (
                    dtypes,
                    packed,
                    [layer(n, dt, i % 2 == 0, packed, True) for i, (n, dt) in enumerate(zip(sizes, dtypes))],
                )


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
    for _be, (_, norms, copies) in results.items():
        np.testing.assert_allclose(norms, ref[1], rtol=1e-5)
        for got, want in zip(copies, ref[2]):
            for a, b in zip(got, want):
                if a is not None:
                    assert a.dtype == b.dtype
                    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


# --- The device part of the contract (_contract.DeviceKernels, met by _torch_kernels) -----------------
# Run on CPU tensors: `on_device` is patched so that torch tensors count as device tensors, and the
# public functions hand them to the device kernels (as tests/test_torch_kernels.py routes them).


def _device_kernels():
    pytest.importorskip("torch")
    return _backend.device_kernels()


def _params_of(fn):
    sig = inspect.signature(fn)
    return [(p.name, p.kind) for p in sig.parameters.values() if p.name != "self"]


@pytest.mark.parametrize("name", DEVICE_NAMES)
def test_the_device_kernels_meet_their_contract(name):
    dk = _device_kernels()
    assert hasattr(dk, name), f"the device kernels lack {name}"
    assert _params_of(getattr(dk, name)) == _params_of(getattr(DeviceKernels, name)), name


@pytest.mark.parametrize("name", [n for n in SHARED_NAMES if n != "topk_masks"])  # device masks are new tensors
def test_kernels_on_both_sides_have_one_signature(name):
    assert _params_of(getattr(DeviceKernels, name)) == contract_params(name)


@pytest.fixture
def routed(monkeypatch):
    torch = pytest.importorskip("torch")
    monkeypatch.setattr(_backend, "on_device", lambda *xs: any(isinstance(x, torch.Tensor) for x in xs))
    return torch


def test_kernels_for_is_the_one_decision(routed):
    torch = routed
    dk = _backend.device_kernels()
    assert _backend.kernels_for(np.zeros(3), None, backend="numpy") is _backend.kernels("numpy")
    assert _backend.kernels_for(np.zeros(3), torch.zeros(3), backend="numpy") is dk
    assert _backend.is_device(dk) and not any(_backend.is_device(_backend.kernels(be)) for be in BACKENDS)
    with pytest.raises(ValueError, match="backend must be one of"):  # named wrong for device tensors too
        _backend.kernels_for(torch.zeros(3), backend="cuda")


def _outcome(call):
    """("ok", result) or (error type, message)."""
    try:
        return "ok", call()
    except (ValueError, TypeError) as e:
        return type(e).__name__, str(e)


def _same(host, device, what):
    """The device outcome is the host's: the same error, or results equal to float tolerance."""
    (hk, hv), (dk, dv) = host, device
    assert hk == dk, (what, host, device)
    if hk != "ok":
        assert hv == dv, what
        return
    if isinstance(hv, list) and hv and not isinstance(hv[0], float):  # masks
        assert all(np.array_equal(np.asarray(a), d.numpy()) for a, d in zip(hv, dv)), what
    else:
        assert dv == pytest.approx(hv, rel=1e-6), what


def _step_cases():
    """Calls of masked_ef_step and masked_ef_step_many on arrays made by `t` (host: a NumPy array
    as it is; device: a torch tensor sharing its memory), valid and not."""
    rng = np.random.default_rng(5)
    w0 = rng.standard_normal(100).astype(np.float32)
    g0 = rng.standard_normal(100).astype(np.float32)
    m0 = rng.random(100) < 0.3

    def w(dtype=np.float32):
        return w0.astype(dtype)

    kw = dict(lr=0.1, weight_decay=1e-3, lam=0.01)
    store = np.zeros(300, np.float32)
    return {
        "valid": lambda t: fk.masked_ef_step(t(w()), t(g0), t(m0), momentum=0.9, norm=2.5,
                                             momentum_buffer=t(np.zeros(100, np.float32)),
                                             pruned_out=t(np.zeros(100, np.float32)), **kw),
        "valid, p = 1, no mask": lambda t: fk.masked_ef_step(t(w(np.float64)), t(g0.astype(np.float64)), p=1, **kw),
        "a strided gradient": lambda t: fk.masked_ef_step(t(w()), t(np.repeat(g0, 2)[::2]), t(m0), **kw),
        "float16 w": lambda t: fk.masked_ef_step(t(w(np.float16)), t(g0.astype(np.float16)), **kw),
        "g of another size": lambda t: fk.masked_ef_step(t(w()), t(g0[:99].copy()), **kw),
        "g of another dtype": lambda t: fk.masked_ef_step(t(w()), t(g0.astype(np.float64)), **kw),
        "a mask of another size": lambda t: fk.masked_ef_step(t(w()), t(g0), t(m0[:99].copy()), **kw),
        "momentum without a buffer": lambda t: fk.masked_ef_step(t(w()), t(g0), momentum=0.9, **kw),
        "a float64 buffer": lambda t: fk.masked_ef_step(t(w()), t(g0), momentum=0.9, momentum_buffer=t(np.zeros(100)),
                                                        **kw),
        "a short buffer": lambda t: fk.masked_ef_step(t(w()), t(g0), momentum=0.9,
                                                      momentum_buffer=t(np.zeros(99, np.float32)), **kw),
        "a strided pruned copy": lambda t: fk.masked_ef_step(t(w()), t(g0),
                                                             pruned_out=t(np.zeros(200, np.float32)[::2]), **kw),
        "a strided w": lambda t: fk.masked_ef_step(t(np.repeat(w0, 2)[::2]), t(g0), **kw),
        "p = 3": lambda t: fk.masked_ef_step(t(w()), t(g0), p=3, **kw),
        "lr NaN": lambda t: fk.masked_ef_step(t(w()), t(g0), lr=float("nan")),
        "a negative norm": lambda t: fk.masked_ef_step(t(w()), t(g0), norm=-1.0, **kw),
        "w and g overlapping": lambda t: fk.masked_ef_step(t(store[:100]), t(store[50:150]), **kw),
        "the pruned copy is g": lambda t: (lambda g: fk.masked_ef_step(t(w()), g, pruned_out=g, **kw))(t(g0.copy())),
        "many: valid": lambda t: fk.masked_ef_step_many(
            [t(w()), t(w(np.float64)[:7].copy())], [t(g0), t(g0[:7].astype(np.float64))], [t(m0), None], momentum=0.9,
            momentum_buffers=[t(np.zeros(100, np.float32)), t(np.zeros(7))], norms=[None, 1.0], **kw),
        "many: a list too short": lambda t: fk.masked_ef_step_many([t(w())], [t(g0)], [None, None], **kw),
        "many: layers overlapping": lambda t: fk.masked_ef_step_many(
            [t(store[:100]), t(store[50:150])], [t(g0), t(g0.copy())], **kw),
        "many: a bad second layer": lambda t: fk.masked_ef_step_many([t(w()), t(w())], [t(g0), t(g0[:5].copy())],
                                                                     **kw),
        "many: none": lambda t: fk.masked_ef_step_many([], [], **kw),
    }


def _topk_cases():
    rng = np.random.default_rng(6)
    ws = [rng.standard_normal(s).astype(np.float32) for s in ((5, 7), (0,), (40,))]
    tied = [np.array([1.0, -1.0, 0.5, -0.0, 1.0, np.inf], np.float32)]
    nan = [np.array([1.0, np.nan], np.float32)]
    return {
        "masks": lambda t: fk.global_topk_masks([t(a) for a in ws], 9),
        "masks by density": lambda t: fk.global_topk_masks([t(a) for a in ws], density=0.3),
        "masks, ties and inf": lambda t: fk.global_topk_masks([t(a) for a in tied], 3),
        "masks, k = 0 and k = n": lambda t: fk.global_topk_masks([t(a) for a in ws], 0) + fk.global_topk_masks(
            [t(a) for a in ws], 75),
        "threshold": lambda t: fk.global_magnitude_threshold([t(a) for a in ws], 9),
        "threshold, k = 0": lambda t: fk.global_magnitude_threshold([t(a) for a in tied], 0),
        "max magnitude": lambda t: fk.max_magnitude([t(a) for a in tied]),
        "NaN": lambda t: fk.global_topk_masks([t(a) for a in nan], 1),
        "NaN, threshold": lambda t: fk.global_magnitude_threshold([t(a) for a in nan], 1),
        "NaN, max": lambda t: fk.max_magnitude([t(a) for a in nan]),
        "k too large": lambda t: fk.global_topk_masks([t(a) for a in ws], 76),
        "k negative": lambda t: fk.global_magnitude_threshold([t(a) for a in ws], -1),
        "k a bool": lambda t: fk.global_magnitude_threshold([t(a) for a in ws], True),
        "density 1.5": lambda t: fk.global_topk_masks([t(a) for a in ws], density=1.5),
        "mixed dtypes": lambda t: fk.global_topk_masks([t(ws[0]), t(ws[2].astype(np.float64))], 3),
        "float16": lambda t: fk.max_magnitude([t(ws[0].astype(np.float16))]),
    }


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(_step_cases()) + list(_topk_cases()))
def test_the_device_kernels_accept_and_refuse_what_the_host_kernels_do(routed, backend, case):
    """The same public call on host arrays (each host backend) and on device tensors (the device
    kernels, through the same validators): the same results, or the same error and message. The
    native core refuses overlapping arrays itself, in words of its own."""
    torch = routed
    cases = {**_step_cases(), **_topk_cases()}
    call = cases[case]
    with _BackendAs(backend):
        host = _outcome(lambda: call(lambda a: a))
    device = _outcome(lambda: call(lambda a: torch.from_numpy(a)))
    if backend == "native" and "share memory" in str(host[1]):  # the native core's words: no array named
        assert host[0] == device[0] == "ValueError" and "share memory; pass separate arrays" in device[1]
        return
    _same(host, device, case)


class _BackendAs:
    """The public functions' default backend ("auto") made `backend` for a while."""

    def __init__(self, backend):
        self.backend = backend

    def __enter__(self):
        self.real = _backend.kernels
        _backend.kernels = lambda name="auto": self.real(self.backend if name == "auto" else name)

    def __exit__(self, *exc):
        _backend.kernels = self.real


def test_the_device_kernels_refuse_packed_masks(routed):
    """mask_bits is for the host kernels (the one thing the device kernels refuse that they take)."""
    torch = routed
    w = torch.zeros(16)
    with pytest.raises(ValueError, match="mask_bits is for host arrays"):
        fk.masked_ef_step(w, torch.ones(16), lr=0.1, mask_bits=fk.pack_mask(np.ones(16, bool)))
    with pytest.raises(ValueError, match="mask_bits is for host arrays"):
        _backend.device_kernels().masked_ef_step_many([w], [w + 1], [None], momentum_buffers=[None], pruned_outs=[None],
                                                       lr=0.1, weight_decay=0.0, lam=0.0, momentum=0.0, p=2,
                                                       norms=[None], mask_packed=True)
    with pytest.raises(ValueError, match="must be a torch tensor on cpu like w"):
        fk.masked_ef_step(w, np.ones(16, np.float32), lr=0.1)
    with pytest.raises(ValueError, match="pass the tensors on one device"):
        fk.global_topk_masks([w, np.ones(3, np.float32)], 1)
