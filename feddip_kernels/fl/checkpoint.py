"""Simulation checkpoints in the library's own formats, never pickle (loading a pickle runs
whatever it holds): a small header, JSON for the configuration and history, one wire-format
message (docs/wire-format.md) for the tensors, and a checksum of the whole file. Everything is
validated on load against the run being resumed; any problem raises CodecError.

    "FDKC" | version u8 (3 for a compact run, else 2) | reserved u8 * 3 = 0 | json_len u32
    | JSON (UTF-8) | message | CRC-32C u32 of every byte before it

Message tensors: "w/<name>" the global model, its prunable tensors coded with the global mask as
their positions (zeros under the mask included); "k<j>/<name>" (j = 0, 1, ...) the j-th other mask
that some client last received, over the prunable tensors (positions only, zero values). A run
with the compact coding (protocol.transport) adds, for each client c contacted so far,
"h<c>/<name>" the model c holds (the same bits at both ends; zero outside the mask it holds) and,
where it has one, "r<c>/<name>" its residual (the uplink's quantisation error not yet sent), every
tensor of both coded without a mask (positions: its non-zeros; -0.0 kept). Values are raw, or for
a compact run lossless and entropy-coded where that is smaller (values "auto"): every byte comes
back. The JSON: {"config": the SimulationConfig, "round": rounds done, "has_mask": whether there
is a global mask, "prunable": the pruned tensors' names, "client_masks": {client id: j, or -1 for
the global mask}, "history": one row per round done, "compact": null, or for a compact run
{"init_crc": the initial model's CRC-32C (the init frame's), "held": the clients contacted, in the
order first contacted, "residual": those with a residual, in the same order}}. A client's end of
the compact transport holds the global mask it last received, its entry in client_masks (none
before round 1), which is not stored twice.

Version 2 is version 3 without "compact": runs without the compact coding still write it, so
that earlier releases read their files; a version 2 file of a compact run is refused (none was
ever written). Version 1 files (no checksum) are refused with a message saying so: such a run is
started again rather than resumed from a file that nothing vouches for. Configurations written
before the coding, rounding and residual_feedback settings read as the plain coding's (what those
runs used).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import struct
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Optional

import numpy as np

from ..codecs import CodecError, crc32c, decode_model, encode_model
from ..protocol.transport import model_crc
from ..storage import parse_json
from .state import ServerState, SimulationConfig, initial_state

if TYPE_CHECKING:
    from torch import nn

MAGIC = b"FDKC"
VERSION = 3
_READ = (2, 3)  # the versions load_checkpoint reads
_HEADER = struct.Struct("<4sB3sI")
_CRC = struct.Struct("<I")
_Fail = Callable[[str], CodecError]  # an error naming the checkpoint file
_CURRENT = -1  # a client holding the current global mask
_META_KEYS_2 = frozenset(["config", "round", "has_mask", "prunable", "client_masks", "history"])
_META_KEYS = _META_KEYS_2 | {"compact"}
_COMPACT_KEYS = frozenset(["init_crc", "held", "residual"])
_CLIENT_ID = re.compile(r"(0|[1-9][0-9]{0,9})")  # a client id as str(int) writes it
# A history row's fields as run_simulation writes them: counts (ints >= 0), reals (ints or floats),
# sparsity_target (a real or null) and failures (strings). A bool is never a number here.
_ROW_COUNTS = ("round", "bytes_up", "bytes_down", "bytes_total", "bytes_authors", "clients", "clients_failed")
_ROW_REALS = ("accuracy", "loss", "sparsity", "lr", "lambda", "time_train", "time_prune", "time_encode")
_ROW_KEYS = frozenset(_ROW_COUNTS + _ROW_REALS + ("sparsity_target", "failures"))
_ROW_LATER = frozenset(("time_evaluate", "time_round"))  # reals that older rows lack (both of them)
_ROW_TIMES = ("time_train", "time_prune", "time_encode", *sorted(_ROW_LATER))
# Settings that configurations written by earlier versions lack (all of them), with the values
# those runs had. A configuration that lacks only some of them is no version's, and is refused.
_LATER_CONFIG = {"coding": "plain", "rounding": "nearest", "residual_feedback": True}


@dataclass
class CompactState:
    """The compact coding's state beside the server's (protocol.transport): `init_crc`, the initial
    model's CRC-32C (protocol.transport.model_crc, which the init frame carries); `held[c]`, the
    model each contacted client c holds (ServerEnd.held[c], the same bits as the client's), in the
    order first contacted; `residual[c]`, a client's residual (ClientEnd.residual: every tensor)
    where it has one. A client's mask (ClientEnd.masks) is its entry in ServerState.client_masks ({}
    before it received one)."""

    init_crc: int = 0
    held: dict[int, dict[str, np.ndarray]] = field(default_factory=dict)
    residual: dict[int, dict[str, np.ndarray]] = field(default_factory=dict)


def save_checkpoint(path: str, state: ServerState, compact: Optional[CompactState] = None) -> None:
    """Write `state` atomically (a temporary file, flushed to disk, then renamed over `path`);
    `compact`: the clients' state of a run with the compact coding (needed for one, refused for
    any other)."""
    if state.config.compact != (compact is not None):
        raise ValueError("a run with the compact coding is checkpointed with its clients' state (compact=), "
                         "any other without" if compact is None else "compact= for a run without the compact coding")
    server = state.server
    tensors = {f"w/{k}": v for k, v in server.weights.items()}
    masks = {f"w/{k}": m for k, m in server.masks.items()}
    held: dict[int, int] = {}  # id of a mask set -> its index (_CURRENT for the global mask)
    if server.masks:
        held[id(server.masks)] = _CURRENT
    clients = {}
    for client, m in state.client_masks.items():
        if id(m) not in held:
            j = held[id(m)] = len([v for v in held.values() if v != _CURRENT])
            for k, mk in m.items():
                tensors[f"k{j}/{k}"] = np.zeros(mk.shape, np.float32)
                masks[f"k{j}/{k}"] = mk
        clients[str(client)] = held[id(m)]
    saved = None
    values = "raw"
    if compact is not None:
        residual = [c for c in compact.held if compact.residual.get(c)]
        if len(residual) != sum(bool(e) for e in compact.residual.values()):
            raise ValueError("a residual of a client that holds no model")
        for prefix, models in (("h", compact.held), ("r", {c: compact.residual[c] for c in residual})):
            for c, model in models.items():
                if model.keys() != server.weights.keys():
                    raise ValueError(f"client {c}'s held model or residual does not hold the model's tensors")
                tensors.update({f"{prefix}{c}/{k}": v for k, v in model.items()})
        saved = {"init_crc": int(compact.init_crc), "held": [int(c) for c in compact.held],
                 "residual": [int(c) for c in residual]}
        values = "auto"  # every client's model and residual: entropy-coded where that is smaller
    meta = {
        "config": dataclasses.asdict(state.config),
        "round": server.round,
        "has_mask": bool(server.masks),
        "prunable": server.prunable,
        "client_masks": clients,
        "history": state.history,
    }
    version = 2  # what a run without the compact coding holds: readable by earlier releases
    if compact is not None:
        meta["compact"], version = saved, VERSION
    body = json.dumps(meta).encode("utf-8")
    message = encode_model(tensors, masks=masks, values=values)
    data = _HEADER.pack(MAGIC, version, bytes(3), len(body)) + body + message
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data + _CRC.pack(crc32c(data)))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path: str, cfg: SimulationConfig, model: nn.Module) -> ServerState:
    """The server's state saved at `path`, for a run of `cfg` with `model`'s architecture (a run with
    the compact coding resumes with read_checkpoint, which also returns its clients' state). Raises
    CodecError (a ValueError) for a file that is not a valid checkpoint of this run: corrupt (the
    checksum covers every byte), of another format version, or with any JSON field of the wrong type,
    out of range or inconsistent with the configuration, the model, the message or the other fields.
    Only `rounds` may differ from the run's configuration, and only when `cfg.horizon` fixes the
    schedules (then a finished run can be extended)."""
    return read_checkpoint(path, cfg, model)[0]


def read_checkpoint(path: str, cfg: SimulationConfig, model: nn.Module
                    ) -> tuple[ServerState, Optional[CompactState]]:
    """(the server's state, the clients' state: None unless `cfg` has the compact coding) saved at
    `path`, validated as load_checkpoint says. For the compact coding `model` must also hold the
    run's initial weights (as run_simulation builds it: torch.manual_seed(seed_for(cfg.seed, 0)),
    then make_model), from which the clients' models derive: init_crc must be theirs. The clients
    contacted are those the rounds done sampled, in the order first contacted; residuals are
    theirs (none without residual feedback); a held model's masked tensors are zero outside the
    mask that client holds, and a client last contacted in round 0 holds the initial model (round
    0 sends it the init frame alone)."""

    data, version, meta, json_len, fail = _read_meta(path)
    state = initial_state(cfg, model)
    server = state.server
    rounds_done = _check_config(meta["config"], cfg, meta["round"], fail)
    if version != VERSION and cfg.compact:
        raise fail(f"checkpoint format {version} holds no compact coding state, and no run with that coding wrote one")
    body_end = len(data) - _CRC.size
    # The first round (t = 0) always makes a pruning run's global mask, and checkpoints are written
    # after a round: a pruning run's checkpoint has one, FedAvg's none.
    has_mask = server.prune and bool(server.prunable)
    if meta["has_mask"] is not has_mask:
        raise fail(f"has_mask is {meta['has_mask']!r}; a {cfg.algorithm} run has {'a' if has_mask else 'no'} "
                   "global mask after its first round")
    if meta["prunable"] != server.prunable:
        raise fail("its prunable tensors are not this model's")
    expected = _expected_client_masks(cfg, rounds_done) if has_mask else {}
    holders = _check_client_masks(meta["client_masks"], expected, cfg.clients, fail)
    if not isinstance(meta["history"], list) or len(meta["history"]) != rounds_done:
        raise fail(f"the history does not have one row for each of the {rounds_done} rounds done")
    n_fixed = sum(v.size for k, v in server.weights.items() if k not in server.prunable)  # never pruned
    _check_history(meta["history"], cfg, n_fixed, sum(v.size for v in server.weights.values()), fail)
    last_contact = _expected_contacts(cfg, rounds_done) if cfg.compact else {}
    held, residual = _check_compact(meta.get("compact"), cfg, list(last_contact), server.weights, fail)

    # The message must hold exactly these tensors (checked before anything is allocated).
    expect: dict[str, tuple[tuple[int, ...], Any]] = {f"w/{k}": (v.shape, v.dtype) for k, v in server.weights.items()}
    for j in sorted(set(holders.values()) - {_CURRENT}):
        expect.update({f"k{j}/{k}": (server.weights[k].shape, np.float32) for k in server.prunable})
    for prefix, clients in (("h", held), ("r", residual)):
        for c in clients:
            expect.update({f"{prefix}{c}/{k}": (v.shape, v.dtype) for k, v in server.weights.items()})
    size = sum(math.prod(shape) * np.dtype(dt).itemsize for shape, dt in expect.values())
    try:
        decoded = decode_model(memoryview(data)[_HEADER.size + json_len : body_end], expect=expect, max_bytes=size)
    except CodecError as e:
        raise fail(f"the tensors do not fit this run: {e}") from None

    init = server.weights
    server.weights = {k: decoded.tensors[f"w/{k}"] for k in server.weights}
    server.masks = {k: decoded.masks[f"w/{k}"] for k in server.prunable} if has_mask else {}
    server.round = rounds_done
    sets: dict[int, dict[str, np.ndarray]] = {_CURRENT: server.masks}
    for client, j in holders.items():
        if j not in sets:
            if any(decoded.tensors[f"k{j}/{k}"].any() for k in server.prunable):
                raise fail(f"mask set {j} carries values; it holds positions only")
            sets[j] = {k: decoded.masks[f"k{j}/{k}"] for k in server.prunable}
            # Masks only shrink during a run (new ones are taken inside the old), so a mask a client
            # received earlier contains the current one.
            if any((server.masks[k] & ~m).any() for k, m in sets[j].items()):
                raise fail(f"mask set {j} does not contain the global mask, which no run produces")
        state.client_masks[client] = sets[j]
    state.history = meta["history"]
    if not cfg.compact:
        return state, None
    compact = CompactState(init_crc=meta["compact"]["init_crc"])
    for c in held:
        model_c = compact.held[c] = {k: decoded.tensors[f"h{c}/{k}"] for k in server.weights}
        outside = [k for k, m in state.client_masks.get(c, {}).items() if model_c[k][~m].any()]
        if outside:
            raise fail(f"client {c}'s held model has values outside the mask it holds (in {', '.join(outside)})")
        if last_contact[c] == 0 and any(v.tobytes() != init[k].tobytes() for k, v in model_c.items()):
            raise fail(f"client {c}, last contacted in round 0, holds another model than the initial one")
    compact.residual = {c: {k: decoded.tensors[f"r{c}/{k}"] for k in server.weights} for c in residual}
    return state, compact



def _read_meta(path: str) -> tuple[bytes, int, dict, int, _Fail]:
    """(the file's bytes, its format version, its JSON part, that part's length, an error maker
    naming the file): the header, checksum and JSON fields checked; CodecError otherwise."""
    with open(path, "rb") as f:
        data = f.read()

    def fail(why: str) -> CodecError:
        return CodecError(f"checkpoint {path}: {why}")

    if len(data) < _HEADER.size + _CRC.size:
        raise fail(f"{len(data)} bytes is shorter than a header and checksum: truncated")
    magic, version, reserved, json_len = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise fail("not a feddip checkpoint (bad magic)")
    if version == 1:
        raise fail("written by an earlier feddip-kernels in checkpoint format 1, which has no checksum and is "
                   "not resumed; start the run again without --resume")
    if version not in _READ or reserved != bytes(3):
        raise fail(f"unsupported checkpoint format version {version} or reserved bytes (this library reads "
                   f"{' and '.join(map(str, _READ))})")
    body_end = len(data) - _CRC.size
    if json_len > body_end - _HEADER.size:
        raise fail("truncated: the JSON length runs past the end of the file")
    if crc32c(memoryview(data)[:body_end]) != _CRC.unpack_from(data, body_end)[0]:
        raise fail("checksum mismatch: the file is corrupt")
    try:
        meta = parse_json(data[_HEADER.size : _HEADER.size + json_len], "the JSON part")
    except CodecError as e:
        raise fail(str(e)) from None
    keys = _META_KEYS if version == VERSION else _META_KEYS_2
    if not isinstance(meta, dict) or set(meta) != keys:
        raise fail(f"the JSON part is not an object with exactly the fields {sorted(keys)}")
    return data, version, meta, json_len, fail


def check_checkpoint(path: str, cfg: SimulationConfig) -> int:
    """The rounds done by the checkpoint at `path`, after the checks that need no model: the file
    whole (header, checksum, JSON fields) and written by a run of `cfg` (only `rounds` may differ,
    as load_checkpoint says). What `feddip simulate --resume` checks of every run before any runs.
    CodecError otherwise."""
    _, version, meta, _, fail = _read_meta(path)
    rounds_done = _check_config(meta["config"], cfg, meta["round"], fail)
    if version != VERSION and cfg.compact:
        raise fail(f"checkpoint format {version} holds no compact coding state, and no run with that coding wrote one")
    return rounds_done

def _check_config(before: Any, cfg: SimulationConfig, rounds_done: Any, fail: _Fail) -> int:
    """The number of rounds done, after checking the saved configuration against `cfg` (types
    included: JSON's 1 and true, or 1 and 1.0, are different settings) and the round against both."""
    now = dataclasses.asdict(cfg)
    if isinstance(before, dict) and set(now) - set(before) == _LATER_CONFIG.keys() and set(before) <= set(now):
        before = {**before, **_LATER_CONFIG}  # written before these settings: the runs they describe
    if not isinstance(before, dict) or set(before) != set(now) or type(before["rounds"]) is not int:
        raise fail("was written with a different configuration (its config is not a SimulationConfig)")
    differ = [k for k in now if k != "rounds" and json.dumps(before[k]) != json.dumps(now[k])]
    if differ:
        what = "; ".join(f"{k} {json.dumps(before[k])} there, {json.dumps(now[k])} here" for k in differ)
        raise fail(f"was written with a different configuration ({what}; only --rounds may change, and only "
                   "when --horizon fixes the schedules)")
    if type(rounds_done) is not int or not 1 <= rounds_done <= before["rounds"]:
        raise fail(f"round {rounds_done!r} is not a number of rounds done in [1, {before['rounds']}]")
    if before["rounds"] != cfg.rounds and (cfg.horizon is None or cfg.rounds < rounds_done):
        raise fail(f"was written with a different configuration ({before['rounds']} rounds; only --rounds may "
                   "change, and only when --horizon fixes the schedules and the new total covers the rounds done)")
    return rounds_done


def _expected_client_masks(cfg: SimulationConfig, rounds_done: int) -> dict[str, int]:
    """client_masks as save_checkpoint writes it after `rounds_done` rounds of a pruning run: the
    clients sampled in rounds 1 .. rounds_done - 1 (round 0 sends no mask), in the order they were
    first sampled, each with the global mask of the last round that sampled it: -1 while that is
    the current one, else its mask set's index, numbered in order of first use."""
    schedule = cfg.schedule
    made = 0  # global masks made before round t (every mask round makes a new one)
    received: dict[int, int] = {}  # client -> the mask it holds, by number; keeps first-seen order
    for t in range(rounds_done):
        if t >= 1:
            for c in cfg.clients_in_round(t):
                received[c] = made
        made += schedule.updates_mask(t)
    index: dict[int, int] = {}
    return {str(c): -1 if m == made else index.setdefault(m, len(index)) for c, m in received.items()}


def _expected_contacts(cfg: SimulationConfig, rounds_done: int) -> dict[int, int]:
    """The clients a compact run has contacted after `rounds_done` rounds, in the order first
    contacted, each with the last round that contacted it: every client sampled (a round contacts
    each client it samples before training it, so a client that then fails was contacted all the
    same)."""
    last: dict[int, int] = {}
    for t in range(rounds_done):
        for c in cfg.clients_in_round(t):
            last[c] = t
    return last


def _check_compact(saved: Any, cfg: SimulationConfig, contacted: list[int], init: dict[str, np.ndarray],
                   fail: _Fail) -> tuple[list[int], list[int]]:
    """(the clients whose held models the message holds, those whose residuals it holds): the JSON
    "compact" field, null unless `cfg` has the compact coding, checked against the run's initial
    model `init`, the clients the rounds done contacted (`contacted`, in the order first contacted)
    and the configuration."""
    if not cfg.compact:
        if saved is not None:
            raise fail("compact is not null, and the run has no compact coding state")
        return [], []
    if not isinstance(saved, dict) or set(saved) != _COMPACT_KEYS:
        raise fail(f"compact is not an object with exactly the fields {sorted(_COMPACT_KEYS)}")
    crc = model_crc(init)
    if json.dumps(saved["init_crc"]) != json.dumps(crc):
        raise fail(f"compact.init_crc is not {crc}, the CRC-32C of this run's initial model, from which the clients' "
                   "models derive (the run started from another initial model: another model, seed or torch?)")
    if json.dumps(saved["held"]) != json.dumps(contacted):  # as text: JSON's 1, 1.0 and true differ
        raise fail(f"compact.held is not the list of the clients the rounds done contacted, in the order first "
                   f"contacted: {contacted}")
    residual = saved["residual"]
    if not isinstance(residual, list) or not all(type(c) is int for c in residual):
        raise fail("compact.residual is not a list of client ids")
    if residual and not cfg.residual_feedback:
        raise fail("compact.residual lists clients, and the run has no residual feedback (it keeps no residuals)")
    rank = {c: i for i, c in enumerate(contacted)}
    for c in residual:
        if c not in rank:
            raise fail(f"compact.residual names client {c}, which the rounds done did not contact")
    ranks = [rank[c] for c in residual]
    if ranks != sorted(set(ranks)):
        raise fail("compact.residual lists a client twice, or in another order than the one first contacted")
    return contacted, residual


def _check_client_masks(clients: Any, expected: dict[str, int], n_clients: int, fail: _Fail) -> dict[int, int]:
    """client id -> mask set index (_CURRENT: the global mask), which the configuration and the
    rounds done determine: anything else is refused."""
    if json.dumps(clients) == json.dumps(expected):  # as text: JSON's 1, 1.0 and true differ
        return {int(c): j for c, j in expected.items()}
    if not isinstance(clients, dict):
        raise fail("client_masks is not an object")
    for key, j in clients.items():
        if not _CLIENT_ID.fullmatch(key) or int(key) >= n_clients:
            raise fail(f"client_masks names client {key!r}, not one of the run's {n_clients} clients")
        if key not in expected or json.dumps(j) != json.dumps(expected[key]):
            raise fail(f"client_masks: client {key} holds mask set {j!r}; the rounds done sent it "
                       f"{'none' if key not in expected else expected[key]} (-1: the global mask)")
    missing = sorted(set(expected) - set(clients), key=int)
    raise fail(f"client_masks lacks clients {missing} that the rounds done sent masks to" if missing else
               "client_masks lists the clients in another order than the one they first received masks in")


def _check_history(history: Any, cfg: SimulationConfig, n_fixed: int, n_weights: int, fail: _Fail) -> None:
    """One row for each round done, each with the fields run_simulation writes, of their types and
    ranges, the byte totals adding up and the client counts those of the round's sample (the results
    themselves, such as accuracy or bytes, cannot be checked without rerunning the round)."""
    total = 0
    for i, row in enumerate(history):
        if not isinstance(row, dict) or set(row) not in (_ROW_KEYS, _ROW_KEYS | _ROW_LATER):
            raise fail(f"history row {i} does not have the fields {sorted(_ROW_KEYS)} (and {sorted(_ROW_LATER)} "
                       "from rows written since)")
        bad = [k for k in _ROW_COUNTS if type(row[k]) is not int or row[k] < 0]
        bad += [k for k in (*_ROW_REALS, *_ROW_LATER) if k in row and type(row[k]) not in (int, float)]
        if row["sparsity_target"] is not None and type(row["sparsity_target"]) not in (int, float):
            bad.append("sparsity_target")
        if not isinstance(row["failures"], list) or not all(isinstance(f, str) for f in row["failures"]):
            bad.append("failures")
        if bad:
            raise fail(f"history row {i}: {', '.join(bad)} of the wrong type")
        target = row["sparsity_target"]
        out_of_range = [k for k, ok in (
            ("accuracy", 0 <= row["accuracy"] <= 1), ("sparsity", 0 <= row["sparsity"] <= 1),
            ("sparsity_target", target is None or 0 <= target <= 1), ("lr", 0 <= row["lr"] < math.inf),
            ("lambda", 0 <= row["lambda"] < math.inf), ("loss", math.isnan(row["loss"]) or row["loss"] >= 0),
            *((k, 0 <= row[k] < math.inf) for k in _ROW_TIMES if k in row)) if not ok]
        if out_of_range:
            raise fail(f"history row {i}: {', '.join(out_of_range)} out of range")
        total += row["bytes_up"] + row["bytes_down"]
        clients = len(cfg.clients_in_round(i))
        # bytes_authors = 2 directions x clients x 4 bytes x kept weights (at least the unpruned ones)
        kept, rest = divmod(row["bytes_authors"], 8 * clients)
        if (row["round"] != i + 1 or row["bytes_total"] != total or row["clients"] != clients
                or row["clients_failed"] != len(row["failures"]) or row["clients_failed"] >= clients
                or rest or not n_fixed <= kept <= n_weights):
            raise fail(f"history row {i} is inconsistent (its round, byte counts or client counts)")
