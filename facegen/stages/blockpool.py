"""Running per-block work on a Ray cluster with the driver holding only small records.

- :func:`map_blocks`: a :class:`BlockWorker` class (one actor per pool slot, models loaded once)
  that makes one block per call, writes the block's files itself and returns its stats record;
  the driver receives the records in completion order (no global ordering, nothing large).
- :func:`map_tasks`: a function over many items as Ray tasks, at most ``max_in_flight`` at a time,
  results handled as they finish (each ``ray.wait`` looks at the bounded window only, so the
  bookkeeping is O(n) in the number of items).
- :func:`cluster_checksums`: sha256 of many files, computed in the cluster, not in the driver.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from facegen.blocks import sha256_or_none


def _record_batch(block_ids: np.ndarray, records: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    return {"block_id": np.asarray(block_ids, np.int64),
            "record": np.array([json.dumps(r, default=float) for r in records], dtype=object)}


def _one_line(exc: BaseException, limit: int = 500) -> str:
    return " ".join(f"{type(exc).__name__}: {exc}".split())[:limit]


class BlockWorker:
    """Base of the per-block callable classes: ``make(row) -> stats record`` does one block.

    :meth:`make_record` turns an exception into an error record, so one bad block never stops the
    others (the driver reports it); ``__call__`` offers the same on a Ray Data batch of block rows.
    """

    def make(self, row: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def make_record(self, row: dict[str, Any]) -> dict[str, Any]:
        """``make(row)``, or ``{"block_id", "error"}`` when it raised."""
        try:
            return self.make(row)
        except Exception as exc:  # noqa: BLE001 - reported per block, the pool goes on
            return {"block_id": int(row["block_id"]), "error": f"block {int(row['block_id'])}: {_one_line(exc)}"}

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = [{k: (v[i].item() if hasattr(v[i], "item") else v[i]) for k, v in batch.items()}
                for i in range(len(batch["block_id"]))]
        return _record_batch(batch["block_id"], [self.make_record(r) for r in rows])


class _GuardedWorker:
    """The actor behind :func:`map_blocks`: builds the worker and remembers why it could not.

    A constructor that raises inside Ray is logged as a multi-page traceback and retried; caught
    here, it becomes one ``fatal`` record that the driver turns into one line.
    """

    def __init__(self, worker_class: type, kwargs: dict[str, Any]):
        self.failure: str | None = None
        try:
            self.worker = worker_class(**kwargs)
        except Exception as exc:  # noqa: BLE001 - reported to the driver as one line
            self.worker, self.failure = None, _one_line(exc)

    def make_record(self, row: dict[str, Any]) -> dict[str, Any]:
        if self.worker is None:
            return {"block_id": int(row["block_id"]), "fatal": self.failure}
        return self.worker.make_record(row)


def _creation_error(exc: BaseException) -> str:
    """The one-line cause of an actor that could not be created (its constructor raised)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    causes = [ln for ln in lines if ": " in ln and ln.split(":", 1)[0].replace(".", "").isidentifier()
              and ln.split(":", 1)[0].endswith(("Error", "Exception"))]
    return (causes[-1] if causes else (lines[-1] if lines else type(exc).__name__))[:500]


def map_blocks(
    actor_class: type,
    constructor_kwargs: dict[str, Any],
    blocks: list[dict[str, Any]],
    *,
    pool_size: int,
    num_cpus: float,
    num_gpus: float = 0.0,
    resources: dict[str, float] | None = None,
    max_restarts: int = 3,
) -> Iterator[dict[str, Any]]:
    """Stats records of ``actor_class(**constructor_kwargs).make_record(row)`` for every block row,
    as blocks finish, on a pool of ``pool_size`` actors.

    Each actor has two blocks queued at most (no idle gap between blocks); the driver waits on
    that bounded set only, so handling n blocks costs O(n). An actor lost with its node is
    restarted and its block retried (``max_restarts``); an actor whose constructor raises stops
    the stage at once with that error in one line (:class:`~facegen.stages.StageError`).
    """
    import ray
    from ray.exceptions import RayActorError

    from facegen.stages import StageError

    if not blocks:
        return
    remote = ray.remote(_GuardedWorker).options(num_cpus=num_cpus, num_gpus=num_gpus, resources=resources or None,
                                                max_restarts=max_restarts, max_task_retries=max_restarts)
    actors = [remote.remote(actor_class, constructor_kwargs) for _ in range(max(1, min(pool_size, len(blocks))))]
    queue = iter(blocks)
    in_flight: dict[Any, Any] = {}

    def submit(actor: Any) -> None:
        row = next(queue, None)
        if row is not None:
            in_flight[actor.make_record.remote(row)] = actor

    try:
        for _ in range(2):
            for actor in actors:
                submit(actor)
        while in_flight:
            [ref], _ = ray.wait(list(in_flight), num_returns=1)
            actor = in_flight.pop(ref)
            try:
                record = ray.get(ref)
            except RayActorError as exc:
                what = "could not start" if "creation task" in str(exc) else "died (restarts used up)"
                raise StageError(f"{actor_class.__name__} {what}: {_creation_error(exc)}") from None
            if "fatal" in record:
                raise StageError(f"{actor_class.__name__} could not start: {record['fatal']}")
            submit(actor)
            yield record
    finally:
        for actor in actors:
            ray.kill(actor)


def map_tasks(fn: Callable[..., Any], items: list[Any], *, max_in_flight: int = 64, num_cpus: float = 0.25,
              num_gpus: float = 0.0, resources: dict[str, float] | None = None) -> Iterator[Any]:
    """``fn(item)`` for every item as Ray tasks, at most ``max_in_flight`` at once; yields results
    in completion order."""
    import ray
    from ray.exceptions import RayTaskError

    from facegen.stages import StageError

    remote = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus, resources=resources or None, max_retries=2)(fn)
    pending = iter(items)
    in_flight = []
    for item in pending:
        in_flight.append(remote.remote(item))
        if len(in_flight) >= max_in_flight:
            break
    while in_flight:
        done, in_flight = ray.wait(in_flight, num_returns=1)
        for item in pending:
            in_flight.append(remote.remote(item))
            break
        try:
            result = ray.get(done[0])
        except RayTaskError as exc:  # the task's own exception, without Ray's wrapping traceback
            cause = exc.cause if getattr(exc, "cause", None) is not None else exc
            raise StageError(f"{getattr(fn, '__name__', 'task')}: {_one_line(cause)}") from None
        yield result


def _checksum_chunk(paths: list[str]) -> list[tuple[str, str | None]]:
    return [(p, sha256_or_none(p)) for p in paths]


def cluster_checksums(paths: list[str], chunk: int = 16) -> list[str | None]:
    """sha256 of each path (None where unreadable), computed by Ray tasks near the data."""
    chunks = [paths[i : i + chunk] for i in range(0, len(paths), chunk)]
    found: dict[str, str | None] = {}
    for result in map_tasks(_checksum_chunk, chunks):
        found.update(result)
    return [found[p] for p in paths]
