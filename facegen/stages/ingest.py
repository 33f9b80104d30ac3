"""Ingest stage: an image folder ``DIR/<identity>/<image>`` -> raw blocks of SAMPLE rows.

The layout of HSFace, CASIA-WebFace exports and most released synthetic sets. Identity ids follow
the sorted folder names from ``identities.first_id`` on the first run and stay stable afterwards
(the listing is the name -> id map: new folders get new ids, a removed folder's id is not reused);
images are taken in sorted name order (``sample_idx``), and each row keeps its file as ``source``.
Entries that are not ``<identity>/<image>`` files are counted by reason, never silently dropped.

1. The folder is listed by one Ray task on a worker (a local path every node sees, or ``s3://``):
   ``<output_dir>/ingest/listing.parquet`` holds one row per identity (id, folder name, files), and
   the driver gets back only counts per block.
2. Blocks of ``identities.block_size`` consecutive ids are the resumable work units, as in
   generation: ingest block workers (a Ray Data actor pool, ``faces.pool``) read their part of the
   listing and their files, run the same faces stage (detection, alignment, embedding) and write
   whole blocks, so ``facegen clean``, ``shard`` and ``train`` work on the result unchanged.

A block records the digest of its identities' listing rows: when a folder's files change, its
block is made again. An unreadable file becomes an error row; the job goes on.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from facegen import blocks as blk
from facegen import storage
from facegen.config import FacegenConfig, TaskSettings
from facegen.schema import GENERATED, LANDMARK_DIM, STATUS_ERROR, STATUS_OK, rows_to_batch
from facegen.stages import StageReport
from facegen.stages.generate import BlockGenerator, run_blocks

ORIGIN_INGESTED = "ingested"
#: ``seed`` of ingested rows: they were not generated from one.
NO_SEED = -1
LISTING_FILE = "listing.parquet"
#: ``<output_dir>/ingest/listing.json``: identities, files, skipped entries by reason, the listing's digest.
LISTING_STATS = "listing.json"
LISTING = pa.schema([pa.field("identity_id", pa.int64()), pa.field("name", pa.string()), pa.field("files", pa.list_(pa.string()))])


def listing_path(cfg: FacegenConfig) -> str:
    """``<output_dir>/ingest/listing.parquet``."""
    return f"{cfg.stage_dir('ingest')}/{LISTING_FILE}"


def _filesystem(path: str):
    import pyarrow.fs as pafs

    if storage.is_remote(path):
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), path


#: Schema metadata key of the listing: the first id its name -> id map was made from.
FIRST_ID_KEY = b"facegen.first_id"
#: Why a listed entry is not ingested (counted per reason in the report and the listing's stats).
SKIP_TOP_LEVEL_FILE = "file beside the identity folders"
SKIP_NESTED = "file in a nested folder"
SKIP_EXTENSION = "not an image extension"
SKIP_HIDDEN = "hidden file or folder"
SKIP_EMPTY = "identity folder without images"


def scan_image_folder(images_dir: str, extensions: list[str], first_id: int,
                      known: dict[str, int] | None = None) -> tuple[pa.Table, dict[str, int]]:
    """``images_dir/<identity>/<image>`` as LISTING rows sorted by id, and the count of skipped
    entries by reason; one-line errors for a missing or empty folder.

    Identity ids are stable across runs: a folder named in ``known`` (the previous listing's
    name -> id map) keeps its id, new folders get new ids after the largest one in sorted name
    order, and a removed folder's id is not reused."""
    import pyarrow.fs as pafs

    fs, root = _filesystem(images_dir)
    if fs.get_file_info(root).type != pafs.FileType.Directory:
        raise FileNotFoundError(f"ingest.images_dir: {images_dir}: no such folder")
    root = root.rstrip("/")
    by_identity: dict[str, list[str]] = {}
    skipped: Counter[str] = Counter()
    suffixes = tuple(e.lower() for e in extensions)
    for info in fs.get_file_info(pafs.FileSelector(root, recursive=True)):
        parts = info.path[len(root) + 1 :].split("/")
        if info.type == pafs.FileType.Directory:
            if len(parts) == 1 and not parts[0].startswith("."):
                by_identity.setdefault(parts[0], [])
        elif info.type != pafs.FileType.File:
            continue
        elif any(p.startswith(".") for p in parts):
            skipped[SKIP_HIDDEN] += 1
        elif len(parts) == 1:
            skipped[SKIP_TOP_LEVEL_FILE] += 1
        elif len(parts) > 2:
            skipped[SKIP_NESTED] += 1
        elif not parts[1].lower().endswith(suffixes):
            skipped[SKIP_EXTENSION] += 1
        else:
            by_identity.setdefault(parts[0], []).append(parts[1])  # object stores may list a file before its folder
    skipped[SKIP_EMPTY] += sum(1 for files in by_identity.values() if not files)
    names = sorted(n for n, files in by_identity.items() if files)
    if not names:
        raise FileNotFoundError(f"ingest.images_dir: {images_dir}: no <identity>/<image> files ({', '.join(extensions)})")
    ids = dict(known or {})
    next_id = max(ids.values(), default=first_id - 1) + 1
    for name in names:
        if name not in ids:
            ids[name], next_id = next_id, next_id + 1
    names.sort(key=ids.__getitem__)
    prefix = images_dir.rstrip("/")
    table = pa.table({"identity_id": np.array([ids[n] for n in names], dtype=np.int64), "name": names,
                      "files": [[f"{prefix}/{name}/{f}" for f in sorted(by_identity[name])] for name in names]}, schema=LISTING)
    return table.replace_schema_metadata({FIRST_ID_KEY: str(first_id).encode()}), {k: v for k, v in skipped.items() if v}


def known_identities(listing: str, first_id: int) -> dict[str, int]:
    """The name -> id map of a previous listing at ``listing`` (empty when there is none, or when it
    was made from another ``identities.first_id``)."""
    if not storage.exists(listing):
        return {}
    table = storage.read_table(listing)
    if (table.schema.metadata or {}).get(FIRST_ID_KEY) != str(first_id).encode():
        return {}
    return dict(zip(table.column("name").to_pylist(), table.column("identity_id").to_pylist()))


def _rows_digest(table: pa.Table) -> str:
    blob = json.dumps({"ids": table.column("identity_id").to_pylist(), "names": table.column("name").to_pylist(),
                       "files": table.column("files").to_pylist()})
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def list_folder(images_dir: str, extensions: list[str], first_id: int, block_size: int, out: str) -> dict[str, Any]:
    """Scan the folder (ids kept from the listing already at ``out``), write the new listing there;
    returns per-block ``[block_id, first, end, identities, files, digest]``, totals, skipped entries
    by reason and the listing's digest (run as a Ray task, so the driver never lists millions of files)."""
    table, skipped = scan_image_folder(images_dir, extensions, first_id, known_identities(out, first_id))
    storage.write_table_atomic(table, out)
    ids = table.column("identity_id").to_numpy()
    counts = pc.list_value_length(table.column("files")).to_numpy()
    blocks = []
    for b in np.unique(ids // block_size):
        rows = np.flatnonzero(ids // block_size == b)
        part = table.take(rows)
        first, end = max(first_id, int(b) * block_size), int(b + 1) * block_size
        blocks.append([int(b), first, end, len(rows), int(counts[rows].sum()), _rows_digest(part)])
    return {"identities": len(ids), "files": int(counts.sum()), "blocks": blocks, "skipped": skipped,
            "listing_sha256": _rows_digest(table)}


def _image_row(identity_id: int, block_id: int, sample_idx: int, path: str, name: str) -> dict[str, Any]:
    row = {"identity_id": identity_id, "block_id": block_id, "sample_idx": sample_idx, "seed": NO_SEED, "source": path,
           "landmarks": np.full(LANDMARK_DIM, np.nan, np.float32), "true_identity_id": -1,
           "meta": json.dumps({"identity": name}), "status": STATUS_OK, "reason": ""}
    try:
        row["image"] = storage.read_bytes(path)
        if not row["image"]:
            raise ValueError("empty file")
    except Exception as exc:  # an unreadable file is one error row
        row.update(image=b"", status=STATUS_ERROR, reason=f"ingest: {path}: {type(exc).__name__}: {' '.join(str(exc).split())}"[:500])
    return row


class IngestBlocks(BlockGenerator):
    """Block worker of ingestion: a block's identities and files come from the listing; the face
    stage and the block commit are generation's."""

    def __init__(self, cfg_json: str, stage_dir: str, config_digest: str, embedder: dict[str, Any] | None = None,
                 listing: str = ""):
        self.listing = listing
        super().__init__(cfg_json, stage_dir, config_digest, embedder)

    def build_source(self, cfg: FacegenConfig) -> None:
        return None

    def build_faces(self, settings: Any):
        from facegen.faces.stage import FaceStage

        return FaceStage(settings, origin=ORIGIN_INGESTED)

    def source_for(self, row: dict[str, Any]):
        import pyarrow.parquet as pq

        fs, listing = storage.filesystem(self.listing)
        part = pq.read_table(listing, filesystem=fs, filters=[("identity_id", ">=", int(row["first_id"])),
                                                           ("identity_id", "<", int(row["end_id"]))])
        files = dict(zip(part.column("identity_id").to_pylist(), part.column("files").to_pylist()))
        names = dict(zip(part.column("identity_id").to_pylist(), part.column("name").to_pylist()))

        def source(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            # an id of the block's range without a folder (one removed since its id was given) has no rows
            rows = [_image_row(int(i), int(b), k, path, names[int(i)])
                    for i, b in zip(batch["identity_id"], batch["block_id"]) for k, path in enumerate(files.get(int(i), []))]
            return rows_to_batch(rows, GENERATED)

        return source


def run_ingest(cfg: FacegenConfig, output_dir: str | None = None, progress: bool = True) -> StageReport:
    """Ingest ``cfg.ingest.images_dir`` into raw blocks (``<run.output_dir>/raw``); resumable by block.

    The folder is listed by a Ray task; each block is read, detected, aligned, embedded and written
    by one actor of the ``faces.pool`` Ray Data pool (see :func:`facegen.stages.generate.run_blocks`).
    """
    from facegen.faces.embed import describe_embedder
    from facegen.lineage import settings_digest
    from facegen.stages.tasks import run_task

    if not cfg.ingest.images_dir:
        raise ValueError("ingest.images_dir: no image folder given (facegen ingest --images DIR)")
    embedder = describe_embedder(cfg.faces.embedder)  # a bad embedder fails before the folder is listed
    listing = listing_path(cfg)
    scan = run_task(list_folder, cfg.ingest.images_dir, cfg.ingest.extensions, cfg.identities.first_id,
                    cfg.identities.block_size, listing, resources=TaskSettings(num_cpus=0.25), field="ingest.images_dir",
                    name="ingest: list folder")
    planned = [blk.Block(b, first, end) for b, first, end, _, _, _ in scan["blocks"]]
    people = {b: n for b, _, _, n, _, _ in scan["blocks"]}
    files = {b: n for b, _, _, _, n, _ in scan["blocks"]}
    listed = {b: d for b, _, _, _, _, d in scan["blocks"]}
    storage.write_json_atomic({k: scan[k] for k in ("identities", "files", "skipped", "listing_sha256")},
                              f"{cfg.stage_dir('ingest')}/{LISTING_STATS}")
    digest = settings_digest("ingest", cfg.identities.block_size, cfg.ingest.extensions, cfg.faces)
    report = run_blocks(cfg, "ingest", output_dir or cfg.stage_dir("raw"), planned, digest, IngestBlocks,
                        cfg.faces.pool, "faces.pool", extra_kwargs={"listing": listing},
                        row_inputs=lambda b: {"source_sha256": listed[b.block_id], "identities": people[b.block_id]},
                        images_of=lambda b: files[b.block_id], progress=progress, embedder=embedder,
                        sources=listed)
    report.totals = {k: v for k, v in report.totals.items() if k in ("identities", "images", "images_ok", "images_error", "faces_rejected")}
    report.totals.update({f"skipped: {reason}": n for reason, n in sorted(scan["skipped"].items())})
    return report
