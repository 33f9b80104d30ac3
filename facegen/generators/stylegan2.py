"""StyleGAN2 generator backend (``generator.backend: stylegan2``): NVIDIA ``.pkl`` / rosinality ``.pt``
weights in facegen's own network (:mod:`facegen.models.stylegan2`), as a latent space in W.

The latent is one w of ``w_dim``, broadcast to every layer (the Langevin paper samples in W); the
centre is ``w_avg``; a standard-normal draw maps to W through the mapping network with truncation.
Its section ``generator.stylegan2`` is :data:`SETTINGS`; rendering and variation are the GAN backends'
shared :class:`facegen.generators.gan_backend.GanGenerator`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from facegen.config.gan import GanCropSettings
from facegen.config.generation import BackendSettings


class StyleGAN2Settings(BackendSettings):
    """A StyleGAN2 network: NVIDIA ``.pkl`` (restricted unpickler) or rosinality ``.pt`` (weights only)."""

    kind: Literal["stylegan2"] = "stylegan2"
    checkpoint: str | None = Field(default=None, json_schema_extra={"input_path": "required"})
    network: str = Field(default="G_ema", description="which network of an NVIDIA pickle")
    truncation_psi: float = Field(default=0.7, ge=0.0, le=1.0)
    noise_mode: Literal["const", "random", "none"] = "const"
    fp16: bool = Field(default=True, description="fp16 blocks on CUDA as the checkpoint declares them")
    crop: GanCropSettings = GanCropSettings()


SETTINGS = StyleGAN2Settings


def load_gan(section: StyleGAN2Settings, device: Any):
    """The StyleGAN2 network of ``section`` as a :class:`facegen.generators.gan.LatentGAN` in W."""
    from facegen.generators.crop import GanCrop
    from facegen.models.stylegan2_checkpoint import load_stylegan2

    if not section.checkpoint:
        raise ValueError("generator.stylegan2.checkpoint: the stylegan2 backend needs a .pkl or .pt checkpoint")
    network = load_stylegan2(section.checkpoint, device=device, key=section.network)
    return latent_space(network, GanCrop.from_settings(section.crop, network.img_resolution), device, section)


def latent_space(network: Any, crop: Any, device: Any, section: StyleGAN2Settings | None = None):
    """A loaded StyleGAN2 ``network`` as a :class:`facegen.generators.gan.LatentGAN` in W: one w
    broadcast to every layer, centred on ``w_avg``; truncation, noise and fp16 from ``section``."""
    import torch

    from facegen.generators.gan import LatentGAN

    section = section or StyleGAN2Settings()

    def synthesize(latents: torch.Tensor) -> torch.Tensor:
        ws = latents.unsqueeze(1).repeat(1, network.num_ws, 1)
        return network.synthesis(ws, noise_mode=section.noise_mode, force_fp32=not section.fp16)

    def map_z(z: torch.Tensor) -> torch.Tensor:
        return network.mapping(z, truncation_psi=section.truncation_psi)[:, 0]

    return LatentGAN("stylegan2", network, crop, device, latent_dim=int(network.w_dim),
                     latent_mean=network.w_avg.detach().float().clone(), synthesize=synthesize,
                     z_dim=int(network.z_dim), map_z=map_z)


def build(settings: Any, seed: int, **options: Any):
    """The backend's generator (:data:`facegen.config.generation.GENERATORS`)."""
    from facegen.generators.gan_backend import GanGenerator

    return GanGenerator(settings, seed, **options)
