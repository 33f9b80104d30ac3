"""Checks made before Ray starts, so a wrong input fails in one line naming the setting.

A settings field that names an input (a model folder, a checkpoint, a ``.bin`` set, reference
embeddings, a folder of photos) is marked in :mod:`facegen.config` with
``json_schema_extra={"input_path": kind}``: ``"required"`` and ``"folder"`` inputs must exist when
set; ``"local_or_hub"`` values are checked only when they look like a path (``/``, ``./``, ``../``,
``~``, or a URI), since a bare ``org/name`` is a hub id. Only storage metadata is read (no model
bytes): a local path, or an ``s3://`` object or prefix through the configured endpoint.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

from pydantic import BaseModel

from facegen import storage
from facegen.cache import input_fields, looks_like_path
from facegen.config import ConfigError, FacegenConfig


def input_paths(model: BaseModel, prefix: str = "") -> Iterator[tuple[str, str, str]]:
    """``(dotted field, path, kind)`` for every input path set in ``model`` (recursively)."""
    for field, kind, value in input_fields(model, prefix):
        if not value:
            continue
        values = value if isinstance(value, list) else [value]
        for i, path in enumerate(values):
            yield (f"{field}[{i}]" if isinstance(value, list) else field), str(path), kind


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:200] + ("..." if len(text) > 200 else "")


def check_input_path(field: str, path: str, source: str = "config") -> None:
    """Raise :class:`ConfigError` (one line) when ``path`` does not exist or its storage cannot be reached."""
    local = os.path.expanduser(path.removeprefix("file://"))
    try:
        found = storage.exists(local if not storage.is_remote(path) else path)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{source}: {field}: {path}: storage not reachable ({_short(exc)})") from None
    if not found:
        raise ConfigError(f"{source}: {field}: {path}: no such file or folder")


def check_input_paths(cfg: FacegenConfig, source: str = "config") -> None:
    """Raise :class:`ConfigError` (one line) for the first input path that does not exist."""
    for field, path, kind in input_paths(cfg):
        if looks_like_path(path, kind):
            check_input_path(field, path, source)
