"""Procedural face renderer (CPU, no weights): identities with known landmarks for demos and tests.

An identity is a :class:`FaceParams` drawn from its own random stream: face outline, skin, eyes,
brows, nose, mouth, hair and marks, spread widely so a recognition model can tell identities apart.
Each image adds moderate nuisance from the sample stream (pose, expression, lighting, blur,
occlusion, background), scaled by ``parametric.nuisance``. Faces are drawn anti-aliased at twice
the output size and downsampled; the five ArcFace landmarks (left eye, right eye, nose tip, left
and right mouth corner; "left" = image-left) go through the same geometry, so they are exact.

With probability ``parametric.wrong_identity_rate`` a sample shows another face: an impostor id in
``[2**62, 2**63)``, outside every run, recorded in ``true_identity_id`` and ``meta.wrong_identity``.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from facegen.config import GeneratorSettings, ParametricSettings
from facegen.generators import MAX_IDENTITY_ID, check_identity_id, failure_reason, identity_rows, sample_seed
from facegen.identities.seeds import identity_rng
from facegen.images import encode_png
from facegen.schema import GENERATED, PIXELS, STATUS_OK, error_row, object_column, rows_to_batch

SOURCE = "parametric"
#: Domain tag of the identity-level appearance draws.
IDENTITY_TAG = 0xFACE
HAIR_STYLES = ("bald", "short", "side_part", "long", "curly")
_SHIFT = 4  # fractional bits of OpenCV's sub-pixel drawing
_EYE_WHITE = (238, 236, 230)

Colour = tuple[int, int, int]


@dataclass(frozen=True)
class FaceParams:
    """The appearance of one identity. Lengths are in face half-widths, colours are RGB."""

    face_width: float  # face half-width as a fraction of the image side
    upper_height: float  # centre to crown
    lower_height: float  # centre to chin
    skin: Colour
    eye_x: float  # half the distance between the eye centres
    eye_y: float  # eye line above the centre
    eye_width: float  # eye half-width
    eye_aspect: float  # eye half-height / half-width
    iris: float  # iris radius / eye half-width
    eye_colour: Colour
    brow_gap: float  # brow line above the eye line
    brow_arch: float
    brow_thickness: float
    brow_length: float  # brow half-length / eye half-width
    nose_y: float  # nose tip below the centre
    nose_width: float
    mouth_gap: float  # mouth line below the nose tip
    mouth_width: float  # mouth half-width
    lip_thickness: float
    lip_colour: Colour
    hair_colour: Colour
    hair_style: str
    hair_gap: float  # hairline above the brows
    hair_slope: float  # tilt of the hairline (side parting)
    beard: bool
    mark: tuple[float, float, float] | None  # (x, y, radius) of a mole, or None


def _colour(rgb: Any) -> Colour:
    return tuple(int(v) for v in np.clip(np.round(rgb), 0, 255))  # type: ignore[return-value]


@functools.lru_cache(maxsize=1024)
def identity_params(seed: int, identity_id: int) -> FaceParams:
    """The appearance of ``identity_id``: a pure function of ``(seed, identity_id)``."""
    rng = identity_rng(seed, identity_id, IDENTITY_TAG)
    u = rng.uniform
    skin = np.array([250, 222, 196]) + u(0, 1) * (np.array([92, 58, 40]) - [250, 222, 196]) + rng.normal(0, 8, 3)
    eye_palette = [(75, 45, 25), (60, 110, 170), (70, 120, 70), (110, 115, 125), (35, 25, 20)]
    hair_palette = [(25, 20, 20), (75, 48, 30), (140, 100, 60), (225, 195, 125), (165, 75, 35), (175, 175, 175)]
    eye_colour = np.array(eye_palette[rng.integers(len(eye_palette))]) + rng.normal(0, 15, 3)
    hair_colour = np.array(hair_palette[rng.integers(len(hair_palette))]) + rng.normal(0, 12, 3)
    lip = 0.6 * skin + 0.4 * np.array([175, 60, 70]) + rng.normal(0, 10, 3)
    style = HAIR_STYLES[rng.integers(len(HAIR_STYLES))]
    slope = u(0.2, 0.45) * rng.choice([-1, 1]) if style == "side_part" else 0.0
    mark = (u(-0.7, 0.7), u(-0.1, 0.6), u(0.03, 0.06)) if u() < 0.35 else None
    return FaceParams(
        face_width=u(0.21, 0.26), upper_height=u(1.2, 1.45), lower_height=u(1.2, 1.5), skin=_colour(skin),
        eye_x=u(0.33, 0.5), eye_y=u(0.22, 0.45), eye_width=u(0.14, 0.2), eye_aspect=u(0.45, 0.65),
        iris=u(0.5, 0.7), eye_colour=_colour(eye_colour),
        brow_gap=u(0.18, 0.32), brow_arch=u(-0.02, 0.1), brow_thickness=u(0.04, 0.09), brow_length=u(1.1, 1.5),
        nose_y=u(0.2, 0.5), nose_width=u(0.12, 0.24),
        mouth_gap=u(0.25, 0.42), mouth_width=u(0.3, 0.5), lip_thickness=u(0.05, 0.11), lip_colour=_colour(lip),
        hair_colour=_colour(hair_colour), hair_style=style, hair_gap=u(0.18, 0.45), hair_slope=float(slope),
        beard=bool(u() < 0.2), mark=mark,
    )


def draw_nuisance(rng: np.random.Generator, strength: float) -> dict[str, Any]:
    """Per-image variation; every draw happens whatever ``strength`` is, so streams stay aligned."""
    k, u = strength, rng.uniform
    out = {
        "rotation_deg": u(-15, 15) * k,
        "scale": max(0.5, 1 + u(-0.15, 0.10) * k),
        "shift": [u(-0.08, 0.08) * k, u(-0.08, 0.08) * k],
        "yaw": float(np.clip(u(-1, 1) * k, -1, 1)),
        "smile": u(-0.3, 1.0) * k,
        "mouth_open": max(0.0, u(-0.6, 1.0)) * k,
        "eye_open": float(np.clip(1 - u(0, 0.45) * k, 0.2, 1)),
        "light": u(0, 0.35) * k,
        "light_angle_deg": u(0, 360),
        "brightness": u(-25, 25) * k,
        "contrast": float(np.exp(u(-0.2, 0.2) * k)),
        "blur_sigma": u(0, 1.5) * k,
        "noise_sigma": u(0, 4) * k,
        "background": rng.integers(0, 256, 3).tolist(),
        "clothing": rng.integers(0, 256, 3).tolist(),
    }
    occluded = u() < min(1.0, 0.15 * k)
    box = [u(0.05, 0.2), u(0.5, 2.0), u(-0.7, 0.7), u(-0.8, 1.0)]  # area fraction, aspect, centre x, y
    occluder = rng.integers(0, 256, 3).tolist()
    out["occlusion"] = {"area": box[0], "aspect": box[1], "centre": box[2:], "colour": occluder} if occluded else None
    return out


class _Canvas:
    """Anti-aliased filled shapes in face units on an RGB canvas (origin = face centre)."""

    def __init__(self, image: np.ndarray, origin: tuple[float, float], unit: float):
        self.image, self.origin, self.unit = image, np.asarray(origin), unit

    def _fixed(self, points: np.ndarray) -> np.ndarray:
        pixels = self.origin + np.asarray(points, np.float64) * self.unit
        return np.round(pixels * (1 << _SHIFT)).astype(np.int32).reshape(-1, 2)

    def polygon(self, points: np.ndarray, colour: Colour) -> None:
        cv2.fillPoly(self.image, [self._fixed(points)], colour, cv2.LINE_AA, _SHIFT)

    def line(self, points: np.ndarray, colour: Colour, thickness: float) -> None:
        width = max(1, int(round(thickness * self.unit)))
        cv2.polylines(self.image, [self._fixed(points)], False, colour, width, cv2.LINE_AA, _SHIFT)

    def ellipse(self, centre, axes, colour: Colour, top: float | None = None, half: bool = False, n: int = 40) -> None:
        """Filled ellipse with half-axes ``axes``; ``top`` = another upper half-axis; ``half`` = lower half only."""
        cos, sin = _unit_circle(n, half)
        ay = np.where(sin < 0, axes[1] if top is None else top, axes[1])
        self.polygon(np.stack([centre[0] + axes[0] * cos, centre[1] + ay * sin], 1), colour)


@functools.lru_cache(maxsize=32)
def _unit_circle(n: int, half: bool) -> tuple[np.ndarray, np.ndarray]:
    t = np.linspace(0, np.pi, n) if half else np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.cos(t), np.sin(t)


def _bezier(p0, control, p1, n: int = 9) -> np.ndarray:
    t = np.linspace(0, 1, n)[:, None]
    return (1 - t) ** 2 * np.asarray(p0) + 2 * (1 - t) * t * np.asarray(control) + t**2 * np.asarray(p1)


def _scaled(colour: Colour, factor: float) -> Colour:
    return _colour(np.asarray(colour) * factor)


def _draw_face(cv: _Canvas, p: FaceParams, n: dict[str, Any]) -> np.ndarray:
    """Draw one face in face units; returns the five landmarks in face units."""
    yaw, dx = n["yaw"], 0.18 * n["yaw"]
    cv.ellipse((0, p.lower_height + 1.5), (2.3, 1.0), _colour(n["clothing"]))
    cv.polygon(np.array([[-0.42, 0.5], [0.42, 0.5], [0.5, 3.0], [-0.5, 3.0]]), _scaled(p.skin, 0.85))
    if p.hair_style == "long":
        bottom, crown = p.lower_height + 0.4, -p.upper_height * 1.08
        cv.ellipse((0, (bottom + crown) / 2), (1.3, (bottom - crown) / 2), p.hair_colour)
    for side in (-1, 1):
        cv.ellipse((side * 1.0, 0.05), (0.16, 0.3), _scaled(p.skin, 0.92))
    cv.ellipse((0, 0), (1.0, p.lower_height), p.skin, top=p.upper_height, n=64)
    if p.beard:
        y0 = p.nose_y + 0.1
        cv.ellipse((dx, y0), (0.97, p.lower_height - y0), p.hair_colour, half=True)
    if p.mark is not None:
        cv.ellipse((p.mark[0] + dx, p.mark[1]), (p.mark[2], p.mark[2]), _scaled(p.skin, 0.45), n=12)

    brow_y = -(p.eye_y + p.brow_gap)
    if p.hair_style != "bald":
        t = np.linspace(0, 2 * np.pi, 96, endpoint=False)
        cap = np.stack([1.07 * np.cos(t), p.upper_height * 1.1 * np.sin(t)], 1)
        hairline = brow_y - p.hair_gap
        cv.polygon(cap[cap[:, 1] <= hairline + p.hair_slope * cap[:, 0]], p.hair_colour)
        if p.hair_style == "curly":
            for angle in np.linspace(np.pi * 1.08, np.pi * 1.92, 8):
                centre = (1.05 * np.cos(angle), p.upper_height * 1.08 * np.sin(angle))
                cv.ellipse(centre, (0.22, 0.22), p.hair_colour, n=16)

    eyes = []
    brow_colour = _scaled(p.hair_colour, 0.8)
    for side in (-1, 1):
        ex, ey = side * p.eye_x * (1 - 0.12 * abs(yaw)) + dx, -p.eye_y
        width = p.eye_width * (1 - 0.2 * yaw * side)
        height = width * p.eye_aspect * n["eye_open"]
        iris = width * p.iris
        cv.ellipse((ex, ey), (width, height), _EYE_WHITE, n=24)
        cv.ellipse((ex, ey), (iris, min(iris, height)), p.eye_colour, n=20)
        cv.line(_bezier((ex - width, ey), (ex, ey - 2 * height), (ex + width, ey)), _scaled(p.skin, 0.4), 0.025)
        half = p.eye_width * p.brow_length
        inner, outer = ex - side * half * 0.9, ex + side * half
        brow = [(inner, brow_y), (ex + side * 0.15 * half, brow_y - p.brow_arch), (outer, brow_y + 0.02)]
        cv.line(np.array(brow), brow_colour, p.brow_thickness)
        eyes.append((ex, ey))

    nose = (1.4 * dx, p.nose_y)
    bridge = [(nose[0], -p.eye_y + 0.12), (nose[0] - p.nose_width, p.nose_y), (nose[0] + p.nose_width, p.nose_y)]
    cv.polygon(np.array(bridge), _scaled(p.skin, 0.9))
    cv.ellipse(nose, (p.nose_width * 0.55, p.nose_width * 0.35), _scaled(p.skin, 0.72), n=20)

    mouth_y = p.nose_y + p.mouth_gap
    half = p.mouth_width * (1 - 0.1 * abs(yaw))
    corner_y = mouth_y - 0.08 * n["smile"]
    left, right = (dx - half, corner_y), (dx + half, corner_y)
    opening = 0.12 * n["mouth_open"]

    def arc(mid_y: float) -> np.ndarray:
        return _bezier(left, (dx, 2 * mid_y - corner_y), right)

    upper, lower = arc(mouth_y - p.lip_thickness), arc(mouth_y + 1.3 * p.lip_thickness + opening)
    cv.polygon(np.concatenate([upper, lower[::-1]]), p.lip_colour)
    if opening > 0.005:
        cv.polygon(np.concatenate([arc(mouth_y - 0.3 * opening), arc(mouth_y + 0.9 * opening)[::-1]]), (60, 22, 28))
    else:
        cv.line(arc(mouth_y), _scaled(p.lip_colour, 0.6), 0.015)
    return np.array([*eyes, nose, left, right], np.float64)


def _finish(image: np.ndarray, n: dict[str, Any], rng: np.random.Generator, face: tuple[float, float, float]):
    """Output-frame effects: occluder, directional light, brightness/contrast, blur, sensor noise."""
    size = image.shape[0]
    out = image.astype(np.float32)
    occ = n["occlusion"]
    if occ is not None:
        cx, cy, half_width = face  # face centre and half-width in output pixels
        area = occ["area"] * np.pi * half_width**2 * 1.3
        w = np.sqrt(area * occ["aspect"])
        h = area / w
        x0, y0 = cx + occ["centre"][0] * half_width - w / 2, cy + occ["centre"][1] * half_width - h / 2
        cv2.rectangle(out, (int(x0), int(y0)), (int(x0 + w), int(y0 + h)), [float(c) for c in occ["colour"]], -1)
    grid = (np.arange(size, dtype=np.float32) - size / 2) / (size / 2)
    angle = np.deg2rad(n["light_angle_deg"])
    contrast = n["contrast"]
    gain = contrast * (1 + n["light"] * (np.cos(angle) * grid[None, :] + np.sin(angle) * grid[:, None]))
    out *= gain[..., None]
    out += 128 * (1 - contrast) + n["brightness"]
    if n["blur_sigma"] > 0.1:
        out = cv2.GaussianBlur(out, (0, 0), n["blur_sigma"])
    if n["noise_sigma"] > 0:
        out += rng.standard_normal((size, size, 1), dtype=np.float32) * n["noise_sigma"]  # luminance noise
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def render_face(
    params: FaceParams, nuisance: dict[str, Any], size: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Render ``params`` under ``nuisance`` -> (uint8 RGB ``size x size``, landmarks ``(5, 2)`` in pixels)."""
    big = 2 * size
    canvas = np.empty((big, big, 3), np.uint8)
    canvas[:] = nuisance["background"]
    origin = np.array([big / 2, big * 0.52])
    unit = params.face_width * big
    points = _draw_face(_Canvas(canvas, origin, unit), params, nuisance)
    image = cv2.resize(canvas, (size, size), interpolation=cv2.INTER_AREA)
    # A 2x2 area average puts output pixel j's centre at canvas coordinate 2j + 0.5.
    centre = origin / 2 - 0.25
    landmarks = (origin + points * unit) / 2 - 0.25
    matrix = cv2.getRotationMatrix2D(tuple(centre), nuisance["rotation_deg"], nuisance["scale"])
    matrix[:, 2] += np.asarray(nuisance["shift"]) * size
    if not np.allclose(matrix, [[1, 0, 0], [0, 1, 0]]):
        image = cv2.warpAffine(image, matrix, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        landmarks = landmarks @ matrix[:, :2].T + matrix[:, 2]
        centre = matrix[:, :2] @ centre + matrix[:, 2]
    image = _finish(image, nuisance, rng, (centre[0], centre[1], unit * nuisance["scale"] / 2))
    return image, landmarks.astype(np.float32)


def render_sample(seed: int, identity_id: int, sample_idx: int, options: ParametricSettings,
                  encode: bool = True) -> dict[str, Any]:
    """One GENERATED row (without ``block_id``) for ``(seed, identity_id, sample_idx)``; with
    ``encode=False`` its image is left as ``pixels`` (uint8 RGB) for a face stage in the same process."""
    identity_id = check_identity_id(identity_id)
    row_seed = sample_seed(seed, identity_id, sample_idx)
    rng = np.random.default_rng(row_seed)
    wrong = bool(rng.random() < options.wrong_identity_rate)
    impostor = int(MAX_IDENTITY_ID + rng.integers(0, MAX_IDENTITY_ID, dtype=np.int64))
    shown = impostor if wrong else identity_id
    nuisance = draw_nuisance(rng, options.nuisance)
    image, landmarks = render_face(identity_params(int(seed), shown), nuisance, options.image_size, rng)
    data = b""
    if encode:
        data = encode_png(image, rle=True)
    meta = {"wrong_identity": wrong, "nuisance": _rounded(nuisance)}
    row = {
        "identity_id": identity_id, "sample_idx": int(sample_idx), "seed": row_seed, "source": SOURCE,
        "image": data, "landmarks": landmarks.reshape(-1), "true_identity_id": shown,
        "meta": json.dumps(meta, sort_keys=True), "status": STATUS_OK, "reason": "",
    }
    return row if encode else row | {PIXELS: image}


def _rounded(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    return round(float(value), 4) if isinstance(value, float) else value


class ParametricGenerator:
    """Ray Data stage: identity rows -> ``images_per_identity`` rendered GENERATED rows each.

    With :attr:`emit_pixels` (set by a block worker whose face stage runs in the same process) the
    images stay decoded in a ``pixels`` column instead of being PNG-encoded only to be decoded again.
    """

    emit_pixels = False

    def __init__(self, settings: GeneratorSettings, seed: int):
        if int(seed) < 0:
            raise ValueError(f"run.seed must be >= 0, got {seed}")
        self.settings, self.seed = settings, int(seed)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = []
        for identity_id, block_id in identity_rows(batch):
            for sample_idx in range(self.settings.images_per_identity):
                rows.append(self._row(identity_id, block_id, sample_idx))
        out = rows_to_batch(rows, GENERATED)
        if self.emit_pixels:
            out[PIXELS] = object_column([row.get(PIXELS) for row in rows])
        return out

    def _row(self, identity_id: Any, block_id: Any, sample_idx: int) -> dict[str, Any]:
        try:
            row = render_sample(self.seed, identity_id, sample_idx, self.settings.parametric, encode=not self.emit_pixels)
        except Exception as exc:  # one bad sample must not end the batch
            try:
                seed = sample_seed(self.seed, identity_id, sample_idx)
            except ValueError:
                seed = -1
            reason = failure_reason(identity_id, sample_idx, exc)
            return error_row(identity_id, block_id, sample_idx, seed, SOURCE, reason)
        row["block_id"] = int(block_id)
        return row


def build(settings: GeneratorSettings, seed: int, **options: Any) -> ParametricGenerator:
    """The backend's generator (:data:`facegen.config.generation.GENERATORS`)."""
    return ParametricGenerator(settings, seed, **options)
