"""Face embedders from any source behind one small interface, built by :func:`build_embedder`.

Every embedder has ``embed(images, flip=False)``: aligned RGB uint8 112x112 ArcFace crops
``[N, 112, 112, 3]`` in, float32 ``[N, dim]`` L2-normalised rows out. With ``flip`` the row is
``normalise(f(x) + f(flip(x)))`` (insightface ``eval/verification.py``). ``embed_raw(images)`` gives
the network's own output instead, one forward pass, unnormalised: what Vec2Face conditions on and
re-normalises to (``generator.hybrid.expansion.feature_norm: own``). It also declares the crop it
reads best (``crop``, a :class:`~facegen.faces.align.FaceCrop`) and embeds such crops with
``embed_crops``; for the ArcFace networks that is the 112 crop itself, for dlib's ResNet its own
150 px chip, which the faces stage cuts from the same landmarks. ``record`` names what produced the
embeddings (kind, file, sha256 of the weights, width): block stats and shard manifests carry it.

The kinds (``faces.embedder.kind``: facegen, arcface_torch, onnx, dlib, ...) are modules of
:mod:`facegen.faces.embedders`, listed in :data:`facegen.config.faces.EMBEDDERS`; this module holds
what they share.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from facegen.faces.align import FaceCrop
from facegen.schema import ALIGNED_SIZE
from facegen.storage import sha256_of
from facegen.vectors import l2_normalize

if TYPE_CHECKING:
    import torch
    from torch import nn

    from facegen.config import EmbedderSettings


def check_crops(images: np.ndarray, name: str = "images", size: int = ALIGNED_SIZE) -> np.ndarray:
    """Validate crops: uint8 ``[N, size, size, 3]`` (RGB)."""
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise ValueError(f"{name}: expected uint8 pixels, got {images.dtype}")
    if images.ndim != 4 or images.shape[1:] != (size, size, 3):
        raise ValueError(f"{name}: expected shape [N, {size}, {size}, 3], got {images.shape}")
    return images


def to_model_input(images_uint8: np.ndarray, device: torch.device) -> torch.Tensor:
    """uint8 NHWC RGB -> float NCHW in [-1, 1] on ``device`` (the arcface_torch preprocessing)."""
    import torch

    x = torch.from_numpy(np.ascontiguousarray(images_uint8)).to(device)
    x = x.permute(0, 3, 1, 2).float().contiguous()  # channels-last input crashes torch 2.13 CPU kernels
    return (x / 255.0 - 0.5) / 0.5


def _model_device(model: nn.Module) -> torch.device:
    import torch

    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def embed_with_model(
    model: nn.Module,
    images_uint8: np.ndarray,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    flip: bool = True,
    normalise: bool = True,
) -> np.ndarray:
    """Embed aligned crops with ``model`` (already in eval mode); float32 ``[N, d]``, rows L2-normalised
    (``normalise=False``: as the network gives them).

    ``device`` defaults to where the model's parameters are; on cuda the forward runs under fp16
    autocast (the sum and normalisation are done in float64 on the host).
    """
    import torch

    from facegen.devices import resolve_device

    images = check_crops(images_uint8)
    if batch_size < 1:
        raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
    device = _model_device(model) if device is None else resolve_device(device)
    model = model.to(device)
    with torch.inference_mode():
        return _embed_batches(model, images, batch_size, device, flip, normalise)


def _embed_batches(model: nn.Module, images: np.ndarray, batch_size: int, device: torch.device, flip: bool,
                   normalise: bool) -> np.ndarray:
    import torch

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
    out = np.concatenate(chunks)
    return (l2_normalize(out) if normalise else out).astype(np.float32)


class Embedder(Protocol):
    """What the faces stage, cleaning and verification need of an embedder."""

    kind: str
    dim: int
    crop: FaceCrop
    record: dict[str, Any]

    def embed(self, images: np.ndarray, flip: bool = False) -> np.ndarray:
        """Aligned 112x112 ArcFace crops -> float32 ``[N, dim]`` L2-normalised embeddings."""

    def embed_crops(self, crops: np.ndarray, flip: bool = False) -> np.ndarray:
        """Crops of this embedder's own :attr:`crop` geometry -> float32 ``[N, dim]``."""

    def embed_raw(self, images: np.ndarray) -> np.ndarray:
        """Aligned 112x112 crops -> float32 ``[N, dim]`` as the network outputs them (no flip, not normalised)."""


def weights_record(kind: str, weights_file: str, dim: int) -> dict[str, Any]:
    """``{"kind", "file", "sha256", "dim"}``: what produced a set of embeddings."""
    return {"kind": kind, "file": os.path.basename(weights_file), "sha256": sha256_of(weights_file), "dim": int(dim)}


def describe_embedder(settings: "EmbedderSettings") -> dict[str, Any] | None:
    """What the driver records of the embedder ``settings`` describe, without loading it or reading
    its weights: ``{"kind", "file", "digest"}`` (the digest from storage metadata or a sidecar,
    :func:`facegen.cache.input_digest`); ``None`` when nothing is embedded. Blocks add the width."""
    if not settings.enabled:
        return None
    from facegen.cache import input_digest
    from facegen.config.faces import EMBEDDERS

    weights_file = EMBEDDERS.hook(settings.kind, "weights_file")
    path = weights_file(settings) if weights_file else str(settings.path).rstrip("/")
    try:
        digest = input_digest(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"faces.embedder.path: {path}: no such file or folder") from None
    return {"kind": settings.kind, "file": os.path.basename(path), "digest": digest}


def build_embedder(settings: "EmbedderSettings") -> Embedder:
    """The embedder ``settings`` describe (its kind's module's ``build``); one-line errors naming the field."""
    from facegen.config.faces import EMBEDDERS

    return EMBEDDERS.build(settings)
