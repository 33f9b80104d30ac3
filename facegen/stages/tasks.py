"""Ray tasks of the stages: one task with declared resources, many small ones, cluster checks.

The driver on the head plans and reports; anything that reads data (dedup, leakage, Langevin,
folder scans, checksums, evaluation) runs through :func:`run_task` or :func:`map_tasks` with
``num_cpus > 0``, so a head started with ``--num-cpus=0`` never runs it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from facegen.blocks import sha256_or_none
from facegen.config import TaskSettings
from facegen.stages import StageError


def one_line(exc: BaseException, limit: int = 500) -> str:
    """``Type: message`` of an exception on one line."""
    return " ".join(f"{type(exc).__name__}: {exc}".split())[:limit]


def task_cause(exc: BaseException) -> BaseException:
    """The exception a Ray task raised, without Ray's wrapping (``RayTaskError.cause``)."""
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, BaseException) else exc


def _describe(need: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:g}" for k, v in need.items()) or "nothing"


def check_resources_fit(need: dict[str, float], field: str) -> None:
    """Raise :class:`StageError` (one line naming ``field``) when no node of the cluster, alive or
    one the autoscaler may add, offers ``need`` (e.g. a pool asks for a GPU on a CPU-only cluster)."""
    import ray

    if not need:
        return
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    if any(all(node.get(k, 0.0) >= v for k, v in need.items()) for node in nodes):
        return
    try:
        from ray._private.state import state

        config = state.get_cluster_config()  # the autoscaler's node types, where one runs
    except Exception:  # noqa: BLE001 - a private API; without it only the nodes present count
        config = None
    for group in getattr(config, "node_group_configs", None) or []:
        if group.max_count != 0 and all(group.resources.get(k, 0) >= v for k, v in need.items()):
            return
    shown = "; ".join(_describe({k: v for k, v in node.items() if k in ("CPU", "GPU") or k in need}) for node in nodes)
    raise StageError(f"{field}: one actor or task asks for {_describe(need)}, but no node of this cluster offers "
                     f"that (nodes: {shown or 'none'})")


def run_task(fn: Callable[..., Any], *args: Any, resources: TaskSettings, field: str, name: str | None = None) -> Any:
    """``fn(*args)`` as one Ray task with ``resources``; its exception re-raised as it was (one line
    at the CLI), not wrapped in Ray's traceback."""
    import ray
    from ray.exceptions import RayTaskError

    check_resources_fit(resources.ray_resources(), field)
    remote = ray.remote(num_cpus=resources.num_cpus, num_gpus=resources.num_gpus, resources=resources.resources or None,
                        max_retries=2, retry_exceptions=False)(fn)
    try:
        return ray.get(remote.options(name=name or getattr(fn, "__name__", "task")).remote(*args))
    except RayTaskError as exc:
        cause = task_cause(exc)
        if isinstance(cause, (FileNotFoundError, ValueError, StageError)):
            raise cause from None
        raise StageError(f"{name or getattr(fn, '__name__', 'task')}: {one_line(cause)}") from None


def map_tasks(fn: Callable[..., Any], items: list[Any], *, max_in_flight: int = 64, num_cpus: float = 0.25,
              num_gpus: float = 0.0, resources: dict[str, float] | None = None) -> Iterator[Any]:
    """``fn(item)`` for every item as Ray tasks, at most ``max_in_flight`` at once; yields results
    in completion order (each ``ray.wait`` looks at the bounded window only: O(n) bookkeeping)."""
    import ray
    from ray.exceptions import RayTaskError

    remote = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus, resources=resources or None, max_retries=3)(fn)
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
        except RayTaskError as exc:
            raise StageError(f"{getattr(fn, '__name__', 'task')}: {one_line(task_cause(exc))}") from None
        yield result


def _checksum_chunk(paths: list[str]) -> list[tuple[str, str | None]]:
    return [(p, sha256_or_none(p)) for p in paths]


def cluster_checksums(paths: list[str], chunk: int = 16) -> list[str | None]:
    """sha256 of each path (None where unreadable), computed by Ray tasks on the workers."""
    chunks = [paths[i : i + chunk] for i in range(0, len(paths), chunk)]
    found: dict[str, str | None] = {}
    for result in map_tasks(_checksum_chunk, chunks):
        found.update(result)
    return [found[p] for p in paths]


class _TrackedTask:
    """An actor that runs one function in the background and answers progress polls meanwhile."""

    def __init__(self) -> None:
        self.done, self.total, self.postfix = 0, 0, ""

    def _report(self, done: int, total: int, postfix: str = "") -> None:
        self.done, self.total, self.postfix = int(done), int(total), postfix

    def run(self, fn: Callable[..., Any], args: tuple) -> Any:
        return fn(*args, report=self._report)

    def poll(self) -> tuple[int, int, str]:
        return self.done, self.total, self.postfix


def run_tracked(fn: Callable[..., Any], *args: Any, resources: TaskSettings, field: str, name: str,
                progress: bool = True, unit: str = "it") -> Any:
    """:func:`run_task` for long work that reports how far it is: ``fn(*args, report=cb)`` calls
    ``cb(done, total, postfix)``; the driver shows it as one progress line. The actor is restarted
    (on another node) and the call retried when its node dies: ``fn`` must resume from its own
    checkpoints."""
    import ray
    from ray.exceptions import RayTaskError
    from tqdm.auto import tqdm

    check_resources_fit(resources.ray_resources(), field)
    actor = ray.remote(_TrackedTask).options(
        name=None, num_cpus=resources.num_cpus, num_gpus=resources.num_gpus, resources=resources.resources or None,
        max_concurrency=2, max_restarts=3, max_task_retries=3).remote()
    result = actor.run.remote(fn, args)
    bar = tqdm(total=0, unit=unit, desc=name, disable=not progress)
    try:
        while True:
            ready, _ = ray.wait([result], timeout=1.0)
            try:
                done, total, postfix = ray.get(actor.poll.remote(), timeout=10)
                bar.total, bar.n = total, done
                if postfix:
                    bar.set_postfix_str(postfix, refresh=False)
                bar.refresh()
            except (ray.exceptions.RayError, TimeoutError):
                pass  # the actor is restarting on another node: the next poll tells
            if ready:
                return ray.get(result)
    except RayTaskError as exc:
        cause = task_cause(exc)
        if isinstance(cause, (FileNotFoundError, ValueError, StageError)):
            raise cause from None
        raise StageError(f"{name}: {one_line(cause)}") from None
    finally:
        bar.close()
        ray.kill(actor)


def stage_resources(cfg: Any, stages: list[str]) -> list[tuple[str, TaskSettings]]:
    """``(field, resources)`` of every pool and task the named stages will ask the cluster for."""
    needs = {
        "identities": [("identities.sampler.pool", cfg.identities.sampler.pool)]
        + ([("identities.sampler.langevin.worker", cfg.identities.sampler.langevin.worker)]
           if cfg.identities.sampler.kind == "langevin" and cfg.identities.sampler.langevin.workers > 1 else []),
        "directions": [("directions.pool", cfg.directions.pool)],
        "generate": [("generator.pool", cfg.generator.pool)],
        "ingest": [("faces.pool", cfg.faces.pool)],
        "clean": [("clean.pool", cfg.clean.pool), ("clean.global_task", cfg.clean.global_task)]
        + ([("generator.pool", cfg.generator.pool)] if cfg.clean.replace_dropped else []),
        "shard": [("shards.pool", cfg.shards.pool)],
        "train": [("train", TaskSettings(num_cpus=cfg.train.cpus_per_worker, num_gpus=1.0 if cfg.train.use_gpu else 0.0,
                                         resources=cfg.train.resources))],
        "train_generator": [("train_generator", TaskSettings(
            num_cpus=cfg.train_generator.cpus_per_worker, num_gpus=1.0 if cfg.train_generator.use_gpu else 0.0,
            resources=cfg.train_generator.resources))],
    }
    return [need for stage in stages for need in needs.get(stage, [])]


def check_stage_resources(cfg: Any, stages: list[str]) -> None:
    """Before any work: every pool and task of ``stages`` fits on some node (one line naming the field)."""
    for field, resources in stage_resources(cfg, stages):
        check_resources_fit(resources.ray_resources(), field)
