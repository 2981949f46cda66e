"""Simulation checkpoints in the library's own formats, never pickle (loading a pickle runs
whatever it holds): a small header, JSON for the configuration and history, one wire-format
message (docs/wire-format.md) for the tensors, and a checksum of the whole file. Everything is
validated on load against the run being resumed; any problem raises CodecError.

    "FDKC" | version u8 = 2 | reserved u8 * 3 = 0 | json_len u32 | JSON (UTF-8) | message
    | CRC-32C u32 of every byte before it

Message tensors: "w/<name>" the global model, its prunable tensors coded with the global mask as
their positions (zeros under the mask included); "k<j>/<name>" (j = 0, 1, ...) the j-th other mask
that some client last received, over the prunable tensors (positions only, zero values). The JSON:
{"config": the SimulationConfig, "round": rounds done, "has_mask": whether there is a global mask,
"prunable": the pruned tensors' names, "client_masks": {client id: j, or -1 for the global mask},
"history": one row per round done}.

Version 1 files (no checksum) are refused with a message saying so: such a run is started again
rather than resumed from a file that nothing vouches for. Configurations written before the
coding, rounding and residual_feedback settings read as the plain coding's (what those runs used).
Runs with the compact coding (protocol.transport) are not checkpointed: what each client holds and
its residual are not in the file.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import struct
from typing import Any, Callable

import numpy as np
from torch import nn

from ..codecs import CodecError, crc32c, decode_model, encode_model
from ..storage import parse_json
from .state import ServerState, SimulationConfig, initial_state

MAGIC = b"FDKC"
VERSION = 2
_HEADER = struct.Struct("<4sB3sI")
_CRC = struct.Struct("<I")
_Fail = Callable[[str], CodecError]  # an error naming the checkpoint file
_CURRENT = -1  # a client holding the current global mask
_META_KEYS = frozenset(["config", "round", "has_mask", "prunable", "client_masks", "history"])
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


def save_checkpoint(path: str, state: ServerState) -> None:
    """Write `state` atomically (a temporary file, flushed to disk, then renamed over `path`)."""
    if state.config.compact:
        raise ValueError("a run with the compact coding is not checkpointed (its clients' state is not in the file)")
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
    meta = {
        "config": dataclasses.asdict(state.config),
        "round": server.round,
        "has_mask": bool(server.masks),
        "prunable": server.prunable,
        "client_masks": clients,
        "history": state.history,
    }
    body = json.dumps(meta).encode("utf-8")
    message = encode_model(tensors, masks=masks, values="raw")
    data = _HEADER.pack(MAGIC, VERSION, bytes(3), len(body)) + body + message
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data + _CRC.pack(crc32c(data)))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path: str, cfg: SimulationConfig, model: nn.Module) -> ServerState:
    """The state saved at `path`, for a run of `cfg` with `model`'s architecture. Raises CodecError
    (a ValueError) for a file that is not a valid checkpoint of this run: corrupt (the checksum
    covers every byte), of another format version, or with any JSON field of the wrong type, out of
    range or inconsistent with the configuration, the model, the message or the other fields. Only
    `rounds` may differ from the run's configuration, and only when `cfg.horizon` fixes the
    schedules (then a finished run can be extended)."""

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
    if version != VERSION or reserved != bytes(3):
        raise fail(f"unsupported checkpoint format version {version} or reserved bytes (this library reads {VERSION})")
    body_end = len(data) - _CRC.size
    if json_len > body_end - _HEADER.size:
        raise fail("truncated: the JSON length runs past the end of the file")
    if crc32c(memoryview(data)[:body_end]) != _CRC.unpack_from(data, body_end)[0]:
        raise fail("checksum mismatch: the file is corrupt")
    try:
        meta = parse_json(data[_HEADER.size : _HEADER.size + json_len], "the JSON part")
    except CodecError as e:
        raise fail(str(e)) from None
    if not isinstance(meta, dict) or set(meta) != _META_KEYS:
        raise fail(f"the JSON part is not an object with exactly the fields {sorted(_META_KEYS)}")

    state = initial_state(cfg, model)
    server = state.server
    rounds_done = _check_config(meta["config"], cfg, meta["round"], fail)
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

    # The message must hold exactly these tensors (checked before anything is allocated).
    expect: dict[str, tuple[tuple[int, ...], Any]] = {f"w/{k}": (v.shape, v.dtype) for k, v in server.weights.items()}
    for j in sorted(set(holders.values()) - {_CURRENT}):
        expect.update({f"k{j}/{k}": (server.weights[k].shape, np.float32) for k in server.prunable})
    size = sum(math.prod(shape) * np.dtype(dt).itemsize for shape, dt in expect.values())
    try:
        decoded = decode_model(memoryview(data)[_HEADER.size + json_len : body_end], expect=expect, max_bytes=size)
    except CodecError as e:
        raise fail(f"the tensors do not fit this run: {e}") from None

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
    return state


def _check_config(before: Any, cfg: SimulationConfig, rounds_done: Any, fail: _Fail) -> int:
    """The number of rounds done, after checking the saved configuration against `cfg` (types
    included: JSON's 1 and true, or 1 and 1.0, are different settings) and the round against both."""
    now = dataclasses.asdict(cfg)
    if isinstance(before, dict) and set(now) - set(before) == _LATER_CONFIG.keys() and set(before) <= set(now):
        before = {**before, **_LATER_CONFIG}  # written before these settings: the runs they describe
    if not isinstance(before, dict) or set(before) != set(now) or type(before["rounds"]) is not int:
        raise fail("was written with a different configuration (its config is not a SimulationConfig)")
    if json.dumps({**before, "rounds": 0}, sort_keys=True) != json.dumps({**now, "rounds": 0}, sort_keys=True):
        raise fail("was written with a different configuration (only --rounds may change, "
                   "and only when --horizon fixes the schedules)")
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
