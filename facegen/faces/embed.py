"""Face embeddings from an IResNet checkpoint, computed the way insightface evaluates.

One implementation serves the faces stage and verification: RGB uint8 112x112 crops become NCHW
floats in [-1, 1] (``(x / 255 - 0.5) / 0.5``); with ``flip`` the embedding is
``normalise(f(x) + f(flip(x)))`` (insightface ``eval/verification.py``), otherwise ``normalise(f(x))``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from facegen.curriculum import l2_normalize

from facegen.schema import ALIGNED_SIZE
from facegen.models.iresnet_checkpoint import load_backbone


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` -> cuda when available, else cpu; anything else is passed to ``torch.device``."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def check_crops(images: np.ndarray, name: str = "images") -> np.ndarray:
    """Validate aligned crops: uint8 ``[N, 112, 112, 3]`` (RGB)."""
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise ValueError(f"{name}: expected uint8 pixels, got {images.dtype}")
    if images.ndim != 4 or images.shape[1:] != (ALIGNED_SIZE, ALIGNED_SIZE, 3):
        raise ValueError(f"{name}: expected shape [N, {ALIGNED_SIZE}, {ALIGNED_SIZE}, 3], got {images.shape}")
    return images


def to_model_input(images_uint8: np.ndarray, device: torch.device) -> torch.Tensor:
    """uint8 NHWC RGB -> float NCHW in [-1, 1] on ``device`` (the arcface_torch preprocessing)."""
    x = torch.from_numpy(np.ascontiguousarray(images_uint8)).to(device)
    x = x.permute(0, 3, 1, 2).float().contiguous()  # channels-last input crashes torch 2.13 CPU kernels
    return (x / 255.0 - 0.5) / 0.5


def _model_device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


@torch.inference_mode()
def embed_with_model(
    model: nn.Module,
    images_uint8: np.ndarray,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    flip: bool = True,
) -> np.ndarray:
    """Embed aligned crops with ``model`` (already in eval mode); float32 ``[N, d]``, rows L2-normalised.

    ``device`` defaults to where the model's parameters are; on cuda the forward runs under fp16
    autocast (the sum and normalisation are done in float64 on the host).
    """
    images = check_crops(images_uint8)
    if batch_size < 1:
        raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
    device = _model_device(model) if device is None else resolve_device(device)
    model = model.to(device)
    chunks: list[np.ndarray] = []
    for start in range(0, len(images), batch_size):
        x = to_model_input(images[start : start + batch_size], device)
        with torch.autocast(device_type="cuda", dtype=torch.float16, enabled=device.type == "cuda"):
            out = model(x).float()
            if flip:
                out = out + model(torch.flip(x, dims=[3])).float()
        chunks.append(out.cpu().numpy().astype(np.float64))
    if not chunks:
        dim = getattr(model, "num_features", None)
        if dim is None:
            dim = int(model(torch.zeros(1, 3, ALIGNED_SIZE, ALIGNED_SIZE, device=device)).shape[1])
        return np.zeros((0, int(dim)), np.float32)
    return l2_normalize(np.concatenate(chunks)).astype(np.float32)


class Embedder:
    """A backbone checkpoint (facegen directory or insightface ``.pth``) ready to embed aligned crops."""

    def __init__(self, checkpoint: str, device: str = "auto", batch_size: int = 64, arch: str | None = None):
        if batch_size < 1:
            raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
        self.checkpoint = str(checkpoint)
        self.device = resolve_device(device)
        self.batch_size = int(batch_size)
        self.model = load_backbone(self.checkpoint, device=self.device, arch=arch)
        if self.device.type == "cuda" and hasattr(self.model, "fp16"):
            # IResNet opens its own autocast region from this flag, which overrides an outer one.
            self.model.fp16 = True

    @property
    def embedding_size(self) -> int:
        """Length of one embedding."""
        dim = getattr(self.model, "num_features", None)
        if dim is None:
            probe = np.zeros((1, ALIGNED_SIZE, ALIGNED_SIZE, 3), np.uint8)
            dim = embed_with_model(self.model, probe, 1, self.device).shape[1]
        return int(dim)

    def embed(self, images: np.ndarray, flip: bool = True) -> np.ndarray:
        """uint8 ``[N, 112, 112, 3]`` RGB crops -> float32 ``[N, d]`` L2-normalised embeddings."""
        return embed_with_model(self.model, images, self.batch_size, self.device, flip)
