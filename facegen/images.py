"""Image codecs: encoded bytes <-> uint8 RGB arrays, the one PNG and JPEG encoder every stage uses.

Pixels in memory are RGB ``uint8 (H, W, 3)``; OpenCV does the coding (BGR on its side).
"""

from __future__ import annotations

import cv2
import numpy as np

from facegen.schema import ALIGNED_SIZE

#: Run-length deflate at level 1: about twice as fast as the default on flat, noisy images (the
#: parametric renders), and as small.
PNG_RLE = (cv2.IMWRITE_PNG_COMPRESSION, 1, cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_RLE)


def check_image(image_rgb: np.ndarray) -> np.ndarray:
    """``image_rgb``, or ``ValueError`` unless it is a non-empty uint8 ``(H, W, 3)`` array."""
    if not isinstance(image_rgb, np.ndarray) or image_rgb.dtype != np.uint8:
        raise ValueError(f"image: expected a uint8 numpy array, got {getattr(image_rgb, 'dtype', type(image_rgb))}")
    if image_rgb.ndim != 3 or image_rgb.shape[2] != 3 or min(image_rgb.shape[:2]) == 0:
        raise ValueError(f"image: expected shape (H, W, 3), got {image_rgb.shape}")
    return image_rgb


def decode_image(data: bytes) -> np.ndarray:
    """Encoded image bytes (PNG, JPEG, ...) -> uint8 RGB (H, W, 3); grey and alpha are converted."""
    if data is None or len(data) == 0:
        raise ValueError("empty image bytes")
    bgr = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
    if bgr is None:
        raise ValueError(f"cannot decode image ({len(data)} bytes)")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def decode_aligned(data: bytes) -> np.ndarray:
    """JPEG/PNG bytes -> ``uint8 [112, 112, 3]`` RGB (resized if stored at another size)."""
    img = decode_image(data)
    if img.shape[:2] != (ALIGNED_SIZE, ALIGNED_SIZE):
        img = cv2.resize(img, (ALIGNED_SIZE, ALIGNED_SIZE), interpolation=cv2.INTER_AREA)
    return img


def encode_png(image_rgb: np.ndarray, rle: bool = False) -> bytes:
    """uint8 RGB (H, W, 3) -> PNG bytes (OpenCV's defaults, or :data:`PNG_RLE` with ``rle``)."""
    check_image(image_rgb)
    ok, buf = cv2.imencode(".png", cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR), list(PNG_RLE) if rle else [])
    if not ok:
        raise ValueError("image: png encoding failed")
    return buf.tobytes()


def encode_image(image_rgb: np.ndarray, image_format: str = "jpeg", jpeg_quality: int = 95) -> bytes:
    """uint8 RGB (H, W, 3) -> JPEG or PNG bytes."""
    check_image(image_rgb)
    if image_format == "png":
        return encode_png(image_rgb)
    if image_format != "jpeg":
        raise ValueError(f"image_format: expected 'jpeg' or 'png', got {image_format!r}")
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, int(jpeg_quality)])
    if not ok:
        raise ValueError("image: jpeg encoding failed")
    return buf.tobytes()


def low_resolution(image: np.ndarray, factor: float, interpolation: int = cv2.INTER_LINEAR) -> np.ndarray:
    """Resize down to ``factor`` of each side and back up to the original size with ``interpolation``
    (a camera's low resolution; ``factor >= 1`` leaves the image as it is)."""
    if factor >= 1.0:
        return image
    h, w = image.shape[:2]
    small = cv2.resize(image, (max(1, int(w * factor)), max(1, int(h * factor))), interpolation=interpolation)
    return cv2.resize(small, (w, h), interpolation=interpolation)
