"""Latents -> identity embeddings through the generator, the ArcFace crop and an embedder, and back.

Identity forces (Langevin in latent space, Dispersion, DisCo) are gradients of angles between
embeddings with respect to latents: ``embed(crop(G(w)))`` must be differentiable end to end.
:class:`IdentityEncoder` gives the forward map in batches (``embed``) and the vector-Jacobian
product that turns a gradient on embeddings into one on latents (``pullback``), one batch at a time,
so memory stays bounded whatever the number of particles.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from facegen.config import ForceEmbedderSettings
from facegen.devices import resolve_device
from facegen.generators.crop import to_uint8_images
from facegen.generators.gan import LatentGAN
from facegen.models.iresnet_checkpoint import load_backbone


class ForceEmbedder:
    """A facegen IResNet (or insightface ``.pth``) as a differentiable map: crops in [-1, 1] -> unit vectors."""

    def __init__(self, settings: ForceEmbedderSettings, device: str | torch.device | None = None):
        if not settings.path:
            raise ValueError("generator.embedder.path: identity forces need a differentiable embedder (a facegen backbone folder or an arcface_torch .pth)")
        from facegen.config.faces import EMBEDDERS

        self.device = resolve_device(device or settings.device)
        self.model = EMBEDDERS.hook(settings.kind, "differentiable_model")(settings, self.device)

    def __call__(self, crops: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.model(crops.to(self.device)).float(), dim=1)


class IdentityEncoder:
    """``latent -> normalise(embedder(crop(G(latent))))`` in batches, with its pullback.

    With a ``detector`` (crop kind ``detector``) each rendered image is cropped by the landmarks
    found on it (the fixed crop where no face is found); detection itself is not differentiated.
    """

    def __init__(self, gan: LatentGAN, embedder: ForceEmbedder, batch_size: int = 64, detector: Any = None):
        self.gan, self.embedder, self.batch_size, self.detector = gan, embedder, int(batch_size), detector

    def crop_matrices(self, images: torch.Tensor) -> np.ndarray | None:
        """Per-image crop transforms from the detector, or None for the fixed crop."""
        if self.detector is None:
            return None
        found = self.detector.detect_batch(list(to_uint8_images(images)))
        return self.gan.crop.matrices_from_landmarks([faces[0].landmarks if faces else None for faces in found])

    def embed_tensor(self, latents: torch.Tensor) -> torch.Tensor:
        """Unit embeddings of a batch of latents, keeping the autograd graph."""
        images = self.gan.render(latents)
        return self.embedder(self.gan.crop.warp(images.float().clamp(-1, 1), self.crop_matrices(images)))

    @torch.no_grad()
    def embed(self, latents: np.ndarray) -> np.ndarray:
        """Unit embeddings ``[N, d]`` (float32) of latents ``[N, latent_dim]``."""
        chunks = []
        for start in range(0, len(latents), self.batch_size):
            part = torch.from_numpy(np.ascontiguousarray(latents[start : start + self.batch_size], np.float32))
            chunks.append(self.embed_tensor(part).cpu().numpy())
        return np.concatenate(chunks) if chunks else np.zeros((0, 0), np.float32)

    def pullback(self, latents: np.ndarray, grad_embeddings: np.ndarray) -> np.ndarray:
        """``J^T g`` per particle: the gradient on latents of an energy whose gradient on embeddings is ``g``."""
        out = np.empty_like(latents, dtype=np.float32)
        for start in range(0, len(latents), self.batch_size):
            stop = start + self.batch_size
            if not np.any(grad_embeddings[start:stop]):
                out[start:stop] = 0.0  # no force on these particles: skip the generator pass
                continue
            w = torch.from_numpy(np.ascontiguousarray(latents[start:stop], np.float32)).to(self.gan.device).requires_grad_(True)
            e = self.embed_tensor(w)
            g = torch.from_numpy(np.ascontiguousarray(grad_embeddings[start:stop], np.float32)).to(e.device)
            (grad,) = torch.autograd.grad(e, w, grad_outputs=g)
            out[start:stop] = grad.float().cpu().numpy()
        return out
