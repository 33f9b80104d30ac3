"""Resumable work units: blocks of consecutive identity ids, one output file per block.

Identity ``i`` belongs to block ``i // block_size``, whatever range a run covers, so file names are
a pure function of the ids. A block is done when both ``block-XXXXXX.parquet`` and
``block-XXXXXX.stats.json`` exist; the stats record is written after the data file, so a crash
between the two leaves a block that is simply redone.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from facegen import storage
from facegen.config import IdentitySettings


@dataclass(frozen=True)
class Block:
    """Identities ``first_id <= i < end_id`` of block ``block_id``."""

    block_id: int
    first_id: int
    end_id: int

    @property
    def num_identities(self) -> int:
        return self.end_id - self.first_id


def plan_blocks(settings: IdentitySettings) -> list[Block]:
    """The blocks covering ``settings.first_id .. first_id + num_identities - 1``."""
    start, end, size = settings.first_id, settings.first_id + settings.num_identities, settings.block_size
    blocks = []
    for block_id in range(start // size, (end - 1) // size + 1):
        blocks.append(Block(block_id, max(start, block_id * size), min(end, (block_id + 1) * size)))
    return blocks


def block_path(stage_dir: str, block_id: int) -> str:
    """``<stage_dir>/block-000042.parquet``."""
    return f"{stage_dir.rstrip('/')}/block-{block_id:06d}.parquet"


def stats_path(stage_dir: str, block_id: int) -> str:
    """``<stage_dir>/block-000042.stats.json`` (the done-marker)."""
    return f"{stage_dir.rstrip('/')}/block-{block_id:06d}.stats.json"


def is_done(stage_dir: str, block_id: int) -> bool:
    """Both the block's data file and its stats record exist."""
    return storage.exists(stats_path(stage_dir, block_id)) and storage.exists(block_path(stage_dir, block_id))


def done_block_ids(stage_dir: str) -> list[int]:
    """Ids of the finished blocks in a stage directory, ascending."""
    ids = []
    for path in storage.list_dir(stage_dir, ".stats.json"):
        name = path.rsplit("/", 1)[-1]
        try:
            block_id = int(name[len("block-") : -len(".stats.json")])
        except ValueError:
            continue
        if storage.exists(block_path(stage_dir, block_id)):
            ids.append(block_id)
    return sorted(ids)


def commit_block(stage_dir: str, block_id: int, table: pa.Table, stats: dict[str, Any]) -> dict[str, Any]:
    """Write the block's data file, then its stats record (with size and checksum) atomically."""
    record = storage.write_table_atomic(table, block_path(stage_dir, block_id))
    full = {"block_id": block_id, "rows": record.rows, "bytes": record.bytes, "sha256": record.sha256, **stats}
    storage.write_json_atomic(full, stats_path(stage_dir, block_id))
    return full


def reset_blocks(stage_dir: str, block_ids: Iterable[int]) -> None:
    """Forget finished blocks (``--overwrite``): the stats marker goes first."""
    for block_id in block_ids:
        storage.remove(stats_path(stage_dir, block_id))
        storage.remove(block_path(stage_dir, block_id))


def read_stats(stage_dir: str) -> list[dict[str, Any]]:
    """The stats records of all finished blocks, by block id."""
    return [storage.read_json(stats_path(stage_dir, b)) for b in done_block_ids(stage_dir)]


def sum_stats(records: list[dict[str, Any]], keys: Iterable[str]) -> dict[str, int]:
    """Totals of integer counters over block stats records (missing counters count as 0)."""
    return {k: int(sum(int(r.get(k, 0) or 0) for r in records)) for k in keys}
