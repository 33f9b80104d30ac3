"""Reading wandb's offline runs back, for the tests that check what each stage logged.

wandb stores an offline run as a LevelDB-style log of protobuf ``Record`` messages
(``<dir>/wandb/offline-run-<time>-<id>/run-<id>.wandb``). wandb 0.31 writes it from its Go core and
ships no Python reader any more, so :func:`read_offline_run` walks the log blocks itself and decodes
each record with wandb's own protobuf classes (``wandb.proto.wandb_internal_pb2.Record``).
"""

from __future__ import annotations

import glob
import json
import os
import re
import struct
import zlib
from dataclasses import dataclass, field
from typing import Any

_BLOCK = 32768
_HEADER = 7
_IDENT = b":W&B"
_MAGIC = 0xBEE1
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


@dataclass
class OfflineRun:
    """What an offline run recorded: the config, one dict per ``log`` call, the final summary."""

    config: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    summary: dict = field(default_factory=dict)
    run_id: str | None = None
    group: str | None = None
    job_type: str | None = None


def _records(path: str) -> list[bytes]:
    """Payloads of a LevelDB-log file: 32 KiB blocks of (crc32, length, type) chunks."""
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < _HEADER:
        raise ValueError(f"{path}: not a wandb run file (too short)")
    ident, magic, _version = struct.unpack("<4sHB", data[:_HEADER])
    if ident != _IDENT or magic != _MAGIC:
        raise ValueError(f"{path}: not a wandb run file (bad header)")
    out: list[bytes] = []
    pos, partial = _HEADER, b""
    while pos + _HEADER <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < _HEADER:  # block trailer: zero padding
            pos += left
            continue
        checksum, length, kind = struct.unpack("<IHB", data[pos : pos + _HEADER])
        chunk = data[pos + _HEADER : pos + _HEADER + length]
        if len(chunk) < length:
            break  # the writer was interrupted mid-record: keep what is complete
        if zlib.crc32(chunk, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF != checksum:
            raise ValueError(f"{path}: corrupt record at byte {pos}")
        pos += _HEADER + length
        if kind == _FULL:
            out.append(chunk)
        elif kind == _FIRST:
            partial = chunk
        elif kind == _MIDDLE:
            partial += chunk
        elif kind == _LAST:
            out.append(partial + chunk)
            partial = b""
    return out


def _item_key(item: Any) -> list[str]:
    return [item.key] if item.key else list(item.nested_key)


def _set(tree: dict, keys: list[str], value: Any) -> None:
    for k in keys[:-1]:
        tree = tree.setdefault(k, {})
    tree[keys[-1]] = value


def _apply_items(tree: dict, items: Any, remove: Any = ()) -> None:
    for item in items:
        keys = _item_key(item)
        if keys:
            _set(tree, keys, json.loads(item.value_json))
    for item in remove:
        keys = _item_key(item)
        node = tree
        for k in keys[:-1]:
            node = node.get(k, {})
        if keys:
            node.pop(keys[-1], None)


def _read_file(path: str, run: OfflineRun) -> None:
    from wandb.proto import wandb_internal_pb2 as pb

    for payload in _records(path):
        record = pb.Record()
        record.ParseFromString(payload)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run.run_id = record.run.run_id or run.run_id
            run.group = record.run.run_group or run.group
            run.job_type = record.run.job_type or run.job_type
            _apply_items(run.config, record.run.config.update, record.run.config.remove)
        elif kind == "config":
            _apply_items(run.config, record.config.update, record.config.remove)
        elif kind == "history":
            row: dict = {}
            _apply_items(row, record.history.item)
            run.history.append(row)
        elif kind == "summary":
            _apply_items(run.summary, record.summary.update, record.summary.remove)
    run.config.pop("_wandb", None)
    run.summary.pop("_wandb", None)


def read_offline_run(run_dir: str, run_id: str | None = None) -> OfflineRun:
    """Parse an offline run: a ``.wandb`` file, its run folder, or a folder holding ``wandb/``.

    When the folder holds several offline runs of the same id (a resumed training), they are
    merged in time order; several different ids need ``run_id`` to pick one.
    """
    run_dir = str(run_dir)
    if os.path.isfile(run_dir):
        files = [run_dir]
    else:
        files = glob.glob(os.path.join(run_dir, "*.wandb"))
        for pattern in ("offline-run-*", os.path.join("wandb", "offline-run-*")):
            if not files:
                files = glob.glob(os.path.join(run_dir, pattern, "*.wandb"))
    if run_id is not None:
        files = [f for f in files if os.path.basename(f) == f"run-{run_id}.wandb"]
    if not files:
        raise FileNotFoundError(f"{run_dir}: no offline wandb run found" + (f" with id {run_id}" if run_id else ""))
    ids = sorted({os.path.basename(f)[len("run-") : -len(".wandb")] for f in files})
    if len(ids) > 1:
        raise ValueError(f"{run_dir}: several offline runs {ids}; pass run_id=")
    run = OfflineRun(run_id=ids[0])
    for path in sorted(files, key=lambda f: _start_order(f, ids[0])):
        _read_file(path, run)
    return run


def _start_order(path: str, rid: str) -> tuple[str, int]:
    """Folders are ``offline-run-<YYYYmmdd_HHMMSS>-<id>[-<n>]``; wandb adds ``-n`` within one second."""
    folder = os.path.basename(os.path.dirname(path))
    match = re.fullmatch(rf"offline-run-(\d{{8}}_\d{{6}})-{re.escape(rid)}(?:-(\d+))?", folder)
    if match is None:
        return (folder, 0)
    return (match.group(1), int(match.group(2) or 0))
