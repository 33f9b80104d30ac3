"""Curriculum sharding stage: global difficulty buckets, then each block split into bucket files.

Pass 1 runs one Ray task per source block that reads only its ``difficulty``/``identity_id``/
``status`` columns and returns a mergeable difficulty sketch and the block's identity ids; the
driver merges the sketches into the bucket edges (it never holds every row). Pass 2 is a block
stage on the ``shards.pool`` Ray Data actor pool (:mod:`facegen.stages.runner`): each worker reads
one block (sha256 checked), writes its bucket files and then its done-marker
``blocks/block-XXXXXX.stats.json`` (the shard records), so an interrupted pass resumes block by
block. The manifest is written last, so its presence means the shard set is complete; it records
the source blocks' sha256 and the shard settings' digest, and the set is rebuilt when either changes.

With ``shards.assembly`` the inputs are two clean folders (the ingested set's and the generated
set's): pass 1 first counts every identity's usable images, :func:`facegen.assembly.plan_assembly`
picks the identities and their dense labels, and pass 2 writes only those rows, relabelled
(``assembly.parquet`` maps the labels back). With ``shards.order: source`` each group's rows go to
its own run of buckets (:mod:`facegen.assembly`).
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
#: An assembled set's label -> input map (:data:`facegen.schema.ASSEMBLY`), beside the manifest.
ASSEMBLY_FILE = "assembly.parquet"


def _ok_rows(table: pa.Table) -> pa.Table:
    table = table.filter(pc.equal(table.column("status"), "ok"))
    difficulty = pc.fill_null(table.column("difficulty"), np.float32(0.0))
    difficulty = pc.if_else(pc.is_nan(difficulty), np.float32(0.0), difficulty)  # unscored (bootstrap) = easy
    return table.set_column(table.schema.get_field_index("difficulty"), "difficulty", difficulty)


def _totals(manifest: dict) -> dict[str, int]:
    totals = {"rows": manifest["num_rows"], "shards": len(manifest["shards"]), "identities": manifest["num_identities"]}
    counts = manifest.get("assembly", {}).get("counts", {})
    if counts:
        totals.update({"ingested: identities": counts["ingested"]["identities"], "ingested: kept": counts["ingested"]["kept"],
                       "ingested: dropped (< min_images)": counts["ingested"]["dropped_min_images"],
                       "generated: replacements used": counts["generated"]["used"],
                       "generated: left unused": counts["generated"]["unused"]})
    for group in manifest.get("curriculum", {}).get("groups", []):
        totals[f"order {group['first_bucket'] // max(manifest['num_buckets'], 1) + 1}: {group['name']} (rows)"] = group["rows"]
    return totals


def _summarise_block(job: tuple[int, str, int, np.ndarray | None, bool]) -> dict[str, Any]:
    """Pass 1, one block: difficulty sketch and unique identity ids of its usable rows (those of
    ``keep`` only, when given), usable images of every identity, and with ``groups`` the number of
    identities of each origin."""
    from facegen.assembly import identity_groups, ok_counts
    from facegen.curriculum import difficulty_sketch

    key, source_dir, block_id, keep, groups = job
    columns = ["identity_id", "difficulty", "status"] + (["origin"] if groups else [])
    whole = storage.read_table(blk.block_path(source_dir, block_id), columns=columns)
    table = _ok_rows(whole)
    if keep is not None:
        table = table.filter(pc.is_in(table.column("identity_id"), value_set=pa.array(keep, pa.int64())))
    summary = {"key": key, "sketch": difficulty_sketch(table.column("difficulty").to_numpy()),
               "identity_ids": np.unique(table.column("identity_id").to_numpy()), "counts": ok_counts(whole)}
    if groups:
        try:
            found = identity_groups(table)
        except ValueError as exc:
            raise ValueError(f"{blk.block_path(source_dir, block_id)}: {exc}") from None
        summary["groups"] = {g: sum(1 for v in found.values() if v == g) for g in set(found.values())}
    return summary


class ShardSplitter(BlockWorker):
    """Block worker of pass 2: one source block (sha256 checked) into its bucket files, then its marker.

    A job row names its block (``source_dir``, ``block``), and when assembled the ``input`` it comes
    from and its ``labels`` (``[original id, label]`` of the identities the set keeps); with
    ``source_order`` each group's rows go to the group's own buckets."""

    def __init__(self, shards_dir: str, edges: list[float], config_digest: str, source_order: list[str] | None = None):
        self.shards_dir, self.config_digest, self.source_order = shards_dir, config_digest, source_order
        self.edges = np.asarray(edges, np.float64)

    def make(self, row: dict[str, Any]) -> dict[str, Any]:
        from facegen.assembly import identity_groups
        from facegen.shards import split_block_into_buckets

        key, block_id = int(row["block_id"]), int(row["block"])
        table = _ok_rows(blk.read_block(row["source_dir"], block_id, sha256=row["source_sha256"]))
        if row.get("labels") is not None:
            original, label = np.asarray(row["labels"], np.int64).reshape(-1, 2).T
            table = table.filter(pc.is_in(table.column("identity_id"), value_set=pa.array(original, pa.int64())))
            ids = table.column("identity_id").to_numpy(zero_copy_only=False)
            order = np.argsort(original)
            remapped = label[order][np.searchsorted(original[order], ids)]
            table = table.set_column(table.schema.get_field_index("identity_id"), table.schema.field("identity_id"),
                                     pa.array(remapped, pa.int64()))
        parts: list[tuple[pa.Table, int, str | None]] = [(table, 0, None)]
        if self.source_order:
            if row.get("input"):
                groups = np.full(table.num_rows, row["input"], dtype=object)
            else:
                by_identity = identity_groups(table)
                groups = np.array([by_identity[int(i)] for i in table.column("identity_id").to_numpy()], dtype=object)
            step = len(self.edges) - 1
            parts = [(table.filter(pa.array(groups == name)), rank * step, name)
                     for rank, name in enumerate(self.source_order) if (groups == name).any()]
        shards = [s for part, first, name in parts
                  for s in split_block_into_buckets(part, key, self.edges, self.shards_dir, first, name)]
        record = {"block_id": key, "rows": sum(r["rows"] for r in shards), "shards": shards,
                  "config_digest": self.config_digest, "source_sha256": row["source_sha256"], "node_id": self.node_id}
        storage.write_json_atomic(record, blk.stats_path(f"{self.shards_dir}/{MARKERS_DIR}", key))
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
    storage.remove(f"{shards_dir.rstrip('/')}/{ASSEMBLY_FILE}")


def _inputs(cfg: FacegenConfig, source_dir: str | None) -> list[tuple[str | None, str, blk.BlockCheck]]:
    """``(assembly input or None, folder, its finished blocks)`` of every input; one line when one is missing."""
    assembly = cfg.shards.assembly
    if assembly is None:
        folders = [(None, source_dir or cfg.stage_dir("clean"))]
    elif source_dir is not None:
        raise ValueError("shards.assembly: the assembly names its inputs; do not pass a source_dir")
    else:
        folders = [("ingested", assembly.ingested), ("generated", assembly.generated or cfg.stage_dir("clean"))]
    found = []
    for name, folder in folders:
        where = f"shards.assembly.{name}: {folder}" if name else folder
        if name and not storage.exists(folder):
            raise FileNotFoundError(f"{where}: no such folder")
        check = blk.check_blocks(folder)  # sizes here; pass 2 checks each block's sha256 as it reads it
        if not check.valid:
            raise FileNotFoundError(f"{where}: no finished blocks to shard")
        found.append((name, folder, check))
    return found


def _plan(cfg: FacegenConfig, inputs: list[tuple[str | None, str, blk.BlockCheck]]):
    """Pass 1 over every input block (Ray tasks reading a few columns; the driver never holds rows):
    the assembly when configured, then the difficulty sketch, identity ids and group sizes of the
    rows the set holds. Returns ``(jobs, sketch, identity id arrays, identities per group, plan or
    None)``; ``jobs`` maps a shard key to its block's work."""
    from facegen.assembly import plan_assembly, shard_key
    from facegen.curriculum import merge_sketches

    blocks = {(shard_key(name, b) if name else b): (name, folder, b, check.valid[b]["sha256"])
              for name, folder, check in inputs for b in sorted(check.valid)}
    plan, keep = None, {}
    if cfg.shards.assembly is not None:
        usable: dict[str, dict[int, int]] = {"ingested": {}, "generated": {}}
        block_ids: dict[int, np.ndarray] = {}
        for summary in map_tasks(_summarise_block, [(k, f, b, None, False) for k, (_, f, b, _) in blocks.items()]):
            ids, images = summary["counts"]
            block_ids[summary["key"]] = ids
            usable[blocks[summary["key"]][0]].update(zip(ids.tolist(), images.tolist()))
        settings = cfg.shards.assembly
        plan = plan_assembly(usable["ingested"], usable["generated"], settings.num_identities, settings.min_images,
                             {name: folder for name, folder, _ in inputs})
        labels = {name: plan.labels(name) for name in ("ingested", "generated")}
        for key, ids in block_ids.items():
            mapping = labels[blocks[key][0]]
            keep[key] = [[int(i), mapping[int(i)]] for i in ids if int(i) in mapping]
    by_source = cfg.shards.order == "source" and plan is None
    work = [(k, f, b, None if plan is None else np.array([i for i, _ in keep[k]], np.int64), by_source)
            for k, (_, f, b, _) in blocks.items() if plan is None or keep[k]]
    sketch, id_parts, groups = merge_sketches([]), [], {}
    for summary in map_tasks(_summarise_block, work):
        sketch = merge_sketches([sketch, summary["sketch"]])  # merged as they arrive: O(bins) memory
        id_parts.append(summary["identity_ids"])
        for group, count in summary.get("groups", {}).items():
            groups[group] = groups.get(group, 0) + count
    jobs = {k: {"source_dir": f, "block": b, "source_sha256": sha, **({"input": n, "labels": keep[k]} if plan else {})}
            for k, (n, f, b, sha) in blocks.items() if plan is None or keep[k]}
    if plan is not None:
        groups = {"generated": len(plan.replacements), "ingested": len(plan.kept)}
        id_parts = [np.arange(len(plan.replacements) + len(plan.kept), dtype=np.int64)]  # the dense labels
    return jobs, sketch, id_parts, groups, plan


def run_shard(cfg: FacegenConfig, source_dir: str | None = None, shards_dir: str | None = None, progress: bool = True) -> StageReport:
    """Write the curriculum shard set of ``source_dir``'s blocks (clean blocks by default), or of
    the ``shards.assembly`` inputs; easy to hard, or by source (``shards.order``)."""
    from facegen.assembly import check_source_order, group_summary, shard_key
    from facegen.curriculum import SKETCH_BINS, SKETCH_RANGE, bucket_edges_from_sketch
    from facegen.lineage import settings_digest as settings_digest_of
    from facegen.lineage import shards_digest
    from facegen.shards import write_manifest
    from facegen.tracking import start_stage_tracker

    shards_dir = shards_dir or cfg.stage_dir("shards")
    started = time.time()
    inputs = _inputs(cfg, source_dir)
    records_by_input = [r for _, _, check in inputs for r in check.valid.values()]
    embedders = {json.dumps(r.get("embedder"), sort_keys=True) for r in records_by_input}
    where = " and ".join(folder for _, folder, _ in inputs)
    if len(embedders) > 1:
        raise ValueError(f"{where}: blocks were embedded by different embedders ({len(embedders)}): re-run generate/ingest with one")
    notes = [n for _, folder, check in inputs
             for n in check.notes(folder.rstrip("/").rsplit("/", 1)[-1], "left out of the shard set")]
    manifest_path = f"{shards_dir.rstrip('/')}/manifest.json"
    sources = {str(shard_key(name, b) if name else b): check.valid[b]["sha256"]
               for name, _, check in inputs for b in sorted(check.valid)}
    settings = shards_digest(cfg)
    if storage.exists(manifest_path):
        previous = storage.read_json(manifest_path)
        if previous.get("sources") == sources and previous.get("settings_digest") == settings and not cfg.run.overwrite:
            used = len({int(s["block"]) for s in previous["shards"]})  # an assembly may leave blocks out
            return StageReport("shard", shards_dir, used, used, 0, 0.0, _totals(previous), notes=notes)
        why = "overwrite" if cfg.run.overwrite else ("shard settings changed" if previous.get("sources") == sources
                                                    else "source blocks changed")
        notes.append(f"shard: the previous shard set was rebuilt ({why})")
        _remove_set(shards_dir, previous)

    jobs, sketch, id_parts, groups, plan = _plan(cfg, inputs)
    if not np.asarray(sketch["counts"]).sum():
        raise ValueError(f"{where}: no usable (status ok) rows to shard")
    source_order = list(cfg.shards.source_order) if cfg.shards.order == "source" else None
    if source_order:
        check_source_order(source_order, {g for g, n in groups.items() if n}, where)
    identity_ids = np.unique(np.concatenate(id_parts))
    edges = bucket_edges_from_sketch(sketch, cfg.shards.num_buckets)
    assembly_file = None
    if plan is not None:
        assembly_file = storage.write_table_atomic(plan.table(), f"{shards_dir.rstrip('/')}/{ASSEMBLY_FILE}")
    split_digest = settings_digest_of(settings, [float(e) for e in edges], assembly_file.sha256 if assembly_file else "")
    tracker = start_stage_tracker(cfg, "shard")
    stage = BlockStage(
        "shard", shards_dir, ShardSplitter,
        {"shards_dir": shards_dir, "edges": [float(e) for e in edges], "config_digest": split_digest,
         "source_order": source_order},
        cfg.shards.pool, "shards.pool", jobs, overwrite=cfg.run.overwrite,
        check=lambda ids: _check_split(shards_dir, ids, split_digest, {k: jobs[k]["source_sha256"] for k in jobs}, cfg.run.verify),
        reset=lambda ids: _reset_split(shards_dir, ids),
        on_record=lambda r: tracker.log_block({"block_id": r["block_id"], "rows": r["rows"], "shards": len(r["shards"])}),
    )
    try:
        outcome = run_block_stage(stage, progress=progress)
    except BaseException:
        tracker.finish()
        raise
    records = [shard for r in outcome.records.values() for shard in r["shards"]]
    curriculum = None
    if source_order:
        curriculum = {"order": "source", "groups": group_summary(records, source_order, cfg.shards.num_buckets, groups)}
    assembly = None
    if plan is not None:
        a = cfg.shards.assembly
        assembly = {"inputs": {name: folder for name, folder, _ in inputs}, "num_identities": a.num_identities,
                    "min_images": a.min_images, "counts": plan.counts, "file": ASSEMBLY_FILE, "sha256": assembly_file.sha256}
    manifest = write_manifest(records, shards_dir, identity_ids, edges, cfg.digest(), sources,
                              embedder=records_by_input[0].get("embedder"), settings_digest=settings,
                              curriculum=curriculum, assembly=assembly)
    report = StageReport("shard", shards_dir, len(jobs), outcome.report.blocks_skipped, outcome.report.blocks_written,
                         round(time.time() - started, 2), _totals(manifest), blocks_redone=outcome.report.blocks_redone,
                         notes=notes + outcome.report.notes)
    if source_order:
        report.notes.append(f"order: by source ({', '.join(source_order)}), easy to hard inside each")
    counts = np.asarray(sketch["counts"])
    coarse = counts.reshape(64, SKETCH_BINS // 64).sum(axis=1)  # 64 bins for W&B
    tracker.log_block({"difficulty_histogram": {"counts": coarse.tolist(),
                                                "bin_edges": np.linspace(*SKETCH_RANGE, 65).tolist()}})
    tracker.finish_stage(report)
    return report
