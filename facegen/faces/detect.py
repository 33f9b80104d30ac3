"""Face detectors behind one small protocol, built by :func:`build_detector`, and the rule that keeps
one face per image.

A detector's ``detect(image)`` takes one RGB uint8 ``[H, W, 3]`` image and returns a list of
:class:`Detection` (box, score in [0, 1], five landmarks in the ArcFace order: left eye, right eye,
nose tip, left and right mouth corner, "left" as seen in the image), best first;
``detect_batch(images)`` does a list at once (batched on the network where the model allows).

Kinds (``faces.detector.kind``):

- ``mtcnn``: MTCNN in torch (:mod:`facegen.models.mtcnn`) with the ``mtcnn`` package's weights,
  batched, CPU or GPU; on a GPU its pyramid, crops and NMS run there too
  (:mod:`facegen.models.mtcnn_torch`). The default: it works offline everywhere.
- ``dlib``: dlib's HOG or CNN detector with its 5-point predictor; the ArcFace points are derived
  from dlib's eye corners and nose base as :mod:`facegen.models.dlib_face` explains. Its score is
  the logistic of the detector's margin.
- ``insightface``: an SCRFD/RetinaFace ONNX (a model folder such as buffalo_l or antelopev2, or
  one ``.onnx``) through ``insightface.model_zoo``, with onnxruntime's CUDA provider when present.
- ``none``: no detector; the faces stage uses the generator's landmarks only.

Nothing here knows about Ray.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np

if TYPE_CHECKING:
    from facegen.config import DetectorSettings

KINDS = ("mtcnn", "dlib", "insightface", "none")
#: ``faces.detector.min_score`` when left unset, per kind (their scores mean different things).
DEFAULT_MIN_SCORE = {"mtcnn": 0.9, "dlib": 0.5, "insightface": 0.5, "none": 0.0}

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


def check_image(image: np.ndarray) -> np.ndarray:
    """Validate one RGB uint8 ``[H, W, 3]`` image."""
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image: expected RGB uint8 [H, W, 3], got {getattr(image, 'dtype', type(image))} {np.shape(image)}")
    return image


def _detections(boxes: np.ndarray, scores: np.ndarray, landmarks: np.ndarray) -> list[Detection]:
    order = np.argsort(-np.asarray(scores), kind="stable")
    return [Detection(np.asarray(boxes[i], np.float32), float(scores[i]), np.asarray(landmarks[i], np.float32)) for i in order]


class MtcnnDetector:
    """MTCNN in torch; ``detect_batch`` runs all images through each network together."""

    kind = "mtcnn"

    def __init__(self, device: str = "auto", min_face: int = 20, thresholds: tuple[float, float, float] = (0.6, 0.7, 0.8),
                 cascade: str = "auto"):
        from facegen.devices import resolve_device
        from facegen.models.mtcnn import MTCNN

        self.model = MTCNN(resolve_device(device), min_face, thresholds, cascade=cascade)

    def detect_batch(self, images: list[np.ndarray]) -> list[list[Detection]]:
        images = [check_image(im) for im in images]
        return [_detections(*found) for found in self.model.detect_batch(images)] if images else []

    def detect(self, image: np.ndarray) -> list[Detection]:
        return self.detect_batch([image])[0]


class DlibDetector:
    """dlib HOG (CPU) or CNN (mmod) detector + 5-point predictor, ArcFace points derived."""

    kind = "dlib"

    def __init__(self, model: str = "hog", upsample: int = 1):
        from facegen.models.dlib_face import DlibFaces

        self.model = DlibFaces(model, upsample)

    def detect(self, image: np.ndarray) -> list[Detection]:
        from facegen.models.dlib_face import arcface_from_dlib5

        boxes, margins, points = self.model.detect(check_image(image))
        scores = 1.0 / (1.0 + np.exp(-margins.astype(np.float64)))
        landmarks = np.array([arcface_from_dlib5(p) for p in points], np.float32).reshape(-1, 5, 2)
        return _detections(boxes, scores, landmarks)

    def detect_batch(self, images: list[np.ndarray]) -> list[list[Detection]]:
        return [self.detect(image) for image in images]


def find_detection_onnx(path: str) -> str:
    """``path`` if it is an ONNX file, else the detection model of an insightface model folder
    (the ``.onnx`` whose graph has SCRFD's five or more outputs)."""
    import onnxruntime

    if os.path.isfile(path):
        return path
    if not os.path.isdir(path):
        raise FileNotFoundError(f"faces.detector.path: {path}: no such model folder or .onnx file")
    candidates = sorted(glob.glob(os.path.join(path, "*.onnx")))
    # model packs name their detector det_*.onnx (buffalo_l) or scrfd_*.onnx (antelopev2): open those first
    candidates.sort(key=lambda f: not os.path.basename(f).startswith(("det", "scrfd", "retinaface")))
    for candidate in candidates:
        try:
            session = onnxruntime.InferenceSession(candidate, providers=["CPUExecutionProvider"])
        except Exception:  # noqa: BLE001 - a broken file is simply not the detector
            continue
        if len(session.get_outputs()) >= 5:
            return candidate
    raise FileNotFoundError(f"faces.detector.path: {path}: no SCRFD/RetinaFace detection .onnx in this folder")


class InsightfaceDetector:
    """An SCRFD/RetinaFace ONNX through ``insightface.model_zoo`` (input ``det_size`` square)."""

    kind = "insightface"

    def __init__(self, path: str, det_size: int = 640, min_score: float = 0.5):
        from insightface.model_zoo import get_model

        from facegen.devices import onnx_providers

        self.path = find_detection_onnx(path)
        providers = onnx_providers()
        try:
            model = get_model(self.path, providers=providers)
        except Exception as exc:  # onnxruntime's own exception types
            raise ValueError(f"faces.detector.path: {self.path}: not a loadable ONNX model ({type(exc).__name__}: {exc})"[:400]) from None
        if model is None or getattr(model, "taskname", None) != "detection":
            raise ValueError(f"faces.detector.path: {self.path}: insightface does not read it as a face detector")
        ctx = 0 if providers[0] == "CUDAExecutionProvider" else -1
        model.prepare(ctx_id=ctx, input_size=(det_size, det_size), det_thresh=float(min_score))
        if not model.use_kps:
            raise ValueError(f"faces.detector.path: {self.path}: the detector gives no landmarks (no keypoint outputs)")
        self.model, self.det_size, self.min_score = model, int(det_size), float(min_score)

    def detect(self, image: np.ndarray) -> list[Detection]:
        bgr = np.ascontiguousarray(check_image(image)[:, :, ::-1])  # insightface reads BGR (OpenCV)
        det, kps = self.model.detect(bgr, input_size=(self.det_size, self.det_size), det_thresh=self.min_score)
        if kps is None or len(det) == 0:
            return []
        return _detections(det[:, :4], det[:, 4], kps)

    def detect_batch(self, images: list[np.ndarray]) -> list[list[Detection]]:
        return [self.detect(image) for image in images]


def min_score_of(settings: "DetectorSettings") -> float:
    """``settings.min_score``, or the kind's default when unset."""
    return DEFAULT_MIN_SCORE[settings.kind] if settings.min_score is None else float(settings.min_score)


def build_detector(settings: "DetectorSettings") -> FaceDetector | None:
    """The detector ``settings`` describe (``faces.detector``); ``None`` for kind ``none``."""
    kind = settings.kind
    if kind == "none":
        return None
    if kind == "mtcnn":
        return MtcnnDetector(settings.device, settings.mtcnn_min_face, settings.mtcnn_thresholds, settings.mtcnn_cascade)
    if kind == "dlib":
        return DlibDetector(settings.dlib_model, settings.dlib_upsample)
    if kind == "insightface":
        if not settings.path:
            raise ValueError("faces.detector.path: the insightface detector needs a model folder or .onnx")
        return InsightfaceDetector(settings.path, settings.det_size, min_score_of(settings))
    raise ValueError(f"faces.detector.kind: unknown kind {kind!r}, expected one of {', '.join(KINDS)}")


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
