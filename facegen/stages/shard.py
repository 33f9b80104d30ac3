"""Curriculum sharding stage: global difficulty buckets, then each block split into bucket files.

Pass 1 runs one Ray task per source block that reads only its ``difficulty``/``identity_id``/
``status`` columns and returns a mergeable difficulty sketch and the block's identity ids; the
driver merges the sketches into the bucket edges (it never holds every row). Pass 2 is a block
stage on the ``shards.pool`` Ray Data actor pool (:mod:`facegen.stages.runner`): each worker reads
one block (sha256 checked), writes its bucket files and then its done-marker
``blocks/block-XXXXXX.stats.json`` (the shard records), so an interrupted pass resumes block by
block. The manifest is written last, so its presence means the shard set is complete; it records
the source blocks' sha256 and the shard settings' digest, and the set is rebuilt when either changes.
"""

from __future__ import annotations

import json
import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from facegen import blocks as blk
from facegen import storage
from facegen.config import FacegenConfig
from facegen.stages import StageReport
from facegen.stages.runner import BlockStage, BlockWorker, run_block_stage
from facegen.stages.tasks import cluster_checksums, map_tasks

MARKERS_DIR = "blocks"


def _ok_rows(table: pa.Table) -> pa.Table:
    table = table.filter(pc.equal(table.column("status"), "ok"))
    difficulty = pc.fill_null(table.column("difficulty"), np.float32(0.0))
    difficulty = pc.if_else(pc.is_nan(difficulty), np.float32(0.0), difficulty)  # unscored (bootstrap) = easy
    return table.set_column(table.schema.get_field_index("difficulty"), "difficulty", difficulty)


def _totals(manifest: dict) -> dict[str, int]:
    return {"rows": manifest["num_rows"], "shards": len(manifest["shards"]), "identities": manifest["num_identities"]}


def _summarise_block(job: tuple[str, int]) -> dict[str, Any]:
    """Pass 1, one block: difficulty sketch and unique identity ids of its usable rows."""
    from facegen.curriculum import difficulty_sketch

    source_dir, block_id = job
    columns = ["identity_id", "difficulty", "status"]
    table = _ok_rows(storage.read_table(blk.block_path(source_dir, block_id), columns=columns))
    return {"sketch": difficulty_sketch(table.column("difficulty").to_numpy()),
            "identity_ids": np.unique(table.column("identity_id").to_numpy())}


class ShardSplitter(BlockWorker):
    """Block worker of pass 2: one source block (sha256 checked) into its bucket files, then its marker."""

    def __init__(self, source_dir: str, shards_dir: str, edges: list[float], config_digest: str):
        self.source_dir, self.shards_dir, self.config_digest = source_dir, shards_dir, config_digest
        self.edges = np.asarray(edges, np.float64)

    def make(self, row: dict[str, Any]) -> dict[str, Any]:
        from facegen.shards import split_block_into_buckets

        block_id = int(row["block_id"])
        table = _ok_rows(blk.read_block(self.source_dir, block_id, sha256=row["source_sha256"]))
        shards = split_block_into_buckets(table, block_id, self.edges, self.shards_dir)
        record = {"block_id": block_id, "rows": sum(r["rows"] for r in shards), "shards": shards,
                  "config_digest": self.config_digest, "source_sha256": row["source_sha256"], "node_id": self.node_id}
        storage.write_json_atomic(record, blk.stats_path(f"{self.shards_dir}/{MARKERS_DIR}", block_id))
        return record


def _shard_sizes(shards_dir: str) -> dict[str, int]:
    """``{relative path: size}`` of every bucket file (one listing per bucket folder)."""
    return {f"{d}/{name}": size for d in storage.list_dirs(shards_dir) if d.startswith("bucket-")
            for name, size in storage.list_sizes(f"{shards_dir}/{d}").items() if name.startswith("block-")}


def _check_split(shards_dir: str, block_ids: list[int], digest: str, sources: dict[int, str], verify: str) -> blk.BlockCheck:
    """Pass 2's finished blocks sorted into trusted and bad: marker readable, settings and bucket
    edges unchanged, input unchanged, every bucket file there with its size (and sha256)."""
    markers = f"{shards_dir}/{MARKERS_DIR}"
    done = [b for b in blk.scan(markers).stats if b in set(block_ids)]
    sizes = _shard_sizes(shards_dir)
    result = blk.BlockCheck()
    for block_id, record in zip(done, blk.parallel_map(lambda b: storage.read_json(blk.stats_path(markers, b)), done)):
        if record.get("config_digest") != digest:
            result.invalid[block_id] = "shard settings or bucket edges changed"
        elif record.get("source_sha256") != sources.get(block_id):
            result.invalid[block_id] = "its input block changed"
        elif any(sizes.get(s["path"]) != s["bytes"] for s in record.get("shards", [])):
            result.invalid[block_id] = "a bucket file is missing or truncated"
        else:
            result.valid[block_id] = record
    if verify == "sha256" and result.valid:
        shards = [(b, s) for b in sorted(result.valid) for s in result.valid[b]["shards"]]
        found = cluster_checksums([f"{shards_dir}/{s['path']}" for _, s in shards])
        for (block_id, shard), digest_found in zip(shards, found):
            if digest_found != shard["sha256"] and block_id in result.valid:
                del result.valid[block_id]
                result.invalid[block_id] = "sha256 mismatch (corrupt bucket file)"
    return result


def _reset_split(shards_dir: str, block_ids: list[int]) -> None:
    """Forget pass 2's blocks: the marker first, then every bucket file of the block."""
    wanted = {f"block-{b:06d}.parquet" for b in block_ids}
    for b in block_ids:
        storage.remove(blk.stats_path(f"{shards_dir}/{MARKERS_DIR}", b))
    for path in _shard_sizes(shards_dir):
        if path.rsplit("/", 1)[-1] in wanted:
            storage.remove(f"{shards_dir}/{path}")


def _remove_set(shards_dir: str, manifest: dict) -> None:
    storage.remove(f"{shards_dir.rstrip('/')}/manifest.json")  # the manifest first: the set is incomplete from here
    _reset_split(shards_dir, sorted({int(s["block"]) for s in manifest.get("shards", []) if "block" in s}))
    for shard in manifest.get("shards", []):
        storage.remove(f"{shards_dir.rstrip('/')}/{shard['path']}")


def run_shard(cfg: FacegenConfig, source_dir: str | None = None, shards_dir: str | None = None, progress: bool = True) -> StageReport:
    """Write the easy-to-hard shard set of ``source_dir``'s blocks (clean blocks by default)."""
    from facegen.curriculum import SKETCH_BINS, SKETCH_RANGE, bucket_edges_from_sketch, merge_sketches
    from facegen.lineage import settings_digest as settings_digest_of
    from facegen.lineage import shards_digest
    from facegen.shards import write_manifest
    from facegen.tracking import start_stage_tracker

    source_dir = source_dir or cfg.stage_dir("clean")
    shards_dir = shards_dir or cfg.stage_dir("shards")
    started = time.time()
    source = blk.check_blocks(source_dir)  # sizes here; pass 2 checks each block's sha256 as it reads it
    if not source.valid:
        raise FileNotFoundError(f"{source_dir}: no finished blocks to shard")
    embedders = {json.dumps(r.get("embedder"), sort_keys=True) for r in source.valid.values()}
    if len(embedders) > 1:
        raise ValueError(f"{source_dir}: blocks were embedded by different embedders ({len(embedders)}): re-run generate/ingest with one")
    block_ids = sorted(source.valid)
    notes = source.notes(source_dir.rstrip("/").rsplit("/", 1)[-1], "left out of the shard set")
    manifest_path = f"{shards_dir.rstrip('/')}/manifest.json"
    sources = {str(b): source.valid[b]["sha256"] for b in block_ids}
    settings = shards_digest(cfg)
    if storage.exists(manifest_path):
        previous = storage.read_json(manifest_path)
        if previous.get("sources") == sources and previous.get("settings_digest") == settings and not cfg.run.overwrite:
            return StageReport("shard", shards_dir, len(block_ids), len(block_ids), 0, 0.0, _totals(previous), notes=notes)
        why = "overwrite" if cfg.run.overwrite else ("shard settings changed" if previous.get("sources") == sources
                                                    else "source blocks changed")
        notes.append(f"shard: the previous shard set was rebuilt ({why})")
        _remove_set(shards_dir, previous)

    sketch, id_parts = merge_sketches([]), []
    for summary in map_tasks(_summarise_block, [(source_dir, b) for b in block_ids]):
        sketch = merge_sketches([sketch, summary["sketch"]])  # merged as they arrive: O(bins) memory
        id_parts.append(summary["identity_ids"])
    if not np.asarray(sketch["counts"]).sum():
        raise ValueError(f"{source_dir}: no usable (status ok) rows to shard")
    identity_ids = np.unique(np.concatenate(id_parts))
    edges = bucket_edges_from_sketch(sketch, cfg.shards.num_buckets)
    split_digest = settings_digest_of(settings, [float(e) for e in edges])
    block_sources = {b: source.valid[b]["sha256"] for b in block_ids}
    tracker = start_stage_tracker(cfg, "shard")
    stage = BlockStage(
        "shard", shards_dir, ShardSplitter,
        {"source_dir": source_dir, "shards_dir": shards_dir, "edges": [float(e) for e in edges], "config_digest": split_digest},
        cfg.shards.pool, "shards.pool", {b: {"source_sha256": block_sources[b]} for b in block_ids},
        overwrite=cfg.run.overwrite,
        check=lambda ids: _check_split(shards_dir, ids, split_digest, block_sources, cfg.run.verify),
        reset=lambda ids: _reset_split(shards_dir, ids),
        on_record=lambda r: tracker.log_block({"block_id": r["block_id"], "rows": r["rows"], "shards": len(r["shards"])}),
    )
    try:
        outcome = run_block_stage(stage, progress=progress)
    except BaseException:
        tracker.finish()
        raise
    records = [shard for r in outcome.records.values() for shard in r["shards"]]
    manifest = write_manifest(records, shards_dir, identity_ids, edges, cfg.digest(), sources,
                              embedder=source.valid[block_ids[0]].get("embedder"), settings_digest=settings)
    report = StageReport("shard", shards_dir, len(block_ids), outcome.report.blocks_skipped, outcome.report.blocks_written,
                         round(time.time() - started, 2), _totals(manifest), blocks_redone=outcome.report.blocks_redone,
                         notes=notes + outcome.report.notes)
    counts = np.asarray(sketch["counts"])
    coarse = counts.reshape(64, SKETCH_BINS // 64).sum(axis=1)  # 64 bins for W&B
    tracker.log_block({"difficulty_histogram": {"counts": coarse.tolist(),
                                                "bin_edges": np.linspace(*SKETCH_RANGE, 65).tolist()}})
    tracker.finish_stage(report)
    return report
