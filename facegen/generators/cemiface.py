"""CemiFace expansion: aligned faces drawn at a target similarity m to the identity feature.

The generator is one ``facegen train-generator`` trained (:mod:`facegen.models.cemiface`). Each
sample is drawn with DDIM (``generator.hybrid.cemiface.ddim_steps``, eta 0) from its own seeded
starting noise, so its image depends only on (identity feature, m, sample seed): the same in any
batch. The model draws ArcFace-aligned crops at its own size; they are resized to 112 px and their
five landmarks are the template's, so no detector runs on them.

Which m each sample gets (:func:`sample_similarity`): the ``similarity`` list cycled by sample
index (CemiFace draws at m = 0), or a value drawn uniformly from ``similarity_band`` with the
sample's own stream.
"""

from __future__ import annotations

import numpy as np
import torch

from facegen.devices import resolve_device
from facegen.faces.align import ARCFACE_TEMPLATE
from facegen.models.cemiface import check_similarities, ddim_sample, load_generator, to_aligned_crops

FIELD = "generator.hybrid.cemiface"
#: Domain tag of the per-sample m draw in band mode.
SIMILARITY_TAG = 0x5E31


def sample_similarity(settings, sample_idx: int, sample_seed: int) -> float:
    """The target similarity of sample ``sample_idx`` (module docstring)."""
    if settings.similarity_band is not None:
        low, high = settings.similarity_band
        return float(np.random.default_rng([int(sample_seed), SIMILARITY_TAG]).uniform(low, high))
    return float(settings.similarity[int(sample_idx) % len(settings.similarity)])


class CemiFaceExpander:
    """Loads a trained CemiFace generator once; :meth:`render` draws one image per (feature, m)."""

    source = "cemiface"
    takes_text = False
    takes_similarity = True
    known_landmarks = ARCFACE_TEMPLATE.reshape(-1).copy()

    def __init__(self, settings, device: str | None = None, embedder_record: dict | None = None):
        if not settings.model:
            raise ValueError(f"{FIELD}.model: a CemiFace generator folder is required (facegen train-generator)")
        self.settings = settings
        self.device = resolve_device(device or "auto")
        self.model, self.scheduler_config, self.info = load_generator(settings.model, f"{FIELD}.model", self.device)
        self.dtype = torch.float16 if settings.fp16 and self.device.type == "cuda" else None
        trained = self.info.get("embedder", {})
        if embedder_record is not None and trained and (trained.get("kind"), trained.get("dim")) != (
                embedder_record.get("kind"), embedder_record.get("dim")):
            raise ValueError(f"{FIELD}.model: the generator was trained on {trained.get('kind')} features of width "
                             f"{trained.get('dim')}, but generator.hybrid.embedder gives {embedder_record.get('kind')} "
                             f"features of width {embedder_record.get('dim')}")

    def render(self, features: np.ndarray, sample_seeds: list[int], phrases: list[str] | None = None,
               similarities: list[float] | None = None) -> list[np.ndarray]:
        """uint8 ``112x112x3`` RGB aligned faces, one per row of ``features`` and its m."""
        features = np.asarray(features, np.float64)
        if features.ndim != 2 or len(features) != len(sample_seeds):
            raise ValueError(f"features {features.shape} do not match {len(sample_seeds)} sample seeds")
        if similarities is None:
            raise ValueError(f"{FIELD}: the CemiFace expander needs a target similarity per sample")
        m = check_similarities(similarities, f"{FIELD}.similarity")
        norms = np.linalg.norm(features, axis=1, keepdims=True)
        if not (np.isfinite(features).all() and (norms > 0).all()):
            raise ValueError("identity features must be finite and non-zero")
        unit = (features / norms).astype(np.float32)  # C_id as in training: a unit embedding
        images = ddim_sample(self.model, self.scheduler_config, unit, m, sample_seeds, self.settings.ddim_steps, self.dtype)
        return list(to_aligned_crops(images))
