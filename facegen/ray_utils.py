"""Connecting to Ray: the submitting cluster, an explicit address, or a private local node on loopback."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator

from facegen.config import RaySettings, StorageSettings

#: Ray reads this once, when ``ray._private.ray_constants`` is imported. At "0" a local node keeps
#: every address on 127.0.0.1; otherwise Ray 2.60 swaps a loopback node address for the machine's
#: "remotely reachable" one (``services.resolve_ip_for_localhost``) and the GCS, the raylet and
#: Ray Train's ``MASTER_ADDR`` listen and connect there, even with ``_node_ip_address="127.0.0.1"``.
LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
#: Loggers of Ray itself that a normal run keeps to errors (``--verbose`` leaves them alone).
RAY_LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune", "ray.air", "ray.serve")


def keep_local_ray_on_loopback() -> None:
    """Make the next local Ray started by this process (and its workers) bind to loopback only.

    Sets :data:`LOOPBACK_ENV` to ``"0"`` in this process's environment, which the GCS, raylet and
    worker processes inherit. When ``ray`` was imported before this call, its already-read constant
    is updated too, so the order of imports does not matter.
    """
    os.environ[LOOPBACK_ENV] = "0"
    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None:
        constants.ENABLE_RAY_CLUSTER = False


def storage_env(settings: StorageSettings | None) -> dict[str, str]:
    """Environment variables that point pyarrow (driver and workers) at the configured object store."""
    env: dict[str, str] = {}
    if settings is not None and settings.s3_endpoint:
        env["AWS_ENDPOINT_URL"] = settings.s3_endpoint
    if settings is not None and settings.s3_region:
        env["AWS_DEFAULT_REGION"] = settings.s3_region
    if settings is not None and settings.cache_dir:
        env["FACEGEN_CACHE_DIR"] = settings.cache_dir
    return env


def quiet_ray_logs() -> None:
    """Keep Ray's own log lines and Ray Data's progress printing out of a normal run's output.

    The stages print their own progress bars and tables; Ray's INFO lines, Ray Data's progress
    log and its start-up notices say nothing a user acts on (they stay in Ray's session logs).
    """
    import ray.data

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    for name in RAY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def _cluster_message(line: str) -> str | None:
    """facegen's one line for a message Ray pushes to every driver, or None to keep it in the logs."""
    if "has been marked dead" in line:
        node = line.split("node id:", 1)[-1].split()[0][:8] if "node id:" in line else "?"
        return f"note: node {node} left the cluster; its blocks are being made again on the others"
    return None


def quiet_cluster_messages() -> None:
    """Replace the messages Ray pushes to drivers (retried tasks, dead nodes: several lines each)
    with facegen's one-line notes; the rest stays in Ray's session logs (a private Ray API: if it
    moves, Ray's messages are shown as before)."""
    try:
        from ray._private import worker as ray_worker
    except ImportError:
        return
    original = ray_worker.print_to_stdstream
    if getattr(original, "facegen_quiet", False):
        return

    def printer(data: dict, ignore_prefix: bool = False) -> None:
        if data.get("pid") != "raylet":
            return original(data, ignore_prefix=ignore_prefix)
        for line in data.get("lines", []):
            note = _cluster_message(str(line))
            if note:
                print(note, file=sys.stderr, flush=True)

    printer.facegen_quiet = True  # type: ignore[attr-defined]
    ray_worker.print_to_stdstream = printer


#: Lines Ray's C++ core worker writes to the driver's stderr that say nothing a user acts on: every
#: Ray Data actor pool (its constructor arguments live in the object store) prints this one.
NATIVE_NOISE = ("has constructor arguments in the object store and max_restarts",)
_native_filter: list[int] = []


def filter_native_stderr(noise: tuple[str, ...] = NATIVE_NOISE) -> None:
    """Drop :data:`NATIVE_NOISE` lines from what C++ code writes to this process's stderr.

    Python's own ``sys.stderr`` (progress bars, errors) keeps writing to the terminal directly; file
    descriptor 2, where Ray's core worker logs, becomes a pipe read by a thread that forwards every
    other line unchanged. Installed once per process.
    """
    import threading

    if _native_filter:
        return
    try:
        sys.stderr.flush()
        terminal = os.dup(2)
        sys.stderr = os.fdopen(os.dup(terminal), "w", buffering=1, encoding=sys.stderr.encoding or "utf-8",
                               errors="backslashreplace")
        read_end, write_end = os.pipe()
        os.dup2(write_end, 2)
        os.close(write_end)
    except (OSError, ValueError, AttributeError):  # no real stderr (e.g. captured): leave it as it is
        return
    _native_filter.append(terminal)

    def forward() -> None:
        with os.fdopen(read_end, "rb") as pipe:
            for line in pipe:
                if not any(n.encode() in line for n in noise):
                    os.write(terminal, line)

    threading.Thread(target=forward, name="facegen-native-stderr", daemon=True).start()


def forward_worker_stdout_only() -> None:
    """Show what workers print to stdout (training progress lines) as they wrote it, not their stderr.

    Workers' stderr carries Ray's own messages: C++ core-worker warnings, Ray Train's and Ray
    Data's log lines, retried-task tracebacks; they stay in the session's log files. Ray offers
    no setting for this, so the driver's log handler is swapped (a private Ray API: if it moves,
    all worker output is shown as before).
    """
    import functools

    try:
        from ray._private import worker as ray_worker

        dispatcher = ray_worker.global_worker_stdstream_dispatcher
        # without Ray's "(RayTrainWorker pid=..., ip=...)" prefix and its colour codes: the lines are facegen's own
        printer = functools.partial(ray_worker.print_to_stdstream, ignore_prefix=True)
        dispatcher.remove_handler("ray_print_logs")
    except (ImportError, AttributeError, KeyError, ValueError):
        return
    dispatcher.add_handler("ray_print_logs", lambda data: None if data.get("is_err") else printer(data))


def init_ray(settings: RaySettings, storage: StorageSettings | None = None, verbose: bool = True) -> str:
    """Initialise Ray once; returns how it connected ("existing", "address", "cluster", "local").

    Under ``ray job submit`` the driver sees ``RAY_ADDRESS`` and joins that cluster with a plain
    ``ray.init()``; an explicit ``ray.address`` is joined as given. Neither is touched otherwise.
    Else a private local node is started with every address on 127.0.0.1: see
    :func:`keep_local_ray_on_loopback` (``_node_ip_address`` alone does not do it).
    ``storage`` settings reach every worker as environment variables (:func:`storage_env`);
    ``verbose=False`` keeps Ray's own logs out of the output (:func:`quiet_ray_logs`).
    """
    joins_cluster = bool(settings.address or os.environ.get("RAY_ADDRESS"))
    if not joins_cluster:
        keep_local_ray_on_loopback()
    env = storage_env(storage)
    os.environ.update(env)
    import ray

    if ray.is_initialized():
        return "existing"
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    common: dict = {"runtime_env": {"env_vars": env}} if env else {}
    if not verbose:
        common.update(logging_level=logging.ERROR, logging_config=ray.LoggingConfig(log_level="ERROR"))
        quiet_ray_logs()
        quiet_cluster_messages()
    if settings.address:
        ray.init(address=settings.address, log_to_driver=True, **common)
        how = "address"
    elif os.environ.get("RAY_ADDRESS"):
        ray.init(**common)
        how = "cluster"
    else:
        if settings.num_cpus:
            common["num_cpus"] = settings.num_cpus
        if settings.object_store_memory_gb:
            common["object_store_memory"] = int(settings.object_store_memory_gb * (1 << 30))
        start_local_ray(include_dashboard=settings.dashboard, dashboard_host="127.0.0.1", **common)
        how = "local"
    if not verbose:
        forward_worker_stdout_only()
        filter_native_stderr()
    return how


#: Ray's variable for the GCS port of a head it starts.
GCS_PORT_ENV = "RAY_GCS_SERVER_PORT"


def start_local_ray(**init_kwargs: object) -> None:
    """``ray.init`` a private local node on 127.0.0.1 whose workers know its address.

    Ray's state API, inside a worker with no ``RAY_ADDRESS``, finds "the" cluster through
    ``/tmp/ray/ray_current_cluster``, which only ``ray start`` writes: on a machine where a
    ``ray start`` cluster ran (or still runs), Ray Train's placement-group cleaner then asks that
    other cluster whether this run's controller lives, waiting out a 10 s timeout at the end of
    every fit (or, with a live other cluster, finding the controller absent). The GCS port is
    therefore chosen here and the node's processes inherit ``RAY_ADDRESS`` naming it; this
    process's own environment is left as it was.
    """
    import socket

    import ray

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with environment({"RAY_ADDRESS": f"127.0.0.1:{port}", GCS_PORT_ENV: str(port)}):
        ray.init(address="local", _node_ip_address="127.0.0.1", **init_kwargs)


@contextlib.contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    """``values`` set in this process's environment for the block, then each name as it was
    (removed again where it was unset)."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


SHARED_MARKERS = ".facegen-shared"


def _sees_marker(marker: str, node_marker: str) -> bool:
    """On one node: whether it sees the driver's marker; if so it leaves its own beside it."""
    from facegen import storage

    if not os.path.exists(marker):
        return False
    storage.write_bytes_atomic(b"seen\n", node_marker)
    return True


def check_output_storage(output_dir: str, shared: bool) -> None:
    """Refuse (one line) a local ``run.output_dir`` on a cluster of several nodes, where each node
    would write its own copy, unless ``storage.shared`` declares it mounted on every node, which is
    then checked: each node must see a marker the driver writes and leave its own."""
    import uuid

    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from facegen import storage
    from facegen.stages import StageError

    if storage.is_remote(output_dir):
        return
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) <= 1:
        return
    if not shared:
        raise StageError(f"run.output_dir: {output_dir} is a local path and this cluster has {len(nodes)} nodes, each of "
                         "which would write its own copy: use s3://... or, if every node mounts it (NFS), set "
                         "storage.shared: true")
    folder = os.path.abspath(f"{output_dir.rstrip('/')}/{SHARED_MARKERS}")
    token = uuid.uuid4().hex[:12]
    storage.write_bytes_atomic(b"driver\n", f"{folder}/{token}")
    check = ray.remote(num_cpus=0)(_sees_marker)
    refs = [check.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(
        f"{folder}/{token}", f"{folder}/{token}.{n['NodeID'][:12]}") for n in nodes]
    blind = [n["NodeID"][:8] for n, seen in zip(nodes, ray.get(refs)) if not seen]
    blind += [n["NodeID"][:8] for n in nodes if n["NodeID"][:8] not in blind
              and not os.path.exists(f"{folder}/{token}.{n['NodeID'][:12]}")]
    for name in os.listdir(folder):
        if name.startswith(token):
            os.remove(f"{folder}/{name}")
    if blind:
        raise StageError(f"run.output_dir: {output_dir} is declared shared (storage.shared) but node(s) "
                         f"{', '.join(sorted(set(blind)))} do not see what the others write there")
