"""Kinds ``facegen`` (a facegen IResNet folder: ``backbone.json`` + ``backbone.safetensors``) and
``arcface_torch`` (an insightface arcface_torch ``.pth`` state dict; ``arch`` names the network,
read with ``torch.load(weights_only=True)``). Preprocessing is insightface's: RGB, ``(x - 127.5) / 127.5``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from facegen.faces.align import ARCFACE_CROP
from facegen.faces.embed import embed_with_model, weights_record

if TYPE_CHECKING:
    from facegen.config import EmbedderWeights


class IResNetEmbedder:
    """An IResNet (facegen folder or arcface_torch ``.pth``) ready to embed aligned 112 crops."""

    crop = ARCFACE_CROP

    def __init__(self, path: str, kind: str = "facegen", arch: str | None = None, device: str = "auto", batch_size: int = 64):
        from facegen.devices import resolve_device
        from facegen.models.iresnet_checkpoint import BACKBONE_WEIGHTS, load_backbone

        if batch_size < 1:
            raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
        self.kind, self.path = kind, str(path).rstrip("/")
        if kind == "arcface_torch" and not self.path.endswith((".pth", ".pt")):
            raise ValueError(f"faces.embedder.path: {path}: an arcface_torch checkpoint is a .pth file")
        if kind == "facegen" and self.path.endswith((".pth", ".pt")):
            raise ValueError(f"faces.embedder.path: {path}: a .pth file is kind arcface_torch (with arch)")
        self.device = resolve_device(device)
        self.batch_size = int(batch_size)
        self.model = load_backbone(self.path, device=self.device, arch=arch)
        if self.device.type == "cuda" and hasattr(self.model, "fp16"):
            # IResNet opens its own autocast region from this flag, which overrides an outer one.
            self.model.fp16 = True
        self.dim = int(self.model.num_features)
        weights = self.path if kind == "arcface_torch" else f"{self.path}/{BACKBONE_WEIGHTS}"
        self.record = weights_record(kind, weights, self.dim)

    @property
    def embedding_size(self) -> int:
        """Length of one embedding (same as :attr:`dim`)."""
        return self.dim

    def embed(self, images: np.ndarray, flip: bool = False) -> np.ndarray:
        """uint8 ``[N, 112, 112, 3]`` RGB crops -> float32 ``[N, d]`` L2-normalised embeddings."""
        return embed_with_model(self.model, images, self.batch_size, self.device, flip)

    embed_crops = embed

    def embed_raw(self, images: np.ndarray) -> np.ndarray:
        """uint8 ``[N, 112, 112, 3]`` RGB crops -> float32 ``[N, d]``: the IResNet's output, unnormalised."""
        return embed_with_model(self.model, images, self.batch_size, self.device, flip=False, normalise=False)


def check(settings: "EmbedderWeights") -> None:
    """An arcface_torch ``.pth`` needs its network; both kinds need weights to embed."""
    if settings.kind == "arcface_torch" and settings.path and settings.arch is None:
        raise ValueError("arch: an arcface_torch .pth needs its network (iresnet18/34/50/100, or with _se)")


def build(settings: "EmbedderWeights") -> IResNetEmbedder:
    """The IResNet ``settings.path`` holds."""
    if not settings.path:
        raise ValueError(f"{settings.where}.path: the {settings.kind} embedder needs a path")
    return IResNetEmbedder(settings.path, settings.kind, settings.arch, settings.device, getattr(settings, "batch_size", 64))


def weights_file(settings: "EmbedderWeights") -> str:
    """The folder (facegen) or the ``.pth`` (arcface_torch)."""
    from facegen.models.iresnet_checkpoint import BACKBONE_META
    from facegen.storage import exists

    path = str(settings.path).rstrip("/")
    if settings.kind == "facegen" and not exists(f"{path}/{BACKBONE_META}"):
        raise FileNotFoundError(f"{settings.where}.path: {path}: not a backbone directory ({BACKBONE_META} not found)")
    return path


def differentiable_model(settings: "EmbedderWeights", device: Any) -> Any:
    """The IResNet as a torch module (frozen) on ``device``: crops in [-1, 1] -> raw embeddings."""
    from facegen.models.iresnet_checkpoint import load_backbone

    arch = settings.arch if settings.kind == "arcface_torch" else None
    return load_backbone(settings.path, device=device, arch=arch).requires_grad_(False)
