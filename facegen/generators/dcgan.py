"""DCGAN generator backend (``generator.backend: dcgan``): the 64 px face generator of the
``gan-face-generate`` wheel (DigiFace-1M: non-commercial research only) as a latent space (z itself).

Its section ``generator.dcgan`` is :data:`SETTINGS`; rendering and variation are the GAN backends'
shared :class:`facegen.generators.gan_backend.GanGenerator`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from facegen.config.gan import GanCropSettings
from facegen.config.generation import BackendSettings
from facegen.templates import ARCFACE_TEMPLATE_112


class DcganSettings(BackendSettings):
    """The DCGAN of ``gan-face-generate`` (64 px, DigiFace-1M: non-commercial research only)."""

    kind: Literal["dcgan"] = "dcgan"
    weights: str | None = Field(
        default=None, description="weights.tar; None = the one packaged with gan-face-generate",
        json_schema_extra={"input_path": "required"},
    )
    crop: GanCropSettings = GanCropSettings(
        src_points=[(x / 112, y / 112) for x, y in ARCFACE_TEMPLATE_112], dst_points=list(ARCFACE_TEMPLATE_112)
    )


SETTINGS = DcganSettings


def load_gan(section: DcganSettings, device: Any):
    """The DCGAN as a :class:`facegen.generators.gan.LatentGAN`: latent = z, centre = 0."""
    import torch

    from facegen.generators.crop import GanCrop
    from facegen.generators.gan import LatentGAN
    from facegen.models.dcgan import load_dcgan

    network = load_dcgan(section.weights, device=device)
    return LatentGAN("dcgan", network, GanCrop.from_settings(section.crop, network.img_resolution), device,
                     latent_dim=int(network.nz), latent_mean=torch.zeros(int(network.nz), device=device),
                     synthesize=network)


def build(settings: Any, seed: int, **options: Any):
    """The backend's generator (:data:`facegen.config.generation.GENERATORS`)."""
    from facegen.generators.gan_backend import GanGenerator

    return GanGenerator(settings, seed, **options)
