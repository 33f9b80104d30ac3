"""Curriculum sharding stage: global difficulty buckets, then each block split into bucket files.

Pass 1 reads only the ``difficulty``/``identity_id`` columns of every block to fix the bucket
edges (quantiles) and the label set; pass 2 splits the blocks in parallel Ray tasks; the manifest
is written last, so its presence means the shard set is complete.
"""

from __future__ import annotations

import json
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from facegen import blocks as blk
from facegen import storage
from facegen.config import FacegenConfig
from facegen.stages import StageReport


def _ok_rows(table: pa.Table) -> pa.Table:
    table = table.filter(pc.equal(table.column("status"), "ok"))
    difficulty = pc.fill_null(table.column("difficulty"), np.float32(0.0))
    difficulty = pc.if_else(pc.is_nan(difficulty), np.float32(0.0), difficulty)  # unscored (bootstrap) = easy
    return table.set_column(table.schema.get_field_index("difficulty"), "difficulty", difficulty)


def _totals(manifest: dict) -> dict[str, int]:
    return {"rows": manifest["num_rows"], "shards": len(manifest["shards"]), "identities": manifest["num_identities"]}


def _split_block(source_dir: str, block_id: int, edges: np.ndarray, shards_dir: str) -> list[dict]:
    from facegen.shards import split_block_into_buckets

    table = _ok_rows(storage.read_table(blk.block_path(source_dir, block_id)))
    return split_block_into_buckets(table, block_id, edges, shards_dir)


def run_shard(cfg: FacegenConfig, source_dir: str | None = None, shards_dir: str | None = None, progress: bool = True) -> StageReport:
    """Write the easy-to-hard shard set of ``source_dir``'s blocks (clean blocks by default)."""
    import ray
    from tqdm.auto import tqdm

    from facegen.curriculum import bucket_edges
    from facegen.shards import write_manifest

    source_dir = source_dir or cfg.stage_dir("clean")
    shards_dir = shards_dir or cfg.stage_dir("shards")
    started = time.time()
    source_stats = blk.read_stats(source_dir)
    if not source_stats:
        raise FileNotFoundError(f"{source_dir}: no finished blocks to shard")
    embedders = {json.dumps(r.get("embedder"), sort_keys=True) for r in source_stats}
    if len(embedders) > 1:
        raise ValueError(f"{source_dir}: blocks were embedded by different embedders ({len(embedders)}): re-run generate/ingest with one")
    block_ids = [int(r["block_id"]) for r in source_stats]
    manifest_path = f"{shards_dir.rstrip('/')}/manifest.json"
    sources = {str(r["block_id"]): r["sha256"] for r in source_stats}
    if storage.exists(manifest_path):
        previous = storage.read_json(manifest_path)
        if previous.get("sources") == sources and not cfg.run.overwrite:
            return StageReport("shard", shards_dir, len(block_ids), len(block_ids), 0, 0.0, _totals(previous))
        # the source blocks changed (or --overwrite): the old set goes, manifest first
        storage.remove(manifest_path)
        for shard in previous.get("shards", []):
            storage.remove(f"{shards_dir.rstrip('/')}/{shard['path']}")
    difficulties, identity_ids = [], []
    for block_id in block_ids:
        table = _ok_rows(storage.read_table(blk.block_path(source_dir, block_id), columns=["identity_id", "difficulty", "status"]))
        difficulties.append(table.column("difficulty").to_numpy())
        identity_ids.append(np.unique(table.column("identity_id").to_numpy()))
    all_difficulty = np.concatenate(difficulties).astype(np.float32)
    if all_difficulty.size == 0:
        raise ValueError(f"{source_dir}: no usable (status ok) rows to shard")
    edges = bucket_edges(all_difficulty, cfg.shards.num_buckets)
    split = ray.remote(num_cpus=0.5)(_split_block)
    futures = [split.remote(source_dir, b, edges, shards_dir) for b in block_ids]
    records: list[dict] = []
    with tqdm(total=len(futures), unit="block", desc="shard", disable=not progress) as bar:
        while futures:
            done, futures = ray.wait(futures, num_returns=1)
            records.extend(ray.get(done[0]))
            bar.update(1)
    manifest = write_manifest(records, shards_dir, np.unique(np.concatenate(identity_ids)), edges, cfg.digest(), sources,
                              embedder=source_stats[0].get("embedder"))
    return StageReport("shard", shards_dir, len(block_ids), 0, len(block_ids), round(time.time() - started, 2), _totals(manifest))
