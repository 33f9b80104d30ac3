"""Connecting to Ray: the submitting cluster, an explicit address, or a private local node on loopback."""

from __future__ import annotations

import os
import sys

from facegen.config import RaySettings

#: Ray reads this once, when ``ray._private.ray_constants`` is imported. At "0" a local node keeps
#: every address on 127.0.0.1; otherwise Ray 2.60 swaps a loopback node address for the machine's
#: "remotely reachable" one (``services.resolve_ip_for_localhost``) and the GCS, the raylet and
#: Ray Train's ``MASTER_ADDR`` listen and connect there, even with ``_node_ip_address="127.0.0.1"``.
LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


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


def init_ray(settings: RaySettings) -> str:
    """Initialise Ray once; returns how it connected ("existing", "address", "cluster", "local").

    Under ``ray job submit`` the driver sees ``RAY_ADDRESS`` and joins that cluster with a plain
    ``ray.init()``; an explicit ``ray.address`` is joined as given. Neither is touched otherwise.
    Else a private local node is started with every address on 127.0.0.1: see
    :func:`keep_local_ray_on_loopback` (``_node_ip_address`` alone does not do it).
    """
    joins_cluster = bool(settings.address or os.environ.get("RAY_ADDRESS"))
    if not joins_cluster:
        keep_local_ray_on_loopback()
    import ray

    if ray.is_initialized():
        return "existing"
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if settings.address:
        ray.init(address=settings.address, log_to_driver=True)
        return "address"
    if os.environ.get("RAY_ADDRESS"):
        ray.init()
        return "cluster"
    kwargs = {}
    if settings.num_cpus:
        kwargs["num_cpus"] = settings.num_cpus
    if settings.object_store_memory_gb:
        kwargs["object_store_memory"] = int(settings.object_store_memory_gb * (1 << 30))
    ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=True, dashboard_host="127.0.0.1", **kwargs)
    return "local"
