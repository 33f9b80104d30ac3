"""Kind ``mtcnn``: MTCNN in torch (:mod:`facegen.models.mtcnn`) with the ``mtcnn`` package's weights,
batched, CPU or GPU; on a GPU its pyramid, crops and NMS run there too (:mod:`facegen.models.mtcnn_torch`).
The default detector: it works offline everywhere."""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field

from facegen.config.faces import DetectorSettings
from facegen.faces.detect import Detection, detections

#: ``faces.detector.min_score`` when unset: the O-Net probability MTCNN's authors keep.
DEFAULT_MIN_SCORE = 0.9


class MtcnnSettings(DetectorSettings):
    """MTCNN's own detector settings: the pyramid's smallest face, the three networks' thresholds and
    where the glue between them runs."""

    kind: Literal["mtcnn"] = "mtcnn"
    mtcnn_min_face: int = Field(default=20, ge=12, description="smallest face the MTCNN pyramid looks for (px)")
    mtcnn_thresholds: tuple[float, float, float] = (0.6, 0.7, 0.8)
    mtcnn_cascade: Literal["auto", "numpy", "torch"] = Field(
        default="auto", description="the glue between MTCNN's networks: numpy = OpenCV resizes and numpy NMS on the host; "
        "torch = pyramid, crops and NMS batched on the networks' device (the same faces; for GPUs); auto = torch on a GPU")


SETTINGS = MtcnnSettings


class MtcnnDetector:
    """MTCNN in torch; ``detect_batch`` runs all images through each network together."""

    kind = "mtcnn"

    def __init__(self, device: str = "auto", min_face: int = 20, thresholds: tuple[float, float, float] = (0.6, 0.7, 0.8),
                 cascade: str = "auto"):
        from facegen.devices import resolve_device
        from facegen.models.mtcnn import MTCNN

        self.model = MTCNN(resolve_device(device), min_face, thresholds, cascade=cascade)

    def detect_batch(self, images: list[np.ndarray]) -> list[list[Detection]]:
        from facegen.images import check_image

        images = [check_image(im) for im in images]
        return [detections(*found) for found in self.model.detect_batch(images)] if images else []

    def detect(self, image: np.ndarray) -> list[Detection]:
        return self.detect_batch([image])[0]


def build(settings: MtcnnSettings) -> MtcnnDetector:
    """MTCNN with the ``mtcnn_*`` settings on ``settings.device``."""
    return MtcnnDetector(settings.device, settings.mtcnn_min_face, settings.mtcnn_thresholds, settings.mtcnn_cascade)
