"""The curriculum shard set: SAMPLE rows split into easy-to-hard difficulty buckets, plus a manifest.

Layout of ``shards_dir``::

    bucket-000/block-000000.parquet   rows of block 0 in bucket 0, sorted by difficulty
    bucket-000/block-000001.parquet
    bucket-001/...
    labels.parquet                    one int64 column identity_id, sorted unique (label = index)
    manifest.json                     written last: its presence means the set is complete

``manifest.json`` = ``{"format_version": 1, "facegen_version", "config_digest", "created",
"num_rows", "num_identities", "num_buckets", "labels_file", "bucket_edges", "sources",
"embedder" ({"kind", "file", "sha256", "dim"} or null), "shards": [...]}``, and with
``shards.order: source`` a ``curriculum`` (order, groups with their first bucket) and with
``shards.assembly`` an ``assembly`` (inputs, counts per source, ``assembly.parquet``'s sha256);
each shard record is ``{"path" (relative), "bucket", "block", "rows", "bytes", "sha256",
"difficulty_min", "difficulty_max"}`` (and ``group`` by source), listed in curriculum order
(bucket, then block). By source, bucket ``rank * num_buckets + b`` is difficulty bucket ``b`` of
the group ranked ``rank``; ``num_buckets`` stays the difficulty buckets.
A training label is ``searchsorted(labels, identity_id)``.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import numpy as np
import pyarrow as pa

from facegen import storage
from facegen.curriculum import assign_buckets
from facegen.lineage import short_digest

FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
LABELS_FILE = "labels.parquet"
_MANIFEST_KEYS = ("format_version", "num_rows", "num_identities", "num_buckets", "labels_file", "bucket_edges", "shards")
_SHARD_KEYS = ("path", "bucket", "rows", "bytes", "sha256")


class ShardSetError(ValueError):
    """A shard set that is missing or not readable; the message names the path."""


def _facegen_version() -> str:
    # importlib.metadata rather than facegen.__version__: an editable install made before the
    # package had an __init__.py imports facegen as a namespace package without that attribute.
    try:
        return version("facegen")
    except PackageNotFoundError:
        return "0+unknown"


def _join(root: str, relative: str) -> str:
    return f"{root.rstrip('/')}/{relative}"


def shard_relpath(bucket: int, block_id: int) -> str:
    """``bucket-002/block-000041.parquet``: a pure function of bucket and block."""
    return f"bucket-{bucket:03d}/block-{block_id:06d}.parquet"


def split_block_into_buckets(table: pa.Table, block_id: int, edges: np.ndarray, shards_dir: str,
                             first_bucket: int = 0, group: str | None = None) -> list[dict[str, Any]]:
    """Write one Parquet file per non-empty bucket of a block's rows; returns their shard records.

    Rows are bucketed by their ``difficulty`` (see :func:`facegen.curriculum.assign_buckets`) and
    sorted by difficulty within each file (ties by identity_id, sample_idx, so reruns write
    identical bytes). ``first_bucket`` shifts the bucket numbers (curriculum by source: a group's
    buckets follow the previous group's); ``group`` is recorded in each shard record.
    """
    for name in ("difficulty", "identity_id", "sample_idx"):
        if name not in table.column_names:
            raise ValueError(f"split_block_into_buckets: block {block_id} lacks column {name!r}")
    difficulty = table.column("difficulty").to_numpy(zero_copy_only=False).astype(np.float64)
    buckets = assign_buckets(difficulty, edges) + int(first_bucket)
    order_key = np.where(np.isnan(difficulty), np.inf, difficulty)
    identity = table.column("identity_id").to_numpy(zero_copy_only=False)
    sample = table.column("sample_idx").to_numpy(zero_copy_only=False)
    records = []
    for bucket in np.unique(buckets):
        rows = np.flatnonzero(buckets == bucket)
        rows = rows[np.lexsort((sample[rows], identity[rows], order_key[rows]))]
        relpath = shard_relpath(int(bucket), int(block_id))
        written = storage.write_table_atomic(table.take(pa.array(rows, pa.int64())), _join(shards_dir, relpath))
        finite = difficulty[rows][np.isfinite(difficulty[rows])]
        records.append({
            "path": relpath, "bucket": int(bucket), "block": int(block_id), "rows": written.rows,
            "bytes": written.bytes, "sha256": written.sha256,
            "difficulty_min": float(finite.min()) if finite.size else None,
            "difficulty_max": float(finite.max()) if finite.size else None,
            **({"group": group} if group is not None else {}),
        })
    return records


def write_manifest(
    records: list[dict[str, Any]], shards_dir: str, identity_ids: np.ndarray, edges: np.ndarray, config_digest: str,
    sources: dict[str, str] | None = None, embedder: dict[str, Any] | None = None, settings_digest: str = "",
    curriculum: dict[str, Any] | None = None, assembly: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``labels.parquet`` then ``manifest.json`` (last, so its presence marks completion).

    ``records`` are the shard records of every block in any order; they are listed in curriculum
    order (bucket ascending, then block id). ``identity_ids`` may repeat; labels are their sorted
    unique values. ``sources`` (source block id -> sha256) records what the set was built from, so
    a later run can tell whether it is stale; ``embedder`` (kind, file, sha256, dim) what embedded
    the rows; ``settings_digest`` the shard settings; ``curriculum`` the order (``{"order", "groups"}``)
    and ``assembly`` an assembled set's inputs and counts, when given. ``digest`` identifies the set's content
    (shards, labels, edges, settings): a training run records it and refuses to resume on a set
    with another. Returns the manifest.
    """
    edges = np.asarray(edges, dtype=np.float64)
    if edges.ndim != 1 or len(edges) < 2 or not np.isfinite(edges).all() or np.any(np.diff(edges) <= 0):
        raise ValueError(f"write_manifest: bucket edges must be finite and strictly increasing, got {edges.tolist()}")
    labels = np.unique(np.asarray(identity_ids, dtype=np.int64))
    ordered = sorted(records, key=lambda r: (int(r["bucket"]), int(r.get("block", -1)), r["path"]))
    labels_written = storage.write_table_atomic(pa.table({"identity_id": pa.array(labels, pa.int64())}), _join(shards_dir, LABELS_FILE))
    manifest = {
        "format_version": FORMAT_VERSION,
        "facegen_version": _facegen_version(),
        "config_digest": str(config_digest),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "num_rows": int(sum(int(r["rows"]) for r in ordered)),
        "num_identities": int(len(labels)),
        "num_buckets": int(len(edges) - 1),
        "labels_file": LABELS_FILE,
        "bucket_edges": [float(e) for e in edges],
        "sources": dict(sources or {}),
        "embedder": embedder,
        "settings_digest": settings_digest,
        "digest": manifest_digest(ordered, labels_written.sha256, [float(e) for e in edges], settings_digest),
        "shards": ordered,
        **({"curriculum": curriculum} if curriculum else {}),
        **({"assembly": assembly} if assembly else {}),
    }
    storage.write_json_atomic(manifest, _join(shards_dir, MANIFEST_FILE))
    return manifest


def load_manifest(shards_dir: str) -> dict[str, Any]:
    """Read and check ``<shards_dir>/manifest.json``; raises :class:`ShardSetError` naming the path."""
    path = _join(shards_dir, MANIFEST_FILE)
    if not storage.exists(path):
        raise ShardSetError(f"{path}: no shard manifest (the shard set is missing or incomplete; run `facegen shard`)")
    try:
        manifest = storage.read_json(path)
    except ValueError as exc:
        raise ShardSetError(str(exc)) from None
    if not isinstance(manifest, dict):
        raise ShardSetError(f"{path}: manifest must be a JSON object")
    missing = [k for k in _MANIFEST_KEYS if k not in manifest]
    if missing:
        raise ShardSetError(f"{path}: manifest lacks {missing}")
    if manifest["format_version"] != FORMAT_VERSION:
        raise ShardSetError(f"{path}: format_version {manifest['format_version']!r} is not supported (expected {FORMAT_VERSION})")
    if not isinstance(manifest["shards"], list):
        raise ShardSetError(f"{path}: shards must be a list")
    for i, shard in enumerate(manifest["shards"]):
        if not isinstance(shard, dict) or any(k not in shard for k in _SHARD_KEYS):
            raise ShardSetError(f"{path}: shards[{i}] must have keys {list(_SHARD_KEYS)}")
    return manifest


class ScaleCapExceeded(ValueError):
    """A shard set larger than the DataCV scale ``train.datacv_scale`` allows (one line)."""


def manifest_digest(shards: list[dict[str, Any]], labels_sha256: str, edges: list[float], settings: str) -> str:
    """Digest of a shard set's content: its shard files, labels, bucket edges and settings."""
    body = {"shards": sorted((s["path"], s["sha256"]) for s in shards), "labels": labels_sha256,
            "edges": [float(e) for e in edges], "settings": settings}
    return short_digest(json.dumps(body, sort_keys=True).encode())


def shard_set_digest(shards_dir: str) -> str:
    """The ``digest`` of the shard set in ``shards_dir`` (computed for manifests older than it)."""
    return manifest_set_digest(load_manifest(shards_dir))


def manifest_set_digest(manifest: dict[str, Any]) -> str:
    """The ``digest`` of a loaded shard manifest (computed for manifests older than it)."""
    if manifest.get("digest"):
        return str(manifest["digest"])
    return manifest_digest(manifest["shards"], "", manifest["bucket_edges"], str(manifest.get("config_digest", "")))


def check_datacv_scale(scale: str | None, manifest: dict[str, Any], shards_dir: str) -> None:
    """Raise :class:`ScaleCapExceeded` when the manifest counts more identities or images (rows, all
    status ok) than DataCV scale ``scale`` allows (``facegen.config.DATACV_SCALES``); None: no cap."""
    if scale is None:
        return
    from facegen.config import DATACV_SCALES

    if scale not in DATACV_SCALES:
        raise ValueError(f"train.datacv_scale: unknown scale {scale!r}, expected one of {', '.join(DATACV_SCALES)}")
    max_ids, max_images = DATACV_SCALES[scale]
    ids, images = int(manifest["num_identities"]), int(manifest["num_rows"])
    if ids > max_ids or images > max_images:
        raise ScaleCapExceeded(
            f"train.datacv_scale: {scale} allows at most {max_ids} identities and {max_images} images, but "
            f"{_join(shards_dir, MANIFEST_FILE)} has {ids} identities and {images} images")


def shard_paths(manifest: dict[str, Any], shards_dir: str) -> list[str]:
    """Full paths of the shard files, in curriculum order."""
    return [_join(shards_dir, s["path"]) for s in manifest["shards"]]


def verify_shards(shards_dir: str) -> list[str]:
    """Problems found in a shard set (empty when it is intact): missing files, size or sha256 mismatches."""
    manifest = load_manifest(shards_dir)
    problems = []
    labels = _join(shards_dir, manifest["labels_file"])
    if not storage.exists(labels):
        problems.append(f"{labels}: labels file missing")
    if sum(int(s["rows"]) for s in manifest["shards"]) != manifest["num_rows"]:
        problems.append(f"{_join(shards_dir, MANIFEST_FILE)}: shard rows do not add up to num_rows {manifest['num_rows']}")
    for shard in manifest["shards"]:
        path = _join(shards_dir, shard["path"])
        if not storage.exists(path):
            problems.append(f"{path}: missing")
            continue
        size = storage.size_of(path)
        if size != shard["bytes"]:
            problems.append(f"{path}: size {size} bytes, manifest says {shard['bytes']}")
        elif storage.sha256_of(path) != shard["sha256"]:
            problems.append(f"{path}: sha256 mismatch")
    return problems
