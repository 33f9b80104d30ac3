"""A GAN as identity sampling and variation see it: a latent space and a differentiable renderer.

:class:`LatentGAN` wraps StyleGAN2 (latent = one w of ``w_dim``, broadcast to every layer, as the
Langevin paper samples in W; centre = ``w_avg``) and the DCGAN (latent = z, centre = 0) behind the
same few members: ``latent_dim``, ``latent_mean``, ``image_size``, ``crop``, ``render(latents)``
(``[N, 3, R, R]`` in [-1, 1], differentiable) and ``gaussian_latents(seed, identity_ids)``, the
independent draw every identity gets unless a sampler placed it.
"""

from __future__ import annotations

import numpy as np
import torch

from facegen.config import GeneratorSettings
from facegen.config.gan import GAN_BACKENDS  # noqa: F401  (re-exported: the GAN backends)
from facegen.devices import resolve_device
from facegen.generators.crop import GanCrop
from facegen.identities.seeds import identity_rng

#: Domain tag of the identity-level latent draw (distinct from every other identity-level tag).
LATENT_TAG = 0x6A7E


class LatentGAN:
    """Latent -> image for one loaded generator (StyleGAN2 or DCGAN)."""

    def __init__(self, kind: str, network: torch.nn.Module, crop: GanCrop, device: torch.device,
                 truncation_psi: float = 1.0, noise_mode: str = "const", fp16: bool = True):
        self.kind, self.network, self.crop, self.device = kind, network, crop, device
        self.truncation_psi, self.noise_mode, self.fp16 = truncation_psi, noise_mode, fp16
        if kind == "stylegan2":
            self.latent_dim, self.z_dim = int(network.w_dim), int(network.z_dim)
            self.latent_mean = network.w_avg.detach().float().clone()
        else:
            self.latent_dim = self.z_dim = int(network.nz)
            self.latent_mean = torch.zeros(self.latent_dim, device=device)
        self.image_size = int(network.img_resolution)

    def render(self, latents: torch.Tensor) -> torch.Tensor:
        """Images ``[N, 3, R, R]`` (about [-1, 1]) of latents ``[N, latent_dim]``; keeps the graph."""
        latents = latents.to(self.device, torch.float32)
        if self.kind == "stylegan2":
            ws = latents.unsqueeze(1).repeat(1, self.network.num_ws, 1)
            return self.network.synthesis(ws, noise_mode=self.noise_mode, force_fp32=not self.fp16)
        return self.network(latents)

    @torch.no_grad()
    def latents_from_z(self, z: np.ndarray) -> np.ndarray:
        """Map standard-normal draws to latents (StyleGAN2: mapping with truncation; DCGAN: z itself)."""
        if self.kind != "stylegan2":
            return np.asarray(z, np.float32)
        zt = torch.from_numpy(np.asarray(z, np.float32)).to(self.device)
        ws = self.network.mapping(zt, truncation_psi=self.truncation_psi)
        return ws[:, 0].float().cpu().numpy()

    def gaussian_latents(self, seed: int, identity_ids: np.ndarray, batch_size: int = 4096) -> np.ndarray:
        """The independent latent of each identity: a pure function of ``(seed, identity_id)``."""
        ids = np.asarray(identity_ids, np.int64)
        out = np.empty((len(ids), self.latent_dim), np.float32)
        for start in range(0, len(ids), batch_size):
            part = ids[start : start + batch_size]
            z = np.stack([identity_rng(seed, int(i), LATENT_TAG).standard_normal(self.z_dim) for i in part])
            out[start : start + len(part)] = self.latents_from_z(z)
        return out


def crop_settings(settings: GeneratorSettings):
    """The crop section of the selected GAN backend."""
    return settings.stylegan2.crop if settings.backend == "stylegan2" else settings.dcgan.crop


def crop_detector(settings: GeneratorSettings):
    """The face detector identity forces crop by (crop kind ``detector``), else None."""
    crop = crop_settings(settings)
    if crop.kind != "detector":
        return None
    from facegen.config import DetectorSettings
    from facegen.faces.detect import build_detector

    return build_detector(DetectorSettings(kind=crop.detector, device=settings.device))


def build_gan(settings: GeneratorSettings, device: str | torch.device | None = None) -> LatentGAN:
    """Load the GAN of ``settings.backend`` (``stylegan2`` or ``dcgan``) with its crop."""
    device = resolve_device(device or settings.device)
    if settings.backend == "stylegan2":
        from facegen.models.stylegan2_checkpoint import load_stylegan2

        sg = settings.stylegan2
        if not sg.checkpoint:
            raise ValueError("generator.stylegan2.checkpoint: the stylegan2 backend needs a .pkl or .pt checkpoint")
        network = load_stylegan2(sg.checkpoint, device=device, key=sg.network)
        crop = GanCrop.from_settings(sg.crop, network.img_resolution)
        return LatentGAN("stylegan2", network, crop, device, sg.truncation_psi, sg.noise_mode, sg.fp16)
    if settings.backend == "dcgan":
        from facegen.models.dcgan import load_dcgan

        network = load_dcgan(settings.dcgan.weights, device=device)
        return LatentGAN("dcgan", network, GanCrop.from_settings(settings.dcgan.crop, network.img_resolution), device)
    raise ValueError(f"generator.backend: {settings.backend!r} has no latent space (expected one of {', '.join(GAN_BACKENDS)})")
