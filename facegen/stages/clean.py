"""Cleaning stage: expert pass per block, global dedup + leakage, final pass per block.

1. Expert pass (a Ray Data actor pool, ``clean.pool``, one call per raw block, the raw block's
   sha256 checked as it is read): the experts vote, fusion decides; the block's rows with their
   votes go to ``<output>/clean_votes`` with one centre per identity.
2. Global steps (:mod:`facegen.clean.global_steps`) in one Ray task on a worker
   (``clean.global_task``: a GPU for faiss where configured), streaming the centres.
3. Final pass (the same pool, one call per block): the global plan applied, minimum size,
   semi-hard trim, top-up; the final blocks go to ``<output>/clean``.

Every part resumes, and every output records what it was made from (:mod:`facegen.lineage`): a
votes block its raw block's sha256 and the expert settings' digest; a final block the same raw
sha256, the digest of every cleaning setting and the digest of its own part of the global plan.
A block whose inputs or settings changed, or whose file is truncated or corrupt, is made again
(and the report says so); everything else is skipped.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from facegen import blocks as blk
from facegen import storage
from facegen.config import CleanSettings, FacegenConfig
from facegen.stages import StageReport
from facegen.stages.runner import BlockStage, BlockWorker, run_block_stage

CLEAN_COUNTERS = [
    "identities_in", "identities_kept", "identities_dropped", "identities_removed_dedup", "identities_removed_leakage",
    "images_in", "images_error", "images_removed", "images_augmented", "images_out", "injected_wrong_in",
    "injected_wrong_removed", "images_no_embedding", "images_dropped_with_identity", "images_removed_global",
    "images_trimmed", "augment_sources_unreadable",
]


def difficulty_histogram_of(table) -> dict[str, Any]:
    """The difficulty histogram of a block's ok rows (for W&B, the report and the shard stage)."""
    from facegen.curriculum import difficulty_histogram

    ok = np.array(table.column("status").to_pylist(), dtype=object) == "ok"
    difficulty = table.column("difficulty").to_numpy(zero_copy_only=False).astype(np.float64)[ok]
    return difficulty_histogram(difficulty)


def votes_digest(cfg: FacegenConfig) -> str:
    """What shapes a votes block besides its raw block: the experts, the fusion, the embedder."""
    from facegen.clean.block import CENTRES_FORMAT
    from facegen.lineage import settings_digest

    c = cfg.clean
    return settings_digest(cfg.run.seed, c.dbscan, c.experts, c.fusion, cfg.faces, CENTRES_FORMAT)


class BlockVoter(BlockWorker):
    """Block actor of the expert pass: reads a raw block (sha256 checked), writes its votes block."""

    def __init__(self, cfg_json: str, raw_dir: str, votes_dir: str, config_digest: str):
        from facegen.cache import localized
        from facegen.clean.block import build_experts

        self.cfg = FacegenConfig.model_validate_json(cfg_json)
        self.raw_dir, self.votes_dir, self.config_digest = raw_dir, votes_dir, config_digest
        clean = self.cfg.clean.model_copy(update={"experts": [
            localized(e, f"clean.experts[{i}]") for i, e in enumerate(self.cfg.clean.experts)]})
        self.experts = build_experts(clean, stage_dir=self.cfg.stage_dir)

    def make(self, row: dict[str, Any]) -> dict[str, Any]:
        """Vote on the block of a ``{"block_id", "source_sha256"}`` row."""
        from facegen.clean.block import vote_block
        from facegen.clean.global_steps import centres_path

        block_id, source = int(row["block_id"]), row.get("source_sha256")
        table = blk.read_block(self.raw_dir, block_id, sha256=source)
        voted, centres, stats = vote_block(table, block_id, self.cfg.clean, self.experts)
        stats.update(source_sha256=source, config_digest=self.config_digest,
                     embedder=storage.read_json(blk.stats_path(self.raw_dir, block_id)).get("embedder"))
        storage.write_table_atomic(centres, centres_path(self.votes_dir, block_id))
        return self.commit(self.votes_dir, block_id, voted, stats)


class BlockFinisher(BlockWorker):
    """Block actor of the final pass: the global plan, minimum size, semi-hard trim, top-up."""

    def __init__(self, cfg_json: str, votes_dir: str, clean_dir: str, global_dir: str, config_digest: str):
        from facegen.clean.global_steps import GlobalPlan

        self.cfg = FacegenConfig.model_validate_json(cfg_json)
        self.votes_dir, self.clean_dir, self.config_digest = votes_dir, clean_dir, config_digest
        summary = storage.read_json(f"{global_dir.rstrip('/')}/global.json")
        self.plan = GlobalPlan.from_table(summary["digest"], storage.read_table(f"{global_dir.rstrip('/')}/plan.parquet"))
        self.embed_fn = None
        if self.cfg.faces.embedder.enabled:
            from facegen.cache import localized
            from facegen.faces.embed import build_embedder

            self.embed_fn = build_embedder(localized(self.cfg.faces.embedder, "faces.embedder")).embed

    def make(self, row: dict[str, Any]) -> dict[str, Any]:
        """Finish the block of a ``{"block_id", "source_sha256", "votes_sha256"}`` row."""
        import pyarrow as pa
        import pyarrow.compute as pc

        from facegen.clean.block import combine_stats
        from facegen.clean.finish import finish_block
        from facegen.clean.merge import merged_rows

        block_id = int(row["block_id"])
        removed, leaving, incoming = self.plan.for_block(block_id)
        table = blk.read_block(self.votes_dir, block_id, sha256=row.get("votes_sha256"))
        if leaving:
            table = table.filter(pc.invert(pc.is_in(table.column("identity_id"), value_set=pa.array(sorted(leaving), pa.int64()))))
        merged_in = merged_rows(self.votes_dir, table, incoming) if incoming else None
        out, final_stats = finish_block(table, self.cfg.clean, self.cfg.run.seed, self.embed_fn, removed=removed,
                                        merged_in=merged_in, jpeg_quality=self.cfg.faces.jpeg_quality)
        votes_stats = storage.read_json(blk.stats_path(self.votes_dir, block_id))
        votes_stats = {k: v for k, v in votes_stats.items()
                       if k not in ("block_id", "rows", "bytes", "sha256", "source_sha256", "config_digest")}
        stats = combine_stats(votes_stats, final_stats)
        stats.update(source_sha256=row.get("source_sha256"), config_digest=self.config_digest,
                     plan_digest=self.plan.block_digest(block_id), difficulty_histogram=difficulty_histogram_of(out))
        return self.commit(self.clean_dir, block_id, out, stats)


def check_same_embedder(cfg: FacegenConfig, raw_dir: str) -> None:
    """Cleaning embeds its augmented images with ``faces.embedder``: it must be the embedder that
    embedded the raw blocks, or one identity would mix two embedding spaces."""
    from facegen.faces.embed import describe_embedder

    wanted = describe_embedder(cfg.faces.embedder)
    for record in blk.read_stats(raw_dir):
        used = record.get("embedder")
        if wanted and used and used.get("digest") != wanted["digest"]:
            raise ValueError(
                f"faces.embedder: {raw_dir} block {record['block_id']} was embedded by {used['kind']} {used['file']} "
                f"({used.get('digest')}), the config names {wanted['kind']} {wanted['file']} ({wanted['digest']}); "
                "re-run generate/ingest with this embedder, or name the one the blocks record"
            )


def _pass(cfg: FacegenConfig, name: str, out: str, worker: type, kwargs: dict[str, Any], jobs: dict[int, dict[str, Any]],
          digest: str, sources: dict[int, str], progress: bool, **options: Any):
    """One per-block pass of cleaning on the ``clean.pool`` actor pool (resumable, checked)."""
    return run_block_stage(BlockStage(name, out, worker, kwargs, cfg.clean.pool, "clean.pool", jobs, config_digest=digest,
                                      sources=sources, verify=cfg.run.verify, overwrite=cfg.run.overwrite, **options),
                           progress=progress)


def _global_task(votes_dir: str, global_dir: str, settings_json: str) -> tuple[Any, dict[str, Any]]:
    """Dedup + leakage on a worker, the references fetched to its node (a Ray task body)."""
    from facegen.cache import localized
    from facegen.clean.global_steps import run_global

    settings = CleanSettings.model_validate_json(settings_json)
    settings = settings.model_copy(update={"leakage": localized(settings.leakage, "clean.leakage")})
    plan, summary = run_global(votes_dir, global_dir, settings)
    return plan.digest, summary


def _check_references(settings_json: str) -> int:
    """Open the leakage references (headers only) on a worker: a bad file fails before any block is cleaned."""
    from facegen.cache import localized
    from facegen.clean.leakage import ReferenceSet

    leakage = localized(CleanSettings.model_validate_json(settings_json).leakage, "clean.leakage")
    return ReferenceSet(leakage.references).dim


def _record_summary(global_dir: str, totals: dict[str, int], records: list[dict[str, Any]],
                    global_summary: dict[str, Any], tracker: Any) -> None:
    """``clean_summary.json`` (distributions, votes, global steps) and the same figures in W&B."""
    from facegen.clean.summary import clean_summary, log_to_wandb

    summary = {"totals": totals, **clean_summary(records), "global": global_summary}
    storage.write_json_atomic(summary, f"{global_dir}/clean_summary.json")
    log_to_wandb(tracker.tracker, totals, summary)


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
    from facegen.clean.global_steps import GlobalPlan
    from facegen.lineage import clean_digest
    from facegen.stages.tasks import run_task
    from facegen.tracking import start_stage_tracker

    votes_dir, global_dir = f"{clean_dir.rstrip('/')}_votes", f"{clean_dir.rstrip('/')}_global"
    started = time.time()
    raw = blk.check_blocks(raw_dir)  # sizes only here: each raw block's sha256 is checked as it is read
    if not raw.valid:
        raise FileNotFoundError(f"{raw_dir}: no finished raw blocks to clean (run `facegen generate` first)")
    check_same_embedder(cfg, raw_dir)
    available = sorted(raw.valid)
    sources = {b: raw.valid[b]["sha256"] for b in available}
    expert_digest, final_digest = votes_digest(cfg), clean_digest(cfg)
    cfg_json = cfg.model_dump_json()
    voted = _pass(cfg, "clean: experts", votes_dir, BlockVoter,
                  {"cfg_json": cfg_json, "raw_dir": raw_dir, "votes_dir": votes_dir, "config_digest": expert_digest},
                  {b: {"source_sha256": sources[b]} for b in available}, expert_digest, sources, progress,
                  notes_outcome="redone")

    plan_digest, global_summary = run_task(_global_task, votes_dir, global_dir, cfg.clean.model_dump_json(),
                                           resources=cfg.clean.global_task, field="clean.global_task", name="clean: dedup + leakage")
    plan = GlobalPlan(plan_digest)  # empty: the digest of a block the plan leaves alone; the finishers read the plan
    plan_digests = global_summary.get("block_digests", {})

    def plan_unchanged(block_id: int, record: dict[str, Any]) -> str | None:
        wanted = plan_digests.get(str(block_id), plan.block_digest(block_id))
        return None if record.get("plan_digest") == wanted else "dedup / leakage decisions for its identities changed"

    tracker = start_stage_tracker(cfg, "clean")
    kwargs = {"cfg_json": cfg_json, "votes_dir": votes_dir, "clean_dir": clean_dir, "global_dir": global_dir,
              "config_digest": final_digest}
    jobs = {b: {"source_sha256": sources[b], "votes_sha256": voted.records[b]["sha256"]} for b in available}
    try:
        final = _pass(cfg, "clean: finish", clean_dir, BlockFinisher, kwargs, jobs, final_digest, sources, progress,
                      still_valid=plan_unchanged, on_record=tracker.log_block)
    except BaseException:
        tracker.finish()
        raise
    report = final.report
    report.stage = "clean"
    report.notes = raw.notes("raw", "not cleaned") + voted.report.notes + report.notes
    records = list(final.records.values())
    report.totals = blk.sum_stats(records, CLEAN_COUNTERS)
    report.seconds = round(time.time() - started, 2)
    if report.blocks_written or not storage.exists(f"{global_dir}/clean_summary.json"):
        _record_summary(global_dir, report.totals, records, global_summary, tracker)
    tracker.finish_stage(report)
    return report


def run_clean(cfg: FacegenConfig, raw_dir: str | None = None, clean_dir: str | None = None, progress: bool = True) -> StageReport:
    """Clean every finished raw block: expert pass, global steps, final pass (each resumable);
    with ``clean.replace_dropped``, then generate replacements for the removed identities and clean again.

    Every threshold is first resolved on the embedder's own scale (its calibration,
    :mod:`facegen.clean.thresholds`), so the workers and the blocks' settings digest see cosines."""
    from facegen.clean.thresholds import describe_thresholds, resolve_clean_settings
    from facegen.faces.calibration import load_calibration

    calibration = load_calibration(cfg.faces.embedder)
    cfg = cfg.model_copy(update={"clean": resolve_clean_settings(cfg.clean, calibration)})
    raw_dir = raw_dir or cfg.stage_dir("raw")
    clean_dir = clean_dir or cfg.stage_dir("clean")
    if cfg.clean.leakage.references:  # fail before any expensive work
        from facegen.stages.tasks import run_task

        run_task(_check_references, cfg.clean.model_dump_json(), resources=cfg.clean.global_task,
                 field="clean.leakage.references", name="clean: check references")
    if cfg.clean.replace_dropped and raw_dir != cfg.stage_dir("raw"):
        raise ValueError("clean.replace_dropped: replacements are generated into the run's raw directory; do not pass another raw_dir")
    report = _clean_blocks(cfg, raw_dir, clean_dir, progress)
    if cfg.clean.replace_dropped and _replace_dropped(cfg, f"{clean_dir.rstrip('/')}_global", report.totals, progress):
        first = report
        report = _clean_blocks(cfg, raw_dir, clean_dir, progress)
        report.seconds = round(report.seconds + first.seconds, 2)
    report.notes.append(describe_thresholds(cfg.clean, calibration))
    return report
