"""Golomb coding of positions in torch operations, where the tensors are (CUDA), so that
encode_model copies to the host only the coded streams, the kept values and the packed bits that
the message takes. The streams are byte for byte those of the native golomb_encode_many
(csrc/golomb.cpp: gaps, unary quotient then a one bit, truncated binary remainder, bits least
significant first); tested on CPU tensors against it (tests/test_torch_golomb.py).

Many independent streams (each tensor's positions, each run of a large tensor, each tensor's
-0.0) are coded by one set of launches over all of them: a launch costs microseconds on a GPU, so
a loop of launches per tensor would cost more than coding on the host. Each code's stop bit and
remainder (at most 32 bits, the quotient's zeros cost nothing) are added into the 64-bit words of
one output at bit offsets from a cumulative sum: codes own disjoint bits, so the sums are ORs.

DeviceSparse is encode_model's and encode_stream's device step: sparsify, count, let the host
choose the codecs and parameters from the counts (one wait for the device), code and copy (a
second wait). The codecs reach it (and Plan) through the device kernels (_torch_kernels, which
_backend.device_kernels() hands out); the packing of bits and the flat buffer of the tensors
(pack_bits, flat_keep) are its own."""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple, Optional, Sequence, cast

import numpy as np
import torch

from .codecs.positions import golomb_max_len

# Eight bool bytes read as one little-endian int64 (byte j is 0 or 1 at bit 8j), times this, hold
# byte j's value at bit 56 + j and nothing that carries into bits 56-63: the top byte is the eight
# packed little-endian (element j is bit j). Tested on every byte pattern.
_GATHER_BITS = 0x0102040810204080


def pack_bits(keep: torch.Tensor) -> torch.Tensor:
    """A flat bool tensor packed little-endian (element i is bit i % 8 of byte i // 8), on its device."""
    flat = keep.reshape(-1).contiguous()
    if not flat.numel():
        return flat.new_zeros(0, dtype=torch.uint8)
    if flat.numel() % 8 or flat.storage_offset() % 8:  # whole int64 words, aligned
        flat = torch.cat([flat, flat.new_zeros(-flat.numel() % 8)])
    words = flat.view(torch.uint8).view(torch.int64) * _GATHER_BITS
    return (words >> 56).to(torch.uint8)


def flat_keep(items: Sequence[tuple[torch.Tensor, Any]], device: torch.device,
              dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, list[int], list[int]]:
    """(flat, keep, sizes, padded sizes) of (tensor, mask) pairs of one device and dtype: the
    tensors one after another in one buffer, each padded with zeros to whole bytes of positions,
    and which of its elements are kept (the mask's, non-zero = kept, else the non-zeros; never
    the padding)."""
    sizes = [t.numel() for t, _ in items]
    padded = [(n + 7) // 8 * 8 for n in sizes]
    zeros = torch.zeros(8, dtype=dtype, device=device)
    pieces = []
    for (t, _), n, pn in zip(items, sizes, padded):
        pieces.append(t.detach().reshape(-1))
        if pn > n:
            pieces.append(zeros[: pn - n])
    flat = torch.cat(pieces) if pieces else zeros[:0]
    keep = flat != 0  # the padding is zero: never kept
    offset = 0
    for (_, mask), n, pn in zip(items, sizes, padded):
        if mask is not None:
            m = torch.as_tensor(mask, device=device).reshape(-1)
            if m.numel() != n:
                raise ValueError(f"mask has {m.numel()} elements, expected {n}")
            keep[offset : offset + n] = m if m.dtype == torch.bool else m != 0
        offset += pn
    return flat, keep, sizes, padded


def _to_host(t: torch.Tensor) -> torch.Tensor:
    """A copy of `t` on the host, without waiting for it (pinned memory) where `t` is on CUDA."""
    if t.device.type != "cuda":
        return t.cpu()
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    return host


def _pinned_table(rows: Sequence[Sequence[int]], device: torch.device) -> torch.Tensor:
    """A small host-made int64 table on `device`, copied without waiting for the device."""
    table = torch.tensor(rows, dtype=torch.int64)
    if device.type != "cuda":
        return table.to(device)
    return table.pin_memory().to(device, non_blocking=True)


def _nonzero(keep: torch.Tensor, count: int) -> torch.Tensor:
    """Flat indices of the `count` set elements of flat bool `keep`: with the count known, no
    wait for the device (nonzero_static) where the device has it."""
    try:
        return torch.nonzero_static(keep, size=count).reshape(-1)
    except (NotImplementedError, RuntimeError):  # a backend without it: nonzero waits for the count
        return torch.nonzero(keep).reshape(-1)


def encode_segments(pos: torch.Tensor, starts: Sequence[int], sizes: Sequence[int], counts: Sequence[int],
                    ms: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """The Golomb streams of many segments of positions, in one set of launches on pos's device.

    `pos`: increasing int64 positions of one index space, segment after segment; segment s spans
    [starts[s], starts[s] + sizes[s]) (segments in increasing order, disjoint) and holds counts[s]
    of them. ms[s] is its Golomb parameter, or 0 for a segment not to code (its positions are
    skipped). Returns (out, lengths, slots), out and lengths on the device: segment s's stream is
    out[slots[s] : slots[s] + lengths[s]]. Each slot holds the most bytes its stream can take
    (golomb_max_len: known on the host before coding, so no wait), zero after the stream."""
    device, n_seg, n_pos = pos.device, len(ms), pos.numel()
    slots, total = [], 0
    for size, count, seg_m in zip(sizes, counts, ms):
        slots.append(total)
        total += golomb_max_len(size, count, seg_m) if seg_m and count else 0  # no position, no byte
    # Words past every slot: the one that the last code may spill into, then the trash that the
    # codes of the segments not coded go to (their bit offsets start there; clamped below).
    trash = total // 8 + 1
    bs = [(m - 1).bit_length() if m else 0 for m in ms]
    # Per segment, made on the host: start, m, cut (2^62 where b = 0: no code has the extra
    # remainder bit), b - 1 and b remainder bits at most (0 where b = 0); and its first code,
    # the code after its last, and the bit offset of its slot.
    per_seg = _pinned_table([(st, m or 1, (1 << b) - m if b else 1 << 62, max(b - 1, 0), max(b, 1))
                             for st, m, b in zip(starts, ms, bs)], device)
    firsts = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)]).tolist()
    bounds = _pinned_table([firsts[:-1], firsts[1:], [8 * slot if m else 64 * trash for slot, m in zip(slots, ms)]],
                           device)
    words = torch.zeros(trash + 2, dtype=torch.int64, device=device)
    if not n_pos:
        return words.view(torch.uint8)[:total], torch.zeros(n_seg, dtype=torch.int64, device=device), slots
    seg = torch.repeat_interleave(torch.arange(n_seg, device=device), bounds[1] - bounds[0], output_size=n_pos)
    start, m, cut, b1, b1_next = per_seg[seg].unbind(1)  # one gather of the segments' fields for all codes
    # Gap: zeros since the previous position, or since the segment's start when that position
    # lies in an earlier segment (it then ends at or before this segment's start).
    gap = pos - torch.maximum(torch.nn.functional.pad(pos[:-1] + 1, (1, 0)), start)
    q = torch.div(gap, m, rounding_mode="floor")
    r = gap - q * m
    big = r >= cut  # truncated binary: b bits from cut on, v = r + cut as (v >> 1, then v & 1)
    v = r + cut
    rem = torch.where(big, (v >> 1) | ((v & 1) << b1), r)
    ends = torch.nn.functional.pad(torch.cumsum(q + big + b1_next, 0), (1, 0))  # bits up to each code
    at = ends[bounds[:2]]  # bits before each segment's first code and after its last
    lengths = (at[1] - at[0] + 7) >> 3
    stop = ends[:-1] + (bounds[2] - at[0])[seg] + q  # bit offset of the code's one bit
    value = (rem << 1) | 1  # the stop bit and the remainder: at most 32 bits, in one or two words
    word, shift = (stop >> 6).clamp_(max=trash), stop & 63
    words.index_add_(0, word, value << shift)
    words.index_add_(0, word + 1, (value >> 1) >> (63 - shift))  # the bits past the word (0 at shift 0)
    return words.view(torch.uint8)[:total], lengths, slots


def _synchronize(devices: Sequence[torch.device]) -> None:
    for device in set(devices):
        if device.type == "cuda":
            torch.cuda.current_stream(device).synchronize()


def golomb_encode_many(items: Sequence[tuple[torch.Tensor, int]]) -> list[bytes]:
    """golomb_encode_many (the native kernel's streams) of (flat bool tensor, m) items of one
    device: one set of launches for all, one wait."""
    if not items:
        return []
    device = items[0][0].device
    joined = torch.cat([t.reshape(-1) for t, _ in items])
    sizes = [t.numel() for t, _ in items]
    starts = np.concatenate([[0], np.cumsum(sizes)])[:-1].tolist()
    ends = _pinned_table([starts, sizes], device)
    csum = torch.cat([ends.new_zeros(1), joined.cumsum(0)])
    counts = (csum[ends[0] + ends[1]] - csum[ends[0]]).tolist()  # waits for the device
    out, lengths, slots = encode_segments(_nonzero(joined, sum(counts)), starts, sizes, counts, [m for _, m in items])
    out, lengths = _to_host(out), _to_host(lengths)
    _synchronize([device])
    data = out.numpy()
    return [data[s : s + n].tobytes() for s, n in zip(slots, lengths.tolist())]


class Fetched(NamedTuple):
    """What DeviceSparse.fetch brings to the host for one item."""

    vals: np.ndarray  # the kept values, in position order
    bits: Optional[np.ndarray]  # packed positions over the item's elements, when asked for or coded with m = 1
    streams: list[Optional[np.ndarray]]  # each run's Golomb stream (None: not coded)
    negative: Optional[np.ndarray]  # packed -0.0 off the positions, when asked for
    sign_stream: Optional[np.ndarray]  # their Golomb stream, when coded


class Plan(NamedTuple):
    """The host's choice for one item, from its counts: Golomb parameters (0: no stream)."""

    ms: Sequence[int]  # one a run
    bits: bool  # fetch the packed positions
    sign_m: int
    sign_bits: bool  # fetch the packed -0.0


class _Group:
    """The items of one device and dtype in one flat buffer (each padded to whole bytes): the
    elements kept, the -0.0 off them that are wanted (`negative`, an index space of its own
    after `keep`'s), and the segments (each run of positions, each set of -0.0): (start in that
    space, size)."""

    def __init__(self, items: Sequence[tuple[torch.Tensor, Any, bool]], run: Optional[int]) -> None:
        t0 = items[0][0]
        self.device = t0.device
        self.flat, self.keep, self.sizes, self.padded = flat_keep([(t, mask) for t, mask, _ in items], t0.device,
                                                                  t0.dtype)
        self.offsets = np.concatenate([[0], np.cumsum(self.padded, dtype=np.int64)])[:-1].tolist()
        self.n = self.keep.numel()
        signed = [s for _, _, s in items]
        self.negative = None
        if any(signed):
            ints = self.flat.view(torch.int32 if self.flat.element_size() == 4 else torch.int64)
            self.negative = ints == torch.iinfo(ints.dtype).min  # -0.0
            self.negative &= ~self.keep  # a mask's -0.0 are values
            if not all(signed):
                self.negative &= self.per_element(signed)
        self.runs = [[(o + s, min(run, n - s)) for s in range(0, n, run)] if run and n > run else [(o, n)]
                     for o, n in zip(self.offsets, self.sizes)]
        self.signs = [(self.n + o, n) if s else None for o, n, s in zip(self.offsets, self.sizes, signed)]
        # Counts of all segments (runs, then -0.0 sets), from sums over words of 8 elements:
        # segments start at whole words.
        segs = [seg for runs in self.runs for seg in runs] + [seg for seg in self.signs if seg is not None]
        words = [b.view(-1, 8).sum(1) for b in (self.keep, self.negative) if b is not None]
        csum = torch.cat([words[0].new_zeros(1), *words]).cumsum(0)
        bounds = _pinned_table([[s // 8 for s, _ in segs], [(s + n + 7) // 8 for s, n in segs]], self.device)
        self.counts = _to_host(csum[bounds[1]] - csum[bounds[0]])

    def per_element(self, flags: Sequence[bool]) -> torch.Tensor:
        """Each item's flag over its (padded) elements: one launch, not one an item."""
        table = _pinned_table([[int(f) for f in flags], self.padded], self.device)
        return torch.repeat_interleave(table[0].bool(), table[1], output_size=self.n)

    def item_counts(self) -> list[tuple[list[tuple[int, int]], Optional[int]]]:
        """Each item's ([(run size, positions in it)], -0.0 off them or None), once the counts
        are on the host."""
        counts = iter(self.counts.tolist())
        runs = [[(size, next(counts)) for _, size in item] for item in self.runs]
        return [(r, None if seg is None else next(counts)) for r, seg in zip(runs, self.signs)]

    def launch(self, plans: Sequence[Plan]) -> dict[str, Any]:
        """Queue the coding and the copies to the host that the items' plans ask for; nothing
        here waits for the device."""
        counts = self.item_counts()
        pos = _nonzero(self.keep, sum(c for runs, _ in counts for _, c in runs))
        job: dict[str, Any] = {"vals": _to_host(self.flat[pos]), "plans": plans, "counts": counts}
        starts, sizes, seg_counts, ms = [], [], [], []
        for item, (runs, _), plan in zip(self.runs, counts, plans):
            for (start, size), (_, c), m in zip(item, runs, plan.ms):
                starts.append(start)
                sizes.append(size)
                seg_counts.append(c)
                ms.append(m)
        coded = [j for j, ((_, negatives), plan) in enumerate(zip(counts, plans)) if negatives and plan.sign_m]
        # An item with -0.0 counted has its sign segment, and self.negative is there.
        sign_counts = {j: cast(int, counts[j][1]) for j in coded}
        for j in coded:
            starts.append(cast("tuple[int, int]", self.signs[j])[0])
            sizes.append(self.sizes[j])
            seg_counts.append(sign_counts[j])
            ms.append(plans[j].sign_m)
        if coded:  # the -0.0 of the sets coded only: others (bitmasks) would cost time for nothing
            wanted = cast(torch.Tensor, self.negative)
            if len(coded) < sum(1 for _, negatives in counts if negatives):
                wanted = wanted & self.per_element([j in coded for j in range(len(plans))])
            pos = torch.cat([pos, _nonzero(wanted, sum(sign_counts.values())) + self.n])
        job["coded_signs"] = coded
        if any(ms):
            streams, lengths, job["slots"] = encode_segments(pos, starts, sizes, seg_counts, ms)
            job["streams"], job["lengths"] = _to_host(streams), _to_host(lengths)
        for key, space, want in (("bits", self.keep, [p.bits for p in plans]),
                                 ("negative", self.negative, [p.sign_bits for p in plans])):
            ranges = [(o // 8, (n + 7) // 8) for o, n, w in zip(self.offsets, self.sizes, want) if w]
            if ranges:
                packed, at = _take_ranges(pack_bits(cast(torch.Tensor, space)), ranges)  # asked for: there
                job[key], job[key + "_at"] = _to_host(packed), iter(at)
        return job

    def unpack(self, job: dict[str, Any]) -> list[Fetched]:
        """The items' Fetched from a launch's copies, once they are on the host."""
        vals = job["vals"].numpy()
        data = job["streams"].numpy() if "streams" in job else None
        segments = iter(zip(job["slots"], job["lengths"].tolist())) if data is not None else iter(())

        def stream(coded: bool) -> Optional[np.ndarray]:
            """The next segment's stream (each segment has a slot, empty when not coded)."""
            at, n = next(segments, (0, 0))
            return data[at : at + n] if coded and data is not None else None

        def packed(key: str, n: int) -> np.ndarray:
            return job[key].numpy()[next(job[key + "_at"]) :][: (n + 7) // 8]

        out, start = [], 0
        for j, ((runs, _), plan) in enumerate(zip(job["counts"], job["plans"])):
            nnz = sum(c for _, c in runs)
            streams = [stream(m > 0) for m in plan.ms]
            bits = packed("bits", self.sizes[j]) if plan.bits else None
            if bits is None and all(m == 1 for m in plan.ms):  # each stream is its run's bitmask, cut short
                coded_runs = cast("list[np.ndarray]", streams)  # m = 1 > 0: every run coded
                bits = np.concatenate([np.pad(s, (0, (size + 7) // 8 - s.size))
                                       for s, (size, _) in zip(coded_runs, runs)])
            out.append(Fetched(vals[start : start + nnz], bits, streams,
                               packed("negative", self.sizes[j]) if plan.sign_bits else None, None))
            start += nnz
        for j in job["coded_signs"]:  # their streams follow the runs'
            out[j] = out[j]._replace(sign_stream=stream(True))
        return out


def _take_ranges(src: torch.Tensor, ranges: Sequence[tuple[int, int]]) -> tuple[torch.Tensor, list[int]]:
    """(the bytes of `src` at the (start, length) ranges, where each range begins in it): a
    gather of just them, or `src` itself when they are most of it."""
    total = sum(n for _, n in ranges)
    if 2 * total >= src.numel():
        return src, [s for s, _ in ranges]
    at = np.concatenate([[0], np.cumsum([n for _, n in ranges], dtype=np.int64)])[:-1].tolist()
    table = _pinned_table([[s - a for (s, _), a in zip(ranges, at)], [n for _, n in ranges]], src.device)
    index = torch.arange(total, device=src.device) + torch.repeat_interleave(table[0], table[1], output_size=total)
    return src[index], at


class DeviceSparse:
    """Sparsify (tensor, mask, signs) items where they are and code their positions there, in
    two steps with the host's choice between them. Construction finds each item's kept
    positions (the mask's, else the non-zeros) and, with `signs`, its -0.0 off them, and counts
    them per run of `run` elements (one run for an item of at most `run`, or with run None):
    `counts` (one wait for the device). `fetch` then takes a Plan an item (from the counts, the
    Golomb parameters by the host's own golomb_parameter) and returns what it asks for on the
    host (a second wait). The items of one device and dtype go as one (a group)."""

    def __init__(self, items: Sequence[tuple[torch.Tensor, Any, bool]], run: Optional[int]) -> None:
        by_kind: dict[tuple[torch.device, torch.dtype], list[int]] = {}
        for i, (t, _, _) in enumerate(items):
            by_kind.setdefault((t.device, t.dtype), []).append(i)
        self.members = list(by_kind.values())
        self.groups = [_Group([items[i] for i in idx], run) for idx in self.members]
        _synchronize([g.device for g in self.groups])  # the counts' copies
        self._counts: list[Any] = [None] * len(items)
        for idx, g in zip(self.members, self.groups):
            for i, c in zip(idx, g.item_counts()):
                self._counts[i] = c

    def counts(self) -> list[tuple[list[tuple[int, int]], Optional[int]]]:
        """Each item's ([(run size, positions in it)], number of -0.0 off them or None)."""
        return list(self._counts)

    def fetch(self, plans: Sequence[Plan]) -> list[Fetched]:
        """What each item's Plan asks for (and its values) on the host."""
        jobs = [g.launch([plans[i] for i in idx]) for idx, g in zip(self.members, self.groups)]
        _synchronize([g.device for g in self.groups])
        out: list[Any] = [None] * len(plans)
        for idx, g, job in zip(self.members, self.groups, jobs):
            for i, got in zip(idx, g.unpack(job)):
                out[i] = got
        return out


def time_encode_model(tensors: Mapping[str, torch.Tensor], repeats: int = 20, **options: Any) -> dict[str, float]:
    """For a GPU script (not used by the library): median milliseconds, over `repeats` runs after
    a warm-up, of encode_model of the device `tensors` with `options` ("device"), of a dense copy
    of them to the host (`.cpu()` each: "dense_cpu", the baseline) and of encode_model of those
    host copies ("host"), and dense_cpu / device ("speedup"). Raises AssertionError when the
    device's message is not the host's."""
    import statistics
    import time

    from .codecs import encode_model

    def median_ms(f: Any) -> tuple[float, Any]:
        out = f()  # warm-up: pinned buffers, kernels, allocator
        times = []
        for _ in range(repeats):
            _synchronize([t.device for t in tensors.values()])
            start = time.perf_counter()
            out = f()
            _synchronize([t.device for t in tensors.values()])
            times.append(time.perf_counter() - start)
        return 1e3 * statistics.median(times), out

    device, message = median_ms(lambda: encode_model(tensors, **options))
    dense, host_tensors = median_ms(lambda: {k: v.cpu() for k, v in tensors.items()})
    host, expected = median_ms(lambda: encode_model(host_tensors, **options))
    assert message == expected, "the device's message differs from the host's"
    return {"device": device, "dense_cpu": dense, "host": host, "speedup": dense / device}
