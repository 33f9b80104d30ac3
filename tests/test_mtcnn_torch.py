"""MTCNN's cascade on the device (facegen.models.mtcnn_torch) against the host cascade (OpenCV + numpy),
on the real photos that ship in installed packages and on its parts: resizes, crops, NMS."""

import os

import cv2
import insightface
import numpy as np
import pytest
import skimage.data
import torch
from insightface.data import get_image

from facegen.config import DetectorSettings, detector_settings
from facegen.faces.detect import build_detector
from facegen.models import mtcnn as host
from facegen.models import mtcnn_torch as device


@pytest.fixture(scope="module")
def photos() -> dict:
    hanks = cv2.imread(os.path.join(os.path.dirname(insightface.__file__), "data", "images", "Tom_Hanks_54745.png"))
    framed = cv2.resize(cv2.copyMakeBorder(hanks, 56, 56, 56, 56, cv2.BORDER_CONSTANT, value=0), None, fx=3, fy=3,
                        interpolation=cv2.INTER_CUBIC)
    return {"t1": cv2.cvtColor(get_image("t1"), cv2.COLOR_BGR2RGB), "hanks": np.ascontiguousarray(framed[:, :, ::-1]),
            "astronaut": skimage.data.astronaut()}


@pytest.fixture(scope="module")
def cascades() -> tuple:
    return host.MTCNN("cpu", cascade="numpy"), host.MTCNN("cpu", cascade="torch")


def test_the_device_cascade_finds_the_same_faces_on_real_photos(photos, cascades):
    """Same faces (6 in the group photo t1, Tom Hanks, the astronaut and her badge's face), boxes and
    landmarks within 0.05 px, scores within 0.005; one batch of mixed sizes gives what single calls give."""
    numpy_path, torch_path = cascades
    names = ["t1", "hanks", "astronaut", "hanks"]
    want = numpy_path.detect_batch([photos[n] for n in names])
    got = torch_path.detect_batch([photos[n] for n in names])
    assert [len(w[1]) for w in want] == [6, 1, 2, 1]
    for (boxes, scores, marks), (want_boxes, want_scores, want_marks) in zip(got, want):
        assert len(scores) == len(want_scores)
        assert np.abs(boxes - want_boxes).max() < 0.05 and np.abs(marks - want_marks).max() < 0.05
        assert np.abs(scores - want_scores).max() < 0.005
    single = torch_path.detect_batch([photos["hanks"]])[0]
    np.testing.assert_allclose(single[0], got[1][0], atol=1e-4)


def test_the_detector_setting_picks_the_cascade(photos):
    auto = build_detector(DetectorSettings(kind="mtcnn", device="cpu"))
    chosen = build_detector(detector_settings(kind="mtcnn", device="cpu", mtcnn_cascade="torch"))
    assert (auto.model.cascade, chosen.model.cascade) == ("numpy", "torch")  # auto: the host glue on a CPU
    found = chosen.detect(photos["astronaut"])
    assert len(found) == 2 and found[0].score > 0.99
    with pytest.raises(ValueError, match="mtcnn_cascade"):
        detector_settings(kind="mtcnn", mtcnn_cascade="cuda")


def test_pyramid_levels_are_opencv_area_resizes(photos):
    """Every level of t1's pyramid equals cv2.resize(INTER_AREA) but for rounding ties (within one grey level)."""
    image = photos["t1"]
    table = device.summed_area(torch.from_numpy(image)[None])
    h, w = image.shape[:2]
    for scale in host.pyramid_scales(h, w, 20)[:6]:
        size = (int(np.ceil(w * scale)), int(np.ceil(h * scale)))
        want = cv2.resize(image, size, interpolation=cv2.INTER_AREA).astype(np.int16)
        got = device.area_resize(table, size[1], size[0])[0].permute(1, 2, 0).numpy().astype(np.int16)
        assert np.abs(got - want).max() <= 1 and (got == want).mean() > 0.999


def test_crops_match_opencv_on_and_off_the_image(photos):
    """Boxes inside, across the edges and beyond the image, larger and smaller than the network input:
    the crops the host cascade makes, within one grey level (OpenCV's 11-bit bilinear weights)."""
    image = photos["astronaut"]
    rng = np.random.default_rng(0)
    centres = rng.uniform(-20, 532, (60, 2))
    sides = rng.uniform(8, 200, 60)
    boxes = np.concatenate([centres - sides[:, None] / 2, centres + sides[:, None] / 2], axis=1)
    for size in (24, 48):
        want = host.crop_boxes([image], host.Candidates(np.zeros(60, np.int64), boxes, np.ones(60)), size).astype(np.int16)
        batch = torch.from_numpy(image)[None]
        got = device.crop_boxes(batch, device.summed_area(batch), torch.zeros(60, dtype=torch.long), torch.from_numpy(boxes), size)
        got = got.permute(0, 2, 3, 1).numpy().astype(np.int16)
        assert np.abs(got - want).max() <= 1 and (got == want).mean() > 0.98  # measured: 99.1 % (24 px), 98.6 % (48 px)


@pytest.mark.parametrize("mode", ["union", "min"])
def test_batched_nms_keeps_what_greedy_nms_keeps(mode):
    """Per image, the very boxes numpy's greedy NMS keeps, with clustered boxes, tied scores and empty images."""
    rng = np.random.default_rng(1)
    images = rng.integers(0, 7, 900)
    centres = rng.uniform(0, 200, (30, 2))[rng.integers(0, 30, 900)] + rng.normal(0, 6, (900, 2))
    sides = rng.uniform(10, 40, (900, 1))
    boxes = np.concatenate([centres - sides / 2, centres + sides / 2], axis=1)
    scores = np.round(rng.uniform(0.5, 1.0, 900), 2).astype(np.float32)  # many ties
    for threshold in (0.3, 0.5, 0.7):
        want = host.nms_per_image(host.Candidates(images, boxes, scores), threshold, mode)
        kept = device.batched_nms(torch.from_numpy(boxes), torch.from_numpy(scores), torch.from_numpy(images), threshold, mode)
        np.testing.assert_array_equal(boxes[kept.numpy()], want.boxes)
