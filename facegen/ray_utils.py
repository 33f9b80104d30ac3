"""Connecting to Ray: the submitting cluster, an explicit address, or a private local node on loopback."""

from __future__ import annotations

import logging
import os
import sys

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


def forward_worker_stdout_only() -> None:
    """Show what workers print to stdout (training progress lines), not their stderr.

    Workers' stderr carries Ray's own messages: C++ core-worker warnings, Ray Train's and Ray
    Data's log lines, retried-task tracebacks; they stay in the session's log files. Ray offers
    no setting for this, so the driver's log handler is swapped (a private Ray API: if it moves,
    all worker output is shown as before).
    """
    import functools

    try:
        from ray._private import worker as ray_worker

        dispatcher = ray_worker.global_worker_stdstream_dispatcher
        printer = functools.partial(ray_worker.print_to_stdstream, ignore_prefix=False)
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
        ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=True, dashboard_host="127.0.0.1", **common)
        how = "local"
    if not verbose:
        forward_worker_stdout_only()
    return how
