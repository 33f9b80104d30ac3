"""``generator.backend: hybrid``: references -> identity feature -> K identity-conditioned images.

HybridGen's generation (ALGORITHMS.md 1.5-1.6) with CemiFace's similarity control (section 3):

1. **Reference** (:mod:`facegen.generators.references`): one accepted face per identity from SD/SDXL
   text-to-image, a photo folder or any generator backend, through the faces stage's detector; its
   embedding (``generator.hybrid.embedder``) is the identity feature. With ``rerender.enabled`` the
   accepted face is re-rendered by InstantID (:mod:`facegen.generators.rerender`, HybridGen's step)
   and the first re-render the detector accepts is the reference instead. An identity without an
   accepted reference after ``max_attempts`` becomes K error rows that say why.
2. **Expansion**: sample ``k`` gets a conditioning feature from the identity feature at
   ``expansion.feature_norm`` (``own``: the embedder's raw output, as Vec2Face takes it; a number:
   the unit feature scaled to it): Vec2Face noise re-scaled to that norm, or a CemiFace band
   (:func:`facegen.identities.expansion.sample_conditioning`), drawn by the expander (``arc2face`` or ``vec2face``; with
   ``gan`` the reference's own GAN latent is perturbed instead, :mod:`facegen.generators.latent`).
   ``cemiface`` (:mod:`facegen.generators.cemiface`) takes the unit feature itself and asks its
   trained generator for a target similarity m per sample (``generator.hybrid.cemiface``). With
   ``measure_similarity`` each image is detected, aligned and embedded again, and the cosine of that
   embedding to the identity feature is the row's ``realised_similarity``.

Every image is a pure function of ``(run seed, identity id, sample index)``: the reference search,
the conditioning feature, the diffusion noise and Vec2Face's masks are all seeded from them. Samples
are computed in micro-batches cut at fixed ``sample_idx`` boundaries of one identity, so the tensors
are the same whichever Ray batch or actor a sample lands in; :meth:`HybridGenerator.regenerate`
recomputes one sample alone that way. An out-of-memory batch is split and retried; a sample that
fails alone becomes an error row.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from facegen.config import GeneratorSettings
from facegen.devices import resolve_device
from facegen.faces.align import align_face
from facegen.generators import check_identity_id, failure_reason, identity_rows, run_with_splitting, sample_seed
from facegen.generators.references import Reference, build_reference_source, feature_reference, find_reference
from facegen.identities.expansion import Conditioning, cosine, sample_conditioning
from facegen.identities.phrases import variation_phrase
from facegen.images import encode_png
from facegen.schema import GENERATED, LANDMARK_DIM, STATUS_OK, error_row, rows_to_batch


#: Latents rendered per GAN call in ``expander: gan``.
GAN_MICRO_BATCH = 32


@dataclass(frozen=True)
class _Sample:
    identity_id: int
    block_id: int
    sample_idx: int
    seed: int
    conditioning: Conditioning
    phrase: str
    norm: float  # the identity feature's norm the conditioning was made at (NaN in a GAN's latent space)


def build_sources(settings: GeneratorSettings, seed: int, device: str, expander: Any = None,
                  embedder_record: dict | None = None) -> tuple[Any, Any]:
    """The reference source and the expander ``settings.hybrid`` names (``expander`` overrides the
    latter, e.g. a model built in memory)."""
    h = settings.hybrid
    if h.expander == "gan":  # references and expansions from one GAN, in its latent space
        from facegen.generators.latent import LatentExpander, LatentSource, load_gan

        gan = load_gan(settings, device)
        backend = h.reference.backend
        fixed_crop = settings.backend_settings(backend).crop.kind == "fixed"
        return LatentSource(gan, seed, h.reference.max_attempts, backend), expander or LatentExpander(gan, fixed_crop)
    # feature identities (reference.backend identities) come with the identity rows: no source
    references = None if h.reference.backend == "identities" else build_reference_source(settings, seed, device)
    if expander is not None:
        return references, expander
    if h.expander == "arc2face":
        from facegen.generators.arc2face import Arc2FaceExpander

        return references, Arc2FaceExpander(h.arc2face, device)
    if h.expander == "cemiface":
        from facegen.generators.cemiface import CemiFaceExpander

        return references, CemiFaceExpander(h.cemiface, device, embedder_record)
    from facegen.generators.vec2face import Vec2FaceExpander

    return references, Vec2FaceExpander(h.vec2face, device)


class HybridGenerator:
    """Ray Data stage: identity rows -> ``images_per_identity`` expanded images of one person each."""

    def __init__(self, settings: GeneratorSettings, seed: int, expander: Any = None):
        from facegen.faces.detect import build_detector
        from facegen.faces.embed import build_embedder

        if int(seed) < 0:
            raise ValueError(f"run.seed must be >= 0, got {seed}")
        self.settings, self.seed, self.hybrid = settings, int(seed), settings.hybrid
        device = resolve_device().type
        self.detector = build_detector(self.hybrid.detector)
        if self.detector is None:
            raise ValueError("generator.hybrid.detector.kind: the hybrid backend needs a face detector, not 'none'")
        if not self.hybrid.embedder.enabled:
            raise ValueError("generator.hybrid.embedder.path: the hybrid backend needs an embedder for the identity feature")
        self.embedder = build_embedder(self.hybrid.embedder)
        self.references, self.expander = build_sources(settings, self.seed, device, expander,
                                                       getattr(self.embedder, "record", None))
        self.micro_batch = {"arc2face": self.hybrid.arc2face.micro_batch, "vec2face": self.hybrid.vec2face.micro_batch,
                            "cemiface": self.hybrid.cemiface.micro_batch}.get(self.hybrid.expander, GAN_MICRO_BATCH)
        self.rerenderer = None
        if self.hybrid.rerender.enabled:
            from facegen.generators.rerender import Rerenderer

            self.rerenderer = Rerenderer(self.hybrid.rerender, self.seed, device, self.hybrid.reference.text_to_image.model)
        self.takes_similarity = bool(getattr(self.expander, "takes_similarity", False))
        self.latent_space = getattr(self.expander, "conditioning", "feature") == "latent"
        rerender = "+instantid" if self.rerenderer is not None else ""
        self.source = f"hybrid:{self.hybrid.reference.backend}{rerender}+{self.expander.source}"

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """GENERATED rows of the batch's identities; a ``latent`` column (the identities stage's
        features, ``reference.backend: identities``) is each identity's feature."""
        features = self._identity_features(batch)
        rows: list[dict[str, Any]] = []
        for row, (identity_id, block_id) in enumerate(identity_rows(batch)):
            rows += self.identity_rows(identity_id, block_id, feature=None if features is None else features[row])
        return rows_to_batch(rows, GENERATED)

    def _identity_features(self, batch: dict[str, np.ndarray]) -> np.ndarray | None:
        if "latent" not in batch:
            return None
        features = np.asarray(batch["latent"], np.float64)
        width = int(getattr(self.embedder, "dim", features.shape[1]))
        if features.ndim != 2 or features.shape[1] != width:
            raise ValueError(f"identity features are {features.shape[1:]}-wide, generator.hybrid.embedder "
                             f"({self.hybrid.embedder.kind}) gives {width}: sample them at its width "
                             "(identities.sampler.vec2face.dim or langevin.feature_dim)")
        return features

    def regenerate(self, identity_id: int, sample_idx: int, block_id: int = 0,
                   feature: np.ndarray | None = None) -> dict[str, Any]:
        """Sample ``sample_idx`` of ``identity_id`` computed alone: the same bytes as in a full run
        (``feature``: the identity's feature, with ``reference.backend: identities``)."""
        return self.identity_rows(identity_id, block_id, only=int(sample_idx), feature=feature)[0]

    # --- one identity ------------------------------------------------------------------------

    def _choose(self, detections, shape):
        from facegen.faces.detect import choose_face

        return choose_face(detections, shape, self.hybrid.detector)

    def _embed(self, crops: np.ndarray) -> np.ndarray:
        return self.embedder.embed(np.asarray(crops, np.uint8))

    def _embed_raw(self, crops: np.ndarray) -> np.ndarray:
        return self.embedder.embed_raw(np.asarray(crops, np.uint8))

    def reference(self, identity_id: int) -> Reference:
        """The identity's accepted reference, re-rendered when ``rerender.enabled`` (raises
        ``ReferenceFailed`` with every reason)."""
        if self.references is None:
            raise ValueError(f"generator.hybrid.reference.backend is identities, but identity {identity_id} came "
                             "without its feature; run facegen identities with this config first")
        rerender = None
        if self.rerenderer is not None:
            def rerender(ref: Reference) -> Reference:
                return self.rerenderer.accept(ref, self.detector.detect_batch, self._choose, self._embed_raw)
        return find_reference(identity_id, self.references, self.detector.detect_batch, self._choose, self._embed_raw,
                              self.hybrid.reference.max_attempts, rerender)

    def identity_rows(self, identity_id: Any, block_id: Any, only: int | None = None,
                      feature: np.ndarray | None = None) -> list[dict[str, Any]]:
        """The GENERATED rows of one identity (or of its sample ``only``), from its reference or
        from its given ``feature``."""
        per_identity = self.settings.images_per_identity
        wanted = range(per_identity) if only is None else [only]
        try:
            identity_id = check_identity_id(identity_id)
            if only is not None and not 0 <= only < per_identity:
                raise ValueError(f"sample_idx {only} is outside [0, {per_identity})")
            reference = self.reference(identity_id) if feature is None else feature_reference(identity_id, feature)
            samples = self._plan(identity_id, int(block_id), reference)
        except Exception as exc:  # the identity fails as a whole, each sample row says why
            rows = []
            for k in wanted:
                try:
                    seed = sample_seed(self.seed, identity_id, k)
                except ValueError:
                    seed = -1
                rows.append(error_row(identity_id, block_id, k, seed, self.source, failure_reason(identity_id, k, exc)))
            return rows
        rows = []
        for start in range(0, per_identity, self.micro_batch):
            window = samples[start : start + self.micro_batch]
            if only is not None and not start <= only < start + len(window):
                continue
            rows += run_with_splitting(window, lambda part: self._render(part, reference), self._failed)
        return rows if only is None else [r for r in rows if r["sample_idx"] == only]

    def _plan(self, identity_id: int, block_id: int, reference: Reference) -> list[_Sample]:
        h = self.hybrid
        per_identity = self.settings.images_per_identity
        if self.latent_space:  # the GAN's own latent of the reference, as it is
            base, norm = np.asarray(reference.candidate.latent, np.float64), float("nan")
        elif self.takes_similarity:  # CemiFace: the unit feature itself, m asked of the model
            base = reference.feature.astype(np.float64)
            base, norm = base / np.linalg.norm(base), 1.0
        else:
            norm = reference.norm if h.expansion.feature_norm == "own" else float(h.expansion.feature_norm)
            base = reference.feature.astype(np.float64)
            base = base / np.linalg.norm(base) * norm
        samples = []
        for k in range(per_identity):
            seed = sample_seed(self.seed, identity_id, k)
            if self.takes_similarity:
                cond = self._similarity_conditioning(base, k, seed)
            else:
                cond = sample_conditioning(base, h.expansion, self.seed, identity_id, k, per_identity, seed)
            phrase = variation_phrase(seed) if self.expander.takes_text else ""
            samples.append(_Sample(identity_id, block_id, k, seed, cond, phrase, norm))
        return samples

    def _similarity_conditioning(self, feature: np.ndarray, k: int, seed: int) -> Conditioning:
        from facegen.generators.cemiface import sample_similarity

        c = self.hybrid.cemiface
        m = sample_similarity(c, k, seed)
        band = tuple(c.similarity_band) if c.similarity_band is not None else (m, m)
        return Conditioning(feature, "similarity", float("nan"), (float(band[0]), float(band[1])), m)

    def _failed(self, s: _Sample, exc: BaseException) -> dict[str, Any]:
        reason = failure_reason(s.identity_id, s.sample_idx, exc)
        return error_row(s.identity_id, s.block_id, s.sample_idx, s.seed, self.source, reason)

    def _render(self, samples: list[_Sample], reference: Reference) -> list[dict[str, Any]]:
        features = np.stack([s.conditioning.feature for s in samples])
        phrases = [s.phrase for s in samples] if self.expander.takes_text else None
        extra = {"similarities": [s.conditioning.requested_similarity for s in samples]} if self.takes_similarity else {}
        images = self.expander.render(features, [s.seed for s in samples], phrases, **extra)
        measured = self._measure(images, reference.feature)
        described = reference.describe(self.hybrid.reference.backend)
        return [self._row(s, described, image, *m) for s, image, m in zip(samples, images, measured)]

    def _measure(self, images: list[np.ndarray], feature: np.ndarray) -> list[tuple[np.ndarray, float, str]]:
        """(landmarks [10], realised similarity, face note) per image; NaN where not measured."""
        nan_points = np.full(LANDMARK_DIM, np.nan, np.float32)
        known = getattr(self.expander, "known_landmarks", None)
        if known is not None:  # the expander puts every face at the same place: no detection needed
            points = [np.asarray(known, np.float32).reshape(-1)] * len(images)
            if not self.hybrid.measure_similarity:
                return [(p, float("nan"), "") for p in points]
            emb = self._embed(np.stack([align_face(im, p) for im, p in zip(images, points)]))
            return [(p, cosine(e, feature), "") for p, e in zip(points, emb)]
        if not self.hybrid.measure_similarity:
            return [(nan_points, float("nan"), "") for _ in images]
        out, crops, where = [], [], []
        for image, found in zip(images, self.detector.detect_batch(images)):
            try:
                face = self._choose(found, image.shape)
            except ValueError as exc:
                out.append((nan_points, float("nan"), str(exc)))
                continue
            points = np.asarray(face.landmarks, np.float32).reshape(-1)
            where.append(len(out))
            crops.append(align_face(image, points))
            out.append((points, float("nan"), ""))
        if crops:
            for i, e in zip(where, self._embed(np.stack(crops))):
                out[i] = (out[i][0], cosine(e, feature), "")
        return out

    def _row(self, s: _Sample, reference: dict[str, Any], image: np.ndarray, landmarks: np.ndarray, realised: float,
             face_note: str) -> dict[str, Any]:
        c = s.conditioning
        expansion = {"mode": c.mode, "space": "latent" if self.latent_space else "feature"}
        if not self.latent_space and not self.takes_similarity:  # the setting (a number or own) and the norm it gave
            expansion["feature_norm"] = self.hybrid.expansion.feature_norm
            expansion["norm"] = round(s.norm, 4)
        if c.mode == "noise":
            expansion["sigma"] = c.sigma
        meta = {"reference": reference, "expansion": expansion}
        if s.phrase:
            meta["phrase"] = s.phrase
        if face_note:
            meta["expansion_face"] = face_note
        return {
            "identity_id": s.identity_id,
            "block_id": s.block_id,
            "sample_idx": s.sample_idx,
            "seed": s.seed,
            "source": self.source,
            "image": encode_png(image),
            "landmarks": landmarks,
            "true_identity_id": -1,
            "meta": json.dumps(meta, sort_keys=True),
            "status": STATUS_OK,
            "reason": "",
            "band_low": c.band[0],
            "band_high": c.band[1],
            "requested_similarity": c.requested_similarity,
            "realised_similarity": realised,
        }


def build(settings: GeneratorSettings, seed: int, **options: Any) -> HybridGenerator:
    """The backend's generator (:data:`facegen.config.generation.GENERATORS`)."""
    return HybridGenerator(settings, seed, **options)
