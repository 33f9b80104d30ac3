"""Shared fixtures: offline hubs, a loopback-bound local Ray for the whole session."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TQDM_DISABLE", "1")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the session, bound to loopback; 4 logical CPUs so fractional pools fit."""
    import ray

    if not ray.is_initialized():
        ray.init(
            address="local",
            num_cpus=4,
            _node_ip_address="127.0.0.1",
            include_dashboard=False,
            log_to_driver=False,
            object_store_memory=1 << 30,
        )
    yield ray
    ray.shutdown()
