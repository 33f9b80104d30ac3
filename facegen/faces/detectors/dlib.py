"""Kind ``dlib``: dlib's HOG or CNN detector with its 5-point predictor; the ArcFace points are derived
from dlib's eye corners and nose base as :mod:`facegen.models.dlib_face` explains. Its score is the
logistic of the detector's margin (dlib's own threshold, margin 0, is 0.5)."""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field

from facegen.config.faces import DetectorSettings
from facegen.faces.detect import Detection, detections

DEFAULT_MIN_SCORE = 0.5


class DlibDetectorSettings(DetectorSettings):
    """dlib's own detector settings: HOG (CPU) or the CNN (mmod) model, and how often the image is upsampled."""

    kind: Literal["dlib"] = "dlib"
    dlib_model: Literal["hog", "cnn"] = "hog"
    dlib_upsample: int = Field(default=1, ge=0, le=3)


SETTINGS = DlibDetectorSettings


class DlibDetector:
    """dlib HOG (CPU) or CNN (mmod) detector + 5-point predictor, ArcFace points derived."""

    kind = "dlib"

    def __init__(self, model: str = "hog", upsample: int = 1):
        from facegen.models.dlib_face import DlibFaces

        self.model = DlibFaces(model, upsample)

    def detect(self, image: np.ndarray) -> list[Detection]:
        from facegen.images import check_image
        from facegen.models.dlib_face import arcface_from_dlib5

        boxes, margins, points = self.model.detect(check_image(image))
        scores = 1.0 / (1.0 + np.exp(-margins.astype(np.float64)))
        landmarks = np.array([arcface_from_dlib5(p) for p in points], np.float32).reshape(-1, 5, 2)
        return detections(boxes, scores, landmarks)

    def detect_batch(self, images: list[np.ndarray]) -> list[list[Detection]]:
        return [self.detect(image) for image in images]


def build(settings: DlibDetectorSettings) -> DlibDetector:
    """dlib's ``dlib_model`` detector, upsampling ``dlib_upsample`` times."""
    return DlibDetector(settings.dlib_model, settings.dlib_upsample)
