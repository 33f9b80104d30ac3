"""Stable Diffusion text-to-image backend: one attribute prompt per identity, one seed per sample.

The pipeline loads once per actor with diffusers ``from_pretrained`` (a local folder or a hub id).
Every sample gets its own CPU ``torch.Generator`` seeded with the row's seed, so its initial latents
do not depend on the device or on the other samples. Micro-batches never mix identities: an
identity's samples are cut at fixed ``sample_idx`` boundaries, so the tensors a sample is computed
with are the same whichever Ray batch or actor it lands in. If a pipeline call fails, its samples
are retried one at a time and only those that still fail become error rows (a retried sample is
computed alone, so its pixels may differ in the last bits from a run where its micro-batch passed).

Landmarks are NaN (this backend has no detector); the faces stage centre-crops such rows.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from facegen.config import DiffusionSettings, GeneratorSettings
from facegen.generators import check_identity_id, failure_reason, identity_rows, sample_seed
from facegen.identities.attributes import build_prompt, sample_attributes
from facegen.schema import GENERATED, LANDMARK_DIM, STATUS_OK, error_row, rows_to_batch

#: Samples per pipeline call (times two with classifier-free guidance).
MICRO_BATCH = 8


@dataclass(frozen=True)
class _Sample:
    identity_id: int
    block_id: int
    sample_idx: int
    seed: int
    prompt: str
    attributes: dict[str, str]


def _looks_local(model: str) -> bool:
    return os.path.isabs(model) or model.startswith((".", "~")) or os.path.exists(model) or model.count("/") > 1


def load_pipeline(options: DiffusionSettings, device: str):
    """``StableDiffusionPipeline.from_pretrained(options.model)`` on ``device``; one-line errors."""
    import torch
    from diffusers import StableDiffusionPipeline

    model = options.model
    if _looks_local(model) and not os.path.isdir(os.path.expanduser(model)):
        raise FileNotFoundError(f"generator.diffusion.model: {model}: no such directory")
    dtype = torch.float16 if options.fp16 and device == "cuda" else torch.float32
    try:
        pipeline = StableDiffusionPipeline.from_pretrained(
            os.path.expanduser(model) if _looks_local(model) else model,
            safety_checker=None,
            requires_safety_checker=False,
            local_files_only=options.local_files_only,
        )
    except Exception as exc:
        message = " ".join(str(exc).split())[:300]
        raise RuntimeError(
            f"generator.diffusion.model: {model}: cannot load a Stable Diffusion pipeline "
            f"({type(exc).__name__}: {message})"
        ) from None
    pipeline.set_progress_bar_config(disable=True)
    # Cast after loading: the load keyword was renamed torch_dtype -> dtype (diffusers #14205).
    return pipeline.to(device, dtype)


class DiffusionGenerator:
    """Ray Data stage: identity rows -> ``images_per_identity`` Stable Diffusion images each."""

    def __init__(self, settings: GeneratorSettings, seed: int, micro_batch: int | None = None):
        import torch

        if int(seed) < 0:
            raise ValueError(f"run.seed must be >= 0, got {seed}")
        micro_batch = settings.diffusion.micro_batch if micro_batch is None else micro_batch
        if micro_batch < 1:
            raise ValueError(f"micro_batch must be >= 1, got {micro_batch}")
        self.settings, self.seed, self.micro_batch = settings, int(seed), int(micro_batch)
        self.options = settings.diffusion
        self.source = f"diffusion:{self.options.model}"
        self.pipeline = load_pipeline(self.options, "cuda" if torch.cuda.is_available() else "cpu")

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
        return [
            _Sample(identity_id, int(block_id), k, sample_seed(self.seed, identity_id, k), prompt, attributes)
            for k in range(self.settings.images_per_identity)
        ]

    def _run(self, samples: list[_Sample]) -> list[dict[str, Any]]:
        try:
            return [self._row(s, png) for s, png in zip(samples, self._generate(samples))]
        except Exception as exc:
            if len(samples) == 1:
                s = samples[0]
                reason = failure_reason(s.identity_id, s.sample_idx, exc)
                return [error_row(s.identity_id, s.block_id, s.sample_idx, s.seed, self.source, reason)]
        return [row for s in samples for row in self._run([s])]

    def _generate(self, samples: list[_Sample]) -> list[bytes]:
        import torch

        opts = self.options
        result = self.pipeline(
            prompt=[s.prompt for s in samples],
            negative_prompt=[opts.negative_prompt] * len(samples),
            generator=[torch.Generator("cpu").manual_seed(s.seed) for s in samples],
            num_inference_steps=opts.num_inference_steps,
            guidance_scale=opts.guidance_scale,
            height=opts.height,
            width=opts.width,
            output_type="pil",
        )
        encoded = []
        for image in result.images:
            if image.size != (opts.width, opts.height):
                width, height = image.size
                raise ValueError(f"pipeline returned {width}x{height}, expected {opts.width}x{opts.height}")
            buffer = io.BytesIO()
            image.convert("RGB").save(buffer, format="PNG")
            encoded.append(buffer.getvalue())
        if len(encoded) != len(samples):
            raise ValueError(f"pipeline returned {len(encoded)} images for {len(samples)} prompts")
        return encoded

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
