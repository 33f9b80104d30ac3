"""HybridGen's dataset assembly and its curriculum by source, as plain functions over plain data.

Assembly (``shards.assembly``): one training set from two cleaned sets, the ingested one (HSFace10K
through ``facegen ingest`` + ``facegen clean``) and the new generated identities. Every ingested
identity with at least ``min_images`` usable (status ok) images is kept; the others are dropped and
as many generated identities as the target count still needs take their place, in identity order
(deterministic; the rest are left unused). Labels are dense: the generated identities used get
``0 .. R-1``, the kept ingested ones ``R .. N-1``, each in identity order; ``assembly.parquet``
beside the shards maps every label back to its input and original id.

Curriculum by source (``shards.order: source``): an identity's group is the input it came from
(assembled) or its origin (one run's clean blocks, e.g. an ingest run whose ``clean.replace_dropped``
generated replacements); the groups of ``shards.source_order`` come one after another as buckets
``rank * num_buckets + difficulty bucket``, so the manifest's (bucket, block) order and the trainer's
pacing see the new identities first and difficulty ascending inside each group.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from facegen.schema import ASSEMBLY

#: Shard keys of an assembled set: ``input index * KEY_STRIDE + block id`` (block ids are 6 digits).
KEY_STRIDE = 1_000_000
#: The assembly's inputs in key order: ingested blocks keep their ids, generated ones are offset.
INPUTS = ("ingested", "generated")
#: ``origin`` of the rows clean's top-up made: they belong to their identity's group.
AUGMENTED = "augmented"


def shard_key(input_name: str, block_id: int) -> int:
    """The key of an input's block in an assembled shard set (its bucket files and marker)."""
    if not 0 <= block_id < KEY_STRIDE:
        raise ValueError(f"shards.assembly.{input_name}: block {block_id} is beyond {KEY_STRIDE - 1}")
    return INPUTS.index(input_name) * KEY_STRIDE + int(block_id)


def identity_groups(table: pa.Table) -> dict[int, str]:
    """Each identity's origin ("generated" | "ingested") from its rows that are not top-up copies."""
    ids = table.column("identity_id").to_numpy(zero_copy_only=False)
    origins = np.asarray(table.column("origin").to_pylist(), dtype=object)
    groups = {}
    for identity, origin in zip(ids[origins != AUGMENTED], origins[origins != AUGMENTED]):
        groups.setdefault(int(identity), str(origin))
    missing = set(np.unique(ids).tolist()) - set(groups)
    if missing:
        raise ValueError(f"identities {sorted(missing)[:5]} have only augmented rows: no origin to order them by")
    return groups


def ok_counts(table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """``(identity ids, usable images)``: every identity of a clean block, with its status-ok row count (0 too)."""
    ids = table.column("identity_id").to_numpy(zero_copy_only=False).astype(np.int64)
    ok = pc.fill_null(pc.equal(table.column("status"), "ok"), False).to_numpy(zero_copy_only=False)
    unique, inverse = np.unique(ids, return_inverse=True)
    return unique, np.bincount(inverse, weights=ok, minlength=len(unique)).astype(np.int64)


@dataclass
class AssemblyPlan:
    """Which identities the assembled set holds: original ids per input, their labels, the counts."""

    kept: np.ndarray  # ingested ids kept (>= min_images), identity order
    replacements: np.ndarray  # generated ids used, identity order
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    images: dict[str, dict[int, int]] = field(default_factory=dict)  # input -> id -> usable images

    def labels(self, input_name: str) -> dict[int, int]:
        """Original id -> dense label of one input's identities in the set."""
        if input_name == "generated":
            return {int(i): k for k, i in enumerate(self.replacements)}
        return {int(i): len(self.replacements) + k for k, i in enumerate(self.kept)}

    def table(self) -> pa.Table:
        """The ASSEMBLY table: one row per label with its group, original id and usable images."""
        ids = [("generated", self.replacements), ("ingested", self.kept)]
        return pa.table({
            "identity_id": pa.array(np.arange(len(self.replacements) + len(self.kept)), pa.int64()),
            "group": [name for name, part in ids for _ in part],
            "source_identity_id": pa.array(np.concatenate([part for _, part in ids]).astype(np.int64), pa.int64()),
            "images": pa.array([self.images[name][int(i)] for name, part in ids for i in part], pa.int64()),
        }, schema=ASSEMBLY)


def plan_assembly(ingested: dict[int, int], generated: dict[int, int], num_identities: int, min_images: int,
                  where: dict[str, str]) -> AssemblyPlan:
    """Keep the ingested identities with ``>= min_images`` usable images, fill up to ``num_identities``
    with generated ones (same rule) in identity order. ``ingested`` / ``generated``: id -> usable
    images of every identity of each input; ``where``: input -> folder, for the one-line errors."""
    ing_ids = np.array(sorted(ingested), np.int64)
    gen_ids = np.array(sorted(generated), np.int64)
    ing_ok = np.array([ingested[int(i)] for i in ing_ids], np.int64).reshape(-1)
    gen_ok = np.array([generated[int(i)] for i in gen_ids], np.int64).reshape(-1)
    kept, eligible = ing_ids[ing_ok >= min_images], gen_ids[gen_ok >= min_images]
    if len(kept) > num_identities:
        raise ValueError(f"shards.assembly.num_identities: {where['ingested']} keeps {len(kept)} identities with >= "
                         f"{min_images} images, more than the target {num_identities}")
    needed = num_identities - len(kept)
    if len(eligible) < needed:
        raise ValueError(f"shards.assembly.generated: {where['generated']} has {len(eligible)} identities with >= "
                         f"{min_images} images, {needed - len(eligible)} short of the {needed} needed to reach "
                         f"num_identities {num_identities} ({len(kept)} ingested identities kept)")
    used = eligible[:needed]
    counts = {
        "ingested": {"identities": len(ing_ids), "kept": len(kept), "dropped_min_images": int((ing_ok < min_images).sum())},
        "generated": {"identities": len(gen_ids), "used": len(used), "too_few_images": int((gen_ok < min_images).sum()),
                      "unused": len(eligible) - len(used)},
    }
    return AssemblyPlan(kept, used, counts, {"ingested": dict(ingested), "generated": dict(generated)})


def check_source_order(source_order: list[str], present: set[str], where: str) -> None:
    """One line when ``source_order`` names a group with no identity, or an identity's group is unnamed."""
    absent = [g for g in source_order if g not in present]
    if absent:
        raise ValueError(f"shards.source_order: {', '.join(absent)} names no source present in {where} "
                         f"(present: {', '.join(sorted(present)) or 'none'})")
    unnamed = sorted(present - set(source_order))
    if unnamed:
        raise ValueError(f"shards.source_order: {where} holds identities of {', '.join(unnamed)}, which it does not name")


def group_summary(records: list[dict[str, Any]], source_order: list[str], num_buckets: int,
                  identities: dict[str, int]) -> list[dict[str, Any]]:
    """Per group in curriculum order: its first bucket, identities and rows (for the manifest)."""
    return [{"name": name, "first_bucket": rank * num_buckets, "identities": int(identities.get(name, 0)),
             "rows": int(sum(r["rows"] for r in records if r.get("group") == name))}
            for rank, name in enumerate(source_order)]
