"""Training augmentations of aligned 112x112 faces, in numpy/OpenCV (no torchvision).

The DataCV recipe (ALGORITHMS.md 4): horizontal flip, random erasing, and AdaFace's three
augmentations (Kim et al., "AdaFace: Quality Adaptive Margin for Face Recognition", CVPR 2022):

- crop: a random box (area share ``crop_scale``, aspect ``crop_ratio``, the random-resized-crop
  draw) is kept *in place* and the rest blacked out, so the face stays aligned;
- low resolution: down-sample to a random share (``low_res_scale``) of the side and back up, one
  interpolation (nearest, linear, area, cubic, Lanczos) drawn for both resizes;
- photometric: brightness, contrast and saturation jitter (factors from ``[1 - x, 1 + x]``).

Order: crop, low resolution, photometric, flip, erasing (a grey box, which is 0 after the
``[-1, 1]`` normalisation, the value of a random erasing applied to the normalised tensor).
Every probability is a setting; every draw comes from the ``rng`` passed in, so a sample's
augmentation is reproducible from its seed, whichever thread runs it.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from facegen.clean.augment import color_jitter
from facegen.config import TrainAugmentSettings
from facegen.images import low_resolution

INTERPOLATIONS = (cv2.INTER_NEAREST, cv2.INTER_LINEAR, cv2.INTER_AREA, cv2.INTER_CUBIC, cv2.INTER_LANCZOS4)
ERASE_VALUE = 128  # uint8 grey: ~0 after (x / 127.5 - 1)


def random_box(
    height: int, width: int, rng: np.random.Generator, scale: tuple[float, float], ratio: tuple[float, float]
) -> tuple[int, int, int, int] | None:
    """``(top, left, h, w)`` of a box with area share in ``scale`` and aspect ``w/h`` in ``ratio``; None after 10 misses."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    return None


def crop_in_place(img: np.ndarray, rng: np.random.Generator, scale: tuple[float, float], ratio: tuple[float, float]) -> np.ndarray:
    """Keep a random box where it is and black out the rest (AdaFace's crop augmentation)."""
    box = random_box(img.shape[0], img.shape[1], rng, scale, ratio)
    if box is None:
        return img
    top, left, h, w = box
    out = np.zeros_like(img)
    out[top : top + h, left : left + w] = img[top : top + h, left : left + w]
    return out


def random_low_resolution(img: np.ndarray, rng: np.random.Generator, scale: tuple[float, float]) -> np.ndarray:
    """Down-sample to a random share of the side and back, with one random interpolation."""
    share = rng.uniform(*scale)
    interpolation = INTERPOLATIONS[int(rng.integers(len(INTERPOLATIONS)))]
    return low_resolution(img, share, interpolation)


def photometric(img: np.ndarray, rng: np.random.Generator, strengths: tuple[float, float, float]) -> np.ndarray:
    """Brightness, contrast and saturation jitter in random order (no hue shift), ``uint8`` out."""
    jittered = color_jitter(img.astype(np.float32), rng, (strengths[0], strengths[1], strengths[2], 0.0))
    return np.clip(np.rint(jittered), 0, 255).astype(np.uint8)


def random_erase(img: np.ndarray, rng: np.random.Generator, scale: tuple[float, float], ratio: tuple[float, float]) -> np.ndarray:
    """Fill a random box (area share ``scale``, aspect ``ratio``) with grey; unchanged if none fits."""
    box = random_box(img.shape[0], img.shape[1], rng, scale, ratio)
    if box is None:
        return img
    top, left, h, w = box
    out = img.copy()
    out[top : top + h, left : left + w] = ERASE_VALUE
    return out


class TrainAugment:
    """``augment(image uint8 [H, W, 3] RGB, rng) -> uint8 image``, the settings' list in order."""

    def __init__(self, settings: TrainAugmentSettings | None = None):
        self.settings = settings or TrainAugmentSettings()

    def __call__(self, img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        s = self.settings
        # One uniform draw per operation, always, so one operation's probability does not shift the
        # random stream of the others.
        draws = rng.random(5)
        if draws[0] < s.crop_p:
            img = crop_in_place(img, rng, s.crop_scale, s.crop_ratio)
        if draws[1] < s.low_res_p:
            img = random_low_resolution(img, rng, s.low_res_scale)
        if draws[2] < s.photometric_p:
            img = photometric(img, rng, s.photometric)
        if draws[3] < s.hflip_p:
            img = img[:, ::-1]
        if draws[4] < s.erase_p:
            img = random_erase(img, rng, s.erase_scale, s.erase_ratio)
        return np.ascontiguousarray(img)
