"""Resumable work units: blocks of consecutive identity ids, one output file per block.

Identity ``i`` belongs to block ``i // block_size``, whatever range a run covers, so file names are
a pure function of the ids. A block is done when both ``block-XXXXXX.parquet`` and
``block-XXXXXX.stats.json`` exist; the stats record is written after the data file, so a crash
between the two leaves a block that is simply redone.

A stats record carries the data file's size and sha256, the digest of the settings that shaped it
(``config_digest``) and, for blocks made from other blocks, the sha256 of each input
(``source_sha256``). :func:`check_blocks` uses them to tell a finished block from a truncated,
corrupt or stale one. Bookkeeping is one directory listing per stage plus stats records read in
parallel, so it stays cheap on object stores with many blocks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from facegen import storage
from facegen.config import IdentitySettings

STATS_SUFFIX = ".stats.json"
DATA_SUFFIX = ".parquet"
#: Threads that read stats records or checksums at once (I/O bound: object-store round trips).
IO_THREADS = 32


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
    return f"{stage_dir.rstrip('/')}/block-{block_id:06d}{DATA_SUFFIX}"


def stats_path(stage_dir: str, block_id: int) -> str:
    """``<stage_dir>/block-000042.stats.json`` (the done-marker)."""
    return f"{stage_dir.rstrip('/')}/block-{block_id:06d}{STATS_SUFFIX}"


def _block_id_of(name: str, suffix: str) -> int | None:
    if not (name.startswith("block-") and name.endswith(suffix)):
        return None
    try:
        return int(name[len("block-") : -len(suffix)])
    except ValueError:
        return None


@dataclass
class StageListing:
    """What one listing of a stage directory shows: data file sizes and stats markers by block id."""

    data_sizes: dict[int, int] = field(default_factory=dict)
    stats: set[int] = field(default_factory=set)

    def done_ids(self) -> list[int]:
        """Blocks with both a data file and a stats record, ascending."""
        return sorted(b for b in self.stats if b in self.data_sizes)


def scan(stage_dir: str) -> StageListing:
    """List ``stage_dir`` once and sort its block files into a :class:`StageListing`."""
    listing = StageListing()
    for name, size in storage.list_sizes(stage_dir).items():
        block_id = _block_id_of(name, STATS_SUFFIX)
        if block_id is not None:
            listing.stats.add(block_id)
            continue
        block_id = _block_id_of(name, DATA_SUFFIX)
        if block_id is not None:
            listing.data_sizes[block_id] = size
    return listing


def is_done(stage_dir: str, block_id: int) -> bool:
    """Both the block's data file and its stats record exist."""
    return storage.exists(stats_path(stage_dir, block_id)) and storage.exists(block_path(stage_dir, block_id))


def done_block_ids(stage_dir: str) -> list[int]:
    """Ids of the finished blocks in a stage directory, ascending (one listing)."""
    return scan(stage_dir).done_ids()


def commit_block(stage_dir: str, block_id: int, table: pa.Table, stats: dict[str, Any]) -> dict[str, Any]:
    """Write the block's data file, then its stats record (with size and checksum) atomically."""
    record = storage.write_table_atomic(table, block_path(stage_dir, block_id))
    full = {"block_id": block_id, "rows": record.rows, "bytes": record.bytes, "sha256": record.sha256, **stats}
    storage.write_json_atomic(full, stats_path(stage_dir, block_id))
    return full


def reset_blocks(stage_dir: str, block_ids: Iterable[int]) -> None:
    """Forget finished blocks (``--overwrite``, or a block found bad): the stats marker goes first."""
    for block_id in block_ids:
        storage.remove(stats_path(stage_dir, block_id))
        storage.remove(block_path(stage_dir, block_id))


def parallel_map(fn: Callable[[Any], Any], items: list[Any], threads: int = IO_THREADS) -> list[Any]:
    """``[fn(x) for x in items]`` on a thread pool (for storage round trips), order kept."""
    if len(items) <= 1:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(max_workers=min(threads, len(items))) as pool:
        return list(pool.map(fn, items))


def _read_record(path: str) -> dict[str, Any] | str:
    """A stats record, or the one-line reason it cannot be used."""
    try:
        record = storage.read_json(path)
    except (OSError, ValueError) as exc:
        return str(exc)
    if not isinstance(record, dict) or not {"sha256", "bytes"} <= set(record):
        return f"{path}: stats record lacks sha256/bytes"
    return record


def read_stats(stage_dir: str, block_ids: list[int] | None = None) -> list[dict[str, Any]]:
    """The stats records of the finished blocks (or of ``block_ids``), by block id, read in parallel."""
    ids = done_block_ids(stage_dir) if block_ids is None else sorted(block_ids)
    return parallel_map(lambda b: storage.read_json(stats_path(stage_dir, b)), ids)


def sum_stats(records: list[dict[str, Any]], keys: Iterable[str]) -> dict[str, int]:
    """Totals of integer counters over block stats records (missing counters count as 0)."""
    return {k: int(sum(int(r.get(k, 0) or 0) for r in records)) for k in keys}


@dataclass
class BlockCheck:
    """The finished blocks a stage can trust, and why the others cannot be (block id -> reason)."""

    valid: dict[int, dict[str, Any]] = field(default_factory=dict)
    invalid: dict[int, str] = field(default_factory=dict)

    def notes(self, stage: str, outcome: str = "redone", limit: int = 5) -> list[str]:
        """One line per bad block (at most ``limit``, then a count): what the report shows."""
        lines = [f"{stage}: block {b} {outcome}: {why}" for b, why in sorted(self.invalid.items())[:limit]]
        if len(self.invalid) > limit:
            lines.append(f"{stage}: {len(self.invalid) - limit} more blocks {outcome}")
        return lines


def check_blocks(
    stage_dir: str,
    block_ids: Iterable[int] | None = None,
    *,
    config_digest: str | None = None,
    sources: dict[int, str] | None = None,
    checksum: Callable[[list[str]], list[str | None]] | None = None,
) -> BlockCheck:
    """Sort the finished blocks of ``stage_dir`` (or those of ``block_ids``) into trusted and bad.

    A block is bad when its stats record is unreadable, its data file's size differs from the
    recorded one (truncated or replaced), its ``config_digest`` differs from ``config_digest``
    (its settings changed), its ``source_sha256`` differs from ``sources[block_id]`` (its input
    block changed) or, when ``checksum`` is given (paths -> sha256 or None when unreadable, e.g.
    run in parallel on a cluster), its content's sha256 differs from the recorded one.
    Blocks without both files are neither: they are simply not done.
    """
    listing = scan(stage_dir)
    done = listing.done_ids()
    if block_ids is not None:
        wanted = set(block_ids)
        done = [b for b in done if b in wanted]
    result = BlockCheck()
    records = parallel_map(lambda b: _read_record(stats_path(stage_dir, b)), done)
    for block_id, record in zip(done, records):
        if isinstance(record, str):
            result.invalid[block_id] = f"stats record unusable ({record})"
        elif listing.data_sizes[block_id] != int(record["bytes"]):
            result.invalid[block_id] = (f"data file is {listing.data_sizes[block_id]} bytes, its stats record says "
                                        f"{record['bytes']} (truncated or replaced)")
        elif config_digest is not None and record.get("config_digest") != config_digest:
            result.invalid[block_id] = f"settings changed (digest {record.get('config_digest')} -> {config_digest})"
        elif sources is not None and record.get("source_sha256") != sources.get(block_id):
            result.invalid[block_id] = "its input block changed"
        else:
            result.valid[block_id] = record
    if checksum is not None and result.valid:
        ids = sorted(result.valid)
        for block_id, digest in zip(ids, checksum([block_path(stage_dir, b) for b in ids])):
            if digest != result.valid[block_id]["sha256"]:
                del result.valid[block_id]
                result.invalid[block_id] = "unreadable" if digest is None else "sha256 mismatch (corrupt data file)"
    return result


def sha256_or_none(path: str) -> str | None:
    """sha256 of a file, or None when it cannot be read."""
    try:
        return storage.sha256_of(path)
    except OSError:
        return None


def read_block(stage_dir: str, block_id: int, sha256: str | None = None, columns: list[str] | None = None) -> pa.Table:
    """Read a block's table; with ``sha256`` the bytes are checked first (one read, no extra I/O).

    A mismatch raises ``ValueError`` naming the file, so a consumer never works on a corrupt input.
    """
    path = block_path(stage_dir, block_id)
    if sha256 is None:
        return storage.read_table(path, columns=columns)
    return storage.read_table_verified(path, sha256, columns=columns)
