"""Pixel-level face preparation: 5-point similarity alignment to the ArcFace template, centre crops, sharpness.

The codecs (decode, encode) live in :mod:`facegen.images`.

The alignment matches insightface ``utils.face_align.norm_crop``: a least-squares similarity
transform (Umeyama 1991) from the five landmarks to the 112x112 ArcFace reference points, applied
with ``cv2.warpAffine`` (bilinear, constant black border). Landmarks with no usable geometry are
rejected with a ``ValueError`` that says what is wrong with them.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from facegen.images import check_image
from facegen.schema import ALIGNED_SIZE
from facegen.templates import ARCFACE_TEMPLATE_112

#: The 112x112 ArcFace reference: left eye, right eye, nose tip, left and right mouth corners (x, y).
ARCFACE_TEMPLATE = np.array(ARCFACE_TEMPLATE_112, dtype=np.float32)


def as_points(landmarks: np.ndarray, name: str = "landmarks") -> np.ndarray:
    """Validate 5 landmarks given as ``(5, 2)`` or flat ``(10,)`` (x0, y0, .., x4, y4) -> float64 (5, 2)."""
    pts = np.asarray(landmarks, dtype=np.float64)
    if pts.shape == (10,):
        pts = pts.reshape(5, 2)
    if pts.shape != (5, 2):
        raise ValueError(f"{name}: expected shape (5, 2) or (10,), got {np.shape(landmarks)}")
    return _point_set(pts, name)


def _point_set(points: np.ndarray, name: str) -> np.ndarray:
    """Validate ``n >= 2`` points ``(n, 2)`` (or five flat landmarks ``(10,)``) -> float64 ``(n, 2)``:
    finite, and not all in one place."""
    pts = np.asarray(points, dtype=np.float64)
    if pts.shape == (10,):
        return as_points(pts, name)
    if pts.ndim != 2 or pts.shape[1] != 2 or len(pts) < 2:
        raise ValueError(f"{name}: expected shape (n >= 2, 2), got {np.shape(points)}")
    if not np.isfinite(pts).all():
        raise ValueError(f"{name}: contain NaN or infinite values")
    if np.ptp(pts, axis=0).max() == 0.0:
        raise ValueError(f"{name}: degenerate, all {'five ' if len(pts) == 5 else ''}points are equal")
    return pts


def estimate_similarity(src_points: np.ndarray, dst_points: np.ndarray) -> np.ndarray:
    """Least-squares similarity (rotation, uniform scale, translation) mapping ``src`` onto ``dst``
    (two or more point pairs: five landmarks, or a GAN crop's reference points).

    Umeyama's closed form: SVD of the cross-covariance, with the sign of the last singular
    direction chosen so the result is a rotation, never a reflection. Returns the (2, 3) matrix
    ``M`` with ``dst ~= M @ [x, y, 1]``.
    """
    src = _point_set(src_points, "src_points")
    dst = _point_set(dst_points, "dst_points")
    if src.shape != dst.shape:
        raise ValueError(f"src_points and dst_points: need the same number of points, got {len(src)} and {len(dst)}")
    src_mean, dst_mean = src.mean(axis=0), dst.mean(axis=0)
    src_c, dst_c = src - src_mean, dst - dst_mean
    cov = dst_c.T @ src_c / len(src)
    u, sing, vt = np.linalg.svd(cov)
    signs = np.ones(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        signs[-1] = -1.0
    rotation = u @ np.diag(signs) @ vt
    scale = float(sing @ signs) / src_c.var(axis=0).sum()
    matrix = np.empty((2, 3), dtype=np.float64)
    matrix[:, :2] = scale * rotation
    matrix[:, 2] = dst_mean - matrix[:, :2] @ src_mean
    return matrix


def align_face(image_rgb: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
    """Warp a face so its 5 landmarks land on :data:`ARCFACE_TEMPLATE`; returns uint8 112x112x3."""
    check_image(image_rgb)
    matrix = estimate_similarity(as_points(landmarks), ARCFACE_TEMPLATE)
    return cv2.warpAffine(image_rgb, matrix, (ALIGNED_SIZE, ALIGNED_SIZE), borderValue=0.0)


@dataclass(frozen=True, eq=False)
class FaceCrop:
    """The geometry of a face crop: ``size`` x ``size`` pixels with the five ArcFace-order landmarks
    at ``points`` (float32 ``[5, 2]``). The faces stage stores :data:`ARCFACE_CROP` crops; an
    embedder that reads another geometry (dlib's 150 px chip) declares its own."""

    size: int
    points: np.ndarray

    def cut(self, image_rgb: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
        """The crop of one face of ``image_rgb`` whose five landmarks are ``landmarks``."""
        check_image(image_rgb)
        matrix = estimate_similarity(as_points(landmarks), self.points)
        return cv2.warpAffine(image_rgb, matrix, (self.size, self.size), borderValue=0.0)

    def from_aligned(self, crops: np.ndarray) -> np.ndarray:
        """Re-cut aligned 112x112 ArcFace crops ``[N, 112, 112, 3]`` into this geometry; pixels the
        112 crop does not hold are filled by replicating its border."""
        if self.size == ALIGNED_SIZE and np.allclose(self.points, ARCFACE_TEMPLATE):
            return crops
        matrix = estimate_similarity(ARCFACE_TEMPLATE, self.points)
        out = np.empty((len(crops), self.size, self.size, 3), np.uint8)
        for i, crop in enumerate(crops):
            out[i] = cv2.warpAffine(crop, matrix, (self.size, self.size), borderMode=cv2.BORDER_REPLICATE)
        return out


#: The crop every SAMPLE row stores: 112x112, landmarks on the ArcFace template.
ARCFACE_CROP = FaceCrop(ALIGNED_SIZE, ARCFACE_TEMPLATE)


def center_crop(image_rgb: np.ndarray, size: int = ALIGNED_SIZE) -> np.ndarray:
    """The central square of an image resized to ``size`` (used when no landmarks are known)."""
    check_image(image_rgb)
    h, w = image_rgb.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    square = image_rgb[top : top + side, left : left + side]
    if side == size:
        return np.ascontiguousarray(square)
    interp = cv2.INTER_AREA if side > size else cv2.INTER_CUBIC
    return cv2.resize(square, (size, size), interpolation=interp)


def sharpness(image_rgb: np.ndarray, scale: float = 100.0) -> float:
    """Focus score in [0, 1): variance of the Laplacian of the grey image, squashed as v / (v + scale).

    ``scale`` is the variance that scores 0.5; at 112x112, blurred faces sit well below 100 and
    sharp ones well above, so the score separates them without being a calibrated quality model.
    """
    check_image(image_rgb)
    grey = cv2.cvtColor(image_rgb, cv2.COLOR_RGB2GRAY)
    var = float(cv2.Laplacian(grey, cv2.CV_64F).var())
    return var / (var + scale)
