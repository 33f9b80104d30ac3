"""A whole pipeline small enough for tests: a real (randomly initialised) tiny embedder checkpoint
and settings that run generate -> clean -> shard -> train -> eval in well under a minute."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def tiny_embedder(directory: Path) -> str:
    """Save an IResNet-18 of width 8 as a facegen backbone folder; returns its path."""
    import torch

    from facegen.models.iresnet import build_backbone
    from facegen.models.iresnet_checkpoint import save_backbone

    torch.manual_seed(0)
    path = str(directory / "embedder")
    save_backbone(path, build_backbone("iresnet18", 8, 512).eval(), "iresnet18", 8, 512)
    return path


def tiny_settings(output_dir: str, embedder: str, name: str = "tiny") -> dict[str, Any]:
    """Settings of the tiny pipeline writing to ``output_dir`` (a path or an s3:// URI)."""
    return {
        "run": {"name": name, "output_dir": output_dir, "seed": 5},
        "identities": {"num_identities": 8, "block_size": 4},
        "generator": {"images_per_identity": 6, "batch_size": 4, "pool": {"num_cpus": 0.25},
                      "parametric": {"image_size": 64, "wrong_identity_rate": 0.2}},
        "faces": {"batch_size": 32, "pool": {"num_cpus": 0.25}, "embedder": {"path": embedder}},
        # a randomly initialised embedder puts every face close to every other: no cross-identity dedup
        "clean": {"min_images": 2, "target_images": 6, "pool": {"num_cpus": 0.25}, "dedup": {"enabled": False}},
        "shards": {"num_buckets": 2},
        "train": {"arch": "iresnet18", "width": 8, "epochs": 1, "lr_steps": [1], "batch_size": 8,
                  "scale": 16.0, "margin": 0.2, "cpus_per_worker": 0.5},
        "eval": {"batch_size": 32},
        "tracking": {"mode": "offline"},
        "demo": {"heldout_identities": 6, "heldout_pairs": 40},
    }
