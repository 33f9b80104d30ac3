"""The faces stage on real photos: detection when the generator has no landmarks, one face per
image or an error row with the reason, quality, and dlib's embedder on its own chip."""

import json
import os

import cv2
import insightface
import numpy as np
import pytest
from insightface.data import get_image

from facegen.config import DetectorSettings, EmbedderSettings, FaceSettings, detector_settings
from facegen.faces.align import sharpness
from facegen.faces.detect import build_detector
from facegen.faces.embed import build_embedder
from facegen.faces.stage import FaceStage
from facegen.images import decode_image, encode_image
from facegen.schema import GENERATED, LANDMARK_DIM, rows_to_batch, sample_schema, table_from_batch

NAN = np.full(LANDMARK_DIM, np.nan, np.float32)


def _hanks_in_frame(side: int = 336, face: int = 224) -> np.ndarray:
    hanks = cv2.imread(os.path.join(os.path.dirname(insightface.__file__), "data", "images", "Tom_Hanks_54745.png"))[:, :, ::-1]
    frame = np.full((side, side, 3), 40, np.uint8)
    top = (side - face) // 2
    frame[top : top + face, top : top + face] = cv2.resize(hanks, (face, face), interpolation=cv2.INTER_CUBIC)
    return frame


@pytest.fixture(scope="module")
def t1() -> np.ndarray:
    return cv2.cvtColor(get_image("t1"), cv2.COLOR_BGR2RGB)


def _row(k: int, image: np.ndarray, landmarks=NAN) -> dict:
    return {"identity_id": 3, "block_id": 0, "sample_idx": k, "seed": k, "source": "test", "image": encode_image(image, "png"),
            "landmarks": np.asarray(landmarks, np.float32), "true_identity_id": -1, "meta": "{}", "status": "ok", "reason": ""}


def test_stage_detects_keeps_one_face_and_explains_rejections(t1):
    hanks = _hanks_in_frame()
    small = np.full((336, 336, 3), 40, np.uint8)
    small[150:180, 150:180] = cv2.resize(hanks[56:280, 56:280], (30, 30), interpolation=cv2.INTER_AREA)
    from facegen.faces.align import ARCFACE_TEMPLATE

    known = (ARCFACE_TEMPLATE * 2 + 56).reshape(-1)  # the generator's own landmarks win over detection
    rows = [_row(0, hanks), _row(1, t1), _row(2, np.full((256, 256, 3), 128, np.uint8)), _row(3, small), _row(4, hanks, known)]
    settings = FaceSettings(image_format="png", detector=DetectorSettings(kind="mtcnn", device="cpu", min_size=40),
                            embedder=EmbedderSettings(kind="dlib"))
    stage = FaceStage(settings)
    out = stage(rows_to_batch(rows, GENERATED))
    table = table_from_batch(out, sample_schema(128))
    assert table.column("status").to_pylist() == ["ok", "error", "error", "error", "ok"]
    reasons = table.column("reason").to_pylist()
    assert reasons[1].startswith("faces: identity 3 sample 1: more than one large face (6 faces")
    assert reasons[2].startswith("faces: identity 3 sample 2: no face")
    assert reasons[3].startswith("faces: identity 3 sample 3: face too small (largest ") and "< min_size 40" in reasons[3]
    face = json.loads(out["meta"][0])["face"]
    assert face["detector"] == "mtcnn" and face["faces_found"] == 1 and face["score"] > 0.95
    crop = decode_image(out["image"][0])
    assert out["quality"][0] == pytest.approx(face["score"] * sharpness(crop), rel=1e-3)
    assert "face" not in json.loads(out["meta"][4]) and out["quality"][4] == pytest.approx(sharpness(decode_image(out["image"][4])), rel=1e-3)
    # the generator's landmarks (the template, framed) give back insightface's own aligned crop
    original = cv2.imread(os.path.join(os.path.dirname(insightface.__file__), "data", "images", "Tom_Hanks_54745.png"))[:, :, ::-1]
    assert np.abs(decode_image(out["image"][4]).astype(int) - original).mean() < 4
    emb = out["embedding"]
    assert emb.shape == (5, 128) and np.isnan(emb[1:4]).all()
    assert float(emb[0] @ emb[4]) > 0.9


def test_dlib_embedder_is_robust_to_crops_rescaling_and_jpeg(t1):
    """The same face under small crops, rescaling and JPEG re-encoding embeds closer than t1's different people."""
    detector = build_detector(detector_settings(kind="mtcnn", device="cpu", mtcnn_min_face=48))  # t1's faces are ~100 px
    embedder = build_embedder(EmbedderSettings(kind="dlib"))

    def embed_faces(image):
        faces = [d for d in detector.detect(image) if d.score >= 0.9]
        return faces, embedder.embed_crops(np.stack([embedder.crop.cut(image, d.landmarks) for d in faces]))

    faces, reference = embed_faces(t1)
    assert len(faces) == 6
    centres = np.array([(d.box[:2] + d.box[2:]) / 2 for d in faces])
    h, w = t1.shape[:2]
    jpeg = decode_image(encode_image(t1, "jpeg", 40))
    variants = [
        (t1[20:, 30:], np.array([30, 20])),  # crops of the frame
        (t1[: h - 25, : w - 40], np.zeros(2)),
        (cv2.resize(t1, None, fx=0.75, fy=0.75, interpolation=cv2.INTER_AREA), None),  # rescaling
        (cv2.resize(t1, None, fx=1.3, fy=1.3, interpolation=cv2.INTER_CUBIC), None),
        (jpeg, np.zeros(2)),  # JPEG quality 40
    ]
    same = []
    for image, shift in variants:
        found, emb = embed_faces(image)
        assert len(found) == 6
        scale = image.shape[1] / w if shift is None else 1.0
        shift = np.zeros(2) if shift is None else shift
        for d, e in zip(found, emb):  # match each face to the reference face at the same place
            k = int(np.argmin(np.linalg.norm(centres - ((d.box[:2] + d.box[2:]) / 2 / scale + shift), axis=1)))
            same.append(1.0 - float(e @ reference[k]))
    cos = reference @ reference.T
    different = 1.0 - cos[np.triu_indices(6, 1)]
    print(f"dlib 1-cos: same face under changes max {max(same):.3f}, different people min {min(different):.3f}")
    assert max(same) < min(different), (max(same), min(different))


def test_large_batches_are_detected_in_parts_with_the_same_result(monkeypatch):
    import facegen.faces.stage as stage_module

    rows = rows_to_batch([_row(0, _hanks_in_frame()), _row(1, np.full((256, 256, 3), 128, np.uint8)), _row(2, _hanks_in_frame())], GENERATED)
    stage = FaceStage(FaceSettings(detector=detector_settings(kind="mtcnn", device="cpu", mtcnn_min_face=40)))
    together = stage(rows)
    monkeypatch.setattr(stage_module, "DETECT_PIXELS", 1)  # every image is its own detection call
    apart = stage(rows)
    assert list(apart["status"]) == list(together["status"]) == ["ok", "error", "ok"]
    assert list(apart["image"]) == list(together["image"]) and list(apart["meta"]) == list(together["meta"])
