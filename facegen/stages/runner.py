"""The one block runner of every block stage: plan, claim, check, map on Ray Data, stream, report.

A block stage (identity blocks, generate, ingest, the two clean passes, shard) is a
:class:`BlockStage`: the blocks it should hold, the per-block callable class that makes one
(:class:`BlockWorker`: load models once in ``__init__``, ``make(row)`` writes the whole block
atomically and returns its small stats record) and the actor pool it runs on
(:class:`~facegen.config.PoolSettings`). :func:`run_block_stage`:

1. claims the stage directory (another run's temp files are never removed, ours are);
2. sorts the finished blocks into trusted and bad (size, settings digest, input sha256, content
   sha256 computed by Ray tasks) and forgets the bad ones;
3. maps the pending blocks through ``ray.data.from_items(...).map_batches(worker, batch_size=1,
   compute=ActorPoolStrategy(min_size, max_size), num_cpus=..., num_gpus=..., resources=...)``; the
   driver receives one small record per block, streamed in completion order, never an image;
4. shows one progress line and returns a :class:`StageReport` with the stage's records.

Node loss is carried by Ray Data: its actors restart (on another node) and their blocks are
retried; a block redone after a node died is written again with the same bytes. A block whose
worker raised is recorded with its reason and the stage goes on; the stage then fails in one line
naming how many blocks failed (a re-run retries exactly those). A worker whose constructor raises
(a missing model on a node, say) stops the stage at once with that cause in one line.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from facegen import blocks as blk
from facegen.claims import StageClaim
from facegen.config import PoolSettings
from facegen.stages import StageError, StageInterrupted, StageReport
from facegen.stages.tasks import check_resources_fit, cluster_checksums, one_line


class BlockWorker:
    """Base of the per-block callable classes: ``make(row) -> stats record`` does one block.

    ``row`` is ``{"block_id": id, **work}`` (the block's inputs from :attr:`BlockStage.jobs`).
    :meth:`commit` writes a block and its stats record (with the node that made it);
    :meth:`make_record` turns an exception into an error record, so one bad block never stops the
    others.
    """

    node_id: str = ""

    def make(self, row: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def commit(self, stage_dir: str, block_id: int, table: Any, stats: dict[str, Any]) -> dict[str, Any]:
        """:func:`facegen.blocks.commit_block` with this worker's node recorded in the stats."""
        return blk.commit_block(stage_dir, block_id, table, {**stats, "node_id": self.node_id})

    def make_record(self, row: dict[str, Any]) -> dict[str, Any]:
        """``make(row)``, or ``{"block_id", "error"}`` when it raised."""
        try:
            return self.make(row)
        except Exception as exc:  # noqa: BLE001 - reported per block, the pool goes on
            return {"block_id": int(row["block_id"]), "error": f"block {int(row['block_id'])}: {one_line(exc)}"}


class BlockCall:
    """The ``map_batches`` callable class around a :class:`BlockWorker` (one per actor).

    A constructor that raises inside Ray is logged as pages of traceback and retried; caught here,
    it becomes one ``fatal`` record per block, which the driver turns into one line.
    """

    worker_class: type = BlockWorker

    def __init__(self, worker_kwargs: dict[str, Any]):
        import ray

        self.failure: str | None = None
        try:
            self.worker = self.worker_class(**worker_kwargs)
            self.worker.node_id = ray.get_runtime_context().get_node_id()
        except Exception as exc:  # noqa: BLE001 - reported to the driver as one line
            self.worker, self.failure = None, one_line(exc)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        records = []
        for block_id, work in zip(batch["block_id"], batch["work"]):
            row = {"block_id": int(block_id), **json.loads(str(work))}
            if self.worker is None:
                records.append({"block_id": int(block_id), "fatal": self.failure})
            else:
                records.append(self.worker.make_record(row))
        return {"block_id": np.asarray(batch["block_id"], np.int64),
                "record": np.array([json.dumps(r, default=float) for r in records], dtype=object)}


def _call_class(worker: type) -> type:
    # named after the worker, so Ray's state API shows MapWorker(MapBatches(<worker>))
    return type(worker.__name__, (BlockCall,), {"worker_class": worker, "__qualname__": worker.__name__})


@dataclass
class BlockStage:
    """One resumable block stage (see the module docstring).

    ``jobs`` maps every planned block id to its JSON-able inputs; ``units`` (block id -> count)
    drives the progress bar in ``unit`` (default: blocks). ``still_valid(block_id, record)``
    returns why a finished block must be redone beyond the standard checks, or None. ``check`` and
    ``reset`` replace the standard bookkeeping (one data file + stats record per block) for a stage
    that writes other files (shard's bucket files).
    """

    name: str
    output_dir: str
    worker: type
    worker_kwargs: dict[str, Any]
    pool: PoolSettings
    pool_field: str
    jobs: dict[int, dict[str, Any]]
    config_digest: str | None = None
    sources: dict[int, str] | None = None
    verify: str = "sha256"
    overwrite: bool = False
    units: dict[int, int] | None = None
    unit: str = "block"
    still_valid: Callable[[int, dict[str, Any]], str | None] | None = None
    check: Callable[[list[int]], blk.BlockCheck] | None = None
    reset: Callable[[list[int]], None] | None = None
    on_record: Callable[[dict[str, Any]], None] | None = None
    notes_outcome: str = "redone"


@dataclass
class StageOutcome:
    """What :func:`run_block_stage` did: the report and every finished block's record (by id)."""

    report: StageReport
    records: dict[int, dict[str, Any]] = field(default_factory=dict)


def quiet_data_context() -> None:
    """Ray Data prints no progress bars or execution plans: each stage shows its own progress line."""
    import ray.data

    context = ray.data.DataContext.get_current()
    for name, value in (("enable_progress_bars", False), ("enable_operator_progress_bars", False),
                        ("print_on_execution_start", False), ("log_internal_stack_trace_to_stdout", False)):
        if hasattr(context, name):
            setattr(context, name, value)


def map_blocks(worker: type, worker_kwargs: dict[str, Any], rows: list[tuple[int, dict[str, Any]]], pool: PoolSettings,
               field: str) -> Iterator[dict[str, Any]]:
    """The stats record of every ``(block id, work)`` row made by ``worker`` on a Ray Data actor
    pool, in completion order; a worker that cannot start raises :class:`StageError` at once."""
    import ray
    import ray.data

    if not rows:
        return
    check_resources_fit(pool.ray_resources(), field)
    quiet_data_context()
    size = len(rows)
    compute = ray.data.ActorPoolStrategy(min_size=min(pool.min_size, size), max_size=min(pool.largest, size),
                                         max_tasks_in_flight_per_actor=pool.max_tasks_in_flight)
    items = [{"block_id": int(b), "work": json.dumps(work)} for b, work in rows]
    dataset = ray.data.from_items(items, override_num_blocks=size).map_batches(
        _call_class(worker), fn_constructor_kwargs={"worker_kwargs": worker_kwargs}, batch_size=1, batch_format="numpy",
        compute=compute, num_cpus=pool.num_cpus, num_gpus=pool.num_gpus or None, resources=pool.resources or None)
    seen: set[int] = set()
    try:
        for row in dataset.iter_rows():
            record = json.loads(row["record"])
            if "fatal" in record:
                raise StageError(f"{worker.__name__} could not start: {record['fatal']}")
            if int(record["block_id"]) not in seen:  # a retried block reports once
                seen.add(int(record["block_id"]))
                yield record
    except ray.exceptions.RayError as exc:
        raise StageError(f"{worker.__name__}: {one_line(exc, 300)}") from None


def _standard_check(stage: BlockStage, block_ids: list[int]) -> blk.BlockCheck:
    checksum = cluster_checksums if stage.verify == "sha256" else None
    return blk.check_blocks(stage.output_dir, block_ids, config_digest=stage.config_digest, sources=stage.sources,
                            checksum=checksum)


def _blocks_done(stage: BlockStage, planned: list[int], records: dict[int, Any]) -> int:
    # a worker may have committed blocks whose records had not reached the driver yet: count storage
    try:
        on_storage = set(planned) & set(blk.done_block_ids(stage.output_dir))
    except OSError:
        on_storage = set()
    return len(on_storage | set(records))


def run_block_stage(stage: BlockStage, progress: bool = True) -> StageOutcome:
    """Make every block of ``stage`` that is not done (or no longer valid); see the module docstring."""
    from tqdm.auto import tqdm

    started = time.time()
    planned = sorted(stage.jobs)
    reset = stage.reset or (lambda ids: blk.reset_blocks(stage.output_dir, ids))
    with StageClaim(stage.output_dir, settings=stage.config_digest or "") as claim:
        # shown without progress too: a run that waits silently looks hung
        claim.wait_for_runs_ahead(on_wait=lambda line: print(f"note: {line}", flush=True))
        claim.remove_stale_temp_files()
        if stage.overwrite:
            reset(planned)
        check = stage.check(planned) if stage.check else _standard_check(stage, planned)
        if stage.still_valid is not None:
            for block_id, record in list(check.valid.items()):
                why = stage.still_valid(block_id, record)
                if why:
                    del check.valid[block_id]
                    check.invalid[block_id] = why
        reset(sorted(check.invalid))
        pending = [b for b in planned if b not in check.valid]
        report = StageReport(stage.name, stage.output_dir, len(planned), len(planned) - len(pending), 0, 0.0,
                             blocks_redone=len(check.invalid), notes=check.notes(stage.name, stage.notes_outcome))
        records = dict(check.valid)
        failures: list[str] = []
        total = sum((stage.units or {}).get(b, 1) for b in pending)
        with tqdm(total=total, unit=stage.unit, desc=f"{stage.name} ({len(pending)} blocks)",
                  disable=not progress or not pending) as bar:
            rows = [(b, stage.jobs[b]) for b in pending]
            try:
                for record in map_blocks(stage.worker, stage.worker_kwargs, rows, stage.pool, stage.pool_field):
                    block_id = int(record["block_id"])
                    bar.update((stage.units or {}).get(block_id, 1))
                    if "error" in record:
                        failures.append(record["error"])
                        continue
                    records[block_id] = record
                    report.blocks_written += 1
                    if stage.on_record is not None:
                        stage.on_record(record)
            except KeyboardInterrupt:
                raise StageInterrupted(f"{stage.name} interrupted: {_blocks_done(stage, planned, records)} of "
                                       f"{len(planned)} blocks done in {stage.output_dir}; run the same command again "
                                       "to resume") from None
    report.seconds = round(time.time() - started, 2)
    if failures:
        raise StageError(f"{stage.name}: {len(failures)} block(s) failed (re-run to retry them); first: {failures[0]}")
    return StageOutcome(report, dict(sorted(records.items())))
