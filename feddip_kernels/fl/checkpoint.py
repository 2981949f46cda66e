"""Simulation checkpoints in the library's own formats, never pickle (loading a pickle runs
whatever it holds): a small header, JSON for the configuration and history, and one wire-format
message (docs/wire-format.md) for the tensors. Everything is validated on load.

    "FDKC" | version u8 = 1 | reserved u8 * 3 = 0 | json_len u32 | JSON (UTF-8) | message

Message tensors: "w/<name>" the global model, its prunable tensors coded with the global mask as
their positions (zeros under the mask included); "k<j>/<name>" the j-th other mask that some
client last received (positions only, zero values). The JSON names which mask each client holds.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
from typing import TYPE_CHECKING

import numpy as np
from torch import nn

from ..codecs import CodecError, decode_model, encode_model

if TYPE_CHECKING:
    from .simulation import ServerState, SimulationConfig

MAGIC = b"FDKC"
VERSION = 1
_HEADER = struct.Struct("<4sB3sI")
_CURRENT = -1  # a client holding the current global mask


def save_checkpoint(path: str, state: "ServerState") -> None:
    """Write `state` atomically (a temporary file, flushed to disk, then renamed over `path`)."""
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
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(_HEADER.pack(MAGIC, VERSION, bytes(3), len(body)) + body + message)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path: str, cfg: "SimulationConfig", model: nn.Module) -> "ServerState":
    """The state saved at `path`, for a run of `cfg` with `model`'s architecture. Raises ValueError
    for a file that is not a valid checkpoint of this run; only `rounds` may differ, and only when
    `cfg.horizon` fixes the schedules (then a finished run can be extended)."""
    from .simulation import _initial_state  # simulation imports this module

    with open(path, "rb") as f:
        data = f.read()
    if len(data) < _HEADER.size:
        raise ValueError(f"checkpoint {path} is truncated")
    magic, version, reserved, json_len = _HEADER.unpack_from(data)
    if magic != MAGIC or version != VERSION or reserved != bytes(3):
        raise ValueError(f"{path} is not a feddip checkpoint of version {VERSION}")
    if json_len > len(data) - _HEADER.size:
        raise ValueError(f"checkpoint {path} is truncated")
    try:
        meta = json.loads(data[_HEADER.size : _HEADER.size + json_len].decode("utf-8"))
        decoded = decode_model(memoryview(data)[_HEADER.size + json_len :])
    except (UnicodeDecodeError, json.JSONDecodeError, CodecError) as e:
        raise ValueError(f"checkpoint {path} is corrupt: {e}") from None
    before, now = meta.get("config"), dataclasses.asdict(cfg)
    same_but_rounds = isinstance(before, dict) and {**before, "rounds": 0} == {**now, "rounds": 0}
    extendable = cfg.horizon is not None and cfg.rounds >= int(meta.get("round", 0))
    if not same_but_rounds or (before["rounds"] != now["rounds"] and not extendable):
        raise ValueError(
            f"checkpoint {path} was written with a different configuration (only --rounds may change, "
            "and only when --horizon fixes the schedules)")
    state = _initial_state(cfg, model)
    server = state.server
    weights = {k[2:]: v for k, v in decoded.tensors.items() if k.startswith("w/")}
    if set(weights) != set(server.weights) or meta.get("prunable") != server.prunable:
        raise ValueError(f"checkpoint {path} holds another model's tensors")
    for k, v in weights.items():
        if v.shape != server.weights[k].shape or v.dtype != server.weights[k].dtype:
            raise ValueError(f"checkpoint {path}: {k!r} has shape {v.shape} {v.dtype}, the model "
                             f"{server.weights[k].shape} {server.weights[k].dtype}")
    server.weights = {k: np.array(v) for k, v in weights.items()}
    server.masks = {k: decoded.masks[f"w/{k}"] for k in server.prunable} if meta["has_mask"] else {}
    server.round = int(meta["round"])
    sets: dict[int, dict[str, np.ndarray]] = {_CURRENT: server.masks}
    for client, j in meta["client_masks"].items():
        if j not in sets:
            names = [k for k in decoded.tensors if k.startswith(f"k{j}/")]
            if not names:
                raise ValueError(f"checkpoint {path}: mask set {j} is missing")
            sets[j] = {k.split("/", 1)[1]: decoded.masks[k] for k in names}
        state.client_masks[int(client)] = sets[j]
    state.history = list(meta["history"])
    return state
