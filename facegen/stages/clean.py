"""Cleaning stage: expert pass per block, global dedup + leakage, final pass per block.

1. Expert pass (an actor pool, one task per raw block): the experts vote, fusion decides; the
   block's rows with their votes go to ``<output>/clean_votes`` with one centre per identity.
2. Global steps on the driver (:mod:`facegen.clean.global_steps`), streaming the centres.
3. Final pass (an actor pool, one task per block): the global plan applied, minimum size,
   semi-hard trim, top-up; the final blocks go to ``<output>/clean``. A final block records the
   plan digest it was made with and is redone when the plan changes.
Every part resumes: finished blocks and an up-to-date plan are skipped on a re-run.
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
    "identities_in", "identities_kept", "identities_dropped", "identities_removed_dedup", "identities_removed_leakage",
    "images_in", "images_error", "images_removed", "images_augmented", "images_out", "injected_wrong_in",
    "injected_wrong_removed", "images_no_embedding", "images_dropped_with_identity", "images_removed_global",
    "images_trimmed", "augment_sources_unreadable",
]


def _embed_fn(cfg: FacegenConfig):
    if not cfg.faces.embedder.enabled:
        return None
    from facegen.faces.embed import build_embedder

    return build_embedder(cfg.faces.embedder).embed


class _BlockTask:
    """Shared ``map_batches`` plumbing: one block per row, failures become records, not crashes."""

    def run(self, block_id: int) -> dict[str, Any]:
        raise NotImplementedError

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        results = []
        for block_id in batch["block_id"]:
            try:
                record = self.run(int(block_id))
            except Exception as exc:  # one unreadable block must not stop the others
                record = {"block_id": int(block_id), "error": f"block {int(block_id)}: {type(exc).__name__}: {exc}"}
            results.append(json.dumps(record, default=float))
        return {"block_id": batch["block_id"], "record": np.array(results, dtype=object)}


class BlockVoter(_BlockTask):
    """Callable class for ``map_batches``: the expert pass of the blocks named in a batch."""

    def __init__(self, cfg_json: str, raw_dir: str, votes_dir: str):
        from facegen.clean.block import Experts

        self.cfg = FacegenConfig.model_validate_json(cfg_json)
        self.raw_dir, self.votes_dir = raw_dir, votes_dir
        settings = self.cfg.clean
        self.experts = Experts()
        if settings.independent.enabled:
            from facegen.clean.independent import IndependentExpert

            self.experts.independent = IndependentExpert.from_settings(settings.independent)
        if settings.vlm.enabled:
            from facegen.clean.vlm import VlmExpert

            cache = settings.vlm.cache_dir or self.cfg.stage_dir("clean_vlm_cache")
            self.experts.vlm = VlmExpert(settings.vlm, cache)

    def run(self, block_id: int) -> dict[str, Any]:
        from facegen.clean.block import vote_block
        from facegen.clean.global_steps import centres_path

        table = storage.read_table(blk.block_path(self.raw_dir, block_id))
        voted, centres, stats = vote_block(table, block_id, self.cfg.clean, self.experts)
        stats["embedder"] = storage.read_json(blk.stats_path(self.raw_dir, block_id)).get("embedder")
        storage.write_table_atomic(centres, centres_path(self.votes_dir, block_id))
        return blk.commit_block(self.votes_dir, block_id, voted, stats)


class BlockFinisher(_BlockTask):
    """Callable class for ``map_batches``: the final pass of the blocks named in a batch."""

    def __init__(self, cfg_json: str, votes_dir: str, clean_dir: str, global_dir: str):
        from facegen.clean.global_steps import GlobalPlan

        self.cfg = FacegenConfig.model_validate_json(cfg_json)
        self.votes_dir, self.clean_dir = votes_dir, clean_dir
        summary = storage.read_json(f"{global_dir.rstrip('/')}/global.json")
        self.plan = GlobalPlan.from_table(summary["digest"], storage.read_table(f"{global_dir.rstrip('/')}/plan.parquet"))
        self.embed_fn = _embed_fn(self.cfg)

    def run(self, block_id: int) -> dict[str, Any]:
        from facegen.clean.block import combine_stats
        from facegen.clean.finish import finish_block
        from facegen.clean.merge import merged_rows

        removed, leaving, incoming = self.plan.for_block(block_id)
        table = storage.read_table(blk.block_path(self.votes_dir, block_id))
        if leaving:
            import pyarrow as pa
            import pyarrow.compute as pc

            table = table.filter(pc.invert(pc.is_in(table.column("identity_id"), value_set=pa.array(sorted(leaving), pa.int64()))))
        merged_in = merged_rows(self.votes_dir, table, incoming) if incoming else None
        out, final_stats = finish_block(table, self.cfg.clean, self.cfg.run.seed, self.embed_fn, removed=removed,
                                        merged_in=merged_in, jpeg_quality=self.cfg.faces.jpeg_quality)
        votes_stats = storage.read_json(blk.stats_path(self.votes_dir, block_id))
        votes_stats = {k: v for k, v in votes_stats.items() if k not in ("block_id", "rows", "bytes", "sha256")}
        stats = combine_stats(votes_stats, final_stats)
        stats["plan_digest"] = self.plan.digest
        return blk.commit_block(self.clean_dir, block_id, out, stats)


def _run_pool(cfg: FacegenConfig, task: type, kwargs: dict[str, Any], block_ids: list[int], desc: str, progress: bool) -> None:
    import ray
    from ray.data import ActorPoolStrategy
    from tqdm.auto import tqdm

    if not block_ids:
        return
    ds = ray.data.from_items([{"block_id": b} for b in block_ids], override_num_blocks=len(block_ids))
    ds = ds.map_batches(task, fn_constructor_kwargs=kwargs, batch_size=1, batch_format="numpy",
                        compute=ActorPoolStrategy(size=min(cfg.clean.concurrency, len(block_ids))),
                        num_cpus=cfg.clean.num_cpus, num_gpus=cfg.clean.num_gpus, resources=cfg.clean.resources or None)
    failures = []
    with tqdm(total=len(block_ids), unit="block", desc=desc, disable=not progress) as bar:
        for row in ds.iter_rows():
            record = json.loads(row["record"])
            if "error" in record:
                failures.append(record["error"])
            bar.update(1)
    if failures:
        raise RuntimeError(f"{desc}: {len(failures)} block(s) failed; first: {failures[0]}")


def _record_summary(cfg: FacegenConfig, global_dir: str, totals: dict[str, int], records: list[dict[str, Any]],
                    global_summary: dict[str, Any]) -> None:
    """``clean_summary.json`` (distributions, votes, global steps) and the same figures in W&B."""
    from facegen.clean.summary import clean_summary, log_to_wandb
    from facegen.tracking import start_run

    summary = {"totals": totals, **clean_summary(records), "global": global_summary}
    storage.write_json_atomic(summary, f"{global_dir}/clean_summary.json")
    tracker = start_run(cfg, "clean")
    try:
        log_to_wandb(tracker, totals, summary)
    finally:
        tracker.finish()


def _final_is_current(clean_dir: str, block_id: int, digest: str) -> bool:
    return blk.is_done(clean_dir, block_id) and storage.read_json(blk.stats_path(clean_dir, block_id)).get("plan_digest") == digest


def replacement_config(cfg: FacegenConfig, first_id: int, count: int) -> FacegenConfig:
    """The run's settings for generating ``count`` new identities from ``first_id`` into the same raw blocks."""
    side = cfg.model_copy(deep=True)
    side.identities.first_id, side.identities.num_identities = first_id, count
    side.run.overwrite = False
    return side


def _replace_dropped(cfg: FacegenConfig, global_dir: str, totals: dict[str, int], progress: bool) -> bool:
    """HybridGen step 5: new identities from the configured generator for the ones cleaning removed.

    One round: the plan (first id, count) is recorded in ``replacements.json`` before generating,
    so a re-run resumes the same identities and never replaces replacements. Returns whether new
    raw blocks were generated.
    """
    from facegen.stages.generate import run_generate

    path = f"{global_dir}/replacements.json"
    if storage.exists(path):
        plan = storage.read_json(path)
    else:
        removed = totals["identities_dropped"] + totals["identities_removed_dedup"] + totals["identities_removed_leakage"]
        ids, size = cfg.identities, cfg.identities.block_size
        first = -(-(ids.first_id + ids.num_identities) // size) * size  # the next free block
        plan = {"first_id": first, "count": removed, "replaces": removed}
        storage.write_json_atomic(plan, path)
    if plan["count"] == 0:
        return False
    report = run_generate(replacement_config(cfg, plan["first_id"], plan["count"]), progress=progress)
    return report.blocks_written > 0


def _clean_blocks(cfg: FacegenConfig, raw_dir: str, clean_dir: str, progress: bool) -> StageReport:
    from facegen.clean.global_steps import run_global

    votes_dir, global_dir = f"{clean_dir.rstrip('/')}_votes", f"{clean_dir.rstrip('/')}_global"
    started = time.time()
    available = blk.done_block_ids(raw_dir)
    if not available:
        raise FileNotFoundError(f"{raw_dir}: no finished raw blocks to clean (run `facegen generate` first)")
    if cfg.run.overwrite:
        blk.reset_blocks(votes_dir, available)
        blk.reset_blocks(clean_dir, available)
    for directory in (votes_dir, clean_dir):
        storage.remove_temp_files(directory)
    cfg_json = cfg.model_dump_json()
    pending = [b for b in available if not blk.is_done(votes_dir, b)]
    _run_pool(cfg, BlockVoter, {"cfg_json": cfg_json, "raw_dir": raw_dir, "votes_dir": votes_dir}, pending, "clean: experts", progress)
    plan, summary = run_global(votes_dir, global_dir, cfg.clean, overwrite=cfg.run.overwrite and bool(pending))
    final = [b for b in available if not _final_is_current(clean_dir, b, plan.digest)]
    _run_pool(cfg, BlockFinisher, {"cfg_json": cfg_json, "votes_dir": votes_dir, "clean_dir": clean_dir, "global_dir": global_dir},
              final, "clean: finish", progress)
    records = blk.read_stats(clean_dir)
    totals = blk.sum_stats(records, CLEAN_COUNTERS)
    if final or not storage.exists(f"{global_dir}/clean_summary.json"):
        _record_summary(cfg, global_dir, totals, records, summary)
    return StageReport("clean", clean_dir, len(available), len(available) - len(final), len(final), round(time.time() - started, 2), totals)


def run_clean(cfg: FacegenConfig, raw_dir: str | None = None, clean_dir: str | None = None, progress: bool = True) -> StageReport:
    """Clean every finished raw block: expert pass, global steps, final pass (each resumable);
    with ``clean.replace_dropped``, then generate replacements for the removed identities and clean again."""
    raw_dir = raw_dir or cfg.stage_dir("raw")
    clean_dir = clean_dir or cfg.stage_dir("clean")
    if cfg.clean.leakage.references:  # fail before any expensive work
        from facegen.clean.leakage import ReferenceSet

        ReferenceSet(cfg.clean.leakage.references)
    if cfg.clean.replace_dropped and raw_dir != cfg.stage_dir("raw"):
        raise ValueError("clean.replace_dropped: replacements are generated into the run's raw directory; do not pass another raw_dir")
    report = _clean_blocks(cfg, raw_dir, clean_dir, progress)
    if cfg.clean.replace_dropped and _replace_dropped(cfg, f"{clean_dir.rstrip('/')}_global", report.totals, progress):
        first = report
        report = _clean_blocks(cfg, raw_dir, clean_dir, progress)
        report.seconds = round(report.seconds + first.seconds, 2)
    return report
