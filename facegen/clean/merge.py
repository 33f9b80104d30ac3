"""Rows of duplicate identities merged into their survivor's block (``dedup.action: merge``)."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.compute as pc

from facegen import blocks as blk
from facegen import storage
from facegen.schema import STATUS_OK


def merged_rows(votes_dir: str, target_table: pa.Table, incoming: list[tuple[int, int, int]]) -> pa.Table:
    """CLEAN rows of each ``(source id, source block, target id)`` relabelled as the target identity.

    Their ``sample_idx`` continue after the target's largest one (sources in id order), ``meta``
    gains ``merged_from`` (the source identity and sample), and kept rows say so in ``decided_by``.
    """
    next_idx: dict[int, int] = {}
    ids = target_table.column("identity_id").to_numpy()
    idx = target_table.column("sample_idx").to_numpy()
    parts = []
    for source, source_block, target in incoming:
        t = storage.read_table(blk.block_path(votes_dir, source_block))
        t = t.filter(pc.equal(t.column("identity_id"), source)).sort_by("sample_idx")
        if t.num_rows == 0:
            continue
        start = next_idx.get(target, int(idx[ids == target].max()) + 1 if (ids == target).any() else 0)
        next_idx[target] = start + t.num_rows
        rows = t.to_pylist()
        for k, row in enumerate(rows):
            meta = json.loads(row["meta"] or "{}")
            meta["merged_from"] = {"identity_id": source, "sample_idx": row["sample_idx"]}
            row.update(identity_id=target, sample_idx=start + k, meta=json.dumps(meta))
            if row["status"] == STATUS_OK:
                row["decided_by"] = f"{row['decided_by']}; dedup: merged from identity {source}"
        parts.append(pa.Table.from_pylist(rows, schema=target_table.schema))
    return pa.concat_tables(parts) if parts else target_table.schema.empty_table()
