"""The per-block expert pass: every expert votes on every usable sample, fusion decides.

Output: the block's rows in the CLEAN schema (kept rows ``status="ok"``, the others ``dropped``
with the experts' reasons, upstream errors stay ``error``), one centre per identity (mean of its
kept embeddings) for the global steps, and the block's stats. :func:`clean_block` chains this pass
and the final pass for one block on its own (no cross-block steps), as tests and small runs use it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np
import pyarrow as pa

from facegen.clean.cluster import cluster_votes
from facegen.clean.fusion import fuse, rows_needing
from facegen.clean.view import BlockView, block_view
from facegen.clean.votes import DROP, ExpertVotes, votes_column
from facegen.config import CleanSettings
from facegen.schema import STATUS_DROPPED, STATUS_OK, clean_schema, embedding_dim
from facegen.vectors import l2_normalize

#: Version of the centres files written beside each votes block (2: ``mean_length`` added); part of
#: the votes blocks' digest, so blocks written in an older format are redone, never misread.
CENTRES_FORMAT = 2

EmbedFn = Callable[[np.ndarray], np.ndarray]

def centres_schema(dim: int) -> pa.Schema:
    """One row per identity with kept images: its unit centre (``dim`` = the block's embedding width)
    and ``mean_length``, the length of the mean of its unit embeddings before renormalising: two
    identities' mean cross-pair cosine is their centres' cosine times both lengths."""
    return pa.schema([
        pa.field("identity_id", pa.int64(), nullable=False),
        pa.field("block_id", pa.int64(), nullable=False),
        pa.field("num_kept", pa.int32(), nullable=False),
        pa.field("centre", pa.list_(pa.float32(), dim)),
        pa.field("mean_length", pa.float32()),
    ])


class Expert(Protocol):
    """An expert that can be asked about some identities of a block (built by its module's ``build``
    from its entry of ``clean.experts``; :data:`facegen.config.clean.EXPERTS`)."""

    name: str

    def vote(self, view: BlockView, identities: list[int]) -> ExpertVotes:
        """Votes over all rows of ``view`` (rows of other identities abstain)."""


def build_experts(settings: CleanSettings, **context: Any) -> list[Expert]:
    """The configured experts in ``clean.experts`` order (the order they are asked in); ``context``
    is what a kind's ``build`` may use: ``stage_dir(name)``, the run's folder for a stage's files."""
    from facegen.config.clean import EXPERTS

    return [EXPERTS.build(s, **context) for s in settings.experts]


def _drop_reason(votes: dict[str, ExpertVotes], row: int) -> str:
    reasons = [str(ev.reason[row]) for ev in votes.values() if ev.vote[row] == DROP and ev.reason[row]]
    return "; ".join(reasons) or "dropped by fusion"


def vote_block(table: pa.Table, block_id: int, settings: CleanSettings, experts: Sequence[Expert] = ()) -> tuple[pa.Table, pa.Table, dict[str, Any]]:
    """Run the cluster expert, then ``experts`` in order, and the fusion on one block; returns
    (CLEAN rows, centres rows, stats)."""
    from facegen.clean.thresholds import resolve_clean_settings

    settings = resolve_clean_settings(settings)
    view = block_view(table)
    n = view.num_rows
    votes: dict[str, ExpertVotes] = {"cluster": cluster_votes(view, settings.dbscan)}
    pending = {e.name for e in experts}
    asked: dict[str, int] = {}
    for expert in experts:
        need = rows_needing(expert.name, votes, settings.fusion, n, pending) & view.usable
        identities = sorted({int(i) for i in view.identity[need]})
        asked[expert.name] = len(identities)
        votes[expert.name] = expert.vote(view, identities)
        pending.discard(expert.name)
    fused = fuse(votes, settings.fusion, n)
    keep = fused.keep & view.usable
    decided_by = fused.decided_by(settings.fusion)

    status, reason = [], []
    original_status = view.table.column("status").to_pylist()
    original_reason = view.table.column("reason").to_pylist()
    for r in range(n):
        if not view.status_ok[r]:
            status.append(original_status[r])
            reason.append(original_reason[r] or "error upstream")
            decided_by[r] = "upstream"
        elif not view.usable[r]:
            status.append(STATUS_DROPPED)
            reason.append("no usable embedding")
            decided_by[r] = "no embedding"
        elif keep[r]:
            status.append(STATUS_OK)
            reason.append("")
        else:
            status.append(STATUS_DROPPED)
            reason.append(_drop_reason(votes, r))
    out = view.table
    out = out.set_column(out.schema.get_field_index("status"), "status", pa.array(status, pa.string()))
    out = out.set_column(out.schema.get_field_index("reason"), "reason", pa.array(reason, pa.string()))
    dim = embedding_dim(view.table.schema)
    schema = clean_schema(dim)
    out = out.append_column(schema.field("votes"), pa.array(votes_column(list(votes.values()), n), schema.field("votes").type))
    out = out.append_column(schema.field("decided_by"), pa.array(decided_by, pa.string()))
    out = out.cast(schema).sort_by([("identity_id", "ascending"), ("sample_idx", "ascending")])

    centre_rows = []
    for ident, rows in view.groups.items():
        kept = rows[keep[rows]]
        if len(kept):
            mean = l2_normalize(view.unit[kept].astype(np.float64)).mean(axis=0)  # identity_centre before renormalising
            centre_rows.append((ident, len(kept), l2_normalize(mean).astype(np.float32), float(np.linalg.norm(mean))))
    centres = pa.Table.from_arrays([
        pa.array([c[0] for c in centre_rows], pa.int64()),
        pa.array([block_id] * len(centre_rows), pa.int64()),
        pa.array([c[1] for c in centre_rows], pa.int32()),
        pa.FixedSizeListArray.from_arrays(pa.array(np.concatenate([c[2] for c in centre_rows]) if centre_rows else np.zeros(0, np.float32)), dim),
        pa.array([c[3] for c in centre_rows], pa.float32()),
    ], schema=centres_schema(dim))

    wrong = (view.true_identity >= 0) & (view.true_identity != view.identity)
    stats: dict[str, Any] = {
        "identities_in": len(view.groups),
        "images_in": n,
        "images_error": int((~view.status_ok).sum()),
        "images_no_embedding": int((view.status_ok & ~view.usable).sum()),
        "images_removed": int((view.usable & ~keep).sum()),
        "injected_wrong_in": int(wrong.sum()),
        "injected_wrong_removed_by_experts": int((wrong & view.usable & ~keep).sum()),
        "experts": {name: {"votes": ev.counts(), **ev.info} for name, ev in votes.items()},
        "experts_asked_identities": asked,
        "fusion_rules_fired": {d: int(c) for d, c in zip(*np.unique(np.array(decided_by)[view.usable], return_counts=True))},
    }
    return out, centres, stats


def combine_stats(expert_stats: dict[str, Any], final_stats: dict[str, Any]) -> dict[str, Any]:
    """One block's stats from its expert pass and its final pass (the counters the stage sums)."""
    stats = {**expert_stats, **final_stats}
    stats["injected_wrong_removed"] = stats["injected_wrong_in"] - final_stats.get("injected_wrong_kept", 0)
    return stats


def clean_block(table: pa.Table, settings: CleanSettings, seed: int, embed_fn: EmbedFn | None = None, *,
                experts: Sequence[Expert] = (), block_id: int = 0, jpeg_quality: int = 95) -> tuple[pa.Table, dict[str, Any]]:
    """Expert pass and final pass of one block on its own (no dedup or leakage across blocks)."""
    from facegen.clean.finish import finish_block

    if seed < 0:
        raise ValueError(f"clean: seed must be >= 0 (it seeds numpy's SeedSequence), got {seed}")
    voted, _, expert_stats = vote_block(table, block_id, settings, experts)
    out, final_stats = finish_block(voted, settings, seed, embed_fn, jpeg_quality=jpeg_quality)
    return out, combine_stats(expert_stats, final_stats)
