"""Entropy-coded values (codecs/entropy.py, codecs/values.py and the ans_* kernels of the contract).

Kernels: every backend counts, codes and decodes as the NumPy reference does (the same histogram,
the same bytes, the words back exactly), for words of 1 to 64 bits, any valid model (the planner's
or a forced one), and the *_many forms as the single ones; corrupt streams fail with the same
message in every backend. Codecs: "ans" and "auto" give back the raw values bit for bit (-0.0,
NaN payloads, infinities, subnormals), in messages (versions 1 and 2) and streams (version 3),
with masks and reference masks; "auto" is never larger than "raw"; "fp16-ans", "bf16-ans" and
"int8-ans" decode to what "fp16", "bf16" and "int8" decode to; the quantised codecs keep their
error bounds, and stochastic rounding is unbiased and seeded. Hostile blocks (every field of the
head, the table, the states, the stream and the raw bits corrupted one at a time, the checksum
resealed) are refused with a CodecError naming the problem, the same in every backend, and
quickly."""

from __future__ import annotations

import io
import struct
import time
from contextlib import contextmanager
from typing import Any, Callable, NamedTuple, Optional

import numpy as np
import pytest
from codec_helpers import _SPECIALS, _reseal, bit_patterns, mutated_body, sparse_arrays
from hypothesis import HealthCheck, given, settings, strategies as st

import feddip_kernels as fk
from feddip_kernels import _backend, codecs, reference
from feddip_kernels._contract import AnsModel
from feddip_kernels._formulas import ANS_MAX_LANES, ANS_MAX_PROB_BITS, word_dtype
from feddip_kernels.codecs import entropy
from feddip_kernels.codecs.format import HEADER, RECORD, STREAM_CHUNK, STREAM_RECORD

BACKENDS = _backend.available_backends()
KERNELS = {be: _backend.kernels(be) for be in BACKENDS}


def _native_isas() -> list[str]:
    """The native loops this CPU has (the decoder's AVX-512, AVX2 and scalar forms): `_isa` caps the
    one in use."""
    if "native" not in BACKENDS:
        return []
    native = _backend.native_module()
    before = native._isa()
    found = [isa for isa in ("avx512", "avx2", "generic") if native._isa(isa) == isa]
    native._isa(before)
    return found


ISAS = _native_isas()


@contextmanager
def isa_capped(isa: Optional[str]):
    if isa is None:
        yield
        return
    native = _backend.native_module()
    before = native._isa()
    native._isa(isa)
    try:
        yield
    finally:
        native._isa(before)


def each_kernels():
    """(label, kernels, ISA cap) for every backend, the native one under every ISA this CPU has."""
    for be, k in KERNELS.items():
        for isa in (ISAS if be == "native" else [None]):
            yield (f"{be}/{isa}" if isa else be), k, isa
ENTROPY_CODECS = ["ans", "auto", "fp16-ans", "bf16-ans", *(f"int{b}-ans" for b in range(2, 9))]
_SLOW_OK = settings(suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large], deadline=None)
# The kernels' and the decoders' parity, and the mutation fuzz: more examples than the profile's
# (they take milliseconds each).
_MORE = settings(_SLOW_OK, max_examples=4 * settings.default.max_examples)


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal dtypes, shapes and bytes (NaN payloads and the signs of zeros included)."""
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


@contextmanager
def chunk_elems(n: int):
    """encode_model's runs of n elements (version 2 records once Golomb positions take two)."""
    before, codecs.model.CHUNK_ELEMS = codecs.model.CHUNK_ELEMS, n
    try:
        yield
    finally:
        codecs.model.CHUNK_ELEMS = before


def stream_bytes(tensors: dict, **kw: Any) -> bytes:
    f = io.BytesIO()
    fk.encode_stream(tensors, f, **kw)
    return f.getvalue()


# ---------------------------------------------------------------------------------------------
# Kernels against the reference.


def _float_words(rng: np.random.Generator, n: int, dtype: np.dtype) -> np.ndarray:
    """Bit patterns of a pruned model's floats (normal values, the kept tails of a bell, at a
    drawn scale) with -0.0, +0.0, +-inf, NaN payloads and subnormals sprinkled in."""
    u = np.uint32 if dtype == np.float32 else np.uint64
    a = (rng.standard_normal(n) * 10.0 ** rng.uniform(-4, 3)).astype(dtype)
    if n and rng.random() < 0.5:  # the tails of a bell: magnitudes above a threshold
        a = np.where(np.abs(a) < np.median(np.abs(a)), a * 4 + np.sign(a), a).astype(dtype)
    words = a.view(u)
    pick = rng.random(n) < rng.choice([0.0, 0.05, 0.5])
    specials = np.array([*_SPECIALS[np.dtype(dtype)], 0, 1 << (8 * np.dtype(dtype).itemsize - 1)], dtype=u)
    words[pick] = specials[rng.integers(0, specials.size, int(pick.sum()))]
    sub = rng.random(n) < rng.choice([0.0, 0.05])  # random subnormals of either sign
    mant = 23 if dtype == np.float32 else 52
    words[sub] = (rng.integers(1, 1 << mant, int(sub.sum()), dtype=np.int64).astype(u)
                  | (rng.integers(0, 2, int(sub.sum())).astype(u) << u(8 * np.dtype(dtype).itemsize - 1)))
    return words


@st.composite
def word_arrays(draw) -> tuple[np.ndarray, int]:
    """(words, word_bits): words of a drawn width (1..64) in its narrowest dtype, of a drawn
    distribution: all zero, constant, two values, random bits, geometric magnitudes, float16,
    float32 or float64 bit patterns."""
    kind = draw(st.sampled_from(["zero", "constant", "two", "random", "geometric", "float16", "float32", "float64"]))
    n = draw(st.one_of(st.integers(0, 70), st.integers(0, 2000)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if kind.startswith("float"):
        word_bits = int(kind[5:])
        if kind == "float16":
            words = (rng.standard_normal(n) * 10.0 ** rng.uniform(-3, 3)).astype(np.float16).view(np.uint16)
        else:
            words = _float_words(rng, n, np.dtype(kind))
        return words, word_bits
    word_bits = draw(st.integers(1, 64))
    top = np.uint64((1 << word_bits) - 1)
    randoms = np.frombuffer(rng.bytes(8 * n), dtype=np.uint64) & top
    if kind == "zero":
        words = np.zeros(n, np.uint64)
    elif kind == "constant":
        words = np.full(n, randoms[0] if n else 0, np.uint64)
    elif kind == "two":
        pair = np.frombuffer(rng.bytes(16), dtype=np.uint64) & top
        words = np.where(rng.random(n) < rng.random(), pair[0], pair[1])
    elif kind == "random":
        words = randoms
    else:  # small magnitudes, geometric, moved up by a drawn shift, random signs
        up = int(rng.integers(0, max(1, word_bits - 6)))
        mag = np.minimum(rng.geometric(0.3, n).astype(np.uint64) << np.uint64(up), top >> np.uint64(1))
        words = mag | (rng.integers(0, 2, n).astype(np.uint64) << np.uint64(word_bits - 1))
    return words.astype(word_dtype(word_bits)), word_bits


def _magnitudes(words: np.ndarray, word_bits: int) -> np.ndarray:
    return words.astype(np.uint64) & np.uint64((1 << (word_bits - 1)) - 1)


@st.composite
def models(draw, words: np.ndarray, word_bits: int) -> AnsModel:
    """The planner's model for the words, or a forced valid one: any shift from the histogram's
    for a drawn max_symbols up to word_bits - 1, absent symbols below and above, absent symbols
    given frequencies, any precision that fits the symbols, any number of lanes."""
    if words.size and draw(st.booleans()):
        return entropy.plan(reference, words, word_bits)
    mag = _magnitudes(words, word_bits)
    max_symbols = draw(st.one_of(st.integers(1, 16), st.integers(1, entropy.MAX_SYMBOLS)))
    shift0 = reference.ans_histogram(words, word_bits=word_bits, max_symbols=max_symbols)[0]
    shift = draw(st.integers(shift0, word_bits - 1))
    top_symbol = ((1 << (word_bits - 1)) - 1) >> shift
    sym = mag >> np.uint64(shift)
    lo, hi = (int(sym.min()), int(sym.max())) if words.size else (0, 0)
    below = draw(st.integers(0, min(lo, 8)))
    above = draw(st.integers(0, max(0, min(8, top_symbol - hi, entropy.MAX_SYMBOLS - (hi - lo + 1) - below))))
    base = lo - below
    size = hi - base + 1 + above
    counts = np.bincount((sym - np.uint64(base)).astype(np.int64), minlength=size).astype(np.uint64)
    if not words.size or draw(st.booleans()):  # absent symbols with a frequency (never coded)
        rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        counts[(counts == 0) & (rng.random(size) < 0.5)] = 1
        if not counts.any():
            counts[0] = 1
    present = int((counts > 0).sum())
    prob_bits = draw(st.integers(max(1, (present - 1).bit_length()), ANS_MAX_PROB_BITS))
    lanes = draw(st.one_of(st.just(ANS_MAX_LANES), st.integers(1, ANS_MAX_LANES)))  # 32: the vector loops
    return AnsModel(word_bits, shift, base, entropy._normalise(counts, prob_bits), prob_bits, lanes)


@given(word_arrays(), st.one_of(st.integers(1, 16), st.integers(1, entropy.MAX_SYMBOLS)))
def test_histograms_match_the_reference(case, max_symbols):
    words, word_bits = case
    shift, base, counts = reference.ans_histogram(words, word_bits=word_bits, max_symbols=max_symbols)
    assert counts.dtype == np.uint64 and counts.size <= max_symbols and int(counts.sum()) == words.size
    if words.size:  # the smallest shift: one less spans more than max_symbols
        mag = _magnitudes(words, word_bits)
        assert counts[0] and counts[-1] and base == int(mag.min()) >> shift
        assert shift == 0 or (int(mag.max()) >> (shift - 1)) - (int(mag.min()) >> (shift - 1)) >= max_symbols
    for be, k in KERNELS.items():
        got = k.ans_histogram(words, word_bits=word_bits, max_symbols=max_symbols)
        assert (int(got[0]), int(got[1])) == (shift, base), be
        assert got[2].dtype == np.uint64 and np.array_equal(got[2], counts), be


@_MORE
@given(word_arrays(), st.data())
def test_every_backend_writes_the_reference_bytes_and_decodes_them(case, data):
    words, word_bits = case
    model = data.draw(models(words, word_bits))
    stream, raw = reference.ans_encode(words, **model._asdict())
    assert len(stream) >= 4 * model.lanes and (len(stream) - 4 * model.lanes) % 2 == 0
    assert (len(stream) - 4 * model.lanes) // 2 <= words.size  # at most a 16-bit word a symbol
    assert len(raw) == entropy.raw_len(words.size, model.shift)
    for be, k, isa in each_kernels():
        with isa_capped(isa):
            s, r = k.ans_encode(words, **model._asdict())
            assert bytes(s) == stream and bytes(r) == raw, be
            got = k.ans_decode(stream, raw, words.size, **model._asdict())
            assert got.dtype == word_dtype(word_bits) and np.array_equal(got, words), be


@given(st.lists(word_arrays(), min_size=1, max_size=4), st.data())
def test_the_many_forms_are_the_single_ones(cases, data):
    items = [(words, data.draw(models(words, bits))) for words, bits in cases]
    singles = [tuple(map(bytes, reference.ans_encode(w, **m._asdict()))) for w, m in items]
    for be, k in KERNELS.items():
        assert [tuple(map(bytes, c)) for c in k.ans_encode_many(items)] == singles, be
        words, failed, message = k.ans_decode_many([(s, r, w.size, m) for (w, m), (s, r) in zip(items, singles)])
        assert (failed, message) == (-1, "") and len(words) == len(items), be
        for (w, _), got in zip(items, words):
            assert got.dtype == w.dtype and np.array_equal(got, w), be
    assert all(k.ans_encode_many([]) == [] for k in KERNELS.values())


def test_the_many_forms_report_the_first_failure():
    # Items decoded in parallel (natively, largest first): the failure reported is the first in
    # list order, with its own message, whichever finishes first.
    rng = np.random.default_rng(4)
    items = []
    for n in (3000, 10, 2500, 700, 4999):
        words = rng.standard_normal(n).astype(np.float32).view(np.uint32)
        model = entropy.plan(reference, words, 32)
        items.append((*reference.ans_encode(words, **model._asdict()), n, model))
    bad = list(items)
    bad[2] = (items[2][0][:-2], *items[2][1:])  # ends early
    bad[3] = (items[3][0] + b"\0\0", *items[3][1:])  # leaves a word
    bad[4] = (items[4][0], b"\xff" * len(items[4][1]), *items[4][2:])  # padding bits
    for be, k, isa in each_kernels():
        with isa_capped(isa):
            words, failed, message = k.ans_decode_many(items)
            assert (failed, message) == (-1, "") and [w.size for w in words] == [3000, 10, 2500, 700, 4999], be
            assert k.ans_decode_many(bad)[1:] == (2, "entropy-coded values: stream ends early"), be
            assert k.ans_decode_many(bad[3:])[1:] == (0, "entropy-coded values: stream does not end where its "
                                                         "symbols do"), be
            assert k.ans_decode_many(bad[4:])[1:] == (0, "entropy-coded values: non-zero padding bits"), be


def _outcome(k: Any, stream: bytes, raw: bytes, n: int, model: AnsModel) -> Any:
    try:
        return k.ans_decode(stream, raw, n, **model._asdict()).tobytes()
    except ValueError as e:
        return f"{type(e).__name__}: {e}"


def _corrupt(rng: np.random.Generator, how: str, stream: bytes, raw: bytes, lanes: int) -> tuple[bytes, bytes]:
    s, r = bytearray(stream), bytearray(raw)
    if how == "byte" and s:
        s[rng.integers(len(s))] = rng.integers(256)
    elif how == "bit" and s:
        s[rng.integers(len(s))] ^= 1 << int(rng.integers(8))
    elif how == "state":
        j = 4 * int(rng.integers(lanes))
        s[j : j + 4] = struct.pack("<I", int(rng.choice([0, (1 << 15) - 1, 1 << 15, (1 << 15) + 1, (1 << 31) - 1,
                                                         1 << 31, (1 << 32) - 1, rng.integers(1 << 32)])))
    elif how == "drop word":
        del s[-2:]
    elif how == "add word":
        s += rng.bytes(2)
    elif how == "odd":
        s += b"\x00"
    elif how == "truncate":
        del s[rng.integers(len(s) + 1):]
    elif how == "raw byte" and r:
        r[rng.integers(len(r))] = rng.integers(256)
    elif how == "raw padding" and r:
        r[-1] |= 0x80
    elif how == "raw length":
        r += b"\x00" if rng.random() < 0.5 or not r else b""
        if len(r) == len(raw):
            del r[-1]
    return bytes(s), bytes(r)


CORRUPTIONS = ["byte", "bit", "state", "drop word", "add word", "odd", "truncate", "raw byte", "raw padding",
               "raw length"]


@_MORE
@given(word_arrays(), st.data(), st.lists(st.sampled_from(CORRUPTIONS), min_size=1, max_size=3),
       st.integers(0, 2**32 - 1))
def test_corrupt_streams_fail_alike_in_every_backend(case, data, hows, seed):
    # The model is valid (the caller checks it); the stream and raw bits are not. Every backend
    # decodes the same words or raises ValueError with the same message.
    words, word_bits = case
    model = data.draw(models(words, word_bits))
    stream, raw = reference.ans_encode(words, **model._asdict())
    rng = np.random.default_rng(seed)
    for how in hows:
        stream, raw = _corrupt(rng, how, stream, raw, model.lanes)
    outcomes = {}
    for be, k, isa in each_kernels():
        with isa_capped(isa):
            outcomes[be] = _outcome(k, stream, raw, words.size, model)
    assert len(set(outcomes.values())) == 1, {be: o if isinstance(o, str) else "words" for be, o in outcomes.items()}
    got = outcomes["numpy"]
    assert isinstance(got, bytes) or got.startswith("ValueError: entropy-coded values: ")
    empty = (*reference.ans_encode(words[:0], **model._asdict()), 0, model)  # a valid item first
    many = {be: k.ans_decode_many([empty, (stream, raw, words.size, model)])[1:] for be, k in KERNELS.items()}
    want = (-1, "") if isinstance(got, bytes) else (1, got.removeprefix("ValueError: "))
    assert all(m == want for m in many.values()), many


KNOWN_CORRUPT = {  # (stream, raw) of 3 words 0, 1, 0 (one symbol each, 1 lane, prob_bits 1) made wrong
    "stream of a bad length": lambda s, r: (s[:3], r),
    "raw bits of a bad length": lambda s, r: (s, r + b"\x00"),
    "non-zero padding bits": lambda s, r: (s, bytes([r[0] | 0x80])),
    "initial state out of range": lambda s, r: (struct.pack("<I", 1 << 31) + s[4:], r),
    "stream ends early": lambda s, r: (struct.pack("<I", 1 << 15), r),
    "stream does not end where its symbols do": lambda s, r: (s + b"\x00\x00", r),
}


@pytest.mark.parametrize("problem", list(KNOWN_CORRUPT))
def test_each_stream_error_has_its_message_in_every_backend(problem):
    words = np.array([0, 1, 0, 0, 1], np.uint8)
    model = AnsModel(8, 0, 0, np.array([1, 1], np.uint32), 1, 1)
    stream, raw = KNOWN_CORRUPT[problem](*reference.ans_encode(words, **model._asdict()))
    for be, k, isa in each_kernels():
        with isa_capped(isa):
            with pytest.raises(ValueError, match=f"^entropy-coded values: {problem}$"):
                k.ans_decode(stream, raw, words.size, **model._asdict())
            many = k.ans_decode_many([(stream, raw, words.size, model)])[1:]
            assert many == (0, f"entropy-coded values: {problem}"), be


def test_encoders_refuse_a_symbol_without_a_frequency():
    words = np.array([0, 3, 1], np.uint8)
    for model in (AnsModel(8, 0, 0, np.array([1, 1], np.uint32), 1, 1),  # 3 beyond the table
                  AnsModel(8, 0, 0, np.array([2, 0, 0, 2], np.uint32), 2, 1),  # 1 of frequency 0
                  AnsModel(8, 0, 1, np.array([1, 1, 2], np.uint32), 2, 1)):  # 0 below the base
        for k in KERNELS.values():
            with pytest.raises(ValueError, match="^entropy-coded values: a symbol has no frequency$"):
                k.ans_encode(words, **model._asdict())


@pytest.mark.parametrize("word_bits", [1, 2, 7, 8, 9, 16, 17, 31, 32, 33, 63, 64])
def test_extreme_words_of_every_width(word_bits):
    # The largest magnitude with and without the sign, zero with the sign, every raw bit set.
    top = (1 << word_bits) - 1
    words = np.array([top, top >> 1, 1 << (word_bits - 1), 0, top, 1 % (top + 1)], dtype=np.uint64)
    words = np.tile(words, 11)[:65].astype(word_dtype(word_bits))  # two groups of 32 lanes and one word
    for shift in sorted({max(0, word_bits - 13), max(0, word_bits - 8), word_bits - 1}):  # <= 4096 symbols
        mag = _magnitudes(words, word_bits) >> np.uint64(shift)
        base = int(mag.min())
        counts = np.bincount((mag - np.uint64(base)).astype(np.int64))
        for lanes in (1, 2, 32):
            model = AnsModel(word_bits, shift, base, entropy._normalise(counts, 15), 15, lanes)
            want = reference.ans_encode(words, **model._asdict())
            for be, k, isa in each_kernels():
                with isa_capped(isa):
                    got = k.ans_encode(words, **model._asdict())
                    assert tuple(map(bytes, got)) == want, (be, shift, lanes)
                    assert np.array_equal(k.ans_decode(*want, words.size, **model._asdict()), words), (be, shift, lanes)


# ---------------------------------------------------------------------------------------------
# Codecs: round trips, bytes alike in every backend, and what they decode to.


class Case(NamedTuple):
    tensors: dict
    kw: dict  # masks and reference for the encoder
    reference: Optional[dict]  # for the decoder


@st.composite
def cases(draw) -> Case:
    """One or two tensors, no masks, masks, or masks relative to a shared reference mask (equal
    to it or a subset of it)."""
    tensors = {"a": draw(bit_patterns())}
    if draw(st.booleans()):
        tensors["b"] = draw(bit_patterns())
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    masking = draw(st.sampled_from(["none", "mask", "shared", "subset"]))
    if masking == "none":
        return Case(tensors, {}, None)
    masks = {k: rng.random(v.shape) < 0.4 for k, v in tensors.items()}
    if masking == "mask":
        return Case(tensors, {"masks": masks}, None)
    subset = masks if masking == "shared" else {k: m & (rng.random(m.shape) < 0.5) for k, m in masks.items()}
    return Case(tensors, {"masks": subset, "reference": masks}, masks)


def _encode_all(case: Case, fmt: str, values: str, **kw: Any) -> bytes:
    """The message in every backend, checked to be the same bytes."""
    def one(be: str) -> bytes:
        if fmt == "stream":
            return stream_bytes(case.tensors, values=values, backend=be, **case.kw, **kw)
        return fk.encode_model(case.tensors, values=values, backend=be, **case.kw, **kw)

    msgs = {be: one(be) for be in BACKENDS}
    assert len(set(msgs.values())) == 1, f"{values}: the backends write different messages"
    return msgs[BACKENDS[0]]


def _decode_all(msg: bytes, case: Case) -> dict:
    """The tensors decoded by every backend (and from a file for a stream), checked to be the same
    bits; those of the first."""
    outs = []
    for be in BACKENDS:
        outs.append(fk.decode_model(msg, reference=case.reference, backend=be).tensors)
        if msg[4] == codecs.STREAM_VERSION:
            outs.append(fk.decode_stream(io.BytesIO(msg), reference=case.reference, backend=be).tensors)
    for other in outs[1:]:
        assert other.keys() == outs[0].keys()
        assert all(same_bits(other[k], outs[0][k]) for k in outs[0])
    return outs[0]


STREAM_KW = st.fixed_dictionaries({"chunk_elems": st.sampled_from([8, 16, 64, 1 << 16]),
                                   "positions": st.sampled_from(["auto", "bitmask", "golomb"])})
MODEL_KW = st.fixed_dictionaries({"positions": st.sampled_from(["auto", "bitmask", "golomb"])})


@_MORE
@given(cases(), st.sampled_from(["ans", "auto"]), st.sampled_from(["model", "chunked", "stream"]), st.data())
def test_lossless_codecs_give_back_the_raw_values_bit_for_bit(case, values, fmt, data):
    kw = data.draw(STREAM_KW if fmt == "stream" else MODEL_KW)
    with chunk_elems(16 if fmt == "chunked" else codecs.model.CHUNK_ELEMS):
        msg = _encode_all(case, "stream" if fmt == "stream" else "model", values, **kw)
        raw = _encode_all(case, "stream" if fmt == "stream" else "model", "raw", **kw)
    got, want = _decode_all(msg, case), _decode_all(raw, case)
    assert all(same_bits(got[k], want[k]) for k in want)
    if not case.kw:  # no masks: the tensors' own bytes, -0.0 off the positions included
        assert all(same_bits(got[k], np.asarray(v)) for k, v in case.tensors.items())
    if fmt != "stream":
        # "auto" takes raw where "ans" is not smaller: never a longer message than raw's.
        assert values != "auto" or len(msg) <= len(raw)


@given(cases(), st.sampled_from(["model", "chunked"]), st.data())
def test_auto_is_never_larger_than_raw_and_picks_the_smaller_per_tensor(case, fmt, data):
    kw = data.draw(MODEL_KW)
    with chunk_elems(16 if fmt == "chunked" else codecs.model.CHUNK_ELEMS):
        sizes = {v: len(fk.encode_model(case.tensors, values=v, **case.kw, **kw)) for v in ("raw", "ans", "auto")}
        # One tensor at a time: "auto" is the smaller of "raw" and "ans" for each.
        for name, t in case.tensors.items():
            one = Case({name: t}, {k: {name: v[name]} for k, v in case.kw.items()}, None)
            each = {v: len(fk.encode_model(one.tensors, values=v, **one.kw, **kw)) for v in ("raw", "ans", "auto")}
            assert each["auto"] == min(each["raw"], each["ans"]), each
    assert sizes["auto"] <= min(sizes["raw"], sizes["ans"]), sizes


def _finite(a: np.ndarray) -> np.ndarray:
    """a's non-finite values, and those whose scale float32 cannot hold, replaced by 1 (int8 refuses them)."""
    with np.errstate(invalid="ignore"):
        return np.where(np.isfinite(a) & (np.abs(a) < 1e38), a, np.ones((), a.dtype)).astype(a.dtype)


@_SLOW_OK
@given(cases(), st.sampled_from([("fp16-ans", "fp16"), ("bf16-ans", "bf16"), ("int8-ans", "int8")]),
       st.sampled_from(["model", "chunked", "stream"]), st.data())
def test_entropy_coded_lossy_codecs_decode_to_their_fixed_width_twins(case, pair, fmt, data):
    coded, twin = pair
    if twin == "int8":  # int8 takes finite values only
        case = case._replace(tensors={k: _finite(v) for k, v in case.tensors.items()})
    kw = data.draw(STREAM_KW if fmt == "stream" else MODEL_KW)
    with chunk_elems(16 if fmt == "chunked" else codecs.model.CHUNK_ELEMS):
        got = _decode_all(_encode_all(case, "stream" if fmt == "stream" else "model", coded, **kw), case)
        want = _decode_all(_encode_all(case, "stream" if fmt == "stream" else "model", twin, **kw), case)
    assert all(same_bits(got[k], want[k]) for k in want)


def _scale(v: np.ndarray, bits: int) -> float:
    """quantise's scale: max|v| / (2^(bits-1) - 1) as float32 (1 for no or only zero values; the
    smallest subnormal where that rounds to 0)."""
    peak = float(np.max(np.abs(v))) if v.size else 0.0
    if peak == 0:
        return 1.0
    scale = np.float32(peak / ((1 << (bits - 1)) - 1))
    return float(scale) if scale > 0 else float(np.nextafter(np.float32(0), np.float32(1)))


@_SLOW_OK
@given(sparse_arrays(allow_nan=False), st.integers(2, 8), st.sampled_from(["nearest", "stochastic"]),
       st.integers(0, 2**32 - 1), st.booleans(), st.sampled_from(["none", "mask", "reference"]))
def test_quantised_codecs_keep_their_error_bounds(a, bits, rounding, seed, stream, masking):
    codec = f"int{bits}-ans"
    mask = np.random.default_rng(seed).random(a.shape) < 0.5
    case = Case({"w": a}, {}, None)
    if masking == "mask":
        case = Case({"w": a}, {"masks": {"w": mask}}, None)
    elif masking == "reference":
        case = Case({"w": a}, {"masks": {"w": mask}, "reference": {"w": mask}}, {"w": mask})
    if stream:
        msg = _encode_all(case, "stream", codec, rounding=rounding, seed=seed, chunk_elems=1 << 16)
    else:
        msg = _encode_all(case, "model", codec, rounding=rounding, seed=seed)
    out = _decode_all(msg, case)["w"]
    assert out.dtype == a.dtype and out.shape == a.shape
    v, o = a.astype(np.float64).reshape(-1), out.astype(np.float64).reshape(-1)
    # The positions: the mask's, or the non-zeros; the rest decodes to +0.0.
    on = mask.reshape(-1) if masking != "none" else v != 0
    assert not o[~on].any() and not np.signbit(o[~on]).any()
    scale = _scale(v[on], bits)
    top = (1 << (bits - 1)) - 1
    q = o[on] / scale
    assert (np.abs(q) <= top * (1 + 1e-6)).all() and np.allclose(q, np.rint(q), rtol=0, atol=1e-3)
    # A few float32 ulps of the peak: the scale and each product q * scale are rounded to float32.
    slack = 4 * float(np.spacing(np.float32(np.max(np.abs(v)) if v.size else 0.0)))
    err = np.abs(o[on] - v[on])
    if rounding == "nearest":
        assert (err <= scale / 2 + slack).all(), (err.max(), scale)
    else:
        assert (err < scale + slack).all(), (err.max(), scale)


def test_stochastic_rounding_is_unbiased_and_seeded():
    # int3: 7 levels (q in -3..3). 200 elements at fractions of the step that nearest rounding
    # errs on by up to half a step in one direction (x.3 -> x, x.7 -> x + 1), the peak fixed so
    # that the scale is the same in every draw.
    bits, draws = 3, 200
    top = (1 << (bits - 1)) - 1
    rng = np.random.default_rng(11)
    frac = rng.choice([0.1, 0.3, 0.5, 0.7, 0.9], 200)
    v = ((rng.integers(-top, top, 200) + frac) / top).astype(np.float32)
    v[0] = 1.0  # the peak: scale = float32(1 / 3)
    scale = _scale(v, bits)
    codec = f"int{bits}-ans"

    def decoded(rounding: str, seed: int) -> np.ndarray:
        msg = fk.encode_model({"w": v}, masks={"w": np.ones(v.size, bool)}, values=codec, rounding=rounding,
                              seed=seed)
        return fk.decode_model(msg).tensors["w"].astype(np.float64)

    err = np.stack([decoded("stochastic", seed) for seed in range(draws)]) - v.astype(np.float64)
    assert (np.abs(err) < scale * (1 + 1e-6)).all()
    # Each draw's error lies in [x - ceil(x), x - floor(x)] * scale, an interval of one step, so by
    # Hoeffding's inequality the mean of `draws` independent draws strays from its expectation by
    # t or more with probability at most 2 exp(-2 draws t^2 / scale^2): for t = 0.3 scale, 2e-16
    # an element. Unbiased rounding has expectation 0 (the fixed seeds make the test
    # deterministic; the bound says it is not a lucky seed that passes).
    per_element = np.abs(err.mean(axis=0))
    assert per_element.max() <= 0.3 * scale, per_element.max() / scale
    # The whole sample's mean, 40000 errors of standard deviation at most scale / 2: within 7 sigma.
    assert abs(err.mean()) <= 7 * scale / 2 / np.sqrt(err.size)
    # Nearest rounding is biased at these fractions, and the test sees it.
    assert np.abs(decoded("nearest", 0) - v).max() > 0.3 * scale
    # A fixed seed draws the same roundings (in every backend, message and stream); another does not.
    kw = dict(values=codec, rounding="stochastic")
    first = {be: fk.encode_model({"w": v}, seed=5, backend=be, **kw) for be in BACKENDS}
    assert len(set(first.values())) == 1 and fk.encode_model({"w": v}, seed=5, **kw) == first[BACKENDS[0]]
    assert fk.encode_model({"w": v}, seed=6, **kw) != first[BACKENDS[0]]
    streams = {be: stream_bytes({"w": v}, seed=5, backend=be, **kw) for be in BACKENDS}
    assert len(set(streams.values())) == 1 and stream_bytes({"w": v}, seed=5, **kw) == streams[BACKENDS[0]]


@pytest.mark.parametrize("values", ["raw", "ans", "auto", "fp16", "bf16", "int8", "fp16-ans", "bf16-ans"])
def test_stochastic_rounding_is_refused_where_nothing_rounds(values):
    # Only the int*-ans codecs choose a rounding; elsewhere "stochastic" would be ignored silently.
    v = {"w": np.linspace(-1, 1, 50, dtype=np.float32)}
    with pytest.raises(ValueError, match="stochastic rounding applies to the int2-ans"):
        fk.encode_model(v, values=values, rounding="stochastic")
    with pytest.raises(ValueError, match="stochastic rounding applies to the int2-ans"):
        stream_bytes(v, values=values, rounding="stochastic")


@pytest.mark.parametrize("values", ENTROPY_CODECS)
@pytest.mark.parametrize("fmt", ["model", "stream"])
def test_empty_and_0d_tensors(values, fmt):
    tensors = {"empty": np.zeros(0, np.float32), "wide": np.zeros((7, 0), np.float64),
               "neg0": np.array(-0.0, np.float32), "one": np.array(3.5), "zeros": np.zeros((2, 3), np.float32),
               "negs": -np.zeros(5, np.float64)}
    case = Case(tensors, {}, None)
    twin = {"ans": "raw", "auto": "raw", "fp16-ans": "fp16", "bf16-ans": "bf16"}.get(values, "int8")
    kw = {"chunk_elems": 8} if fmt == "stream" else {}
    got = _decode_all(_encode_all(case, fmt, values, **kw), case)
    want = _decode_all(_encode_all(case, fmt, twin, **kw), case)
    for name, t in tensors.items():
        assert got[name].shape == t.shape and got[name].dtype == t.dtype
        if values in ("ans", "auto"):
            assert same_bits(got[name], t), name
        elif values in ("fp16-ans", "bf16-ans", "int8-ans"):
            assert same_bits(got[name], want[name]), name
        else:  # int2-ans .. int7-ans: zeros, and the peak within float32's rounding of scale * top
            np.testing.assert_allclose(got[name], want[name], rtol=1e-6, atol=0)


@pytest.mark.parametrize("values", ["ans", "fp16-ans", "bf16-ans", "int2-ans", "int5-ans", "int8-ans"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_large_tensors_in_every_backend_and_isa(values, dtype):
    # Blocks of 32 lanes (the encoder's model from 8192 values on), which the native decoder takes
    # with its vector loops where the CPU has them, for words of 8, 16, 32 and 64 bits; the
    # values of a pruned layer with special bit patterns among them (lossless codecs).
    rng = np.random.default_rng(9)
    a = (rng.standard_normal(16001) * 0.02).astype(dtype)
    a[np.abs(a) < 0.01] = 0
    if values == "ans":
        u = np.uint32 if dtype == np.float32 else np.uint64
        at = rng.choice(a.size, 300, replace=False)
        a.view(u)[at] = np.array(_SPECIALS[np.dtype(dtype)], u)[rng.integers(0, 9, 300)]
    msgs = {be: fk.encode_model({"w": a}, values=values, backend=be) for be in BACKENDS}
    assert len(set(msgs.values())) == 1
    msg = msgs[BACKENDS[0]]
    loc = locate(msg)
    f = fields_at(loc)
    assert f["lanes"] == 32 and f["n"] >= 8192
    want = fk.decode_model(msg, backend="numpy").tensors["w"]
    # A stream of two chunks (14400 and 1601 elements: each a block, of 32 lanes and of fewer).
    s = stream_bytes({"w": a}, values=values, backend="numpy", chunk_elems=14400)
    want_s = fk.decode_stream(io.BytesIO(s), backend="numpy").tensors["w"]
    for be, _, isa in each_kernels():
        with isa_capped(isa):
            assert same_bits(fk.decode_model(msg, backend=be.split("/")[0]).tensors["w"], want), be
            assert stream_bytes({"w": a}, values=values, backend=be.split("/")[0], chunk_elems=14400) == s
            assert same_bits(fk.decode_stream(io.BytesIO(s), backend=be.split("/")[0]).tensors["w"], want_s), be
    if values in ("ans", "fp16-ans", "bf16-ans"):  # no scale: the chunks' values are the whole's
        assert same_bits(want_s, want)
    if values == "ans":
        assert same_bits(want, a)


@pytest.mark.parametrize("values", ["ans", "auto", "bf16-ans", "int4-ans"])
def test_decoding_into_out_and_inputs_of_any_layout(values):
    # Strided inputs code as their contiguous copies do; decode_model and decode_stream write into
    # `out`.
    rng = np.random.default_rng(10)
    a = (rng.standard_normal((40, 30)) * (rng.random((40, 30)) < 0.5)).astype(np.float32)
    msg = fk.encode_model({"w": a}, values=values, seed=1)
    wide = np.zeros((40, 60), np.float32)
    wide[:, ::2] = a
    assert fk.encode_model({"w": wide[:, ::2]}, values=values, seed=1) == msg
    want = fk.decode_model(msg).tensors["w"]
    for be in BACKENDS:
        out = np.full((40, 30), np.nan, np.float32)
        got = fk.decode_model(msg, out={"w": out}, backend=be)
        assert got.tensors["w"] is out and same_bits(out, want)
        out[...] = np.nan
        fk.decode_stream(io.BytesIO(stream_bytes({"w": a}, values=values, seed=1)), out={"w": out}, backend=be)
        assert same_bits(out, want)  # one chunk: the same scale


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_every_special_bit_pattern_on_and_off_the_positions(dtype):
    # -0.0 kept by a mask (a value) and off it (a zero sign), NaN payloads, infinities and
    # subnormals of both signs: "ans" and "auto" give back every bit.
    u = np.uint32 if dtype == np.float32 else np.uint64
    bits = np.array([*_SPECIALS[np.dtype(dtype)], 1 << (8 * np.dtype(dtype).itemsize - 1), 0] * 40, dtype=u)
    a = bits.view(dtype).copy()
    a[::7] = -0.0
    mask = np.arange(a.size) % 3 != 0
    for values in ("ans", "auto"):
        for kw in ({}, {"masks": {"w": mask}, "signed_zeros": True}):
            case = Case({"w": a}, kw, None)
            for fmt in ("model", "stream"):
                got = _decode_all(_encode_all(case, fmt, values), case)["w"]
                want = np.where(mask, a, np.where(np.signbit(a) & (a == 0), a, 0)).astype(dtype) if kw else a
                assert same_bits(got, want), (values, kw, fmt)


def test_ans_compresses_a_pruned_model_below_raw():
    # The kept values of a magnitude-pruned layer (the tails of a bell): about 24 bits a float32
    # value (the docstring's figure), and far below 32 bits for the 16-bit and quantised codecs.
    rng = np.random.default_rng(3)
    w = rng.standard_normal(1 << 16).astype(np.float32) * 0.05
    w[np.abs(w) < np.quantile(np.abs(w), 0.9)] = 0
    nnz = int((w != 0).sum())
    sizes = {v: len(fk.encode_model({"w": w}, values=v, positions="golomb")) for v in ("raw", "ans", "bf16-ans")}
    raw_values = 4 * nnz
    assert sizes["ans"] < sizes["raw"] - raw_values * 0.15
    assert sizes["bf16-ans"] < sizes["raw"] - raw_values * 0.6


# ---------------------------------------------------------------------------------------------
# Hostile blocks: a valid message with its block corrupted precisely, the checksum resealed.

FIELDS = ("word_bits", "shift", "prob_bits", "lanes", "base", "n_symbols", "table_len", "stream_len")


def parse_block(block: bytes) -> dict:
    f = dict(zip(FIELDS, entropy.HEAD.unpack_from(block)))
    at = entropy.HEAD.size
    f["table"] = block[at : at + f["table_len"]]
    at += f["table_len"]
    f["stream"] = block[at : at + f["stream_len"]]
    f["raw"] = block[at + f["stream_len"] :]
    return f


def build_block(f: dict, **lengths: int) -> bytes:
    """The block of fields f; table_len and stream_len those of its pieces unless given."""
    g = {**f, "table_len": len(f["table"]), "stream_len": len(f["stream"]), **lengths}
    return entropy.HEAD.pack(*(g[k] for k in FIELDS)) + g["table"] + g["stream"] + g["raw"]


def varints(freqs: list[int]) -> bytes:
    return entropy._write_table(np.array(freqs, np.uint32))


def freqs_of(f: dict) -> list[int]:
    return entropy._read_table(memoryview(f["table"]), f["n_symbols"], f["prob_bits"], "").tolist()


class Located(NamedTuple):
    """A one-tensor message's body and where its (one) block lies."""

    body: bytes
    stream: bool
    at: int
    length: int
    val_len_at: Optional[int]  # a version 1 record's val_len field
    scale_at: int
    nnz: int


def locate(msg: bytes, name: str = "w", ndim: int = 1) -> Located:
    body = msg[:-4]
    rec = HEADER.size + 2 + len(name.encode()) + 1 + 8 * ndim
    if body[4] == codecs.STREAM_VERSION:
        chunk = rec + STREAM_RECORD.size
        nnz, pos_len = STREAM_CHUNK.unpack_from(body, chunk)[5], STREAM_CHUNK.unpack_from(body, chunk)[8]
        at = chunk + STREAM_CHUNK.size + pos_len
        f = parse_block(body[at:])
        length = entropy.HEAD.size + f["table_len"] + f["stream_len"] + entropy.raw_len(nnz, f["shift"])
        return Located(body, True, at, length, None, chunk + 24, nnz)
    assert body[4] == 1
    fields = RECORD.unpack_from(body, rec)
    at = rec + RECORD.size + fields[10]
    return Located(body, False, at, fields[11], rec + 38, rec + 26, fields[7])


def splice(loc: Located, block: bytes, *, val_len: Optional[int] = None, scale: Optional[float] = None) -> bytes:
    """The message with its block replaced (a version 1 record's val_len set to the block's length
    unless given, its scale replaced when given), resealed."""
    body = bytearray(loc.body[: loc.at] + block + loc.body[loc.at + loc.length :])
    if loc.val_len_at is not None:
        struct.pack_into("<Q", body, loc.val_len_at, len(block) if val_len is None else val_len)
    if scale is not None:
        struct.pack_into("<f", body, loc.scale_at, scale)
    return _reseal(bytes(body))


# Odd sizes, so that the raw bits end within a byte and padding bits exist: 1617 values (6 lanes;
# large enough that every codec's block is smaller than its fixed-width words, which the encoder
# would send instead), and 8193 (32 lanes at 2^12 slots: the encoder's usual model, the native
# decoder's vector loop).
SIZES = (1617, 8193)


def _hostile_base(values: str, dtype: Any, fmt: str, n: int) -> Located:
    rng = np.random.default_rng(12)
    w = rng.standard_normal(n).astype(dtype) + np.asarray(0.1, dtype)  # no zeros: nnz = n
    assert (w != 0).all()
    if fmt == "stream":
        msg = stream_bytes({"w": w}, values=values, positions="bitmask", chunk_elems=16384)
    else:
        msg = fk.encode_model({"w": w}, values=values, positions="bitmask")
    loc = locate(msg)
    assert loc.nnz == n
    return loc


_BASES: dict = {}


def hostile_base(values: str, dtype: Any, fmt: str, n: int) -> Located:
    key = (values, np.dtype(dtype).name, fmt, n)
    if key not in _BASES:
        _BASES[key] = _hostile_base(values, dtype, fmt, n)
    return _BASES[key]


def fields_at(loc: Located) -> dict:
    """The block's fields, and n: its values."""
    return {**parse_block(loc.body[loc.at : loc.at + loc.length]), "n": loc.nnz}


def _four_byte_first(f: dict) -> dict:
    fr = freqs_of(f)
    first = fr[0]
    long = bytes([0x80 | (first & 0x7F), 0x80 | ((first >> 7) & 0x7F), 0x80 | (first >> 14), 0x00])
    return {**f, "table": long + varints(fr[1:])}


def _with_freqs(f: dict, change: Callable[[list[int]], list[int]]) -> dict:
    fr = change(freqs_of(f))
    return {**f, "table": varints(fr), "n_symbols": len(fr)}


def _state(f: dict, lane: int, value: int) -> dict:
    s = bytearray(f["stream"])
    struct.pack_into("<I", s, 4 * lane, value)
    return {**f, "stream": bytes(s)}


def _raw_padding(f: dict) -> dict:
    used = f["n"] * (f["shift"] + 1) % 8
    assert used, "no padding bits to set"
    return {**f, "raw": f["raw"][:-1] + bytes([f["raw"][-1] | 0x80])}


def _top_symbol(f: dict) -> int:
    return ((1 << (f["word_bits"] - 1)) - 1) >> f["shift"]


class Hostile(NamedTuple):
    corrupt: Callable[[dict], Any]  # fields -> a block (bytes), or (block, {val_len=..}) for model messages
    match: str  # what CodecError says: a regex for decode_model of a version 1 message
    stream_match: Optional[str] = None  # for streams, where it differs (None: the same)
    values: str = "ans"
    dtype: Any = np.float32
    scale: Optional[float] = None
    formats: tuple[str, ...] = ("model", "stream")
    model_bug: Optional[str] = None  # a known bug of decode_model: the case is xfail(strict=True) there


HOSTILE = {
    # The frequency table.
    "freqs add up to more": Hostile(lambda f: build_block(_with_freqs(f, lambda fr: [fr[0] + 1, *fr[1:]])),
                                    r"frequencies add up to \d+, not 2\^\d+"),
    "freqs add up to less": Hostile(lambda f: build_block(_with_freqs(f, lambda fr: [max(fr) - 1 if x == max(fr)
                                                                                     else x for x in fr])),
                                    r"frequencies add up to \d+, not 2\^\d+"),
    "a frequency dropped": Hostile(lambda f: build_block(_with_freqs(f, lambda fr: fr[:-1])),
                                   r"frequencies add up to \d+, not 2\^\d+|symbols"),
    "all in one frequency of 2^16": Hostile(lambda f: build_block({**f, "prob_bits": 16, "n_symbols": 1,
                                                                   "table": varints([1 << 16])}),
                                            r"precision 16"),
    "a varint of 4 bytes": Hostile(lambda f: build_block(_four_byte_first(f)), r"a frequency of more than 3 bytes"),
    "a varint never ending": Hostile(lambda f: build_block({**f, "table": f["table"][:-1] + bytes([f["table"][-1]
                                                                                                  | 0x80])}),
                                     r"does not hold exactly \d+ entries"),
    "n_symbols one more than the table": Hostile(lambda f: build_block({**f, "n_symbols": f["n_symbols"] + 1}),
                                                 r"does not hold exactly \d+ entries|a table of"),
    "n_symbols 0": Hostile(lambda f: build_block({**f, "n_symbols": 0}), r"0 symbols from \d+ do not fit"),
    "n_symbols 4097": Hostile(lambda f: build_block({**f, "n_symbols": 4097}), r"4097 symbols from \d+ do not fit"),
    "base + n_symbols beyond the width": Hostile(
        lambda f: build_block({**f, "base": _top_symbol(f) - f["n_symbols"] + 2}), r"symbols from \d+ do not fit"),
    "base 2^64 - 1": Hostile(lambda f: build_block({**f, "base": (1 << 64) - 1}), r"symbols from \d+ do not fit"),
    "table_len longer, stream_len shorter": Hostile(
        lambda f: build_block(f, table_len=len(f["table"]) + 2, stream_len=len(f["stream"]) - 2),
        r"does not hold exactly|a frequency of more than 3 bytes|frequencies add up"),
    "table_len longer than the block": Hostile(lambda f: build_block(f, table_len=len(f["table"]) + 1),
                                               r"take \d+ bytes, their head says \d+", r"."),
    "table_len below n_symbols": Hostile(lambda f: build_block(f, table_len=f["n_symbols"] - 1),
                                         r"a table of \d+ bytes for \d+ symbols"),
    "table_len above 3 n_symbols": Hostile(lambda f: build_block(f, table_len=3 * f["n_symbols"] + 1),
                                           r"a table of \d+ bytes for \d+ symbols"),
    # The head's numbers.
    "shift = word_bits": Hostile(lambda f: build_block({**f, "shift": f["word_bits"]}), r"shift 32 for words of 32"),
    "shift 255": Hostile(lambda f: build_block({**f, "shift": 255}), r"shift 255 for words of 32 bits"),
    "prob_bits 0": Hostile(lambda f: build_block({**f, "prob_bits": 0}), r"precision 0 or \d+ lanes out of range"),
    "prob_bits 16": Hostile(lambda f: build_block({**f, "prob_bits": 16}), r"precision 16 or \d+ lanes out of range"),
    "lanes 0": Hostile(lambda f: build_block({**f, "lanes": 0}), r"precision \d+ or 0 lanes out of range"),
    "lanes 33": Hostile(lambda f: build_block({**f, "lanes": 33}), r"precision \d+ or 33 lanes out of range"),
    "word_bits 16 for float32": Hostile(lambda f: build_block({**f, "word_bits": 16}),
                                        r"words of 16 bits, the values codec has 32"),
    "word_bits 64 for float32": Hostile(lambda f: build_block({**f, "word_bits": 64}),
                                        r"words of 64 bits, the values codec has 32"),
    "word_bits 32 for float64": Hostile(lambda f: build_block({**f, "word_bits": 32}),
                                        r"words of 32 bits, the values codec has 64", dtype=np.float64),
    "word_bits 0 for float64": Hostile(lambda f: build_block({**f, "word_bits": 0}),
                                       r"words of 0 bits, the values codec has 64", dtype=np.float64),
    "word_bits 32 for fp16-ans": Hostile(lambda f: build_block({**f, "word_bits": 32}),
                                         r"words of 32 bits, the values codec has 16", values="fp16-ans"),
    "word_bits 9 for int-ans": Hostile(lambda f: build_block({**f, "word_bits": 9}),
                                       r"words of 9 bits, the values codec has", values="int4-ans"),
    "word_bits 1 for int-ans": Hostile(lambda f: build_block({**f, "word_bits": 1, "shift": 0}),
                                       r"words of 1 bits, the values codec has", values="int4-ans"),
    # The stream's length.
    "stream_len odd": Hostile(lambda f: build_block({**f, "stream": f["stream"] + b"\x00"}),
                              r"a stream of \d+ bytes for \d+ values in \d+ lanes"),
    "stream_len below the states": Hostile(lambda f: build_block({**f, "stream": f["stream"][: 4 * f["lanes"] - 2]}),
                                           r"a stream of \d+ bytes for \d+ values in \d+ lanes"),
    "stream_len 0": Hostile(lambda f: build_block({**f, "stream": b""}), r"a stream of 0 bytes for \d+ values"),
    "stream longer than 2n words": Hostile(
        lambda f: build_block({**f, "stream": f["stream"][: 4 * f["lanes"]] + bytes(2 * f["n"] + 2)}),
        r"a stream of \d+ bytes for \d+ values in \d+ lanes"),
    "stream_len beyond the block": Hostile(lambda f: build_block(f, stream_len=len(f["stream"]) + 2),
                                           r"take \d+ bytes, their head says \d+", r"."),
    # The states and the words.
    "a state below 2^15": Hostile(lambda f: build_block(_state(f, 0, (1 << 15) - 1)), r"initial state out of range"),
    "a state 0": Hostile(lambda f: build_block(_state(f, f["lanes"] - 1, 0)), r"initial state out of range"),
    "a state of 2^31": Hostile(lambda f: build_block(_state(f, 0, 1 << 31)), r"initial state out of range"),
    "a state of 2^32 - 1": Hostile(lambda f: build_block(_state(f, 0, (1 << 32) - 1)), r"initial state out of range"),
    "the stream ends early": Hostile(lambda f: build_block({**f, "stream": f["stream"][:-2]}), r"stream ends early"),
    "the stream leaves a word": Hostile(lambda f: build_block({**f, "stream": f["stream"] + b"\x34\x12"}),
                                        r"stream does not end where its symbols do"),
    "another valid state": Hostile(lambda f: build_block(_state(f, 0, (1 << 30) + 12345)),
                                   r"stream ends early|stream does not end where its symbols do"),
    "raw padding bits set": Hostile(lambda f: build_block(_raw_padding(f)), r"non-zero padding bits"),
    "raw bits one byte short": Hostile(lambda f: build_block({**f, "raw": f["raw"][:-1]}),
                                       r"take \d+ bytes, their head says \d+", r"."),
    "shorter than the head": Hostile(lambda f: (build_block(f), {"val_len": entropy.HEAD.size - 1}),
                                     r"shorter than their head", formats=("model",)),
    # int-ans scales.
    "int-ans scale 0": Hostile(lambda f: build_block(f), r"scale 0.0 is not a positive finite number",
                               values="int4-ans", scale=0.0),
    "int-ans scale -1": Hostile(lambda f: build_block(f), r"scale -1.0 is not a positive finite number",
                                values="int4-ans", scale=-1.0),
    "int-ans scale NaN": Hostile(lambda f: build_block(f), r"scale nan is not a positive finite number",
                                 values="int8-ans", scale=float("nan")),
    "int-ans scale inf": Hostile(lambda f: build_block(f), r"scale inf is not a positive finite number",
                                 values="int2-ans", scale=float("inf")),
    "ans with a scale": Hostile(lambda f: build_block(f), r"scale 1.0 for values that have none", scale=1.0),
    "fp16-ans with a scale": Hostile(lambda f: build_block(f), r"scale -2.0 for values that have none",
                                     values="fp16-ans", scale=-2.0),
}


def _hostile_message(problem: str, fmt: str, n: int) -> bytes:
    h = HOSTILE[problem]
    loc = hostile_base(h.values, h.dtype, fmt, n)
    got = h.corrupt(fields_at(loc))
    block, kw = got if isinstance(got, tuple) else (got, {})
    return splice(loc, block, scale=h.scale, **(kw if fmt == "model" else {}))


def _hostile_params() -> list:
    """(problem, format, n) for every case and the formats it applies to; a known bug's xfail."""
    out = []
    for problem, h in HOSTILE.items():
        for fmt in h.formats:
            marks = [pytest.mark.xfail(reason=h.model_bug, strict=True)] if fmt == "model" and h.model_bug else []
            out += [pytest.param(problem, fmt, n, marks=marks, id=f"{problem}-{fmt}-{n}") for n in SIZES]
    return out


@pytest.mark.parametrize(("problem", "fmt", "n"), _hostile_params())
def test_hostile_blocks_are_refused_alike_in_every_backend(problem, fmt, n):
    h = HOSTILE[problem]
    msg = _hostile_message(problem, fmt, n)
    match = h.match if fmt == "model" or h.stream_match is None else h.stream_match
    decoders = [("decode_model", fk.decode_model)]
    if fmt == "stream":
        decoders.append(("decode_stream", lambda d, **kw: fk.decode_stream(io.BytesIO(d), **kw)))
    said = {}
    for be, _, isa in each_kernels():
        for name, decode in decoders:
            with isa_capped(isa), pytest.raises(fk.CodecError, match=match) as e:
                decode(msg, backend=be.split("/")[0], max_bytes=1 << 20)
            said[be, name] = str(e.value)
    # The message names the tensor (or its chunk) and is the same in every backend.
    assert all(s.startswith("'w'") or "truncated" in s for s in said.values()), said
    for name, _ in decoders:
        assert len({s for (_, nm), s in said.items() if nm == name}) == 1, said


def test_hostile_bases_decode_before_corruption():
    # The messages the hostile cases start from are valid, their blocks where `locate` says.
    for values, dtype in (("ans", np.float32), ("ans", np.float64), ("fp16-ans", np.float32),
                          ("int4-ans", np.float32), ("int2-ans", np.float32), ("int8-ans", np.float32)):
        for fmt in ("model", "stream"):
            for n in SIZES:
                loc = hostile_base(values, dtype, fmt, n)
                f = fields_at(loc)
                assert build_block(f) == loc.body[loc.at : loc.at + loc.length]
                assert f["n_symbols"] > 1 and n * (f["shift"] + 1) % 8, (values, fmt, n)
                want_bits = (8 * np.dtype(dtype).itemsize if values == "ans" else 16 if values == "fp16-ans"
                             else int(values[3:-4]))
                assert f["word_bits"] == want_bits, (values, f["word_bits"])
                assert f["lanes"] == (32 if n >= 8192 else n // 256) and (n < 8192 or f["prob_bits"] == 12), f
                msg = splice(loc, build_block(f))
                assert msg == loc.body + struct.pack("<I", codecs.crc32c(loc.body))
                for be in BACKENDS:
                    assert fk.decode_model(msg, backend=be).tensors["w"].shape == (n,)


def test_values_for_no_values_are_refused():
    msg = fk.encode_model({"w": np.zeros(10, np.float32)}, values="ans", signed_zeros=False)
    loc = locate(msg)
    assert loc.nnz == 0 and loc.length == 0
    bad = splice(loc, b"\x00" * 5)
    for be in BACKENDS:
        with pytest.raises(fk.CodecError, match=r"'w': 5 bytes of values for no values"):
            fk.decode_model(bad, backend=be)


# Mutation fuzzing of messages with entropy-coded values: CodecError only, never more output than
# max_bytes, and the same outcome in every backend. Half the mutations hit the block itself.


def _fuzz_messages() -> list[tuple[bytes, Optional[dict], Optional[Located]]]:
    rng = np.random.default_rng(21)
    w = {"a": (rng.standard_normal((12, 10)) * (rng.random((12, 10)) < 0.4)).astype(np.float32),
         "b": rng.standard_normal(37), "c": np.zeros(0, np.float32), "d": np.array(-2.5, np.float32)}
    shared = {k: rng.random(v.shape) < 0.5 for k, v in w.items()}
    subset = {k: m & (rng.random(m.shape) < 0.5) for k, m in shared.items()}
    one = rng.standard_normal(150).astype(np.float32)
    out: list[tuple[bytes, Optional[dict], Optional[Located]]] = []
    for values in ("ans", "auto", "fp16-ans", "bf16-ans", "int4-ans", "int8-ans", "int2-ans"):
        out.append((fk.encode_model(w, values=values), None, None))
        out.append((fk.encode_model(w, masks=subset, reference=shared, values=values), shared, None))
        with chunk_elems(16):
            out.append((fk.encode_model(w, values=values, positions="golomb"), None, None))
        out.append((stream_bytes(w, masks=subset, reference=shared, values=values, chunk_elems=16), shared, None))
        for msg in (fk.encode_model({"w": one}, values=values, positions="bitmask"),
                    stream_bytes({"w": one}, values=values, positions="bitmask", chunk_elems=256)):
            if values != "auto":
                out.append((msg, None, locate(msg)))
    return out


FUZZ = _fuzz_messages()
LIMIT = 1 << 20


def _decode_outcome(decode: Callable, msg: bytes, ref: Optional[dict], be: str) -> Any:
    try:
        out = decode(msg, reference=ref, max_bytes=LIMIT, backend=be)
    except fk.CodecError as e:
        return f"CodecError: {e}"
    assert sum(t.nbytes for t in out.tensors.values()) <= LIMIT
    return [(k, t.dtype.str, t.shape, t.tobytes()) for k, t in out.tensors.items()]


@_MORE
@given(st.sampled_from(FUZZ), st.data())
def test_fuzz_mutated_entropy_coded_messages(case, data):
    msg, ref, loc = case
    if loc is not None and data.draw(st.booleans()):  # overwrite bytes of the block itself
        body = bytearray(msg[:-4])
        for _ in range(data.draw(st.integers(1, 3))):
            i = data.draw(st.integers(loc.at, loc.at + loc.length - 1))
            body[i] = data.draw(st.integers(0, 255))
    else:
        body = mutated_body(msg, data)
    sealed = _reseal(bytes(body))
    decoders = [fk.decode_model]
    if sealed[4] == codecs.STREAM_VERSION:
        decoders.append(lambda d, **kw: fk.decode_stream(io.BytesIO(d), **kw))
    for decode in decoders:
        for r in ((ref, None) if ref is not None else (None,)):
            outcomes = {be: _decode_outcome(decode, sealed, r, be) for be in BACKENDS}
            first = outcomes[BACKENDS[0]]
            assert all(o == first for o in outcomes.values()), {
                be: o if isinstance(o, str) else "decoded" for be, o in outcomes.items()}


def test_a_hostile_block_fails_quickly():
    # 2^18 values whose last stream word is wrong: the decoder runs through every symbol before it
    # can tell. Linear time, no more: well under a second natively, a few in the reference.
    rng = np.random.default_rng(5)
    w = rng.standard_normal(1 << 18).astype(np.float32)
    w[w == 0] = 1.0
    loc = locate(fk.encode_model({"w": w}, values="ans", positions="bitmask"))
    f = parse_block(loc.body[loc.at : loc.at + loc.length])
    bad = {**f, "stream": f["stream"][:-2] + bytes([f["stream"][-2] ^ 0x55, f["stream"][-1]])}
    msgs = {"last word": splice(loc, build_block(bad)),
            "ends early": splice(loc, build_block({**f, "stream": f["stream"][:-2]})),
            "all of 2^15 slots, 4096 symbols": splice(loc, build_block(
                {**f, "prob_bits": 15, "n_symbols": 4096, "base": 0, "shift": 19, "table": varints([8] * 4096),
                 "raw": bytes(entropy.raw_len(w.size, 19))}))}
    for be in BACKENDS:
        budget = 2.0 if be != "numpy" else 20.0
        for what, msg in msgs.items():
            start = time.perf_counter()
            try:
                fk.decode_model(msg, backend=be)
            except fk.CodecError:
                pass
            assert time.perf_counter() - start < budget, (be, what)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_quantisation_bound_holds_for_subnormal_scales(bits):
    # max|v| / (2^(b-1) - 1) among float32's subnormals: the scale is rounded up, never down (down,
    # the clip would err by many steps).
    from feddip_kernels.codecs.values import quantise

    tiny = np.float32(2.0**-149)
    for peak_ulps in (1, 3, 160, 178, 190, 4099):
        v = np.array([peak_ulps, -peak_ulps // 2, 1, 0], np.float32) * tiny
        q, scale = quantise(v, bits)
        err = np.abs(q.astype(np.float64) * scale - v.astype(np.float64))
        assert err.max() <= scale / 2 + 1e-60, (peak_ulps, scale, err.max())


def test_many_empty_blocks_decode_in_linear_time():
    # Empty records cost a sender nothing: the decoder must not pay for them quadratically.
    import time

    from feddip_kernels import _backend

    empty = entropy.read_block(memoryview(b""), 0, 32, "x")
    k = _backend.kernels("numpy")
    t = time.perf_counter()
    out = entropy.decode_blocks(k, [(empty, 0)] * 50_000, ["x"] * 50_000)
    assert len(out) == 50_000 and time.perf_counter() - t < 2.0


@given(st.lists(st.integers(0, 2**40), min_size=1, max_size=entropy._SHORT), st.integers(1, ANS_MAX_PROB_BITS))
def test_short_histograms_normalise_as_numpy_does(counts, prob_bits):
    """The planner weighs short histograms in Python's ints: the same frequencies as NumPy's path."""
    if not any(counts):
        counts[0] = 1
    if sum(1 for c in counts if c) > 1 << prob_bits:
        return
    a = np.array(counts, dtype=np.uint64)
    short = entropy._normalise_short(counts, prob_bits)
    long = entropy._normalise(np.concatenate((a, np.zeros(entropy._SHORT, np.uint64))), prob_bits)
    assert short == long[: len(counts)].tolist() and not long[len(counts):].any()
    assert sum(short) == 1 << prob_bits and all((f > 0) == (c > 0) for f, c in zip(short, counts))


@given(st.lists(st.integers(0, 10**6), min_size=1, max_size=entropy._SHORT), st.integers(0, 7),
       st.integers(0, 4))
def test_short_histograms_cost_as_numpy_does(counts, shift, base):
    if not any(counts):
        counts[0] = 1
    n = sum(counts)
    a = np.array(counts, dtype=np.uint64)
    assert entropy._cost_bits_short(counts, n, shift) == pytest.approx(entropy._cost_bits(a, n, shift), rel=1e-12,
                                                                       abs=1e-6)
    coarse, up = entropy._coarser(a, base)
    assert entropy._coarser_short(counts, base) == (coarse.tolist(), up) and coarse.dtype == np.uint64


def test_tied_costs_keep_the_finer_shift_on_both_paths():
    """Where a coarser shift costs the same bits (every merged pair of symbols equally counted, the
    table no shorter), float rounding of the two ways of summing must not decide: both paths keep
    the finer shift, so both write the same bytes."""
    counts = [21] * 48
    n = sum(counts)
    short = entropy._search(counts, n, 0, 64, 32, entropy._cost_bits_short, entropy._coarser_short)
    wide = entropy._search(np.array(counts, np.uint64), n, 0, 64, 32, entropy._cost_bits, entropy._coarser)
    assert short[:2] == wide[:2] and short[2] == wide[2].tolist()
    words = np.repeat(np.arange(64, 112, dtype=np.uint32), 21)
    model = entropy.plan(reference, words, 32)
    assert (model.shift, model.base) == short[:2]
