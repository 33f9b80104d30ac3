"""Kind ``insightface``: an SCRFD/RetinaFace ONNX (a model folder such as buffalo_l or antelopev2, or one
``.onnx``) through ``insightface.model_zoo``, with onnxruntime's CUDA provider when present."""

from __future__ import annotations

import glob
import os
from typing import Literal

import numpy as np
from pydantic import Field

from facegen.config.faces import DetectorSettings
from facegen.faces.detect import Detection, detections

DEFAULT_MIN_SCORE = 0.5


class InsightfaceDetectorSettings(DetectorSettings):
    """The insightface detector's own settings: the model the user gives and its input size."""

    kind: Literal["insightface"] = "insightface"
    path: str | None = Field(default=None, description="a model folder (e.g. buffalo_l) or a detection .onnx",
                             json_schema_extra={"input_path": "required"})
    det_size: int = Field(default=640, ge=32, description="network input side (px)")


SETTINGS = InsightfaceDetectorSettings


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
        from facegen.images import check_image

        bgr = np.ascontiguousarray(check_image(image)[:, :, ::-1])  # insightface reads BGR (OpenCV)
        det, kps = self.model.detect(bgr, input_size=(self.det_size, self.det_size), det_thresh=self.min_score)
        if kps is None or len(det) == 0:
            return []
        return detections(det[:, :4], det[:, 4], kps)

    def detect_batch(self, images: list[np.ndarray]) -> list[list[Detection]]:
        return [self.detect(image) for image in images]


def check(settings: InsightfaceDetectorSettings) -> None:
    """The detector is a model the user gives."""
    if not settings.path:
        raise ValueError("path: the insightface detector needs a model folder or a detection .onnx")


def build(settings: InsightfaceDetectorSettings) -> InsightfaceDetector:
    """The SCRFD/RetinaFace model at ``settings.path``, at ``det_size`` and the kind's score threshold."""
    from facegen.faces.detect import min_score_of

    return InsightfaceDetector(settings.path, settings.det_size, min_score_of(settings))
