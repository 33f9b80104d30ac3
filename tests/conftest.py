"""Shared fixtures: offline hubs, a loopback-only local Ray for the whole session."""

import os

# Before anything imports ray: Ray reads this once, and at "0" a local node keeps the GCS, the
# raylet and Ray Train's MASTER_ADDR on 127.0.0.1 (see facegen.ray_utils.LOOPBACK_ENV).
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TQDM_DISABLE", "1")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the session, on loopback only; 4 logical CPUs so fractional pools fit."""
    import ray

    from facegen.ray_utils import start_local_ray

    if not ray.is_initialized():
        start_local_ray(num_cpus=4, include_dashboard=False, log_to_driver=False, object_store_memory=1 << 30)
    yield ray
    ray.shutdown()
