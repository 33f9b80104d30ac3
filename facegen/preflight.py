"""Checks made before Ray starts, so a wrong path fails in one line naming the setting.

A settings field that names an input (a model folder, a checkpoint, a ``.bin`` set, reference
embeddings) is marked in :mod:`facegen.config` with ``json_schema_extra={"input_path": kind}``:
``"required"`` paths must exist when set; ``"local_or_hub"`` values are checked only when they
look like a path (``/``, ``./``, ``../``, ``~``, or a URI), since a bare ``org/name`` is a hub id.
Without this, a missing checkpoint surfaces as actor constructor tracebacks repeated by Ray Data.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

from pydantic import BaseModel

from facegen import storage
from facegen.config import ConfigError, FacegenConfig

_PATH_PREFIXES = ("/", "./", "../", "~", "file://", "s3://", "gs://")


def input_paths(model: BaseModel, prefix: str = "") -> Iterator[tuple[str, str, str]]:
    """``(dotted field, path, kind)`` for every input path set in ``model`` (recursively)."""
    for name, info in type(model).model_fields.items():
        value = getattr(model, name)
        field = f"{prefix}{name}"
        if isinstance(value, BaseModel):
            yield from input_paths(value, f"{field}.")
            continue
        extra: Any = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        kind = extra.get("input_path")
        if not kind or not value:
            continue
        values = value if isinstance(value, list) else [value]
        for i, path in enumerate(values):
            yield (f"{field}[{i}]" if isinstance(value, list) else field), str(path), str(kind)


def _exists(path: str) -> bool:
    path = os.path.expanduser(path.removeprefix("file://"))
    try:
        return storage.exists(path)
    except (OSError, ValueError):
        return False


def check_input_paths(cfg: FacegenConfig, source: str = "config") -> None:
    """Raise :class:`ConfigError` (one line) for the first input path that does not exist."""
    for field, path, kind in input_paths(cfg):
        if kind == "local_or_hub" and not path.startswith(_PATH_PREFIXES):
            continue
        if not _exists(path):
            raise ConfigError(f"{source}: {field}: {path}: no such file or folder")
