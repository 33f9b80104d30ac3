"""Vec2Face expansion: identity-conditioned 112x112 aligned faces from conditioning features.

The network and its checkpoint reader live in :mod:`facegen.models.vec2face`; this module turns a
batch of one identity's conditioning features into images. Each sample's random token mask comes
from its own stream (seeded by the row's sample seed), so an image does not depend on the other
samples in its batch. The transformer runs in float32 (as the release does); on GPU with ``fp16``
the convolutional image decoder runs under float16 autocast.
"""

from __future__ import annotations

import numpy as np
import torch

from facegen.devices import resolve_device
from facegen.faces.align import ARCFACE_TEMPLATE
from facegen.models.vec2face import Vec2Face, draw_token_masks, load_vec2face, vec2face_vit_base_patch16

__all__ = ["Vec2FaceExpander", "vec2face_vit_base_patch16", "images_to_uint8"]

#: Domain tag of the per-sample token-mask stream.
MASK_TAG = 0x7E2F
#: Vec2Face draws aligned crops: the five ArcFace points are where the template puts them.
LANDMARKS = ARCFACE_TEMPLATE.reshape(-1).copy()


def images_to_uint8(images: torch.Tensor) -> np.ndarray:
    """``[B, 3, H, W]`` in [-1, 1] -> uint8 ``[B, H, W, 3]``."""
    pixels = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).cpu().numpy()


class Vec2FaceExpander:
    """Loads a Vec2Face checkpoint once; :meth:`render` draws one image per conditioning feature."""

    source = "vec2face"
    takes_text = False
    #: Vec2Face draws ArcFace-aligned crops: the landmarks of every image are known, no detection.
    known_landmarks = LANDMARKS

    def __init__(self, settings, device: str | None = None, model: Vec2Face | None = None):
        if model is None and not settings.checkpoint:
            raise ValueError("generator.hybrid.vec2face.checkpoint: a Vec2Face checkpoint (.pth) is required")
        self.settings = settings
        self.device = resolve_device(device or "auto")
        self.model = (model if model is not None else load_vec2face(settings.checkpoint)).eval().to(self.device)
        self.half = bool(settings.fp16 and self.device.type == "cuda")

    def masks(self, sample_seeds: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token noise ``[n, 49]`` and masked counts ``[n]``, one seeded stream per sample."""
        s = self.settings
        draws = [
            draw_token_masks(np.random.default_rng([int(seed), MASK_TAG]), self.model.num_dropped,
                             s.mask_ratio_min, s.mask_ratio_max, s.mask_ratio_mu, s.mask_ratio_std)
            for seed in sample_seeds
        ]
        noise = torch.from_numpy(np.stack([d[0] for d in draws]))
        return noise, torch.tensor([d[1] for d in draws], dtype=torch.int64)

    @torch.inference_mode()
    def render(self, features: np.ndarray, sample_seeds: list[int], phrases: list[str] | None = None) -> list[np.ndarray]:
        """uint8 ``112x112x3`` RGB images, one per row of ``features`` ``[n, 512]``."""
        features = np.asarray(features, np.float32)
        if features.ndim != 2 or len(features) != len(sample_seeds):
            raise ValueError(f"features {features.shape} do not match {len(sample_seeds)} sample seeds")
        noise, counts = self.masks(sample_seeds)
        x = torch.from_numpy(features).to(self.device)
        z = self.model.latent_map(x, noise.to(self.device), counts.to(self.device))
        with torch.autocast("cuda", dtype=torch.float16, enabled=self.half):
            images = self.model.im_decoder(z)
        return list(images_to_uint8(images))
