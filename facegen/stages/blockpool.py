"""Running per-block work on a Ray cluster with the driver holding only small records.

- :func:`map_blocks`: a callable class (one actor per pool slot, model loaded once) that receives
  one block per call, writes the block's files itself and returns a JSON record; the driver
  streams the records in completion order (no global ordering, nothing large in the driver).
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


def run_each_block(batch: dict[str, np.ndarray], make: Callable[[dict[str, Any]], dict[str, Any]]) -> dict[str, np.ndarray]:
    """Call ``make(row)`` for every block row of a batch; an exception becomes an error record,
    so one bad block never stops the others (the driver reports it)."""
    rows = [{k: (v[i].item() if hasattr(v[i], "item") else v[i]) for k, v in batch.items()} for i in range(len(batch["block_id"]))]
    records = []
    for row in rows:
        try:
            records.append(make(row))
        except Exception as exc:  # noqa: BLE001 - reported per block, the pool goes on
            message = " ".join(f"{type(exc).__name__}: {exc}".split())[:500]
            records.append({"block_id": int(row["block_id"]), "error": f"block {int(row['block_id'])}: {message}"})
    return _record_batch(batch["block_id"], records)


def map_blocks(
    actor_class: type,
    constructor_kwargs: dict[str, Any],
    blocks: list[dict[str, Any]],
    *,
    pool_size: int,
    num_cpus: float,
    num_gpus: float = 0.0,
    resources: dict[str, float] | None = None,
) -> Iterator[dict[str, Any]]:
    """Records of ``actor_class(**constructor_kwargs)(batch of one block row)``, as blocks finish."""
    import ray
    from ray.data import ActorPoolStrategy

    if not blocks:
        return
    ds = ray.data.from_items(blocks, override_num_blocks=len(blocks))
    ds = ds.map_batches(
        actor_class,
        fn_constructor_kwargs=constructor_kwargs,
        batch_size=1,
        batch_format="numpy",
        compute=ActorPoolStrategy(size=max(1, min(pool_size, len(blocks)))),
        num_cpus=num_cpus,
        num_gpus=num_gpus,
        resources=resources or None,
    )
    for row in ds.iter_rows():
        yield json.loads(row["record"])


def map_tasks(fn: Callable[..., Any], items: list[Any], *, max_in_flight: int = 64, num_cpus: float = 0.25,
              num_gpus: float = 0.0, resources: dict[str, float] | None = None) -> Iterator[Any]:
    """``fn(item)`` for every item as Ray tasks, at most ``max_in_flight`` at once; yields results
    in completion order."""
    import ray

    remote = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus, resources=resources or None)(fn)
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
        yield ray.get(done[0])


def _checksum_chunk(paths: list[str]) -> list[tuple[str, str | None]]:
    return [(p, sha256_or_none(p)) for p in paths]


def cluster_checksums(paths: list[str], chunk: int = 16) -> list[str | None]:
    """sha256 of each path (None where unreadable), computed by Ray tasks near the data."""
    chunks = [paths[i : i + chunk] for i in range(0, len(paths), chunk)]
    found: dict[str, str | None] = {}
    for result in map_tasks(_checksum_chunk, chunks):
        found.update(result)
    return [found[p] for p in paths]
