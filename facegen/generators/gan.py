"""A GAN as identity sampling and variation see it: a latent space and a differentiable renderer.

A GAN backend is a generator backend registered with the ``latent_space`` trait
(:data:`facegen.config.generation.GENERATORS`) whose module has ``load_gan(section, device)``
returning a :class:`LatentGAN`: ``latent_dim``, ``latent_mean``, ``image_size``, ``crop``,
``render(latents)`` (``[N, 3, R, R]`` in [-1, 1], differentiable) and ``gaussian_latents(seed,
identity_ids)``, the independent draw every identity gets unless a sampler placed it. StyleGAN2
(:mod:`facegen.generators.stylegan2`) and the DCGAN (:mod:`facegen.generators.dcgan`) are two such
modules; a new GAN is one more module and one line in the table.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from facegen.config import GeneratorSettings
from facegen.config.generation import GENERATORS, gan_backends
from facegen.devices import resolve_device
from facegen.generators.crop import GanCrop
from facegen.identities.seeds import identity_rng

#: Domain tag of the identity-level latent draw (distinct from every other identity-level tag).
LATENT_TAG = 0x6A7E


class LatentGAN:
    """Latent -> image for one loaded generator, built by its backend module's ``load_gan``.

    ``synthesize`` renders float32 latents ``[N, latent_dim]`` on ``device`` (keeping the graph);
    ``map_z`` maps standard-normal draws of ``z_dim`` to latents (None: the latent space is z itself).
    """

    def __init__(self, kind: str, network: torch.nn.Module, crop: GanCrop, device: torch.device, *,
                 latent_dim: int, latent_mean: torch.Tensor, synthesize: Callable[[torch.Tensor], torch.Tensor],
                 z_dim: int | None = None, map_z: Callable[[torch.Tensor], torch.Tensor] | None = None):
        self.kind, self.network, self.crop, self.device = kind, network, crop, device
        self.latent_dim, self.z_dim = int(latent_dim), int(z_dim if z_dim is not None else latent_dim)
        self.latent_mean = latent_mean
        self.image_size = int(network.img_resolution)
        self._synthesize, self._map_z = synthesize, map_z

    def render(self, latents: torch.Tensor) -> torch.Tensor:
        """Images ``[N, 3, R, R]`` (about [-1, 1]) of latents ``[N, latent_dim]``; keeps the graph."""
        return self._synthesize(latents.to(self.device, torch.float32))

    @torch.no_grad()
    def latents_from_z(self, z: np.ndarray) -> np.ndarray:
        """Map standard-normal draws to latents (the backend's mapping; z itself where it has none)."""
        if self._map_z is None:
            return np.asarray(z, np.float32)
        zt = torch.from_numpy(np.asarray(z, np.float32)).to(self.device)
        return self._map_z(zt).float().cpu().numpy()

    def gaussian_latents(self, seed: int, identity_ids: np.ndarray, batch_size: int = 4096) -> np.ndarray:
        """The independent latent of each identity: a pure function of ``(seed, identity_id)``."""
        ids = np.asarray(identity_ids, np.int64)
        out = np.empty((len(ids), self.latent_dim), np.float32)
        for start in range(0, len(ids), batch_size):
            part = ids[start : start + batch_size]
            z = np.stack([identity_rng(seed, int(i), LATENT_TAG).standard_normal(self.z_dim) for i in part])
            out[start : start + len(part)] = self.latents_from_z(z)
        return out


def gan_section(settings: GeneratorSettings, backend: str | None = None) -> Any:
    """The settings section of GAN ``backend`` (default: the chosen backend); ValueError for a
    backend without a latent space."""
    backend = backend or settings.backend
    if backend not in gan_backends():
        raise ValueError(f"generator.backend: {backend!r} has no latent space (expected one of {', '.join(gan_backends())})")
    return settings.backend_settings(backend)


def crop_settings(settings: GeneratorSettings):
    """The crop section of the selected GAN backend."""
    return gan_section(settings).crop


def crop_detector(settings: GeneratorSettings):
    """The face detector identity forces crop by (crop kind ``detector``), else None."""
    crop = crop_settings(settings)
    if crop.kind != "detector":
        return None
    from facegen.config.faces import detector_settings
    from facegen.faces.detect import build_detector

    return build_detector(detector_settings(kind=crop.detector, device=settings.device))


def build_gan(settings: GeneratorSettings, device: str | torch.device | None = None, backend: str | None = None) -> LatentGAN:
    """Load GAN ``backend`` (default: ``settings.backend``) with its crop, by its module's ``load_gan``."""
    backend = backend or settings.backend
    section = gan_section(settings, backend)
    load_gan = GENERATORS.hook(backend, "load_gan")
    if load_gan is None:
        raise TypeError(f"generator.backend: {backend} is registered with a latent space but its module has no load_gan()")
    return load_gan(section, resolve_device(device or settings.device))
