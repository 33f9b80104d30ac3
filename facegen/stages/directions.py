"""``facegen directions``: DisCo's latent directions fitted on the GAN's own samples.

One Ray task on a worker (``directions.pool``; a GPU where the GAN runs on one): ``directions.samples``
latents drawn from the GAN's prior (a stream of their own, apart from every identity's), rendered,
labelled by facegen's estimators (:mod:`facegen.identities.directions`: landmarks from
``directions.detector``, lighting from the aligned crop), one direction fitted per attribute. Then
each direction is checked: ``check_identities`` other latents are stepped along it over
``-check_range .. +check_range`` spreads, and the Spearman correlation between the step and the
re-estimated attribute says whether the direction moves what it is named after.

``<output_dir>/directions/`` receives ``directions.npz`` (what ``generator.disco.fit`` or
``disco.directions`` reads), ``directions.png`` (one row per direction, the steps left to right) and
``directions.json`` (per direction: spread, fit score, check; the settings digest), written last: a
rerun with the same settings returns at once.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from facegen import storage
from facegen.config import FacegenConfig
from facegen.stages import StageReport

#: Domain tag of the latents directions are fitted on (apart from every identity's).
DIRECTIONS_TAG = 0xD15C0
NPZ, PNG, SUMMARY = "directions.npz", "directions.png", "directions.json"


def directions_dir(cfg: FacegenConfig) -> str:
    """``<output_dir>/directions``."""
    return cfg.stage_dir("directions")


def with_fitted_directions(cfg: FacegenConfig) -> FacegenConfig:
    """``cfg`` with ``generator.disco.directions`` naming this run's fitted ``.npz`` when
    ``generator.disco.fit`` asks for it (one line when they have not been fitted yet)."""
    disco = cfg.generator.disco
    if not disco.fit:
        return cfg
    path = f"{directions_dir(cfg)}/{NPZ}"
    if not storage.exists(f"{directions_dir(cfg)}/{SUMMARY}"):
        raise FileNotFoundError(f"{path}: generator.disco.fit uses this run's fitted directions; run facegen directions "
                                "with this config first")
    generator = cfg.generator.model_copy(update={"disco": disco.model_copy(update={"directions": path})})
    return cfg.model_copy(update={"generator": generator})


def _digest(cfg: FacegenConfig) -> str:
    from facegen.config.generation import GAN_BACKENDS
    from facegen.lineage import settings_digest

    g = cfg.generator
    if g.backend not in GAN_BACKENDS:
        raise ValueError(f"generator.backend: facegen directions fits a GAN's latent directions, not {g.backend}'s")
    return settings_digest(cfg.run.seed, cfg.directions, g.backend, getattr(g, g.backend))


def landmark_finder(settings: Any, upscale: int) -> Callable[[list[np.ndarray]], list[np.ndarray | None]]:
    """``images -> [5, 2] landmarks or None`` per image: ``settings``' detector and one-face rule on
    images resized up to ``upscale`` pixels, landmarks mapped back to the image's own pixels."""
    import cv2

    from facegen.faces.detect import build_detector, choose_face

    detector = build_detector(settings)

    def find(images: list[np.ndarray]) -> list[np.ndarray | None]:
        scales = [max(1.0, upscale / max(im.shape[:2])) for im in images]
        large = [cv2.resize(im, None, fx=s, fy=s, interpolation=cv2.INTER_CUBIC) if s > 1 else im for im, s in zip(images, scales)]
        out: list[np.ndarray | None] = []
        for image, scale, found in zip(large, scales, detector.detect_batch(large)):
            try:
                out.append(np.asarray(choose_face(found, image.shape, settings).landmarks, np.float64).reshape(5, 2) / scale)
            except ValueError:
                out.append(None)
        return out

    return find


def _grid(rows: list[list[np.ndarray]]) -> bytes:
    from PIL import Image

    side = rows[0][0].shape[0]
    canvas = np.zeros((side * len(rows), side * len(rows[0]), 3), np.uint8)
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            canvas[r * side:(r + 1) * side, c * side:(c + 1) * side] = image
    buffer = io.BytesIO()
    Image.fromarray(canvas).save(buffer, format="PNG")
    return buffer.getvalue()


def directions_task(cfg_json: str, out: str, digest: str, report: Callable[..., None]) -> dict[str, Any]:
    """Fit, check and write every direction on this worker; returns the summary."""
    from facegen.cache import localized
    from facegen.generators.gan import build_gan
    from facegen.generators.latent import render_latents
    from facegen.identities.directions import estimate_attributes, fit_direction, write_directions_npz
    from facegen.train.generator_fit import spearman

    cfg = FacegenConfig.model_validate_json(cfg_json)
    d = cfg.directions
    gan = build_gan(localized(cfg.generator, "generator"))
    find = landmark_finder(d.detector, d.upscale)
    stream = int(np.random.SeedSequence([cfg.run.seed, DIRECTIONS_TAG]).generate_state(1)[0])
    latents = gan.gaussian_latents(stream, np.arange(d.samples + d.check_identities, dtype=np.int64))
    fit_on, check_on = latents[: d.samples], latents[d.samples:]
    labels: dict[str, list[np.ndarray]] = {}
    total = d.samples + d.check_identities * d.check_steps * len(d.attributes)
    for start in range(0, d.samples, d.batch_size):
        found = estimate_attributes(render_latents(gan, fit_on[start:start + d.batch_size], d.batch_size), find)
        for name, values in found.items():
            labels.setdefault(name, []).append(values)
        report(min(start + d.batch_size, d.samples), total)
    centre = gan.latent_mean.cpu().numpy()
    detected = int(np.isfinite(np.concatenate(labels["yaw"])).sum())
    fitted, checks, grid_rows = [], {}, []
    steps = np.linspace(-d.check_range, d.check_range, d.check_steps)
    done = d.samples
    for name in d.attributes:
        direction = fit_direction(name, fit_on, np.concatenate(labels[name]), centre, d.method, d.tail, d.svm_c, cfg.run.seed)
        fitted.append(direction)
        means = []
        for step in steps:
            moved = check_on + np.float32(step * direction.spread) * direction.vector
            images = render_latents(gan, moved, d.batch_size)
            means.append(float(np.nanmean(estimate_attributes(images, find)[name])))
            grid_rows.append(images[0])  # the first check latent: the figure's row of this direction
            done += d.check_identities
            report(done, total, f"{name}: step {step:+.2f}")
        checks[name] = {"spearman": round(spearman(steps, means), 4), "means": [round(m, 4) for m in means]}
    storage.write_bytes_atomic(write_directions_npz(fitted), f"{out}/{NPZ}")
    rows = [grid_rows[i * len(steps):(i + 1) * len(steps)] for i in range(len(fitted))]
    storage.write_bytes_atomic(_grid(rows), f"{out}/{PNG}")
    summary = {"digest": digest, "backend": cfg.generator.backend, "latent_dim": int(latents.shape[1]),
               "samples": d.samples, "detected": detected, "method": d.method, "steps": [round(float(s), 4) for s in steps],
               "directions": {f.name: {"spread": round(f.spread, 6), "score": f.score, "labelled": f.samples, "check": checks[f.name]}
                              for f in fitted}}
    storage.write_json_atomic(summary, f"{out}/{SUMMARY}")
    return summary


def run_directions(cfg: FacegenConfig, progress: bool = True) -> StageReport:
    """Fit (or find already fitted) the run's DisCo directions into ``<output_dir>/directions``."""
    from facegen.stages.tasks import run_tracked

    started, out, digest = time.time(), directions_dir(cfg), _digest(cfg)
    path = f"{out}/{SUMMARY}"
    summary = storage.read_json(path) if storage.exists(path) and not cfg.run.overwrite else None
    written = 0
    if summary is None or summary.get("digest") != digest:
        summary = run_tracked(directions_task, cfg.model_dump_json(), out, digest, resources=cfg.directions.pool,
                              field="directions.pool", name=f"directions ({cfg.directions.samples} samples)", progress=progress)
        written = 1
    totals: dict[str, Any] = {"samples labelled": f"{summary['detected']} of {summary['samples']}"}
    for name, record in summary["directions"].items():
        totals[name] = (f"spread {record['spread']:.3f}, fit {record['score']:.3f}, "
                        f"check Spearman {record['check']['spearman']:+.2f}")
    return StageReport("directions", out, 1, 1 - written, written, round(time.time() - started, 2), totals)
