"""Face detectors behind one small protocol, built by :func:`build_detector`, and the rule that keeps
one face per image.

A detector's ``detect(image)`` takes one RGB uint8 ``[H, W, 3]`` image and returns a list of
:class:`Detection` (box, score in [0, 1], five landmarks in the ArcFace order: left eye, right eye,
nose tip, left and right mouth corner, "left" as seen in the image), best first;
``detect_batch(images)`` does a list at once (batched on the network where the model allows).

The kinds (``faces.detector.kind``: mtcnn, dlib, insightface, ...) are modules of
:mod:`facegen.faces.detectors`, listed in :data:`facegen.config.faces.DETECTORS`; ``none`` means no
detector (the faces stage uses the generator's landmarks only).

Nothing here knows about Ray.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np

if TYPE_CHECKING:
    from facegen.config import DetectorSettings

REASON_NO_FACE = "no face"
REASON_TOO_SMALL = "face too small"
REASON_SEVERAL = "more than one large face"


@dataclass(frozen=True, eq=False)
class Detection:
    """One face: ``box`` float32 (x1, y1, x2, y2), ``score`` in [0, 1], ``landmarks`` float32 [5, 2]."""

    box: np.ndarray
    score: float
    landmarks: np.ndarray

    @property
    def size(self) -> float:
        """Square root of the box area, in pixels."""
        w, h = float(self.box[2] - self.box[0]), float(self.box[3] - self.box[1])
        return float(np.sqrt(max(w, 0.0) * max(h, 0.0)))


class FaceDetector(Protocol):
    """What the faces stage needs of a detector."""

    kind: str

    def detect(self, image: np.ndarray) -> list[Detection]:
        """Faces of one RGB uint8 image, best first."""

    def detect_batch(self, images: list[np.ndarray]) -> list[list[Detection]]:
        """:meth:`detect` for each image."""


def detections(boxes: np.ndarray, scores: np.ndarray, landmarks: np.ndarray) -> list[Detection]:
    """Detections from parallel arrays of boxes, scores and landmarks, best score first."""
    order = np.argsort(-np.asarray(scores), kind="stable")
    return [Detection(np.asarray(boxes[i], np.float32), float(scores[i]), np.asarray(landmarks[i], np.float32)) for i in order]


def min_score_of(settings: "DetectorSettings") -> float:
    """``settings.min_score``, or the kind's ``DEFAULT_MIN_SCORE`` when unset (0 for ``none``)."""
    if settings.min_score is not None:
        return float(settings.min_score)
    if settings.kind == "none":
        return 0.0
    from facegen.config.faces import DETECTORS

    return float(DETECTORS.hook(settings.kind, "DEFAULT_MIN_SCORE"))


def build_detector(settings: "DetectorSettings") -> FaceDetector | None:
    """The detector ``settings`` describe (its kind's module's ``build``); ``None`` for kind ``none``."""
    if settings.kind == "none":
        return None
    from facegen.config.faces import DETECTORS, detector_settings

    return DETECTORS.build(detector_settings(settings))


class FaceRejected(ValueError):
    """An image whose faces do not give one usable face; ``reason`` is one of the REASON_* texts."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason} ({detail})")
        self.reason = reason


def choose_face(detections: list[Detection], image_shape: tuple[int, ...], settings: "DetectorSettings") -> Detection:
    """The one face of an image, or :class:`FaceRejected`.

    Faces scoring below ``min_score`` are not faces; of the rest, those of at least ``min_size``
    pixels are large. The kept face is the most central large face; another large face at least
    ``rival_size_ratio`` times its size makes the image ambiguous.
    """
    min_score = min_score_of(settings)
    faces = [d for d in detections if d.score >= min_score]
    if not faces:
        best = max((d.score for d in detections), default=None)
        detail = f"best score {best:.2f} < {min_score}" if best is not None else "nothing detected"
        raise FaceRejected(REASON_NO_FACE, detail)
    large = [d for d in faces if d.size >= settings.min_size]
    if not large:
        raise FaceRejected(REASON_TOO_SMALL, f"largest {max(d.size for d in faces):.0f} px < min_size {settings.min_size:g}")
    h, w = image_shape[:2]
    centre = np.array([w / 2.0, h / 2.0])
    kept = min(large, key=lambda d: float(np.linalg.norm((d.box[:2] + d.box[2:]) / 2 - centre)))
    rivals = [d for d in large if d is not kept and d.size >= settings.rival_size_ratio * kept.size]
    if rivals:
        raise FaceRejected(REASON_SEVERAL, f"{len(rivals) + 1} faces of {settings.min_size:g} px or more")
    return kept
