"""Ingest stage: an image folder ``DIR/<identity>/<image>`` -> raw blocks of SAMPLE rows.

The layout of HSFace, CASIA-WebFace exports and most released synthetic sets. Identity ids are the
positions of the sorted folder names (plus ``identities.first_id``), images are taken in sorted
name order (``sample_idx``), and each row keeps its file as ``source``. Blocks of
``identities.block_size`` consecutive ids are the resumable work units, as in generation; the
files go through the same faces stage (detection, alignment, embedding) on a Ray Data actor pool,
so ``facegen clean``, ``shard`` and ``train`` work on the result unchanged. An unreadable file
becomes an error row; the job goes on.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from facegen import blocks as blk
from facegen import storage
from facegen.config import FacegenConfig
from facegen.schema import GENERATED, LANDMARK_DIM, STATUS_ERROR, STATUS_OK, rows_to_batch
from facegen.stages import StageReport

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
    """Ray Data task: file rows (identity_id, block_id, sample_idx, path, name) -> GENERATED rows."""
    rows = [_image_row(int(i), int(b), int(k), str(p), str(n))
            for i, b, k, p, n in zip(batch["identity_id"], batch["block_id"], batch["sample_idx"], batch["path"], batch["name"])]
    return rows_to_batch(rows, GENERATED)


def run_ingest(cfg: FacegenConfig, plan: IngestPlan | None = None, output_dir: str | None = None, progress: bool = True) -> StageReport:
    """Ingest ``cfg.ingest.images_dir`` into raw blocks (``<run.output_dir>/raw``); resumable by block."""
    import ray
    from tqdm.auto import tqdm

    from facegen.faces.embed import describe_embedder
    from facegen.faces.stage import FaceStage
    from facegen.stages.generate import BlockWriter, map_with_actor_pool

    if plan is None:
        if not cfg.ingest.images_dir:
            raise ValueError("ingest.images_dir: no image folder given (facegen ingest --images DIR)")
        plan = scan_image_folder(cfg.ingest.images_dir, cfg.ingest.extensions, cfg.identities.first_id, cfg.identities.block_size)
    embedder = describe_embedder(cfg.faces.embedder)
    out = output_dir or cfg.stage_dir("raw")
    started = time.time()
    storage.remove_temp_files(out)
    if cfg.run.overwrite:
        blk.reset_blocks(out, [b.block_id for b in plan.blocks])
    pending = [b for b in plan.blocks if not blk.is_done(out, b.block_id)]
    report = StageReport("ingest", out, len(plan.blocks), len(plan.blocks) - len(pending), 0, 0.0)
    if pending:
        expected = plan.expected_rows(pending)
        writer = BlockWriter(out, pending, 0, expected_rows=expected, embedder=embedder)
        items = [{"identity_id": i, "block_id": b.block_id, "sample_idx": k, "path": path, "name": plan.names[i]}
                 for b in pending for i in range(b.first_id, b.end_id) for k, path in enumerate(plan.files[i])]
        ds = ray.data.from_items(items, override_num_blocks=max(1, min(len(items) // cfg.faces.batch_size, 200)))
        ds = ds.map_batches(read_images, batch_format="numpy", batch_size=cfg.faces.batch_size, num_cpus=cfg.faces.num_cpus)
        ds = map_with_actor_pool(ds, FaceStage, {"settings": cfg.faces, "origin": ORIGIN_INGESTED}, cfg.faces)
        context = ray.data.DataContext.get_current()
        keep_order, context.execution_options.preserve_order = context.execution_options.preserve_order, True
        bar = tqdm(total=len(items), unit="img", desc=f"ingest ({len(pending)} blocks)", disable=not progress)
        try:
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                bar.update(writer.add(batch))
        finally:
            context.execution_options.preserve_order = keep_order
            bar.close()
        missing = writer.unfinished()
        if missing:
            raise RuntimeError(f"ingest: blocks ended incomplete {missing} (received, expected)")
        report.blocks_written = len(writer.written)
    records = blk.read_stats(out)
    report.totals = blk.sum_stats(records, ["identities", "images", "images_ok", "images_error"])
    report.seconds = round(time.time() - started, 2)
    return report
