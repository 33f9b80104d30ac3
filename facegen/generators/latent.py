"""Hybrid expansion in a GAN's latent space (``generator.hybrid.expander: gan``).

With a GAN backend (``dcgan``, ``stylegan2``) as the reference source, the identity's conditioning
vector is the reference's own latent rather than its embedding: attempt ``a`` of identity ``i``
renders latent ``w_ia`` (attempt 0 is the latent the GAN backend itself gives the identity, later
attempts come from the reference seed), the detector accepts or rejects the image as for any
reference, and the expansion (Vec2Face noise or a CemiFace band, :mod:`facegen.identities.expansion`)
perturbs the accepted latent. The identity feature (the reference's embedding) is still what the
realised similarity of each expanded image is measured against, so a run shows how a requested band
in latent space lands in embedding space.

The GAN is loaded once (:func:`facegen.generators.gan.build_gan`) and shared by both halves.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from facegen.generators.references import Candidate, reference_seed


def load_gan(settings: Any, device: str | None = None):
    """The :class:`facegen.generators.gan.LatentGAN` of ``settings.hybrid.reference.backend``."""
    from facegen.config.generation import gan_backends
    from facegen.generators.gan import build_gan

    backend = settings.hybrid.reference.backend
    if backend not in gan_backends():
        raise ValueError(f"generator.hybrid.expander: gan expands a GAN's references; reference.backend is {backend!r}, "
                         f"expected one of {', '.join(gan_backends())}")
    return build_gan(settings, device, backend=backend)


def render_latents(gan: Any, latents: np.ndarray, batch: int = 32) -> list[np.ndarray]:
    """uint8 RGB images of latents ``[n, latent_dim]``."""
    import torch

    from facegen.generators.crop import to_uint8_images

    out: list[np.ndarray] = []
    with torch.no_grad():
        for start in range(0, len(latents), batch):
            part = torch.from_numpy(np.ascontiguousarray(latents[start : start + batch], np.float32))
            out += list(to_uint8_images(gan.render(part)))
    return out


class LatentSource:
    """References drawn by a GAN: one latent per ``(identity, attempt)``, the latent kept."""

    def __init__(self, gan: Any, seed: int, batch_size: int, backend: str):
        self.gan, self.seed, self.batch_size, self.backend = gan, int(seed), int(batch_size), backend

    def latent(self, identity_id: int, attempt: int) -> np.ndarray:
        """Attempt 0: the GAN backend's own latent of the identity; later ones: the reference seed's."""
        if attempt == 0:
            return self.gan.gaussian_latents(self.seed, np.array([identity_id]))[0]
        z = np.random.default_rng(reference_seed(self.seed, identity_id, attempt)).standard_normal((1, self.gan.z_dim))
        return self.gan.latents_from_z(z)[0]

    def render(self, identity_id: int, attempts: list[int]) -> list[Candidate]:
        latents = np.stack([self.latent(identity_id, a) for a in attempts]).astype(np.float32)
        images = render_latents(self.gan, latents)
        meta = {"source": self.backend}
        return [Candidate(a, reference_seed(self.seed, identity_id, a), image, meta, latent=z)
                for a, image, z in zip(attempts, images, latents)]


class LatentExpander:
    """Expanded images from perturbed latents of the same GAN."""

    source = "gan"
    takes_text = False
    conditioning = "latent"

    def __init__(self, gan: Any, fixed_crop: bool):
        self.gan = gan
        # A fixed crop puts every face at the same place: its landmarks are known, no detection needed.
        self.known_landmarks = gan.crop.landmarks() if fixed_crop else None

    def render(self, latents: np.ndarray, sample_seeds: list[int], phrases: list[str] | None = None) -> list[np.ndarray]:
        """One image per latent (the seeds already went into the latents)."""
        if len(latents) != len(sample_seeds):
            raise ValueError(f"{len(latents)} latents for {len(sample_seeds)} sample seeds")
        return render_latents(self.gan, np.asarray(latents, np.float32))
