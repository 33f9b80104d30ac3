"""Detectors on real photos that ship in installed packages, the one-face rule, and SCRFD via ONNX."""

import os

import cv2
import insightface
import numpy as np
import pytest
import skimage.data
from insightface.data import get_image
from insightface.utils.face_align import norm_crop

from facegen.config import DetectorSettings, detector_settings
from facegen.faces.align import ARCFACE_CROP, ARCFACE_TEMPLATE
from facegen.faces.detect import REASON_NO_FACE, REASON_SEVERAL, REASON_TOO_SMALL, Detection, FaceRejected, build_detector, choose_face
from facegen.models.dlib_face import DLIB5_IN_ARCFACE_112, DlibFaces, measure_dlib5_in_arcface
from facegen.models.mtcnn import read_joblib_arrays, mtcnn_weights_dir
from tiny_scrfd import BOX_DISTANCES, LANDMARK_OFFSETS, build_tiny_scrfd
from untrusted import RunsShell

PAD, UP = 56, 3  # the 112 px Tom Hanks crop, padded by 56 px and upscaled 3x (dlib's HOG needs ~80 px faces)


def _iou(a, b) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


@pytest.fixture(scope="module")
def photos() -> dict:
    hanks = cv2.imread(os.path.join(os.path.dirname(insightface.__file__), "data", "images", "Tom_Hanks_54745.png"))
    framed = cv2.copyMakeBorder(hanks, PAD, PAD, PAD, PAD, cv2.BORDER_CONSTANT, value=0)
    framed = cv2.resize(framed, None, fx=UP, fy=UP, interpolation=cv2.INTER_CUBIC)
    return {
        "t1": cv2.cvtColor(get_image("t1"), cv2.COLOR_BGR2RGB),
        "hanks": np.ascontiguousarray(framed[:, :, ::-1]),
        "astronaut": skimage.data.astronaut(),
    }


@pytest.fixture(scope="module")
def detectors() -> dict:
    return {kind: build_detector(DetectorSettings(kind=kind, device="cpu")) for kind in ("mtcnn", "dlib")}


_FOUND: dict = {}


def _faces(detector, image, min_score):
    """Detections scoring at least ``min_score`` (each photo is detected once per module)."""
    key = (detector.kind, image.ctypes.data, image.shape)
    if key not in _FOUND:
        _FOUND[key] = detector.detect(image)
    return [d for d in _FOUND[key] if d.score >= min_score]


def test_mtcnn_and_dlib_find_every_face_with_matching_landmarks(photos, detectors):
    hanks_truth = (ARCFACE_TEMPLATE + PAD) * UP  # the crop is insightface-aligned: its landmarks are the template
    expected = {"t1": 6, "hanks": 1, "astronaut": 1}
    errors = []
    for name, image in photos.items():
        mtcnn = _faces(detectors["mtcnn"], image, 0.9)
        dlib = _faces(detectors["dlib"], image, 0.5)
        assert len(mtcnn) == expected[name], name
        # dlib's HOG also fires on the astronaut's suit; every real face is matched by both detectors
        pairs = [(m, max(dlib, key=lambda d: _iou(m.box, d.box))) for m in mtcnn]
        assert all(_iou(m.box, d.box) > 0.4 for m, d in pairs), name
        for m, d in pairs:  # distances in units of the inter-ocular distance
            errors.append(np.linalg.norm(m.landmarks - d.landmarks, axis=1) / np.linalg.norm(m.landmarks[1] - m.landmarks[0]))
        if name == "hanks":  # the template is the similarity fit of a turned face: its nose sits ~0.25 IOD off it
            for det in (mtcnn[0], pairs[0][1]):
                iod = np.linalg.norm(hanks_truth[1] - hanks_truth[0])
                assert (np.linalg.norm(det.landmarks - hanks_truth, axis=1) / iod).max() < 0.3
    errors = np.array(errors)  # [8 faces, 5 points]
    print(f"mtcnn vs dlib landmarks (IOD units): eyes max {errors[:, :2].max():.3f}, median {np.median(errors):.3f}, max {errors.max():.3f}")
    assert errors[:, :2].max() < 0.2  # eye centres: both detectors measure them
    assert np.median(errors) < 0.2  # nose tip and mouth corners of dlib are the mean face's, so on
    assert errors.max() < 0.6  # strongly turned faces they stray further (t1's smallest face: 0.5)


def test_aligned_crops_match_insightface_norm_crop(photos, detectors):
    for name, image in photos.items():
        for det in _faces(detectors["mtcnn"], image, 0.9):
            ours = ARCFACE_CROP.cut(image, det.landmarks).astype(np.float64)
            theirs = norm_crop(np.ascontiguousarray(image[:, :, ::-1]), det.landmarks)[:, :, ::-1].astype(np.float64)
            assert np.abs(ours - theirs).mean() < 1.0, name


def test_dlib5_template_is_what_the_photos_measure(photos, detectors):
    """DLIB5_IN_ARCFACE_112 re-measured: t1's faces (aligned by MTCNN) and the aligned Tom Hanks crop."""
    dlib_faces, arcface = [], []
    raw = DlibFaces("hog", 1)
    for name in ("t1", "hanks"):
        boxes, _, points = raw.detect(photos[name])
        mtcnn = _faces(detectors["mtcnn"], photos[name], 0.9)
        for box, pts in zip(boxes, points):
            best = max(mtcnn, key=lambda m: _iou(m.box, box))
            if _iou(best.box, box) > 0.4:
                dlib_faces.append(pts)
                arcface.append((ARCFACE_TEMPLATE + PAD) * UP if name == "hanks" else best.landmarks)
    assert len(dlib_faces) == 7
    np.testing.assert_allclose(measure_dlib5_in_arcface(dlib_faces, arcface), DLIB5_IN_ARCFACE_112, atol=0.5)


def test_mtcnn_batched_equals_one_by_one(photos, detectors):
    images = [photos["astronaut"], cv2.resize(photos["t1"], (512, 354)), photos["astronaut"][:, ::-1].copy()]
    batched = detectors["mtcnn"].detect_batch(images)
    for image, together in zip(images, batched):
        alone = detectors["mtcnn"].detect(image)
        assert len(alone) == len(together)
        for a, b in zip(alone, together):
            np.testing.assert_allclose(a.box, b.box, atol=1e-3)
            np.testing.assert_allclose(a.landmarks, b.landmarks, atol=1e-3)
    assert len(_faces(detectors["mtcnn"], images[1], 0.9)) == 6  # t1 at 512 px: all six faces still found


def test_one_face_rule():
    settings = DetectorSettings(kind="mtcnn", min_size=40, rival_size_ratio=0.6)

    def face(x, y, side, score=0.99):
        return Detection(np.array([x, y, x + side, y + side], np.float32), score, np.zeros((5, 2), np.float32))

    centre = face(80, 80, 100)
    # faces below min_size, or below rival_size_ratio of the kept one, do not make the image ambiguous
    assert choose_face([face(0, 0, 45), centre, face(200, 200, 30)], (260, 260), settings) is centre
    cases = [([], REASON_NO_FACE), ([face(80, 80, 100, 0.5)], REASON_NO_FACE), ([face(80, 80, 30)], REASON_TOO_SMALL),
             ([centre, face(150, 150, 70)], REASON_SEVERAL)]
    for faces, reason in cases:
        with pytest.raises(FaceRejected) as err:
            choose_face(faces, (260, 260), settings)
        assert err.value.reason == reason and str(err.value).startswith(reason)


def test_insightface_detector_reads_scrfd_layout_from_a_model_folder(tmp_path):
    folder = tmp_path / "pack"
    folder.mkdir()
    build_tiny_scrfd(str(folder / "det_tiny.onnx"))
    (folder / "notes.onnx").write_bytes(b"not a model")  # a folder may hold other files
    detector = build_detector(detector_settings(kind="insightface", path=str(folder), det_size=160))
    image = np.zeros((240, 320, 3), np.uint8)  # scaled by 0.5 into the 160 px input, padded below
    image[96:112, 160:176] = 255  # one white network-input cell at anchor (80, 48): a face at (160, 96)
    (det,) = detector.detect(image)
    anchor = np.array([160.0, 96.0])
    np.testing.assert_allclose(det.box, np.r_[anchor - 2 * BOX_DISTANCES[:2], anchor + 2 * BOX_DISTANCES[2:]], atol=0.5)
    np.testing.assert_allclose(det.landmarks, anchor + 2 * LANDMARK_OFFSETS, atol=0.5)
    assert det.score > 0.95
    assert detector.detect(np.zeros((240, 320, 3), np.uint8)) == []
    with pytest.raises(FileNotFoundError, match="no SCRFD/RetinaFace detection .onnx"):
        build_detector(detector_settings(kind="insightface", path=str(tmp_path)))


def test_mtcnn_weights_are_read_without_unpickling_code(tmp_path):
    arrays = read_joblib_arrays(os.path.join(mtcnn_weights_dir(), "onet.lz4"))
    assert [a.shape for a in arrays][:2] == [(3, 3, 3, 32), (32,)] and all(a.dtype == np.float32 for a in arrays)
    import pickle

    path = tmp_path / "evil.lz4"
    path.write_bytes(pickle.dumps([RunsShell(tmp_path / "ran")]))
    with pytest.raises(ValueError, match="os.system is not allowed|posix.system is not allowed"):
        read_joblib_arrays(str(path))
    assert not (tmp_path / "ran").exists()
