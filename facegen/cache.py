"""Inputs named by a config (models, ``.bin`` sets, references, photos) wherever they live.

A settings field marked as an input path (``json_schema_extra={"input_path": ...}``) may hold a local
path, an ``s3://`` (or other pyarrow) URI, or, where the loading library supports it, a hub id.

- :func:`input_digest`: what lineage records for an input, from storage metadata only (relative
  names, sizes, modification times of its files) or from a sidecar ``<path>.sha256`` a user wrote;
  the driver never reads a model's bytes.
- :func:`fetch`: a local path for the input on *this* node. A URI is copied once per node into a
  content-addressed cache (``<cache>/<key>/<name>``, the key a hash of the URI and its digest): a
  file lock makes two actors of one node download once, the copy is made under a temporary name
  and renamed into place only when complete, so a partial download is never used.
- :func:`localized`: a copy of a settings section with every marked input replaced by its local
  copy (what a worker builds its models from).

Every fetch is appended to ``<cache>/fetches.jsonl`` (URI, key, bytes, seconds), so what each node
downloaded can be read back.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Iterator, TypeVar

import pyarrow.fs as pafs
from pydantic import BaseModel

from facegen import storage

CACHE_ENV = "FACEGEN_CACHE_DIR"
FETCH_LOG = "fetches.jsonl"
SIDECAR_SUFFIX = ".sha256"
_PATH_PREFIXES = ("/", "./", "../", "~", "file://")
COPY_CHUNK = 8 << 20
Section = TypeVar("Section", bound=BaseModel)


def cache_root() -> Path:
    """``$FACEGEN_CACHE_DIR``, else ``~/.cache/facegen/inputs``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "facegen" / "inputs")


def is_uri(path: str) -> bool:
    """An object-store URI (``s3://``, ``gs://``...), fetched into the node cache."""
    return storage.is_remote(str(path))


def looks_like_path(value: str, kind: str) -> bool:
    """Whether an input value names a file: always for ``required`` inputs; for ``local_or_hub``
    ones only when it starts like a path or a URI (a bare ``org/name`` is a hub id)."""
    return kind != "local_or_hub" or str(value).startswith(_PATH_PREFIXES) or is_uri(value)


def _listing(path: str) -> list[tuple[str, int, int]]:
    """``(relative name, size, mtime in ns)`` of a file or of every file under a folder."""
    fs, p = storage.filesystem(path)
    info = fs.get_file_info(p)
    if info.type == pafs.FileType.File:
        return [("", int(info.size or 0), int(info.mtime_ns or 0))]
    if info.type != pafs.FileType.Directory:
        raise FileNotFoundError(f"{path}: no such file or folder")
    root = p.rstrip("/")
    files = [i for i in fs.get_file_info(pafs.FileSelector(root, recursive=True)) if i.type == pafs.FileType.File]
    return sorted((i.path[len(root) + 1 :], int(i.size or 0), int(i.mtime_ns or 0)) for i in files)


def sidecar_digest(path: str) -> str | None:
    """The content digest a user recorded in ``<path>.sha256`` (first word), if that file exists."""
    sidecar = f"{str(path).rstrip('/')}{SIDECAR_SUFFIX}"
    try:
        if not storage.exists(sidecar):
            return None
        words = storage.read_bytes(sidecar).decode("utf-8", "replace").split()
    except (OSError, ValueError):
        return None
    return f"sha256:{words[0][:16]}" if words else None


def input_digest(path: str) -> str:
    """What identifies an input for lineage and the cache: its sidecar digest, or a digest of its
    files' names, sizes and modification times (``FileNotFoundError`` when it does not exist)."""
    path = str(path).removeprefix("file://")
    recorded = sidecar_digest(path)
    if recorded is not None:
        return recorded
    blob = json.dumps(_listing(path)).encode()
    return f"meta:{hashlib.sha256(blob).hexdigest()[:16]}"


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _copy_file(fs: pafs.FileSystem, source: str, target: Path) -> int:
    target.parent.mkdir(parents=True, exist_ok=True)
    copied = 0
    with fs.open_input_stream(source) as src, open(target, "wb") as out:
        while chunk := src.read(COPY_CHUNK):
            out.write(chunk)
            copied += len(chunk)
    return copied


def _download(uri: str, target: Path) -> int:
    """Copy a file or a folder tree from ``uri`` to ``target``; returns the bytes copied."""
    fs, p = storage.filesystem(uri)
    info = fs.get_file_info(p)
    if info.type == pafs.FileType.File:
        return _copy_file(fs, p, target)
    root = p.rstrip("/")
    copied = 0
    for item in fs.get_file_info(pafs.FileSelector(root, recursive=True)):
        if item.type == pafs.FileType.File:
            copied += _copy_file(fs, item.path, target / item.path[len(root) + 1 :])
    target.mkdir(parents=True, exist_ok=True)
    return copied


def fetch(path: str, field: str = "input") -> str:
    """A path on this node holding the input ``path`` (see the module docstring).

    Local paths are returned as they are (``FileNotFoundError`` naming ``field`` when this node
    does not have them); URIs are fetched into the node cache once and reused.
    """
    path = str(path)
    if not is_uri(path):
        local = os.path.expanduser(path.removeprefix("file://"))
        if not os.path.exists(local):
            raise FileNotFoundError(f"{field}: {path}: not found on this node (a local input must exist on every "
                                    "worker node: put it on s3:// or on storage every node mounts)")
        return local
    try:
        digest = input_digest(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{field}: {path}: no such file or folder") from None
    name = path.rstrip("/").rsplit("/", 1)[-1]
    key = hashlib.sha256(f"{path}\0{digest}".encode()).hexdigest()[:24]
    root = cache_root()
    final = root / key
    if (final / ".complete").exists():
        return str(final / name)
    with _locked(root / f".{key}.lock"):
        if (final / ".complete").exists():  # another actor of this node fetched it meanwhile
            return str(final / name)
        for stale in root.glob(f".partial-{key}-*"):  # crashed downloads: only the lock holder writes here
            shutil.rmtree(stale, ignore_errors=True)
        if final.exists():
            shutil.rmtree(final)
        partial = root / f".partial-{key}-{uuid.uuid4().hex[:8]}"
        started = time.time()
        try:
            copied = _download(path, partial / name)
            record = {"uri": path, "digest": digest, "key": key, "bytes": copied, "seconds": round(time.time() - started, 3),
                      "pid": os.getpid(), "time": time.time()}
            (partial / ".complete").write_text(json.dumps(record))
            os.rename(partial, final)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        with open(root / FETCH_LOG, "a") as log:
            log.write(json.dumps(record) + "\n")
    return str(final / name)


def fetch_log(root: str | Path | None = None) -> list[dict[str, Any]]:
    """Every fetch recorded in a node cache (oldest first)."""
    path = Path(root or cache_root()) / FETCH_LOG
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def input_fields(model: BaseModel, prefix: str = "") -> Iterator[tuple[str, str, Any]]:
    """``(dotted field, kind, value)`` of every field marked as an input path, set or not."""
    from facegen.config.walk import leaves

    for leaf in leaves(model, prefix):
        if leaf.input_path:
            yield leaf.dotted, leaf.input_path, leaf.value


def localized(section: Section, where: str = "") -> Section:
    """A copy of ``section`` whose input paths point at this node's copies (fetched as needed).

    Hub ids stay as they are (the loading library fetches them); fields marked ``folder`` (an
    image folder to read, not a model to copy) are left for their stage to read in place.
    """
    from facegen.config.walk import leaves

    copy = section.model_copy(deep=True)
    for leaf in leaves(copy, f"{where}." if where else ""):
        kind, value = leaf.input_path, leaf.value
        if not kind or not value or kind == "folder":
            continue
        if isinstance(value, list):
            fetched = [fetch(str(v), f"{leaf.dotted}[{i}]") if looks_like_path(str(v), kind) else v for i, v in enumerate(value)]
        else:
            fetched = fetch(str(value), leaf.dotted) if looks_like_path(str(value), kind) else value
        object.__setattr__(leaf.owner, leaf.name, fetched)  # no re-validation: the values were valid before
    return copy
