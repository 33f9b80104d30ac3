"""Cleaning stage: one actor-pool task per raw block file -> one cleaned block file.

Identities never span blocks, so per-identity cleaning is block-local and resumes block by
block like generation. The embedder (for augmented images) is loaded once per actor.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from facegen import blocks as blk
from facegen import storage
from facegen.claims import StageClaim
from facegen.config import FacegenConfig
from facegen.stages import StageError, StageReport
from facegen.stages.blockpool import BlockWorker, map_blocks

CLEAN_COUNTERS = [
    "identities_in", "identities_kept", "identities_dropped", "images_in", "images_error",
    "images_removed", "images_augmented", "images_out", "injected_wrong_in", "injected_wrong_removed",
    "images_no_embedding", "images_dropped_with_identity", "images_trimmed", "augment_sources_unreadable",
]


def difficulty_histogram_of(table) -> dict[str, Any]:
    """The difficulty histogram of a block's ok rows (for W&B, the report and the shard stage)."""
    from facegen.curriculum import difficulty_histogram

    ok = np.array(table.column("status").to_pylist(), dtype=object) == "ok"
    difficulty = table.column("difficulty").to_numpy(zero_copy_only=False).astype(np.float64)[ok]
    return difficulty_histogram(difficulty)


class BlockCleaner(BlockWorker):
    """Callable class for ``map_batches``: cleans the blocks named in a batch, returns their stats.

    Each raw block is read with its recorded sha256 checked; the clean block's stats record keeps
    that sha256 (``source_sha256``) and the cleaning settings' digest, so a later run can tell that
    the raw block or the settings changed and clean it again.
    """

    def __init__(self, cfg_json: str, raw_dir: str, clean_dir: str, config_digest: str = ""):
        from facegen.config import FacegenConfig

        self.cfg = FacegenConfig.model_validate_json(cfg_json)
        self.raw_dir, self.clean_dir, self.config_digest = raw_dir, clean_dir, config_digest
        self.embed_fn = None
        if self.cfg.faces.embedder.enabled:
            from facegen.faces.embed import build_embedder

            self.embed_fn = build_embedder(self.cfg.faces.embedder).embed

    def clean_one(self, block_id: int, source_sha256: str | None = None) -> dict[str, Any]:
        """Clean one raw block (checked against ``source_sha256`` when given) and commit it."""
        from facegen.clean.block import clean_block

        table = blk.read_block(self.raw_dir, block_id, sha256=source_sha256)
        cleaned, stats = clean_block(table, self.cfg.clean, self.cfg.run.seed, self.embed_fn, jpeg_quality=self.cfg.faces.jpeg_quality)
        stats.update(source_sha256=source_sha256, config_digest=self.config_digest,
                     difficulty_histogram=difficulty_histogram_of(cleaned),
                     embedder=storage.read_json(blk.stats_path(self.raw_dir, block_id)).get("embedder"))
        return blk.commit_block(self.clean_dir, block_id, cleaned, stats)

    def make(self, row: dict[str, Any]) -> dict[str, Any]:
        """Clean the block of a ``{"block_id", "source_sha256"}`` row."""
        return self.clean_one(int(row["block_id"]), row.get("source_sha256"))


def check_same_embedder(cfg: FacegenConfig, raw_dir: str) -> None:
    """Cleaning embeds its augmented images with ``faces.embedder``: it must be the embedder that
    embedded the raw blocks, or one identity would mix two embedding spaces."""
    from facegen.faces.embed import describe_embedder

    wanted = describe_embedder(cfg.faces.embedder)
    for record in blk.read_stats(raw_dir):
        used = record.get("embedder")
        if wanted and used and used.get("sha256") != wanted["sha256"]:
            raise ValueError(
                f"faces.embedder: {raw_dir} block {record['block_id']} was embedded by {used['kind']} {used['file']} "
                f"({used['sha256'][:12]}), the config names {wanted['kind']} {wanted['file']} ({wanted['sha256'][:12]})"
            )


def run_clean(cfg: FacegenConfig, raw_dir: str | None = None, clean_dir: str | None = None, progress: bool = True) -> StageReport:
    """Clean every finished raw block whose clean block is missing, bad or stale."""
    from tqdm.auto import tqdm

    from facegen.lineage import clean_digest
    from facegen.stages.generate import checksum_fn
    from facegen.tracking import start_stage_tracker

    raw_dir = raw_dir or cfg.stage_dir("raw")
    clean_dir = clean_dir or cfg.stage_dir("clean")
    started = time.time()
    raw = blk.check_blocks(raw_dir)  # sizes only here: each raw block's sha256 is checked as it is read
    if not raw.valid:
        raise FileNotFoundError(f"{raw_dir}: no finished raw blocks to clean (run `facegen generate` first)")
    check_same_embedder(cfg, raw_dir)
    available = sorted(raw.valid)
    sources = {b: raw.valid[b]["sha256"] for b in available}
    digest = clean_digest(cfg)
    with StageClaim(clean_dir) as claim:
        claim.remove_stale_temp_files()
        if cfg.run.overwrite:
            blk.reset_blocks(clean_dir, available)
        check = blk.check_blocks(clean_dir, available, config_digest=digest, sources=sources, checksum=checksum_fn(cfg))
        blk.reset_blocks(clean_dir, check.invalid)
        pending = [b for b in available if b not in check.valid]
        report = StageReport("clean", clean_dir, len(available), len(available) - len(pending), 0, 0.0,
                             blocks_redone=len(check.invalid), notes=raw.notes("raw", "not cleaned") + check.notes("clean"))
        records = list(check.valid.values())
        failures: list[str] = []
        tracker = start_stage_tracker(cfg, "clean")
        rows = [{"block_id": b, "source_sha256": sources[b]} for b in pending]
        kwargs = {"cfg_json": cfg.model_dump_json(), "raw_dir": raw_dir, "clean_dir": clean_dir, "config_digest": digest}
        with tqdm(total=len(pending), unit="block", desc="clean", disable=not progress or not pending) as bar:
            for record in map_blocks(BlockCleaner, kwargs, rows, pool_size=cfg.clean.concurrency, num_cpus=cfg.clean.num_cpus,
                                     num_gpus=cfg.clean.num_gpus, resources=cfg.clean.resources):
                if "error" in record:
                    failures.append(record["error"])
                else:
                    records.append(record)
                    report.blocks_written += 1
                    tracker.log_block(record)
                bar.update(1)
    report.totals = blk.sum_stats(records, CLEAN_COUNTERS)
    report.seconds = round(time.time() - started, 2)
    tracker.finish_stage(report)
    if failures:
        raise StageError(f"clean: {len(failures)} block(s) failed; first: {failures[0]}")
    return report
