"""Ingest stage: an image folder ``DIR/<identity>/<image>`` -> raw blocks of SAMPLE rows.

The layout of HSFace, CASIA-WebFace exports and most released synthetic sets. Identity ids are the
positions of the sorted folder names (plus ``identities.first_id``), images are taken in sorted
name order (``sample_idx``), and each row keeps its file as ``source``. Blocks of
``identities.block_size`` consecutive ids are the resumable work units, as in generation; the
files go through the same faces stage (detection, alignment, embedding) in the same block actors
as generation (each reads, processes and writes whole blocks), so ``facegen clean``, ``shard`` and
``train`` work on the result unchanged. An unreadable file
becomes an error row; the job goes on.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from facegen import blocks as blk
from facegen import storage
from facegen.config import FacegenConfig
from facegen.schema import GENERATED, LANDMARK_DIM, STATUS_ERROR, STATUS_OK, rows_to_batch
from facegen.stages import StageReport
from facegen.stages.generate import BlockGenerator, run_blocks

ORIGIN_INGESTED = "ingested"
#: ``seed`` of ingested rows: they were not generated from one.
NO_SEED = -1


@dataclass(frozen=True)
class IngestPlan:
    """The folder as work: per identity id its folder name and image paths; the blocks."""

    images_dir: str
    names: dict[int, str]
    files: dict[int, list[str]]
    blocks: list[blk.Block]

    def expected_rows(self, blocks: list[blk.Block]) -> dict[int, int]:
        """Rows each block will hold: one per image file of its identities."""
        return {b.block_id: sum(len(self.files[i]) for i in range(b.first_id, b.end_id)) for b in blocks}


def _filesystem(path: str):
    import pyarrow.fs as pafs

    if storage.is_remote(path):
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), path


def scan_image_folder(images_dir: str, extensions: list[str], first_id: int, block_size: int) -> IngestPlan:
    """List ``images_dir/<identity>/<image>``; one-line errors for a missing or empty folder."""
    import pyarrow.fs as pafs

    fs, root = _filesystem(images_dir)
    if fs.get_file_info(root).type != pafs.FileType.Directory:
        raise FileNotFoundError(f"ingest.images_dir: {images_dir}: no such folder")
    root = root.rstrip("/")
    by_identity: dict[str, list[str]] = {}
    suffixes = tuple(e.lower() for e in extensions)
    for info in fs.get_file_info(pafs.FileSelector(root, recursive=True)):
        parts = info.path[len(root) + 1 :].split("/")
        if info.type == pafs.FileType.Directory and len(parts) == 1:
            by_identity.setdefault(parts[0], [])
        elif info.type == pafs.FileType.File and len(parts) == 2 and parts[1].lower().endswith(suffixes):
            by_identity.setdefault(parts[0], []).append(parts[1])
    names = sorted(n for n, files in by_identity.items() if files and not n.startswith("."))
    if not names:
        raise FileNotFoundError(f"ingest.images_dir: {images_dir}: no <identity>/<image> files ({', '.join(extensions)})")
    prefix = images_dir.rstrip("/")
    identity_names = {first_id + k: name for k, name in enumerate(names)}
    files = {i: [f"{prefix}/{name}/{f}" for f in sorted(by_identity[name])] for i, name in identity_names.items()}
    last = first_id + len(names)
    blocks = [blk.Block(b, max(first_id, b * block_size), min(last, (b + 1) * block_size))
              for b in range(first_id // block_size, (last - 1) // block_size + 1)]
    return IngestPlan(images_dir, identity_names, files, blocks)


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


def read_images(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """File rows (identity_id, block_id, sample_idx, path, name) -> GENERATED rows."""
    rows = [_image_row(int(i), int(b), int(k), str(p), str(n))
            for i, b, k, p, n in zip(batch["identity_id"], batch["block_id"], batch["sample_idx"], batch["path"], batch["name"])]
    return rows_to_batch(rows, GENERATED)


class IngestBlocks(BlockGenerator):
    """Block actor of ingestion: a block's work row carries its identities' files and names; the
    face stage and the block commit are generation's."""

    def build_source(self, cfg: FacegenConfig) -> None:
        return None

    def build_faces(self, cfg: FacegenConfig):
        from facegen.faces.stage import FaceStage

        return FaceStage(cfg.faces, origin=ORIGIN_INGESTED)

    def source_for(self, row: dict[str, Any]):
        files = {int(i): paths for i, paths in row["files"].items()}
        names = {int(i): name for i, name in row["names"].items()}

        def source(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            rows = [_image_row(int(i), int(b), k, path, names[int(i)])
                    for i, b in zip(batch["identity_id"], batch["block_id"]) for k, path in enumerate(files[int(i)])]
            return rows_to_batch(rows, GENERATED)

        return source


def run_ingest(cfg: FacegenConfig, plan: IngestPlan | None = None, output_dir: str | None = None, progress: bool = True) -> StageReport:
    """Ingest ``cfg.ingest.images_dir`` into raw blocks (``<run.output_dir>/raw``); resumable by block.

    Each block is read, detected, aligned, embedded and written by one actor of a pool of
    ``faces.concurrency`` (see :func:`facegen.stages.generate.run_blocks`).
    """
    from facegen.lineage import settings_digest

    if plan is None:
        if not cfg.ingest.images_dir:
            raise ValueError("ingest.images_dir: no image folder given (facegen ingest --images DIR)")
        plan = scan_image_folder(cfg.ingest.images_dir, cfg.ingest.extensions, cfg.identities.first_id, cfg.identities.block_size)
    digest = settings_digest("ingest", cfg.identities.block_size, cfg.ingest, cfg.faces)

    def inputs(block: blk.Block) -> dict[str, Any]:
        ids = range(block.first_id, block.end_id)
        return {"files": {str(i): plan.files[i] for i in ids}, "names": {str(i): plan.names[i] for i in ids}}

    report = run_blocks(cfg, "ingest", output_dir or cfg.stage_dir("raw"), plan.blocks, digest, IngestBlocks,
                        cfg.faces.concurrency, row_inputs=inputs, images_of=lambda b: plan.expected_rows([b])[b.block_id],
                        progress=progress)
    report.totals = {k: v for k, v in report.totals.items() if k in ("identities", "images", "images_ok", "images_error", "faces_rejected")}
    return report
