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


#: The settings of the shared tiny pipeline run: 12 identities in two blocks, 12 images each with
#: planted wrong-identity images, cleaned by the demo's bootstrap embedder (2 epochs).
PIPELINE_RUN = {
    "run": {"name": "e2e", "seed": 3},
    "identities": {"num_identities": 12, "block_size": 6},
    "generator": {"images_per_identity": 12, "batch_size": 4, "pool": {"num_cpus": 0.25},
                  "parametric": {"image_size": 96, "wrong_identity_rate": 0.15}},
    "faces": {"batch_size": 64, "pool": {"num_cpus": 0.25}},
    "clean": {"min_images": 5, "target_images": 12, "pool": {"num_cpus": 0.25},
              "dedup": {"threshold": 0.97}},  # the 2-epoch embedder puts different identities close
    "shards": {"num_buckets": 2},
    "train": {"arch": "iresnet18", "width": 8, "epochs": 2, "lr_steps": [1], "batch_size": 32,
              "scale": 16.0, "margin": 0.2, "cpus_per_worker": 0.5},
    "tracking": {"mode": "offline"},
    "demo": {"bootstrap_identities": 16, "bootstrap_images_per_identity": 8, "bootstrap_epochs": 2,
             "heldout_identities": 10, "heldout_pairs": 60},
}


@pytest.fixture(scope="session")
def pipeline_run(ray_local, tmp_path_factory):
    """:data:`PIPELINE_RUN` run once by ``run_pipeline`` for the whole session (the end-to-end and
    the report tests read it): ``(settings, its YAML file, the summary)``."""
    import yaml

    from facegen.config import config_from_dict
    from facegen.pipeline import run_pipeline

    root = tmp_path_factory.mktemp("pipeline")
    settings = {**PIPELINE_RUN, "run": {**PIPELINE_RUN["run"], "output_dir": str(root / "run")}}
    config = root / "e2e.yaml"
    config.write_text(yaml.safe_dump(settings))
    cfg = config_from_dict(settings, "e2e")
    return cfg, str(config), run_pipeline(cfg, progress=False)


@pytest.fixture(scope="session")
def force_embedder(tmp_path_factory):
    """A seeded IResNet-18 of width 4 (32-d) as a facegen backbone folder: the differentiable
    embedder identity forces (Langevin, Dispersion) go through in the tests."""
    import torch

    from facegen.models.iresnet import build_backbone
    from facegen.models.iresnet_checkpoint import save_backbone

    torch.manual_seed(0)
    directory = str(tmp_path_factory.mktemp("force_embedder"))
    return save_backbone(directory, build_backbone("iresnet18", width=4, embedding_size=32).eval(), "iresnet18", 4, 32)
