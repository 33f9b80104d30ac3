"""Connecting to Ray: the submitting cluster, an explicit address, or a local loopback node."""

from __future__ import annotations

import os

from facegen.config import RaySettings


def init_ray(settings: RaySettings) -> str:
    """Initialise Ray once; returns how it connected ("existing", "address", "cluster", "local").

    Under ``ray job submit`` the driver sees ``RAY_ADDRESS`` and joins that cluster with a plain
    ``ray.init()``. Otherwise a private local node is started on 127.0.0.1 (this machine's other
    address is never a target).
    """
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
    ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False, **kwargs)
    return "local"
