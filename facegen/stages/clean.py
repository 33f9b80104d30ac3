"""Cleaning stage: one actor-pool task per raw block file -> one cleaned block file.

Identities never span blocks, so per-identity cleaning is block-local and resumes block by
block like generation. The embedder (for augmented images) is loaded once per actor.
"""

from __future__ import annotations

import json
import time
from typing import Any

import numpy as np

from facegen import blocks as blk
from facegen import storage
from facegen.config import FacegenConfig
from facegen.stages import StageReport

CLEAN_COUNTERS = [
    "identities_in", "identities_kept", "identities_dropped", "images_in", "images_error",
    "images_removed", "images_augmented", "images_out", "injected_wrong_in", "injected_wrong_removed",
    "images_no_embedding", "images_dropped_with_identity", "images_trimmed", "augment_sources_unreadable",
]


class BlockCleaner:
    """Callable class for ``map_batches``: cleans the blocks named in a batch, returns their stats."""

    def __init__(self, cfg_json: str, raw_dir: str, clean_dir: str):
        from facegen.config import FacegenConfig

        self.cfg = FacegenConfig.model_validate_json(cfg_json)
        self.raw_dir, self.clean_dir = raw_dir, clean_dir
        self.embed_fn = None
        if self.cfg.faces.embedder.enabled:
            from facegen.faces.embed import build_embedder

            self.embed_fn = build_embedder(self.cfg.faces.embedder).embed

    def clean_one(self, block_id: int) -> dict[str, Any]:
        from facegen.clean.block import clean_block

        table = storage.read_table(blk.block_path(self.raw_dir, block_id))
        cleaned, stats = clean_block(table, self.cfg.clean, self.cfg.run.seed, self.embed_fn, jpeg_quality=self.cfg.faces.jpeg_quality)
        stats["embedder"] = storage.read_json(blk.stats_path(self.raw_dir, block_id)).get("embedder")
        return blk.commit_block(self.clean_dir, block_id, cleaned, stats)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        results = []
        for block_id in batch["block_id"]:
            try:
                record = self.clean_one(int(block_id))
            except Exception as exc:  # one unreadable block must not stop the others
                record = {"block_id": int(block_id), "error": f"block {int(block_id)}: {type(exc).__name__}: {exc}"}
            results.append(json.dumps(record, default=float))
        return {"block_id": batch["block_id"], "record": np.array(results, dtype=object)}


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
    """Clean every finished raw block that has no cleaned counterpart yet."""
    import ray
    from ray.data import ActorPoolStrategy
    from tqdm.auto import tqdm

    raw_dir = raw_dir or cfg.stage_dir("raw")
    clean_dir = clean_dir or cfg.stage_dir("clean")
    started = time.time()
    available = blk.done_block_ids(raw_dir)
    if not available:
        raise FileNotFoundError(f"{raw_dir}: no finished raw blocks to clean (run `facegen generate` first)")
    check_same_embedder(cfg, raw_dir)
    if cfg.run.overwrite:
        blk.reset_blocks(clean_dir, available)
    storage.remove_temp_files(clean_dir)
    pending = [b for b in available if not blk.is_done(clean_dir, b)]
    failures: list[str] = []
    if pending:
        ds = ray.data.from_items([{"block_id": b} for b in pending], override_num_blocks=len(pending))
        ds = ds.map_batches(
            BlockCleaner,
            fn_constructor_kwargs={"cfg_json": cfg.model_dump_json(), "raw_dir": raw_dir, "clean_dir": clean_dir},
            batch_size=1,
            batch_format="numpy",
            compute=ActorPoolStrategy(size=min(cfg.clean.concurrency, len(pending))),
            num_cpus=cfg.clean.num_cpus,
            num_gpus=cfg.clean.num_gpus,
            resources=cfg.clean.resources or None,
        )
        with tqdm(total=len(pending), unit="block", desc="clean", disable=not progress) as bar:
            for row in ds.iter_rows():
                record = json.loads(row["record"])
                if "error" in record:
                    failures.append(record["error"])
                bar.update(1)
    if failures:
        raise RuntimeError(f"clean: {len(failures)} block(s) failed; first: {failures[0]}")
    records = blk.read_stats(clean_dir)
    return StageReport("clean", clean_dir, len(available), len(available) - len(pending), len(pending),
                       round(time.time() - started, 2), blk.sum_stats(records, CLEAN_COUNTERS))
