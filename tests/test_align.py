"""5-point alignment against insightface ``norm_crop`` and against known synthetic geometry."""

import warnings

import cv2
import numpy as np
import pytest
from insightface.data import get_image
from insightface.utils.face_align import estimate_norm, norm_crop

from facegen.faces.align import ARCFACE_TEMPLATE, align_face, center_crop, estimate_similarity, sharpness
from facegen.images import decode_image, encode_image


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    return cv2.cvtColor(get_image("t1"), cv2.COLOR_BGR2RGB)


def _similarity(scale: float, degrees: float, tx: float, ty: float) -> np.ndarray:
    a = np.deg2rad(degrees)
    return np.array([[scale * np.cos(a), -scale * np.sin(a), tx], [scale * np.sin(a), scale * np.cos(a), ty]])


def _apply(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    return points @ matrix[:, :2].T + matrix[:, 2]


def test_recovers_a_known_similarity_exactly():
    forward = _similarity(2.7, 23.0, 410.0, 180.0)
    landmarks = _apply(forward, ARCFACE_TEMPLATE.astype(np.float64))
    matrix = estimate_similarity(landmarks, ARCFACE_TEMPLATE)
    inverse = cv2.invertAffineTransform(forward)
    np.testing.assert_allclose(matrix, inverse, atol=1e-5)


def test_reflected_points_still_give_a_rotation_not_a_mirror():
    mirrored = ARCFACE_TEMPLATE.astype(np.float64) * [-1.0, 1.0] + [200.0, 0.0]
    matrix = estimate_similarity(mirrored, ARCFACE_TEMPLATE)
    assert np.linalg.det(matrix[:, :2]) > 0


def test_matches_insightface_norm_crop_on_a_real_photo(photo):
    rng = np.random.default_rng(7)
    for _ in range(4):
        forward = _similarity(rng.uniform(1.5, 4.0), rng.uniform(-30, 30), rng.uniform(200, 700), rng.uniform(100, 400))
        landmarks = (_apply(forward, ARCFACE_TEMPLATE.astype(np.float64)) + rng.normal(0, 4, (5, 2))).astype(np.float32)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # skimage deprecates SimilarityTransform.estimate
            reference_matrix = estimate_norm(landmarks)
            reference = norm_crop(photo, landmarks)
        np.testing.assert_allclose(estimate_similarity(landmarks, ARCFACE_TEMPLATE), reference_matrix, atol=1e-3)
        ours = align_face(photo, landmarks.reshape(-1))  # flat (10,) form
        assert ours.shape == (112, 112, 3) and ours.dtype == np.uint8
        diff = np.abs(ours.astype(np.int16) - reference.astype(np.int16))
        assert diff.max() <= 2 and (diff > 0).mean() < 0.01


def _blob_centres(channel: np.ndarray) -> np.ndarray:
    count, labels = cv2.connectedComponents((channel > 25).astype(np.uint8))
    centres = []
    for label in range(1, count):
        ys, xs = np.nonzero(labels == label)
        w = channel[ys, xs].astype(np.float64)
        centres.append([np.sum(xs * w) / w.sum(), np.sum(ys * w) / w.sum()])
    return np.array(centres)


def test_rendered_landmarks_land_on_the_template(photo):
    """Draw Gaussian dots at the landmarks of a rotated, scaled face; after alignment they sit on the template."""
    forward = _similarity(3.1, -17.0, 520.0, 240.0)
    landmarks = _apply(forward, ARCFACE_TEMPLATE.astype(np.float64))
    h, w = photo.shape[:2]
    yy, xx = np.mgrid[0:h, 0:w]
    dots = np.zeros((h, w))
    for x, y in landmarks:
        dots += np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * 4.0**2))
    rendered = photo.copy()
    rendered[..., 2] = np.clip(255 * dots, 0, 255).astype(np.uint8)  # the dots live in the blue channel
    aligned = align_face(rendered, landmarks)
    centres = _blob_centres(aligned[..., 2])
    assert len(centres) == 5
    for target in ARCFACE_TEMPLATE:
        nearest = np.min(np.linalg.norm(centres - target, axis=1))
        assert nearest < 0.5, f"dot {target} landed {nearest:.2f} px away"


@pytest.mark.parametrize(
    "landmarks, message",
    [
        (np.full(10, np.nan), "NaN"),
        (np.r_[ARCFACE_TEMPLATE.reshape(-1)[:9], np.inf], "NaN or infinite"),
        (np.zeros((4, 2)), "shape"),
        (np.ones((5, 3)), "shape"),
        (np.tile([[50.0, 60.0]], (5, 1)), "degenerate"),
    ],
)
def test_bad_landmarks_raise_naming_the_problem(photo, landmarks, message):
    with pytest.raises(ValueError, match=message):
        align_face(photo, landmarks)


def test_bad_image_raises():
    with pytest.raises(ValueError, match="uint8"):
        align_face(np.zeros((50, 50, 3), np.float32), ARCFACE_TEMPLATE)
    with pytest.raises(ValueError, match="shape"):
        align_face(np.zeros((50, 50), np.uint8), ARCFACE_TEMPLATE)


def test_center_crop_codec_and_sharpness(photo):
    crop = center_crop(photo)
    assert crop.shape == (112, 112, 3)
    np.testing.assert_array_equal(decode_image(encode_image(crop, "png")), crop)
    jpeg = decode_image(encode_image(crop, "jpeg", 95))
    assert np.abs(jpeg.astype(int) - crop).mean() < 6  # busy crop, 4:2:0 chroma subsampling
    red = np.zeros((16, 16, 3), np.uint8)
    red[..., 0] = 255
    pixel = decode_image(encode_image(red, "jpeg"))[8, 8]
    assert pixel[0] > 240 and pixel[2] < 15  # RGB order survives the codec
    with pytest.raises(ValueError, match="cannot decode"):
        decode_image(b"not an image")
    blurred = cv2.GaussianBlur(crop, (0, 0), 3)
    assert 0.0 <= sharpness(blurred) < sharpness(crop) < 1.0
