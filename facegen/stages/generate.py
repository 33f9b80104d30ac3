"""Generation stage: identity blocks -> generator -> faces -> one raw Parquet file per block.

A Ray Data actor pool of :class:`BlockGenerator` actors (each holding a generator backend and a
:class:`~facegen.faces.stage.FaceStage`, loaded once from this node's copies of the models) takes
one pending block at a time, renders, aligns and embeds its images in micro-batches, and commits
the block itself: data file, then stats record, both atomic (:mod:`facegen.stages.runner`). The
driver only plans and receives one small record per finished block, in whatever order they
finish, so its memory and bandwidth do not grow with the dataset. A block is done when its file and stats record exist and check out (size,
sha256, settings digest: :func:`facegen.blocks.check_blocks`); a re-run after a crash, or after a
block went bad, makes exactly the missing blocks again, with identical bytes.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa

from facegen import blocks as blk
from facegen.config import FacegenConfig, PoolSettings
from facegen.schema import STATUS_OK, batch_embedding_dim, sample_schema, table_from_batch
from facegen.stages import StageReport
from facegen.stages.runner import BlockStage, BlockWorker, run_block_stage

GENERATE_COUNTERS = ["identities", "images", "images_ok", "images_error", "faces_rejected", "injected_wrong"]


def reason_kind(reason: str | None) -> str:
    """An error reason without the sample it names and its details: what the stats count."""
    text = re.sub(r"^faces: identity -?\d+ sample -?\d+: ", "", reason or "")
    text = re.sub(r"^identity_id=-?\d+ sample_idx=-?\d+: ", "", text)
    # files and URIs named in a reason would give every file a key of its own
    text = re.sub(r"(?:\b[a-z][a-z0-9+.-]*:/)?(?:/[^\s:'\"/]+)+/?", "<path>", text)
    return text.split(" (")[0][:120]


def _slice(batch: dict[str, np.ndarray], start: int, stop: int) -> dict[str, np.ndarray]:
    return {k: v[start:stop] for k, v in batch.items()}


def generate_block_table(
    source: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]],
    faces: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]],
    block: blk.Block,
    identities_per_call: int,
    rows_per_face_call: int,
) -> pa.Table:
    """All SAMPLE rows of one block, sorted by (identity_id, sample_idx); no Ray involved.

    ``source`` turns identity rows (``identity_id``, ``block_id``) into GENERATED rows (a generator
    backend, or any reader of existing images); ``faces`` turns GENERATED rows into SAMPLE rows.
    Both are called on micro-batches, so a large block never holds its full-size images at once.
    """
    parts: list[pa.Table] = []
    ids = np.arange(block.first_id, block.end_id, dtype=np.int64)
    for start in range(0, len(ids), identities_per_call):
        chunk = ids[start : start + identities_per_call]
        generated = source({"identity_id": chunk, "block_id": np.full(len(chunk), block.block_id, np.int64)})
        rows = len(generated["identity_id"])
        for first in range(0, rows, rows_per_face_call):
            out = faces(_slice(generated, first, first + rows_per_face_call))
            parts.append(table_from_batch(out, sample_schema(batch_embedding_dim(out))))
    table = pa.concat_tables(parts) if parts else sample_schema().empty_table()
    return table.sort_by([("identity_id", "ascending"), ("sample_idx", "ascending")])


def block_similarity_histograms(table: pa.Table, bins: int) -> dict[str, dict]:
    """Histograms of the requested and realised similarity columns of one block (those that hold
    any value; empty when the generator does not control similarity)."""
    from facegen.identities.expansion import similarity_histogram

    out = {}
    for name in ("requested_similarity", "realised_similarity"):
        column = table.column(name)
        if column.null_count < table.num_rows:
            out[name.split("_")[0]] = similarity_histogram(column.to_numpy(zero_copy_only=False), bins)
    return out


def run_similarity_histograms(records: list[dict[str, Any]]) -> dict[str, dict]:
    """The per-run similarity histograms: the sum of the blocks' histograms."""
    from facegen.identities.expansion import merge_histograms

    out = {}
    for name in ("requested", "realised"):
        merged = merge_histograms([r.get("similarity_histograms", {}).get(name) for r in records])
        if merged:
            out[name] = merged
    return out


def block_stats(table: pa.Table, block: blk.Block, embedder: dict[str, Any] | None = None,
                histogram_bins: int = 40) -> dict[str, Any]:
    """The counters of a raw block's stats record (and of its W&B row); ``embedder`` is the
    embedder's record (:func:`facegen.faces.embed.describe_embedder`). Blocks of an expanding
    generator (``hybrid``) also record their similarity histograms (``histogram_bins`` on [-1, 1])."""
    status = np.array(table.column("status").to_pylist(), dtype=object)
    reasons = np.array(table.column("reason").to_pylist(), dtype=object)
    failed = status != STATUS_OK
    kinds = Counter(reason_kind(r) for r in reasons[failed])
    true_ids = table.column("true_identity_id").to_numpy(zero_copy_only=False)
    ids = table.column("identity_id").to_numpy()
    stats = {
        "identities": block.num_identities,
        "images": table.num_rows,
        "images_ok": int((~failed).sum()),
        "images_error": int(failed.sum()),
        "faces_rejected": int(sum(str(r).startswith("faces:") for r in reasons[failed])),
        "injected_wrong": int(((true_ids >= 0) & (true_ids != ids)).sum()),
        "error_reasons": dict(kinds.most_common(10)),
        "embedder": embedder,
    }
    histograms = block_similarity_histograms(table, histogram_bins)
    return stats | ({"similarity_histograms": histograms} if histograms else {})


class BlockGenerator(BlockWorker):
    """Block worker of generation: makes and commits whole blocks, returns one record each.

    The source of GENERATED rows is :meth:`build_source` (a generator backend); a stage that starts
    from existing images overrides it and keeps everything else (alignment, embedding, commit).
    Models load from this node's copies of the configured inputs (:func:`facegen.cache.localized`).
    """

    def __init__(self, cfg_json: str, stage_dir: str, config_digest: str, embedder: dict[str, Any] | None = None):
        from facegen.cache import localized

        self.cfg = FacegenConfig.model_validate_json(cfg_json)
        self.stage_dir, self.config_digest, self.embedder = stage_dir, config_digest, embedder
        self.source = self.build_source(self.cfg)
        self.faces = self.build_faces(localized(self.cfg.faces, "faces"))
        if self.embedder is not None:
            self.embedder = {**self.embedder, "dim": int(self.faces.dim)}

    def build_source(self, cfg: FacegenConfig) -> Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]] | None:
        """The callable turning identity rows into GENERATED rows: the configured generator."""
        from facegen.cache import localized
        from facegen.generators import build_generator

        settings = localized(cfg.generator, "generator")
        source = build_generator(settings, cfg.run.seed)
        if hasattr(source, "emit_pixels"):
            source.emit_pixels = True  # the face stage runs in this process: no PNG round trip
        return source

    def build_faces(self, settings: Any) -> Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]:
        """The face stage (detection, alignment, embedding) the GENERATED rows go through."""
        from facegen.faces.stage import FaceStage

        return FaceStage(settings)

    def source_for(self, row: dict[str, Any]) -> Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]:
        """The source of one block's GENERATED rows (a stage whose rows carry their inputs overrides it);
        a row naming its ``identity_block`` feeds the generator the sampled latents from it."""
        if row.get("identity_block"):
            from facegen.stages.identity_blocks import with_latents

            return with_latents(self.source, row["identity_block"])
        return self.source

    def make(self, row: dict[str, Any]) -> dict[str, Any]:
        """Generate, align, embed and commit one block; returns its stats record."""
        started, cpu_started = time.time(), time.process_time()
        block = blk.Block(int(row["block_id"]), int(row["first_id"]), int(row["end_id"]))
        table = generate_block_table(self.source_for(row), self.faces, block, self.cfg.generator.batch_size, self.cfg.faces.batch_size)
        stats = block_stats(table, block, self.embedder, self.cfg.generator.hybrid.expansion.histogram_bins)
        stats.update(config_digest=self.config_digest, seconds=round(time.time() - started, 2),
                     cpu_seconds=round(time.process_time() - cpu_started, 2), started=round(started, 3),
                     finished=round(time.time(), 3))
        if row.get("source_sha256"):
            stats["source_sha256"] = row["source_sha256"]  # what the block was made from (an ingest listing)
        if row.get("identities") is not None:
            stats["identities"] = int(row["identities"])  # a block whose id range has gaps (ingest)
        return self.commit(self.stage_dir, block.block_id, table, stats)


def run_blocks(
    cfg: FacegenConfig, stage: str, out: str, planned: list[blk.Block], digest: str, worker: type,
    pool: PoolSettings, pool_field: str, extra_kwargs: dict[str, Any] | None = None,
    row_inputs: Callable[[blk.Block], dict[str, Any]] | None = None, images_of: Callable[[blk.Block], int] | None = None,
    progress: bool = True, embedder: dict[str, Any] | None = None, sources: dict[int, str] | None = None,
) -> StageReport:
    """Make every block of ``planned`` that is not done (or no longer valid) in ``out`` with a pool
    of ``worker`` block actors (:func:`facegen.stages.runner.run_block_stage`), tracked in W&B.

    ``row_inputs(block)`` adds a block's own inputs to its work row (its identity block's path);
    ``images_of(block)`` is how many images it will hold (for the progress bar); ``sources`` (block
    id -> digest of its inputs) redoes a block whose inputs changed.
    """
    from facegen.tracking import start_stage_tracker

    tracker = start_stage_tracker(cfg, stage)
    kwargs = {"cfg_json": cfg.model_dump_json(), "stage_dir": out, "config_digest": digest, "embedder": embedder,
              **(extra_kwargs or {})}
    jobs = {b.block_id: {"first_id": b.first_id, "end_id": b.end_id, **(row_inputs(b) if row_inputs else {})} for b in planned}
    units = {b.block_id: images_of(b) for b in planned} if images_of else None
    try:
        outcome = run_block_stage(BlockStage(
            stage, out, worker, kwargs, pool, pool_field, jobs, config_digest=digest, sources=sources, verify=cfg.run.verify,
            overwrite=cfg.run.overwrite, units=units, unit="img" if units else "block", on_record=tracker.log_block,
        ), progress=progress)
    except BaseException:
        tracker.finish()
        raise
    report, records = outcome.report, list(outcome.records.values())
    report.totals = blk.sum_stats(records, GENERATE_COUNTERS)
    report.histograms = run_similarity_histograms(records)
    tracker.log_histograms(report.histograms, "similarity")
    tracker.finish_stage(report)
    return report


def run_generate(cfg: FacegenConfig, output_dir: str | None = None, progress: bool = True) -> StageReport:
    """Generate every block of ``cfg.identities`` that is not done (or no longer valid) into ``output_dir``."""
    from facegen.faces.embed import describe_embedder
    from facegen.lineage import raw_digest, settings_digest
    from facegen.stages.directions import with_fitted_directions
    from facegen.stages.identity_blocks import identity_block_inputs

    cfg = with_fitted_directions(cfg)  # disco.fit: this run's directions, by content in the digest below
    per_id = cfg.generator.images_per_identity
    planned = blk.plan_blocks(cfg.identities)
    digest, row_inputs = raw_digest(cfg), None
    sampled = identity_block_inputs(cfg, planned)  # a GAN backend after the identities stage: its latents
    if sampled is not None:
        row_inputs, identities_digest = sampled
        digest = settings_digest(digest, identities_digest)  # resampled identities redo the raw blocks
    return run_blocks(cfg, "generate", output_dir or cfg.stage_dir("raw"), planned, digest, BlockGenerator,
                      cfg.generator.pool, "generator.pool", row_inputs=row_inputs,
                      images_of=lambda b: b.num_identities * per_id, progress=progress,
                      embedder=describe_embedder(cfg.faces.embedder))
