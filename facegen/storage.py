"""File access for every stage: local paths, NFS or URIs (``s3://``, ``gs://``) through pyarrow.

Every write goes to a temporary name in the destination directory and is then renamed, so a
reader never sees a half-written file (on object stores, where rename is a copy, the stages'
done-markers are written last and carry the guarantee instead).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import uuid
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq


@dataclass(frozen=True)
class FileRecord:
    """What was written: path, row count (tables), size in bytes and sha256 of the content."""

    path: str
    rows: int
    bytes: int
    sha256: str


def os_error_line(exc: OSError) -> str:
    """A filesystem error on one line: ``<file>: <what>`` (the file when the error names one)."""
    what = exc.strerror or str(exc)
    return f"{exc.filename}: {what}" if exc.filename else what


def _resolve(path: str) -> tuple[pafs.FileSystem, str]:
    if "://" in str(path):
        return pafs.FileSystem.from_uri(str(path))
    return pafs.LocalFileSystem(), os.path.abspath(os.fspath(path))


def _parent(path: str) -> str:
    return path.rsplit("/", 1)[0] if "/" in path else ""


def is_remote(path: str) -> bool:
    """True for URIs that go through a remote pyarrow filesystem."""
    return "://" in str(path) and not str(path).startswith("file://")


def makedirs(path: str) -> None:
    """Create a directory and its parents (no-op on object stores without directories)."""
    fs, p = _resolve(path)
    fs.create_dir(p, recursive=True)


def exists(path: str) -> bool:
    """Whether a file or directory exists."""
    fs, p = _resolve(path)
    return fs.get_file_info(p).type != pafs.FileType.NotFound


def remove(path: str) -> None:
    """Delete a file if it exists."""
    fs, p = _resolve(path)
    if fs.get_file_info(p).type == pafs.FileType.File:
        fs.delete_file(p)


def list_dir(path: str, suffix: str = "") -> list[str]:
    """Sorted full paths of the files directly in ``path`` whose names end with ``suffix``."""
    fs, p = _resolve(path)
    if fs.get_file_info(p).type != pafs.FileType.Directory:
        return []
    infos = fs.get_file_info(pafs.FileSelector(p, recursive=False))
    prefix = path.rstrip("/")
    names = sorted(i.base_name for i in infos if i.type == pafs.FileType.File and i.base_name.endswith(suffix))
    return [f"{prefix}/{n}" for n in names]


def remove_tree(path: str) -> None:
    """Delete a directory and everything below it, if it exists."""
    fs, p = _resolve(path)
    if fs.get_file_info(p).type == pafs.FileType.Directory:
        fs.delete_dir(p)


def list_sizes(path: str) -> dict[str, int]:
    """``{file name: size in bytes}`` of the files directly in ``path`` (one listing; {} if absent)."""
    fs, p = _resolve(path)
    try:
        infos = fs.get_file_info(pafs.FileSelector(p, recursive=False, allow_not_found=True))
    except NotADirectoryError:
        return {}
    return {i.base_name: int(i.size or 0) for i in infos if i.type == pafs.FileType.File}


def list_dirs(path: str) -> list[str]:
    """Sorted names of the directories directly in ``path`` ([] if absent)."""
    fs, p = _resolve(path)
    try:
        infos = fs.get_file_info(pafs.FileSelector(p, recursive=False, allow_not_found=True))
    except NotADirectoryError:
        return []
    return sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory)


def filesystem(path: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem and the filesystem-relative path of ``path`` (for Ray Train, Ray Data)."""
    return _resolve(path)


def write_bytes_atomic(data: bytes, path: str) -> FileRecord:
    """Write ``data`` to a temporary sibling, then rename it onto ``path``."""
    fs, p = _resolve(path)
    parent = _parent(p)
    if parent:
        fs.create_dir(parent, recursive=True)
    tmp = f"{parent}/.tmp-{uuid.uuid4().hex}-{p.rsplit('/', 1)[-1]}"
    try:
        with fs.open_output_stream(tmp) as out:
            out.write(data)
        fs.move(tmp, p)
    except BaseException:
        if fs.get_file_info(tmp).type == pafs.FileType.File:
            fs.delete_file(tmp)
        raise
    return FileRecord(str(path), 0, len(data), hashlib.sha256(data).hexdigest())


def upload_tree(local: str, destination: str) -> int:
    """Copy every file under ``local`` to the same relative path under ``destination`` (atomic
    writes); returns how many files were copied."""
    copied = 0
    for folder, _, files in os.walk(local):
        for name in files:
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                write_bytes_atomic(f.read(), f"{destination.rstrip('/')}/{os.path.relpath(path, local)}")
            copied += 1
    return copied


def read_bytes(path: str) -> bytes:
    """The whole content of a file."""
    fs, p = _resolve(path)
    try:
        with fs.open_input_stream(p) as f:
            return f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file") from None


def write_table_atomic(table: pa.Table, path: str, compression: str = "zstd") -> FileRecord:
    """Write a Parquet file atomically; returns its row count, size and sha256."""
    sink = io.BytesIO()
    pq.write_table(table, sink, compression=compression)
    rec = write_bytes_atomic(sink.getvalue(), path)
    return FileRecord(rec.path, table.num_rows, rec.bytes, rec.sha256)


def read_table(path: str, columns: list[str] | None = None) -> pa.Table:
    """Read a Parquet file (optionally only some columns); a bad file fails naming it."""
    fs, p = _resolve(path)
    try:
        return pq.read_table(p, columns=columns, filesystem=fs)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file") from None
    except (pa.ArrowInvalid, OSError) as exc:
        raise ValueError(f"{path}: not a readable Parquet file ({exc})") from None


def read_table_verified(path: str, sha256: str, columns: list[str] | None = None) -> pa.Table:
    """Read a Parquet file whose content must have ``sha256``; a mismatch fails naming the file."""
    data = read_bytes(path)
    digest = hashlib.sha256(data).hexdigest()
    if digest != sha256:
        raise ValueError(f"{path}: sha256 mismatch ({len(data)} bytes; the file is truncated or corrupt)")
    try:
        return pq.read_table(pa.BufferReader(data), columns=columns)
    except (pa.ArrowInvalid, OSError) as exc:
        raise ValueError(f"{path}: not a readable Parquet file ({exc})") from None


def write_json_atomic(obj: Any, path: str) -> FileRecord:
    """Write pretty JSON atomically."""
    return write_bytes_atomic((json.dumps(obj, indent=2, sort_keys=False) + "\n").encode(), path)


def read_json(path: str) -> Any:
    """Parse a JSON file; a missing or malformed file fails naming it."""
    data = read_bytes(path)
    try:
        return json.loads(data)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None


def sha256_of(path: str, chunk: int = 1 << 22) -> str:
    """sha256 of a file, streamed."""
    fs, p = _resolve(path)
    h = hashlib.sha256()
    with fs.open_input_stream(p) as f:
        while True:
            buf = f.read(chunk)
            if not buf:
                break
            h.update(buf)
    return h.hexdigest()


def size_of(path: str) -> int:
    """Size of a file in bytes."""
    fs, p = _resolve(path)
    return fs.get_file_info(p).size


def read_vectors(path: str, column: str, what: str) -> "Any":
    """A float32 ``[n, d]`` array from a ``.npy`` (no pickles) or a Parquet list column; ``what``
    names the setting in the one-line errors (missing file, missing column, not numeric)."""
    import numpy as np

    from facegen.schema import vectors_from_column

    if not exists(path):
        raise FileNotFoundError(f"{what}: {path}: no such file or folder")
    if path.endswith(".npy"):
        try:
            array = np.load(io.BytesIO(read_bytes(path)), allow_pickle=False)
        except ValueError as exc:
            raise ValueError(f"{path}: not a numeric .npy ({exc})") from None
    else:
        table = read_table(path)
        if column not in table.column_names:
            raise ValueError(f"{path}: no column {column!r} (has {table.column_names})")
        kind = table.schema.field(column).type
        if not (pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind)):
            raise ValueError(f"{path}: column {column!r} is not a list of floats ({kind})")
        array = vectors_from_column(table.column(column), f"{path}: {what}")
    return np.asarray(array, np.float32)


def _npy_header(f: Any, path: str) -> tuple[tuple[int, int], Any]:
    import numpy as np

    version = np.lib.format.read_magic(f)
    reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = reader(f)
    if fortran or len(shape) != 2 or dtype.hasobject:
        raise ValueError(f"{path}: expected a C-ordered numeric [n, d] array, got shape {shape}")
    return shape, dtype


def npy_shape(path: str) -> tuple[int, int]:
    """``(n, d)`` of a 2-D ``.npy`` on any storage, from its header alone."""
    fs, p = filesystem(path)
    with fs.open_input_file(p) as f:
        return _npy_header(f, path)[0]


def read_npy_rows(path: str, start: int, stop: int) -> "Any":
    """Rows ``start:stop`` of a 2-D ``.npy`` on any storage, reading only those bytes."""
    import numpy as np

    fs, p = filesystem(path)
    with fs.open_input_file(p) as f:
        shape, dtype = _npy_header(f, path)
        stop = min(stop, shape[0])
        row = shape[1] * dtype.itemsize
        f.seek(f.tell() + start * row)
        data = f.read((stop - start) * row)
    return np.frombuffer(data, dtype).reshape(stop - start, shape[1])
