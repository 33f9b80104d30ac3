"""The global steps between the per-block expert pass and the final clean blocks.

Input: every expert-pass block's identity centres (``centres-XXXXXX.parquet`` beside the votes
blocks). Cross-identity dedup searches them against themselves; the leakage audit searches them
(and optionally every kept sample) against the real reference embeddings. Both stream the centres
from their files in chunks, so memory stays bounded by one search index and one chunk. The
outcome is a plan, one row per identity that leaves (dropped or merged), written with the pairs,
``leakage.html`` and ``global.json`` (settings digest, figures) to the global directory; a re-run
with the same inputs and settings reuses it.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from facegen import blocks as blk
from facegen import storage
from facegen.clean.dedup import find_duplicates
from facegen.clean.search import ParquetChunks
from facegen.config import CleanSettings

PLAN = pa.schema([
    pa.field("identity_id", pa.int64()), pa.field("block_id", pa.int64()), pa.field("step", pa.string()),
    pa.field("action", pa.string()), pa.field("target_id", pa.int64()), pa.field("target_block", pa.int64()),
    pa.field("reason", pa.string()),
])


def centres_path(votes_dir: str, block_id: int) -> str:
    """``<votes_dir>/centres-000042.parquet``: one row per identity of the block with kept images."""
    return f"{votes_dir.rstrip('/')}/centres-{block_id:06d}.parquet"


@dataclass
class GlobalPlan:
    """Identities leaving their block: ``removed`` id -> (step, reason); ``merges`` id -> (target, target block)."""

    digest: str
    removed: dict[int, tuple[str, str]] = field(default_factory=dict)
    merges: dict[int, tuple[int, int]] = field(default_factory=dict)
    block_of: dict[int, int] = field(default_factory=dict)
    _by_block: dict | None = field(default=None, repr=False)

    def for_block(self, block_id: int) -> tuple[dict[int, tuple[str, str]], set[int], list[tuple[int, int, int]]]:
        """(removed identities of this block, identities merged away from it, merges into it as
        (source id, source block, target id)); indexed by block on first use."""
        if self._by_block is None:
            self._by_block = {}
            for i, why in self.removed.items():
                self._by_block.setdefault(self.block_of.get(i), ({}, set(), []))[0][i] = why
            for i, (target, target_block) in self.merges.items():
                self._by_block.setdefault(self.block_of.get(i), ({}, set(), []))[1].add(i)
                self._by_block.setdefault(target_block, ({}, set(), []))[2].append((i, self.block_of[i], target))
        removed, leaving, incoming = self._by_block.get(block_id, ({}, set(), []))
        return removed, leaving, sorted(incoming)

    def block_digest(self, block_id: int) -> str:
        """Digest of this block's part of the plan: a final block is redone only when it changes."""
        removed, leaving, incoming = self.for_block(block_id)
        blob = json.dumps({"removed": sorted((int(i), list(why)) for i, why in removed.items()),
                           "leaving": sorted(int(i) for i in leaving), "incoming": [list(map(int, m)) for m in incoming]})
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def table(self) -> pa.Table:
        rows = [(i, self.block_of.get(i, -1), step, "drop", -1, -1, why) for i, (step, why) in self.removed.items()]
        rows += [(i, self.block_of.get(i, -1), "dedup", "merge", t, tb, f"dedup: merged into identity {t}") for i, (t, tb) in self.merges.items()]
        rows.sort()
        return pa.table({name: [r[k] for r in rows] for k, name in enumerate(PLAN.names)}, schema=PLAN)

    @classmethod
    def from_table(cls, digest: str, table: pa.Table) -> "GlobalPlan":
        plan = cls(digest)
        for r in table.to_pylist():
            plan.block_of[r["identity_id"]] = r["block_id"]
            if r["action"] == "merge":
                plan.merges[r["identity_id"]] = (r["target_id"], r["target_block"])
            else:
                plan.removed[r["identity_id"]] = (r["step"], r["reason"])
        return plan


def plan_digest(votes_stats: list[dict[str, Any]], settings: CleanSettings) -> str:
    """Changes when any votes block or a global-step setting changes."""
    blob = json.dumps({"blocks": sorted((int(r["block_id"]), r["sha256"]) for r in votes_stats),
                       "dedup": settings.dedup.model_dump(mode="json"), "leakage": settings.leakage.model_dump(mode="json"),
                       "search": settings.search.model_dump(mode="json")}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _lookup(paths: list[str], ids: np.ndarray, column: str) -> dict[int, Any]:
    """``column`` of the centres rows of ``ids`` (one pass over the files, two columns each)."""
    wanted = pa.array(np.asarray(ids, np.int64))
    out: dict[int, Any] = {}
    for path in paths:
        t = storage.read_table(path, columns=["identity_id", column])
        t = t.filter(pc.is_in(t.column("identity_id"), value_set=wanted))
        out.update(zip(t.column("identity_id").to_pylist(), t.column(column).to_pylist()))
    return out


def first_image(votes_dir: str, block_id: int, identity: int) -> bytes | None:
    """The image of an identity's first kept sample in its votes block (for reports)."""
    t = storage.read_table(blk.block_path(votes_dir, block_id), columns=["identity_id", "status", "image"])
    t = t.filter(pc.and_(pc.equal(t.column("identity_id"), identity), pc.equal(t.column("status"), "ok")))
    return t.column("image")[0].as_py() if t.num_rows else None


def run_global(votes_dir: str, global_dir: str, settings: CleanSettings, overwrite: bool = False) -> tuple[GlobalPlan, dict[str, Any]]:
    """Dedup and leakage over all votes blocks of ``votes_dir``; returns the plan and its summary."""
    from facegen.clean.thresholds import resolve_clean_settings

    settings = resolve_clean_settings(settings)
    records = blk.read_stats(votes_dir)
    digest = plan_digest(records, settings)
    summary_path, plan_path = f"{global_dir.rstrip('/')}/global.json", f"{global_dir.rstrip('/')}/plan.parquet"
    if not overwrite and storage.exists(summary_path) and storage.exists(plan_path):
        summary = storage.read_json(summary_path)
        if summary.get("digest") == digest:
            return GlobalPlan.from_table(digest, storage.read_table(plan_path)), summary
    paths = [centres_path(votes_dir, int(r["block_id"])) for r in records]
    centres = ParquetChunks(paths, "identity_id", "centre", chunk=settings.search.query_chunk)
    plan = GlobalPlan(digest)
    summary: dict[str, Any] = {"digest": digest, "identities": centres.total}
    if settings.dedup.enabled and centres.total > 1:
        started = time.time()
        result = find_duplicates(centres, lambda ids: _lookup(paths, ids, "num_kept"), settings.dedup, settings.search,
                                 mean_length=lambda ids: _lookup(paths, ids, "mean_length"))
        storage.write_table_atomic(result.pairs, f"{global_dir.rstrip('/')}/dedup_pairs.parquet")
        involved = np.array(sorted(set(result.absorbed) | set(result.absorbed.values())), np.int64)
        plan.block_of.update(_lookup(paths, involved, "block_id"))
        for ident, keeper in result.absorbed.items():
            if settings.dedup.action == "merge":
                plan.merges[ident] = (keeper, plan.block_of[keeper])
            else:
                plan.removed[ident] = ("dedup", f"dedup: same person as identity {keeper}, which has more images")
        summary["dedup"] = {"pairs": result.pairs.num_rows, "identities_removed": len(result.absorbed), "measure": settings.dedup.measure,
                            "action": settings.dedup.action, "index": result.plan.kind, "gpu": result.plan.gpu,
                            "seconds": round(time.time() - started, 2)}
    if settings.leakage.references and centres.total:
        summary["leakage"] = _leakage(votes_dir, global_dir, paths, centres, records, settings, plan)
    storage.write_table_atomic(plan.table(), plan_path)
    plan.for_block(-1)  # index the plan by block: every block it touches gets its own digest below
    summary["block_digests"] = {str(b): plan.block_digest(b) for b in sorted(plan._by_block or {}) if b is not None}
    storage.write_json_atomic(summary, summary_path)
    return plan, summary


def _leakage(votes_dir: str, global_dir: str, paths: list[str], centres: ParquetChunks, records: list[dict[str, Any]],
             settings: CleanSettings, plan: GlobalPlan) -> dict[str, Any]:
    from facegen.clean.leakage import ReferenceSet, audit
    from facegen.clean.leakage_report import write_leakage_report

    started = time.time()
    references = ReferenceSet(settings.leakage.references)
    if references.dim != centres.dim:
        raise ValueError(f"clean.leakage.references: {references.dim}-d embeddings, the samples are {centres.dim}-d (use the same embedder)")
    result = audit(centres, references, settings.leakage, settings.search)
    pairs = result.pairs
    if settings.leakage.samples:
        block_paths = [blk.block_path(votes_dir, int(r["block_id"])) for r in records]
        samples = ParquetChunks(block_paths, "identity_id", "embedding", chunk=settings.search.query_chunk, filter_column="status", filter_value="ok")
        pairs = pa.concat_tables([pairs, audit(samples, references, settings.leakage, settings.search).pairs])
    storage.write_table_atomic(pairs, f"{global_dir.rstrip('/')}/leakage_pairs.parquet")
    leaked: dict[int, tuple[float, int]] = {}
    for q, b, s in zip(pairs.column("query_id").to_pylist(), pairs.column("base_id").to_pylist(), pairs.column("cosine").to_pylist()):
        if q not in leaked or s > leaked[q][0]:
            leaked[q] = (s, b)
    shown = set(leaked) | {query for _, query, _ in result.nearest}
    plan.block_of.update(_lookup(paths, np.array(sorted(shown), np.int64), "block_id"))
    for ident, (s, ref) in leaked.items():
        plan.removed[ident] = ("leakage", f"leakage: cosine {s:.3f} to reference row {ref} (threshold {result.threshold:.3f})")
        plan.merges.pop(ident, None)
    for ident, (target, _) in list(plan.merges.items()):
        if target in leaked:  # the same person as a leaked identity leaks too
            plan.removed[ident] = ("leakage", f"leakage: merged into leaked identity {target}")
            del plan.merges[ident]
    write_leakage_report(result, f"{global_dir.rstrip('/')}/leakage.html", references,
                         lambda ident: first_image(votes_dir, plan.block_of[ident], ident) if ident in plan.block_of else None)
    return {"threshold": result.threshold, "calibration": result.calibration, "pairs": pairs.num_rows,
            "identities_leaked": len(leaked), "index": result.plan.kind if result.plan else None,
            "report": f"{global_dir.rstrip('/')}/leakage.html", "seconds": round(time.time() - started, 2)}
