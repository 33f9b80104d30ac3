"""GAN generator backends (``stylegan2``, ``dcgan``): identity latents in, varied face images out.

A callable class for Ray Data ``map_batches`` over identity rows (``identity_id``, ``block_id`` and,
when the identities stage ran, ``latent``): the GAN (and, for Dispersion/DisCo, the differentiable
embedder) is loaded once in ``__init__``; each identity's reference latent is the sampler's, or the
independent draw of :meth:`LatentGAN.gaussian_latents`; ``generator.variation`` turns it into
``images_per_identity`` variants (:mod:`facegen.identities.variation`), rendered in batches and
written as PNG rows with the five ArcFace landmarks of the fixed crop (or none, for the faces
stage's detector). A failing identity becomes error rows; the batch goes on.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from facegen.config import GeneratorSettings
from facegen.generators import check_identity_id, failure_reason, identity_rows, sample_seed
from facegen.generators.gan import build_gan, crop_detector, crop_settings
from facegen.generators.latent import render_latents
from facegen.identities.seeds import identity_rng
from facegen.images import encode_image
from facegen.schema import GENERATED, LANDMARK_DIM, STATUS_OK, error_row, rows_to_batch

#: Domain tag of the per-identity variation draws (Dispersion noise, DisCo covariates).
VARIATION_TAG = 0xD15C
RENDER_BATCH = 32


def latent_column(batch: dict[str, Any]) -> list[np.ndarray | None]:
    """The ``latent`` column of a batch as float32 vectors (None where absent)."""
    n = len(batch["identity_id"])
    if "latent" not in batch:
        return [None] * n
    column = batch["latent"]
    if isinstance(column, np.ndarray) and column.dtype != object and column.ndim == 2:
        return [row.astype(np.float32) for row in column]
    return [None if v is None else np.asarray(v, np.float32) for v in column]


class GanGenerator:
    """Ray Data stage for ``generator.backend`` ``stylegan2`` or ``dcgan``."""

    def __init__(self, settings: GeneratorSettings, seed: int):
        self.settings, self.seed = settings, int(seed)
        self.gan = build_gan(settings)
        self.source = settings.backend
        self.landmarks = (np.full(LANDMARK_DIM, np.nan, np.float32) if crop_settings(settings).kind == "detector"
                          else self.gan.crop.landmarks())
        self.encoder = None
        self.directions = None
        if settings.variation in ("dispersion", "disco"):
            from facegen.identities.encoder import ForceEmbedder, IdentityEncoder

            embedder = ForceEmbedder(settings.embedder, self.gan.device)
            self.encoder = IdentityEncoder(self.gan, embedder, RENDER_BATCH, crop_detector(settings))
        if settings.variation == "disco":
            from facegen.identities.variation import load_directions

            self.directions = load_directions(settings.disco, self.gan.latent_dim)

    def variants(self, identity_id: int, reference: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]:
        """The ``images_per_identity`` latents of one identity and what made them (for ``meta``)."""
        from facegen.identities.variation import covariate_offsets, disperse, noise_variants

        s = self.settings
        count = s.images_per_identity
        seeds = [sample_seed(self.seed, identity_id, i) for i in range(count)]
        start = noise_variants(reference, seeds, s.dispersion.sigma)
        info: dict[str, Any] = {"variation": s.variation, "sigma": s.dispersion.sigma}
        if s.variation == "noise":
            return start, info
        rng = identity_rng(self.seed, identity_id, VARIATION_TAG)
        if s.variation == "disco":
            vectors, spreads = self.directions
            start = start + covariate_offsets(vectors, spreads, count, s.disco.amplitude, rng)
        variants, summary = disperse(reference, start, self.encoder, self.gan.latent_mean.cpu().numpy(), s.dispersion, rng)
        info.update({k: round(v, 5) for k, v in summary.items()})
        return variants, info

    def render_png(self, latents: np.ndarray) -> list[bytes]:
        """PNG bytes of each latent's image."""
        return [encode_image(image, "png") for image in render_latents(self.gan, latents, RENDER_BATCH)]

    def _identity_rows(self, identity_id: Any, block_id: Any, latent: np.ndarray | None) -> list[dict[str, Any]]:
        per_id = self.settings.images_per_identity
        try:
            iid = check_identity_id(identity_id)
            reference = latent if latent is not None else self.gan.gaussian_latents(self.seed, np.array([iid]))[0]
            if reference.shape != (self.gan.latent_dim,):
                raise ValueError(f"latent has {reference.shape[0]} values, the {self.source} latent space has {self.gan.latent_dim}")
            variants, info = self.variants(iid, reference)
            images = self.render_png(variants)
        except Exception as exc:  # one bad identity must not kill the batch
            return [error_row(identity_id, block_id, i, -1, self.source, failure_reason(identity_id, i, exc))
                    for i in range(per_id)]
        meta = json.dumps({**info, "latent": "sampled" if latent is not None else "gaussian"})
        return [{"identity_id": iid, "block_id": int(block_id), "sample_idx": i, "seed": sample_seed(self.seed, iid, i),
                 "source": self.source, "image": image, "landmarks": self.landmarks, "true_identity_id": iid,
                 "meta": meta, "status": STATUS_OK, "reason": ""} for i, image in enumerate(images)]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows: list[dict[str, Any]] = []
        for (identity_id, block_id), latent in zip(identity_rows(batch), latent_column(batch)):
            rows.extend(self._identity_rows(identity_id, block_id, latent))
        return rows_to_batch(rows, GENERATED)

