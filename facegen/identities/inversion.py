"""Images -> GAN latents by optimisation (GAN inversion), as Langevin-DisCo projected MultiPIE into W.

Each image starts from the best of ``starts`` seeded prior draws (lowest pixel loss), then Adam
minimises ``mean((G(w) - x)^2) + identity_weight (1 - cos(E(crop(G(w))), E(crop(x)))) +
prior_weight |w - centre|^2 / d`` for ``steps`` steps; ``E`` is a differentiable embedder
(:class:`~facegen.identities.encoder.ForceEmbedder`), optional. Images are resized to the GAN's
resolution; all images of a call are optimised together, each with its own loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

#: Domain tag of the inversion's random starts.
INVERSION_TAG = 0x1A7E


@dataclass(frozen=True)
class Inversion:
    """Latents ``[n, d]`` recovered for ``n`` images and each one's final pixel loss (MSE in [-1, 1])."""

    latents: np.ndarray
    pixel_loss: np.ndarray


def to_gan_tensor(images: list[np.ndarray], size: int) -> torch.Tensor:
    """uint8 RGB images (any size) -> ``[n, 3, size, size]`` in [-1, 1]."""
    import cv2

    resized = [cv2.resize(im, (size, size), interpolation=cv2.INTER_AREA) if im.shape[:2] != (size, size) else im
               for im in images]
    return torch.from_numpy(np.stack(resized)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def invert(gan: Any, images: list[np.ndarray], steps: int = 200, lr: float = 0.05, starts: int = 16,
           identity_weight: float = 0.0, prior_weight: float = 1e-3, embedder: Any = None, seed: int = 0) -> Inversion:
    """Latents whose images reproduce ``images`` (uint8 RGB) through ``gan`` (a LatentGAN)."""
    from facegen.identities.seeds import identity_rng

    if identity_weight > 0 and embedder is None:
        raise ValueError("directions.inversion.identity_weight: the identity term needs a differentiable embedder "
                         "(generator.embedder.path)")
    target = to_gan_tensor(images, gan.image_size).to(gan.device)
    centre = gan.latent_mean.to(gan.device).float()
    z = identity_rng(seed, 0, INVERSION_TAG).standard_normal((starts, gan.z_dim), dtype=np.float32)
    candidates = torch.from_numpy(gan.latents_from_z(z)).to(gan.device)
    with torch.no_grad():
        rendered = gan.render(candidates).float()
        first = torch.stack([((rendered - t[None]) ** 2).mean(dim=(1, 2, 3)) for t in target]).argmin(dim=1)
        goal = embedder(gan.crop.warp(target.clamp(-1, 1), None)) if identity_weight > 0 else None
    latents = candidates[first].clone().requires_grad_(True)
    optimiser = torch.optim.Adam([latents], lr=lr)
    for _ in range(steps):
        optimiser.zero_grad()
        image = gan.render(latents).float()
        pixel = ((image - target) ** 2).mean(dim=(1, 2, 3))
        loss = pixel + prior_weight * ((latents - centre) ** 2).mean(dim=1)
        if goal is not None:
            loss = loss + identity_weight * (1 - (embedder(gan.crop.warp(image.clamp(-1, 1), None)) * goal).sum(dim=1))
        loss.sum().backward()
        optimiser.step()
    with torch.no_grad():
        final = ((gan.render(latents).float() - target) ** 2).mean(dim=(1, 2, 3))
    return Inversion(latents.detach().cpu().numpy().astype(np.float32), final.cpu().numpy())
