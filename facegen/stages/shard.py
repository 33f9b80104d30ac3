"""Curriculum sharding stage: global difficulty buckets, then each block split into bucket files.

Pass 1 runs one Ray task per source block that reads only its ``difficulty``/``identity_id``/
``status`` columns and returns a mergeable difficulty sketch and the block's identity ids; the
driver merges the sketches into the bucket edges (it never holds every row). Pass 2 splits the
blocks in parallel Ray tasks, each checking its block's sha256 as it reads it. The manifest is
written last, so its presence means the shard set is complete; it records the source blocks'
sha256 and the shard settings' digest, and the set is rebuilt when either changes.
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
from facegen.claims import StageClaim
from facegen.config import FacegenConfig
from facegen.stages import StageReport
from facegen.stages.blockpool import map_tasks


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


def _split_block(job: tuple[str, int, str, np.ndarray, str]) -> list[dict]:
    """Pass 2, one block: read it (sha256 checked) and write its bucket files."""
    from facegen.shards import split_block_into_buckets

    source_dir, block_id, sha256, edges, shards_dir = job
    table = _ok_rows(blk.read_block(source_dir, block_id, sha256=sha256))
    return split_block_into_buckets(table, block_id, edges, shards_dir)


def _remove_set(shards_dir: str, manifest: dict) -> None:
    storage.remove(f"{shards_dir.rstrip('/')}/manifest.json")  # the manifest first: the set is incomplete from here
    for shard in manifest.get("shards", []):
        storage.remove(f"{shards_dir.rstrip('/')}/{shard['path']}")


def run_shard(cfg: FacegenConfig, source_dir: str | None = None, shards_dir: str | None = None, progress: bool = True) -> StageReport:
    """Write the easy-to-hard shard set of ``source_dir``'s blocks (clean blocks by default)."""
    from tqdm.auto import tqdm

    from facegen.curriculum import SKETCH_BINS, SKETCH_RANGE, bucket_edges_from_sketch, merge_sketches
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
    with StageClaim(shards_dir) as claim:
        claim.remove_stale_temp_files()
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
        jobs = [(source_dir, b, source.valid[b]["sha256"], edges, shards_dir) for b in block_ids]
        records: list[dict] = []
        tracker = start_stage_tracker(cfg, "shard")
        with tqdm(total=len(jobs), unit="block", desc="shard", disable=not progress) as bar:
            for block_records in map_tasks(_split_block, jobs, num_cpus=0.5):
                records.extend(block_records)
                tracker.log_block({"block_id": block_records[0]["block"] if block_records else -1,
                                   "rows": sum(r["rows"] for r in block_records), "shards": len(block_records)})
                bar.update(1)
        manifest = write_manifest(records, shards_dir, identity_ids, edges, cfg.digest(), sources,
                                  embedder=source.valid[block_ids[0]].get("embedder"), settings_digest=settings)
    report = StageReport("shard", shards_dir, len(block_ids), 0, len(block_ids), round(time.time() - started, 2),
                         _totals(manifest), notes=notes)
    counts = np.asarray(sketch["counts"])
    coarse = counts.reshape(64, SKETCH_BINS // 64).sum(axis=1)  # 64 bins for W&B
    tracker.log_block({"difficulty_histogram": {"counts": coarse.tolist(),
                                                "bin_edges": np.linspace(*SKETCH_RANGE, 65).tolist()}})
    tracker.finish_stage(report)
    return report
