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
from facegen.config import ConfigError, FacegenConfig, source_of


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


#: Sections only their own command reads (``facegen train-generator``): the others do not check them.
OWN_COMMAND_SECTIONS = ("train_generator.",)


def check_input_paths(cfg: FacegenConfig, source: str = "config", overrides: list[str] | None = None,
                      sections: tuple[str, ...] | None = None) -> None:
    """Raise :class:`ConfigError` (one line) for the first input path that does not exist, naming
    the ``--set`` it came from when one of ``overrides`` gave it. ``sections``: check only fields
    under these dotted prefixes (a command that reads nothing else, whose outputs later commands
    name as inputs); by default every field but :data:`OWN_COMMAND_SECTIONS`'."""
    for field, path, kind in input_paths(cfg):
        wanted = field.startswith(sections) if sections is not None else not field.startswith(OWN_COMMAND_SECTIONS)
        if wanted and looks_like_path(path, kind):
            check_input_path(field, path, source_of(field, source, overrides))


#: Less free space than this at a local output location is refused before any work.
MIN_FREE_BYTES = 64 * 2**20


def _local_output_fault(path: str) -> str | None:
    """Why a local output folder cannot be written, or None. Nothing is left behind: the probe is a
    folder made and removed in the deepest part of the path that exists."""
    import shutil
    import tempfile

    folder = os.path.abspath(os.path.expanduser(path.removeprefix("file://")))
    existing = folder
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        return f"{existing} is a file, not a folder"
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".facegen-write-check-", dir=existing))
    except OSError as exc:
        return f"not writable ({exc.strerror or exc})"
    free = shutil.disk_usage(existing).free
    if free < MIN_FREE_BYTES:
        return f"out of space ({free / 2**20:.0f} MiB free)"
    return None


def output_fault(path: str) -> str | None:
    """Why the output folder ``path`` cannot be written, or None: a file where a folder is meant (or
    above it), no permission, a read-only or full filesystem, object storage that cannot be reached.
    A local path is probed where it exists; an object store gets a probe object written and removed."""
    if not storage.is_remote(path):
        return _local_output_fault(path)
    probe = f"{path.rstrip('/')}/.facegen-write-check"
    try:
        storage.write_bytes_atomic(b"", probe)
        storage.remove(probe)
    except (OSError, ValueError) as exc:
        return f"not writable ({_short(exc)})"
    return None


def check_output_location(field: str, path: str, source: str = "settings") -> None:
    """Raise :class:`ConfigError` (one line naming ``field``) when the folder ``path`` cannot be
    written (see :func:`output_fault`)."""
    fault = output_fault(path)
    if fault:
        raise ConfigError(f"{source}: {field}: {path}: {fault}")


def check_output_file(field: str, path: str) -> None:
    """Raise :class:`ConfigError` (one line naming ``field``) when the file ``path`` cannot be
    written: it is a folder, or its folder cannot be written."""
    if not storage.is_remote(path) and os.path.isdir(os.path.expanduser(path)):
        raise ConfigError(f"{field}: {path}: is a folder; give a file name")
    parent = path.rstrip("/").rsplit("/", 1)[0] if "/" in path.rstrip("/") else "."
    fault = output_fault(parent or "/")
    if fault:
        raise ConfigError(f"{field}: {path}: {fault}")
