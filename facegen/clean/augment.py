"""Top-up augmentation of kept identities (ALGORITHMS.md 1.4), in numpy/OpenCV (no torchvision).

The list and its order follow the HybridGen release: horizontal flip (p), colour jitter (p),
grayscale (p), random affine (p), rotation (p), then Gaussian blur and low resolution always.
Parameter ranges follow torchvision's conventions for the same arguments (jitter factors drawn
from ``[max(0, 1 - x), 1 + x]``, hue shift from ``[-h, h]`` of a full turn, jitter components
in random order, uncovered pixels filled with black). Images are RGB ``uint8`` ``[H, W, 3]``.
"""

from __future__ import annotations

import cv2
import numpy as np

from facegen.config import AugmentSettings
from facegen.images import low_resolution


def _check_settings(settings: AugmentSettings) -> None:
    b, c, s, h = settings.color_jitter
    if min(b, c, s, h) < 0 or h > 0.5:
        raise ValueError(f"clean.augment.color_jitter: need non-negative values and hue <= 0.5, got {settings.color_jitter}")
    k = settings.blur_kernel
    if k < 1 or k % 2 == 0:
        raise ValueError(f"clean.augment.blur_kernel: must be odd and >= 1 (1 = no blur), got {k}")
    lo, hi = settings.blur_sigma
    if not 0 < lo <= hi:
        raise ValueError(f"clean.augment.blur_sigma: need 0 < low <= high, got {settings.blur_sigma}")
    lo, hi = settings.affine_scale
    if not 0 < lo <= hi:
        raise ValueError(f"clean.augment.affine_scale: need 0 < low <= high, got {settings.affine_scale}")


def _luma(img: np.ndarray) -> np.ndarray:
    """ITU-R 601-2 luma of an RGB float image, ``[H, W]``."""
    return img[..., 0] * 0.299 + img[..., 1] * 0.587 + img[..., 2] * 0.114


def grayscale(img: np.ndarray) -> np.ndarray:
    """RGB float image -> 3 equal channels of its luma."""
    return np.repeat(_luma(img)[..., None], 3, axis=2)


def adjust_hue(img: np.ndarray, shift: float) -> np.ndarray:
    """Rotate the hue of an RGB float image in ``[0, 255]`` by ``shift`` turns."""
    hsv = cv2.cvtColor(np.ascontiguousarray(img / 255.0, dtype=np.float32), cv2.COLOR_RGB2HSV)
    hsv[..., 0] = np.mod(hsv[..., 0] + shift * 360.0, 360.0)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB) * 255.0


def color_jitter(img: np.ndarray, rng: np.random.Generator, strengths: tuple[float, float, float, float]) -> np.ndarray:
    """Brightness, contrast, saturation (factors) and hue (shift) in a random order, clipped to [0, 255]."""
    brightness, contrast, saturation, hue = strengths
    for op in rng.permutation(4):
        if op == 0 and brightness > 0:
            img = img * rng.uniform(max(0.0, 1 - brightness), 1 + brightness)
        elif op == 1 and contrast > 0:
            mean = _luma(img).mean()
            img = mean + (img - mean) * rng.uniform(max(0.0, 1 - contrast), 1 + contrast)
        elif op == 2 and saturation > 0:
            gray = grayscale(img)
            img = gray + (img - gray) * rng.uniform(max(0.0, 1 - saturation), 1 + saturation)
        elif op == 3 and hue > 0:
            img = adjust_hue(img, rng.uniform(-hue, hue))
        img = np.clip(img, 0.0, 255.0)
    return img


def affine_matrix(size: tuple[int, int], angle: float, translate: tuple[float, float], scale: float, shear: float) -> np.ndarray:
    """2x3 forward matrix about the image centre: scale, x-shear (deg), rotation (deg, counter-clockwise), shift (px)."""
    h, w = size
    cx, cy = (w - 1) * 0.5, (h - 1) * 0.5
    a, s = np.deg2rad(angle), np.deg2rad(shear)
    rotation = np.array([[np.cos(a), np.sin(a)], [-np.sin(a), np.cos(a)]])
    linear = rotation @ np.array([[1.0, np.tan(s)], [0.0, 1.0]]) * scale
    centre = np.array([cx, cy])
    offset = centre + np.asarray(translate, dtype=np.float64) - linear @ centre
    return np.hstack([linear, offset[:, None]])


def warp(img: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """Bilinear affine warp keeping the size; uncovered pixels are black."""
    h, w = img.shape[:2]
    return cv2.warpAffine(img, matrix, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=(0, 0, 0))


def augment_face(image: np.ndarray, rng: np.random.Generator, settings: AugmentSettings) -> np.ndarray:
    """One random augmentation of an RGB ``uint8 [H, W, 3]`` face (112x112 aligned in practice).

    Same shape and dtype out; the same ``rng`` state gives the same result. ``blur_kernel = 1``
    and ``low_res_factor = 1.0`` switch the two always-on operations off.
    """
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"augment_face: expected uint8 [H, W, 3] RGB, got {image.dtype} {image.shape}")
    _check_settings(settings)
    h, w = image.shape[:2]
    img = image.astype(np.float32)
    if rng.random() < settings.hflip_p:
        img = img[:, ::-1]
    if rng.random() < settings.color_jitter_p:
        img = color_jitter(img, rng, settings.color_jitter)
    if rng.random() < settings.grayscale_p:
        img = grayscale(img)
    img = np.ascontiguousarray(img)
    if rng.random() < settings.affine_p:
        angle = rng.uniform(-settings.affine_degrees, settings.affine_degrees)
        max_dx, max_dy = settings.affine_translate * w, settings.affine_translate * h
        shift = (float(np.round(rng.uniform(-max_dx, max_dx))), float(np.round(rng.uniform(-max_dy, max_dy))))
        scale = rng.uniform(*settings.affine_scale)
        shear = rng.uniform(-settings.affine_shear, settings.affine_shear)
        img = warp(img, affine_matrix((h, w), angle, shift, scale, shear))
    if rng.random() < settings.rotation_p:
        angle = rng.uniform(-settings.rotation_degrees, settings.rotation_degrees)
        img = warp(img, affine_matrix((h, w), angle, (0.0, 0.0), 1.0, 0.0))
    if settings.blur_kernel > 1:
        sigma = rng.uniform(*settings.blur_sigma)
        k = settings.blur_kernel
        img = cv2.GaussianBlur(img, (k, k), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REFLECT_101)
    img = low_resolution(img, settings.low_res_factor)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def top_up(images: list[np.ndarray], target: int, rng: np.random.Generator, settings: AugmentSettings) -> list[tuple[int, np.ndarray]]:
    """Augmented images that bring ``len(images)`` up to ``target`` in total.

    Sources are taken round-robin over one seeded permutation of ``images`` (so every image is
    used once before any is used twice); returns ``(source_index, augmented image)`` pairs, empty
    when there are already ``target`` images or more.
    """
    needed = int(target) - len(images)
    if needed <= 0:
        return []
    if not images:
        raise ValueError(f"top_up: no source images to augment up to {target}")
    order = rng.permutation(len(images))
    out = []
    for k in range(needed):
        source = int(order[k % len(images)])
        out.append((source, augment_face(images[source], rng, settings)))
    return out
