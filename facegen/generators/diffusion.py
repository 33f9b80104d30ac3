"""Stable Diffusion text-to-image backend: one attribute prompt per identity, one seed per sample.

The pipeline (SD 1.x/2.x or SDXL, whichever the model folder or hub id is) loads once per actor
through :mod:`facegen.generators.text_to_image`. Every sample gets its own CPU ``torch.Generator``
seeded with the row's seed, so its initial latents do not depend on the device or on the other
samples. Micro-batches never mix identities: an identity's samples are cut at fixed ``sample_idx``
boundaries, so the tensors a sample is computed with are the same whichever Ray batch or actor it
lands in. A failing pipeline call is retried in parts (halves after an out-of-memory error, one
sample at a time otherwise); only samples that still fail alone become error rows.

With ``variation_phrases`` each sample's prompt ends with its own pose/expression/lighting/camera/
background phrase. Landmarks are NaN (this backend has no detector); the faces stage centre-crops
such rows.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from facegen.config import DiffusionSettings, GeneratorSettings
from facegen.devices import resolve_device
from facegen.generators import check_identity_id, failure_reason, identity_rows, run_with_splitting, sample_seed
from facegen.generators.text_to_image import load_text_to_image, render_text
from facegen.identities.attributes import build_prompt, sample_attributes
from facegen.identities.phrases import with_variation
from facegen.images import encode_png
from facegen.schema import GENERATED, LANDMARK_DIM, STATUS_OK, error_row, rows_to_batch


@dataclass(frozen=True)
class _Sample:
    identity_id: int
    block_id: int
    sample_idx: int
    seed: int
    prompt: str
    attributes: dict[str, str]


def load_pipeline(options: DiffusionSettings, device: str):
    """The SD/SDXL pipeline of ``options.model`` on ``device``; one-line errors."""
    return load_text_to_image(options, device, "generator.diffusion.model")


class DiffusionGenerator:
    """Ray Data stage: identity rows -> ``images_per_identity`` Stable Diffusion images each."""

    def __init__(self, settings: GeneratorSettings, seed: int, micro_batch: int | None = None):
        if int(seed) < 0:
            raise ValueError(f"run.seed must be >= 0, got {seed}")
        micro_batch = settings.diffusion.micro_batch if micro_batch is None else micro_batch
        if micro_batch < 1:
            raise ValueError(f"micro_batch must be >= 1, got {micro_batch}")
        self.settings, self.seed, self.micro_batch = settings, int(seed), int(micro_batch)
        self.options = settings.diffusion
        self.source = f"diffusion:{self.options.model}"
        self.pipeline = load_pipeline(self.options, resolve_device().type)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows: list[dict[str, Any]] = []
        per_identity = self.settings.images_per_identity
        for identity_id, block_id in identity_rows(batch):
            try:
                samples = self._plan(identity_id, block_id)
            except Exception as exc:  # a bad identity fails its own rows only
                rows += [
                    error_row(identity_id, block_id, k, -1, self.source, failure_reason(identity_id, k, exc))
                    for k in range(per_identity)
                ]
                continue
            for start in range(0, per_identity, self.micro_batch):
                rows += self._run(samples[start : start + self.micro_batch])
        return rows_to_batch(rows, GENERATED)

    def _plan(self, identity_id: Any, block_id: Any) -> list[_Sample]:
        identity_id = check_identity_id(identity_id)
        attributes = sample_attributes(self.seed, identity_id)
        prompt = build_prompt(attributes)
        samples = []
        for k in range(self.settings.images_per_identity):
            seed = sample_seed(self.seed, identity_id, k)
            text = with_variation(prompt, seed) if self.options.variation_phrases else prompt
            samples.append(_Sample(identity_id, int(block_id), k, seed, text, attributes))
        return samples

    def _run(self, samples: list[_Sample]) -> list[dict[str, Any]]:
        def failed(s: _Sample, exc: BaseException) -> dict[str, Any]:
            reason = failure_reason(s.identity_id, s.sample_idx, exc)
            return error_row(s.identity_id, s.block_id, s.sample_idx, s.seed, self.source, reason)

        def compute(part: list[_Sample]) -> list[dict[str, Any]]:
            return [self._row(s, png) for s, png in zip(part, self._generate(part))]

        return run_with_splitting(samples, compute, failed)

    def _generate(self, samples: list[_Sample]) -> list[bytes]:
        images = render_text(self.pipeline, self.options, [s.prompt for s in samples], [s.seed for s in samples])
        return [encode_png(image) for image in images]

    def _row(self, sample: _Sample, png: bytes) -> dict[str, Any]:
        meta = {"prompt": sample.prompt, "attributes": sample.attributes}
        return {
            "identity_id": sample.identity_id,
            "block_id": sample.block_id,
            "sample_idx": sample.sample_idx,
            "seed": sample.seed,
            "source": self.source,
            "image": png,
            "landmarks": np.full(LANDMARK_DIM, np.nan, np.float32),
            "true_identity_id": -1,
            "meta": json.dumps(meta, sort_keys=True),
            "status": STATUS_OK,
            "reason": "",
        }


def build(settings: GeneratorSettings, seed: int, **options: Any) -> DiffusionGenerator:
    """The backend's generator (:data:`facegen.config.generation.GENERATORS`)."""
    return DiffusionGenerator(settings, seed, **options)
