"""Step 1 of the hybrid backend: one reference face per identity, and its identity feature.

A reference source renders candidate images for ``(identity, attempt)``; every candidate goes
through the faces stage's detector and its one-face rule (no face, a face too small or more than one
large face reject it); the first accepted candidate, in attempt order, is the reference (HybridGen
advances only when a face is found) and the embedding of its aligned crop is the identity feature.
After ``max_attempts`` rejected candidates the identity is recorded as failed, with every reason.

Sources (``generator.hybrid.reference.backend``):

* ``text_to_image``: SD 1.x/2.x or SDXL (:mod:`facegen.generators.text_to_image`) from the
  identity's attribute-balanced prompt and the negative prompt; attempt ``a`` is seeded by
  :func:`reference_seed`; ``micro_batch`` attempts of one identity per pipeline call.
* ``photos``: the face photos of a folder (sorted by name); attempt ``a`` of identity ``i`` is photo
  ``(i + a) mod n``: real references, e.g. for expanding given people or for CPU tests.
* any generator backend (``parametric``, ``diffusion``, the GAN backends, ...): the backend's own
  sample ``a`` is attempt ``a``; all ``max_attempts`` candidates come from one call (cheap backends);
* with ``expander: gan`` the GAN's references keep their latents (:mod:`facegen.generators.latent`).

With ``generator.hybrid.rerender.enabled`` an accepted candidate is re-rendered
(:mod:`facegen.generators.rerender`) and the first re-render the detector accepts becomes the
reference; a candidate none of whose re-renders is accepted is rejected like a faceless one.

Everything is a pure function of ``(run seed, identity id, attempt)``, so a reference is found again
identically on any actor.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from facegen.faces.align import align_face
from facegen.images import decode_image

#: Domain tag of reference seeds (distinct from the per-sample seeds of expansion).
REFERENCE_TAG = 0x4EF1
PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def reference_seed(seed: int, identity_id: int, attempt: int) -> int:
    """The 63-bit seed of reference attempt ``attempt`` of ``identity_id``."""
    state = np.random.SeedSequence([int(seed), int(identity_id), int(attempt), REFERENCE_TAG])
    high, low = (int(v) for v in state.generate_state(2, np.uint32))
    return ((high & 0x7FFFFFFF) << 32) | low


@dataclass
class Candidate:
    """One rendered attempt: the image (None when rendering failed, with ``error``) and its facts."""

    attempt: int
    seed: int
    image: np.ndarray | None
    meta: dict[str, Any] = field(default_factory=dict)
    error: str = ""
    latent: np.ndarray | None = None  # the generator's latent, when it has one (GAN references)


@dataclass
class Reference:
    """An identity's accepted reference: the image, the chosen face, the unit feature and ``norm``,
    the norm of the embedder's raw output (the feature's own norm, ``expansion.feature_norm: own``)."""

    identity_id: int
    candidate: Candidate
    landmarks: np.ndarray
    score: float
    feature: np.ndarray
    norm: float

    def describe(self, backend: str) -> dict[str, Any]:
        """The reference's facts for a row's ``meta``."""
        return {"backend": backend, "attempt": self.candidate.attempt, "seed": self.candidate.seed,
                "face_score": round(self.score, 4), **self.candidate.meta}


@dataclass
class FeatureReference(Reference):
    """An identity given as a feature (the identities stage's, ``reference.backend: identities``):
    no image, no face; ``feature`` is its unit direction and ``norm`` its drawn norm."""

    def describe(self, backend: str) -> dict[str, Any]:
        return {"backend": backend, "feature_norm": round(self.norm, 4)}


def feature_reference(identity_id: int, feature: np.ndarray) -> FeatureReference:
    """The reference of an identity given as a raw feature vector (any norm)."""
    raw = np.asarray(feature, np.float64).reshape(-1)
    norm = float(np.linalg.norm(raw))
    if not (np.isfinite(norm) and norm > 0):
        raise ValueError(f"identity {identity_id}: its identity feature is zero or not finite")
    nothing = np.full((5, 2), np.nan, np.float32)
    return FeatureReference(identity_id, Candidate(0, -1, None), nothing, float("nan"), (raw / norm).astype(np.float32), norm)


class ReferenceFailed(ValueError):
    """No candidate of an identity was accepted; the message lists every attempt's reason."""


class TextToImageSource:
    """SD/SDXL references from the identity's attribute prompt and the negative prompt."""

    def __init__(self, settings: Any, seed: int, device: str):
        from facegen.generators.text_to_image import load_text_to_image

        self.settings, self.seed = settings, int(seed)
        self.batch_size = settings.micro_batch
        self.pipeline = load_text_to_image(settings, device, "generator.hybrid.reference.text_to_image.model")

    def render(self, identity_id: int, attempts: list[int]) -> list[Candidate]:
        from facegen.generators.text_to_image import render_text
        from facegen.identities.attributes import build_prompt, sample_attributes

        from facegen.generators import run_with_splitting

        attributes = sample_attributes(self.seed, identity_id)
        prompt = build_prompt(attributes)
        meta = {"prompt": prompt, "attributes": attributes}
        items = [(a, reference_seed(self.seed, identity_id, a)) for a in attempts]

        def compute(part: list[tuple[int, int]]) -> list[Candidate]:
            images = render_text(self.pipeline, self.settings, [prompt] * len(part), [s for _, s in part])
            return [Candidate(a, s, image, meta) for (a, s), image in zip(part, images)]

        def failed(item: tuple[int, int], exc: BaseException) -> Candidate:  # rejected; later attempts still run
            return Candidate(item[0], item[1], None, meta, f"{type(exc).__name__}: {exc}")

        return run_with_splitting(items, compute, failed)  # an out-of-memory call is split in halves


class PhotoSource:
    """References from the face photos of a folder."""

    def __init__(self, photos_dir: str | None, batch_size: int):
        if not photos_dir or not os.path.isdir(photos_dir):
            raise FileNotFoundError(f"generator.hybrid.reference.photos_dir: {photos_dir}: no such directory")
        self.paths = sorted(p for p in glob.glob(os.path.join(photos_dir, "*")) if p.lower().endswith(PHOTO_SUFFIXES))
        if not self.paths:
            raise FileNotFoundError(f"generator.hybrid.reference.photos_dir: {photos_dir}: no {'/'.join(PHOTO_SUFFIXES)} files")
        self.batch_size = batch_size

    def render(self, identity_id: int, attempts: list[int]) -> list[Candidate]:
        out = []
        for a in attempts:
            index = (identity_id + a) % len(self.paths)
            meta = {"photo": os.path.basename(self.paths[index])}
            try:
                with open(self.paths[index], "rb") as f:
                    out.append(Candidate(a, index, decode_image(f.read()), meta))
            except Exception as exc:
                out.append(Candidate(a, index, None, meta, f"{type(exc).__name__}: {exc}"))
        return out


class GeneratorSource:
    """References from any facegen generator backend: its sample ``a`` is attempt ``a``."""

    def __init__(self, backend: str, settings: Any, seed: int, max_attempts: int):
        from facegen.generators import build_generator

        inner = settings.model_copy(update={"backend": backend, "images_per_identity": max_attempts})
        self.generator = build_generator(inner, seed)
        self.batch_size = max_attempts

    def render(self, identity_id: int, attempts: list[int]) -> list[Candidate]:
        import json

        out = self.generator({"identity_id": np.array([identity_id], np.int64), "block_id": np.zeros(1, np.int64)})
        by_index = {int(k): i for i, k in enumerate(out["sample_idx"])}
        candidates = []
        for a in attempts:
            i = by_index[a]
            meta = {"source": str(out["source"][i])}
            if out["status"][i] != "ok":
                candidates.append(Candidate(a, int(out["seed"][i]), None, meta, str(out["reason"][i])))
                continue
            meta |= {k: v for k, v in json.loads(out["meta"][i] or "{}").items() if k in ("prompt", "attributes")}
            candidates.append(Candidate(a, int(out["seed"][i]), decode_image(out["image"][i]), meta))
        return candidates


def build_reference_source(settings: Any, seed: int, device: str):
    """The source ``settings.hybrid.reference.backend`` names (``settings``: GeneratorSettings)."""
    ref = settings.hybrid.reference
    if ref.backend == "text_to_image":
        return TextToImageSource(ref.text_to_image, seed, device)
    if ref.backend == "photos":
        return PhotoSource(ref.photos_dir, ref.max_attempts)
    if ref.backend == "hybrid":
        raise ValueError("generator.hybrid.reference.backend: hybrid cannot make its own references")
    return GeneratorSource(ref.backend, settings, seed, ref.max_attempts)


def accept_candidate(identity_id: int, candidate: Candidate, detections: list, choose: Callable, embed: Callable) -> Reference:
    """``candidate`` as the identity's reference when ``choose`` keeps one of its ``detections`` and
    the embedder gives a usable feature; raises ``ValueError`` saying why not."""
    face = choose(detections, candidate.image.shape)
    landmarks = np.asarray(face.landmarks, np.float32).reshape(5, 2)
    raw = np.asarray(embed(align_face(candidate.image, landmarks)[None])[0], np.float64)
    norm = float(np.linalg.norm(raw))
    if not (np.isfinite(norm) and norm > 0):
        raise ValueError("the embedder gave a zero or non-finite feature")
    return Reference(identity_id, candidate, landmarks, float(face.score), (raw / norm).astype(np.float32), norm)


def find_reference(identity_id: int, source: Any, detect_batch: Callable, choose: Callable, embed: Callable,
                   max_attempts: int, rerender: Callable[[Reference], Reference] | None = None) -> Reference:
    """The first accepted candidate of ``identity_id`` and its identity feature.

    ``detect_batch(images) -> [[Detection]]``; ``choose(detections, shape) -> Detection`` or raises
    (the faces stage's one-face rule); ``embed(aligned crops) -> raw features`` (any norm: the
    reference keeps the unit feature and the raw norm). ``rerender(reference) -> Reference`` (or a
    ``ValueError`` that rejects the candidate, e.g. :class:`facegen.generators.rerender.RerenderRejected`)
    replaces an accepted candidate by its re-render (HybridGen's InstantID step).
    """
    reasons = []
    for start in range(0, max_attempts, max(1, source.batch_size)):
        candidates = source.render(identity_id, list(range(start, min(max_attempts, start + source.batch_size))))
        rendered = [c for c in candidates if c.image is not None]
        found = detect_batch([c.image for c in rendered]) if rendered else []
        faces = dict(zip((id(c) for c in rendered), found))
        for c in candidates:
            if c.image is None:
                reasons.append(f"attempt {c.attempt}: {c.error}")
                continue
            try:
                reference = accept_candidate(identity_id, c, faces[id(c)], choose, embed)
                return reference if rerender is None else rerender(reference)
            except ValueError as exc:
                reasons.append(f"attempt {c.attempt}: {exc}")
    raise ReferenceFailed(f"no usable reference face in {max_attempts} attempts ({'; '.join(reasons)})"[:480])
