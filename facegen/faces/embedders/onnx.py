"""Kind ``onnx``: an insightface ArcFace ONNX (glintr100, w600k_r50, an export) through
``insightface.model_zoo.get_model``, with the CUDA provider when onnxruntime has it; insightface's
own preprocessing (the mean/std it reads off the graph)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import numpy as np

from facegen.devices import onnx_providers
from facegen.faces.align import ARCFACE_CROP
from facegen.faces.embed import check_crops, weights_record
from facegen.schema import ALIGNED_SIZE
from facegen.vectors import l2_normalize

if TYPE_CHECKING:
    from facegen.config import EmbedderSettings


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


def check(settings: "EmbedderSettings") -> None:
    """An ONNX embedder is its file."""
    if not settings.path:
        raise ValueError("path: the onnx embedder needs a weights file")


def build(settings: "EmbedderSettings") -> OnnxEmbedder:
    """The ONNX model at ``settings.path``."""
    return OnnxEmbedder(settings.path, batch_size=getattr(settings, "batch_size", 64))
