"""Top-up augmentation (ALGORITHMS.md 1.4) in numpy/OpenCV: each operation, its probability, top_up."""

import cv2
import numpy as np
import pytest

from facegen.clean.augment import affine_matrix, augment_face, top_up, warp
from facegen.config import AugmentSettings

OFF = dict(hflip_p=0.0, color_jitter_p=0.0, grayscale_p=0.0, affine_p=0.0, rotation_p=0.0, blur_kernel=1, low_res_factor=1.0)


def only(**enabled):
    """Settings with every operation off except the given ones."""
    return AugmentSettings(**{**OFF, **enabled})


@pytest.fixture
def face():
    """A 112x112 RGB image with structure in every channel (not left-right symmetric)."""
    rng = np.random.default_rng(0)
    small = rng.integers(30, 226, (14, 14, 3), dtype=np.uint8)
    return cv2.resize(small, (112, 112), interpolation=cv2.INTER_LINEAR)


def test_default_list_keeps_shape_dtype_and_changes_the_image(face):
    out = augment_face(face, np.random.default_rng(1), AugmentSettings())
    assert out.shape == (112, 112, 3) and out.dtype == np.uint8
    assert not np.array_equal(out, face)  # blur and low resolution always apply


def test_same_seed_same_result_other_seed_other_result(face):
    settings = AugmentSettings()
    a = augment_face(face, np.random.default_rng(7), settings)
    b = augment_face(face, np.random.default_rng(7), settings)
    c = augment_face(face, np.random.default_rng(8), settings)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_everything_off_is_identity(face):
    np.testing.assert_array_equal(augment_face(face, np.random.default_rng(0), only()), face)


def test_flip_at_p1_is_fliplr(face):
    np.testing.assert_array_equal(augment_face(face, np.random.default_rng(0), only(hflip_p=1.0)), np.fliplr(face))


def test_grayscale_at_p1_has_equal_channels_of_the_luma(face):
    out = augment_face(face, np.random.default_rng(0), only(grayscale_p=1.0))
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()
    luma = face[..., 0] * 0.299 + face[..., 1] * 0.587 + face[..., 2] * 0.114
    np.testing.assert_allclose(out[..., 0], luma, atol=0.51)


def test_brightness_jitter_scales_by_a_factor_in_range():
    img = np.full((112, 112, 3), 100, np.uint8)
    settings = only(color_jitter_p=1.0, color_jitter=(0.4, 0.0, 0.0, 0.0))
    factors = [augment_face(img, np.random.default_rng(s), settings)[0, 0, 0] / 100.0 for s in range(60)]
    assert min(factors) >= 0.6 - 0.01 and max(factors) <= 1.4 + 0.01
    assert min(factors) < 0.9 and max(factors) > 1.1


def test_saturation_and_hue_leave_gray_alone_but_change_colour():
    gray = np.full((112, 112, 3), 120, np.uint8)
    colour = np.zeros((112, 112, 3), np.uint8)
    colour[..., 0] = 200  # pure red
    settings = only(color_jitter_p=1.0, color_jitter=(0.0, 0.0, 0.4, 0.1))
    for seed in range(5):
        np.testing.assert_allclose(augment_face(gray, np.random.default_rng(seed), settings), gray, atol=1)
    changed = [not np.array_equal(augment_face(colour, np.random.default_rng(s), settings), colour) for s in range(5)]
    assert all(changed)


def test_contrast_jitter_keeps_the_mean_of_a_gray_image(face):
    gray = np.repeat(face[..., :1], 3, axis=2)
    out = augment_face(gray, np.random.default_rng(3), only(color_jitter_p=1.0, color_jitter=(0.0, 0.4, 0.0, 0.0)))
    assert abs(float(out.mean()) - float(gray.mean())) < 1.0
    assert abs(float(out.std()) - float(gray.std())) > 0.5


def test_affine_matrix_rotates_counter_clockwise_about_the_centre():
    m = affine_matrix((112, 112), angle=90.0, translate=(0.0, 0.0), scale=1.0, shear=0.0)
    centre = np.array([55.5, 55.5])
    right_of_centre = m @ np.array([65.5, 55.5, 1.0])
    np.testing.assert_allclose(right_of_centre, centre + [0.0, -10.0], atol=1e-9)  # up on screen
    m = affine_matrix((112, 112), angle=0.0, translate=(3.0, -2.0), scale=2.0, shear=0.0)
    np.testing.assert_allclose(m @ np.array([56.5, 55.5, 1.0]), centre + [2.0 + 3.0, -2.0], atol=1e-9)


def test_warp_moves_a_dot_and_fills_black():
    img = np.zeros((112, 112, 3), np.float32)
    img[55:57, 70:72] = 255.0
    out = warp(img, affine_matrix((112, 112), 90.0, (0.0, 0.0), 1.0, 0.0))
    ys, xs = np.nonzero(out[..., 0] > 128)
    assert abs(xs.mean() - 55.5) < 1 and abs(ys.mean() - (55.5 - 15)) < 1
    white = np.full((112, 112, 3), 255, np.uint8)
    rotated = augment_face(white, np.random.default_rng(0), only(rotation_p=1.0, rotation_degrees=5.0))
    assert rotated[0, 0].max() < 255 or rotated[0, -1].max() < 255  # a corner came from outside


def test_random_affine_stays_within_its_ranges(face):
    settings = only(affine_p=1.0)
    outs = [augment_face(face, np.random.default_rng(s), settings) for s in range(10)]
    assert all(not np.array_equal(o, face) for o in outs)
    # scale 0.95-1.05, shift <= 6 px, angle <= 10 deg: the centre pixel stays near its neighbourhood
    for o in outs:
        assert np.abs(o[40:72, 40:72].astype(float).mean() - face[40:72, 40:72].mean()) < 20


def test_gaussian_blur_smooths(face):
    checker = (np.indices((112, 112)).sum(0) % 2 * 255).astype(np.uint8)
    checker = np.repeat(checker[..., None], 3, axis=2)
    out = augment_face(checker, np.random.default_rng(0), only(blur_kernel=3))
    assert out.std() < checker.std() * 0.9


def test_low_resolution_removes_one_pixel_detail():
    checker = (np.indices((112, 112)).sum(0) % 2 * 255).astype(np.uint8)
    checker = np.repeat(checker[..., None], 3, axis=2)
    out = augment_face(checker, np.random.default_rng(0), only(low_res_factor=0.5))
    assert out.std() < 2.0 and abs(float(out.mean()) - 127.5) < 1.0  # each 2x2 averaged away


@pytest.mark.parametrize("field,p", [("hflip_p", 0.5), ("grayscale_p", 0.2), ("color_jitter_p", 0.8)])
def test_probabilities_over_many_draws(face, field, p):
    extra = {"color_jitter": (0.4, 0.0, 0.0, 0.0)} if field == "color_jitter_p" else {}
    settings = only(**{field: p}, **extra)
    rng = np.random.default_rng(123)
    draws = 600
    applied = sum(not np.array_equal(augment_face(face, rng, settings), face) for _ in range(draws))
    assert abs(applied / draws - p) < 4 * np.sqrt(p * (1 - p) / draws) + 0.01


def test_invalid_settings_name_the_field(face):
    with pytest.raises(ValueError, match="blur_kernel"):
        augment_face(face, np.random.default_rng(0), AugmentSettings(blur_kernel=4))
    with pytest.raises(ValueError, match="color_jitter"):
        augment_face(face, np.random.default_rng(0), AugmentSettings(color_jitter=(0.4, 0.4, 0.4, 0.7)))
    with pytest.raises(ValueError, match="uint8"):
        augment_face(face.astype(np.float32), np.random.default_rng(0), AugmentSettings())


def test_top_up_round_robin_over_a_seeded_permutation(face):
    images = [face, np.fliplr(face).copy(), face[::-1].copy()]
    settings = AugmentSettings()
    out = top_up(images, 10, np.random.default_rng(5), settings)
    assert len(out) == 7
    sources = [s for s, _ in out]
    assert sorted(sources[:3]) == [0, 1, 2] and sources[3:6] == sources[:3] and sources[6] == sources[0]
    assert all(img.shape == (112, 112, 3) and img.dtype == np.uint8 for _, img in out)
    again = top_up(images, 10, np.random.default_rng(5), settings)
    assert [s for s, _ in again] == sources
    assert all(np.array_equal(a, b) for (_, a), (_, b) in zip(out, again))


def test_top_up_edge_cases(face):
    assert top_up([face] * 5, 5, np.random.default_rng(0), AugmentSettings()) == []
    assert top_up([face] * 5, 3, np.random.default_rng(0), AugmentSettings()) == []
    with pytest.raises(ValueError, match="no source images"):
        top_up([], 4, np.random.default_rng(0), AugmentSettings())
