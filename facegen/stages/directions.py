"""``facegen directions``: DisCo's latent directions fitted on the GAN's own samples.

One Ray task on a worker (``directions.pool``; a GPU where the GAN runs on one): ``directions.samples``
latents drawn from the GAN's prior (a stream of their own, apart from every identity's), rendered,
labelled by facegen's estimators (:mod:`facegen.identities.directions`: landmarks from
``directions.detector``, lighting from the aligned crop, the outputs of ``directions.classifiers``'
ONNX models on that crop), one direction fitted per attribute. Then
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
from facegen.config import DirectionsSettings, FacegenConfig
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
    if not (disco.fit and cfg.generator.variation == "disco"):
        return cfg
    path = f"{directions_dir(cfg)}/{NPZ}"
    if not storage.exists(f"{directions_dir(cfg)}/{SUMMARY}"):
        raise FileNotFoundError(f"{path}: generator.disco.fit uses this run's fitted directions; run facegen directions "
                                "with this config first")
    # resolved: the file named, as a config naming it would (workers validate the settings again)
    generator = cfg.generator.model_copy(update={"disco": disco.model_copy(update={"directions": path, "fit": False})})
    return cfg.model_copy(update={"generator": generator})


def _digest(cfg: FacegenConfig) -> str:
    from facegen.config.generation import gan_backends
    from facegen.lineage import backend_section, settings_digest

    g = cfg.generator
    if g.backend not in gan_backends():
        raise ValueError(f"generator.backend: facegen directions fits a GAN's latent directions, not {g.backend}'s")
    return settings_digest(cfg.run.seed, cfg.directions, g.backend, backend_section(g, g.backend))


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


def _grid(rows: list[list[np.ndarray]]) -> np.ndarray:
    side = rows[0][0].shape[0]
    canvas = np.zeros((side * len(rows), side * len(rows[0]), 3), np.uint8)
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            canvas[r * side:(r + 1) * side, c * side:(c + 1) * side] = image
    return canvas


LABELS_CSV = "labels.csv"


def read_labelled(folder: str, attributes: list[str]) -> tuple[list[np.ndarray], dict[str, np.ndarray], list[str]]:
    """The images of ``folder``'s ``labels.csv`` (``file`` then numeric attribute columns) and their
    labels; an image that cannot be read is left out with its reason (one line each, returned)."""
    import csv

    from facegen.images import decode_image

    path = f"{folder.rstrip('/')}/{LABELS_CSV}"
    if not storage.exists(path):
        raise FileNotFoundError(f"directions.labelled: {path}: no such file (file, then one column per attribute)")
    rows = list(csv.DictReader(io.StringIO(storage.read_bytes(path).decode("utf-8"))))
    missing = [a for a in ["file", *attributes] if rows and a not in rows[0]]
    if not rows or missing:
        raise ValueError(f"{path}: needs columns file and {', '.join(attributes)} ({'missing ' + ', '.join(missing) if rows else 'no rows'})")
    images, values, skipped = [], {a: [] for a in attributes}, []
    for line, row in enumerate(rows, start=2):
        try:
            parsed = {a: float(row[a]) if row[a].strip() else float("nan") for a in attributes}
            images.append(decode_image(storage.read_bytes(f"{folder.rstrip('/')}/{row['file']}")))
        except Exception as exc:  # one bad row is recorded, not fatal
            skipped.append(f"{LABELS_CSV}:{line} {row.get('file')}: {type(exc).__name__}: {exc}"[:200])
            continue
        for a in attributes:
            values[a].append(parsed[a])
    return images, {a: np.asarray(v, np.float64) for a, v in values.items()}, skipped


def _invert_labelled(cfg: FacegenConfig, gan: Any, report: Callable[..., None]) -> tuple[np.ndarray, dict[str, np.ndarray], list[str]]:
    """Latents of the labelled folder's images (inversion), their labels, the rows left out and why."""
    from facegen.identities.inversion import invert

    d, inv = cfg.directions, cfg.directions.inversion
    images, labels, skipped = read_labelled(d.labelled, d.attributes)
    if not images:
        raise ValueError(f"directions.labelled: {d.labelled}: no readable image ({'; '.join(skipped[:2])})")
    embedder = None
    if inv.identity_weight > 0:
        from facegen.identities.encoder import ForceEmbedder

        embedder = ForceEmbedder(cfg.generator.embedder, gan.device)
    parts = []
    for start in range(0, len(images), inv.batch_size):
        part = images[start:start + inv.batch_size]
        parts.append(invert(gan, part, inv.steps, inv.lr, inv.starts, inv.identity_weight, inv.prior_weight, embedder,
                            seed=cfg.run.seed + start).latents)
        report(start + len(part), len(images), "inverting labelled images")
    return np.concatenate(parts), labels, skipped


def _labels_from(name: str, d: DirectionsSettings) -> str:
    """Where an attribute's labels came from, for the summary and the report."""
    if d.labelled:
        return LABELS_CSV
    for classifier in d.classifiers:
        if name in classifier.outputs:
            return classifier.path.rstrip("/").rsplit("/", 1)[-1]
    return "landmarks" if name in ("yaw", "pitch", "roll") else "crop pixels"


def check_classifiers(cfg: FacegenConfig) -> None:
    """Load and probe ``directions.classifiers`` here, before any work: a missing file, a model that
    refuses the described input or whose output width disagrees with its names fails in one line."""
    from facegen.cache import localized
    from facegen.identities.classifiers import load_classifiers
    from facegen.preflight import check_input_paths

    if cfg.directions.classifiers:
        check_input_paths(cfg, "settings", sections=("directions.classifiers",))
        load_classifiers(localized(cfg.directions, "directions").classifiers, providers=["CPUExecutionProvider"])


def directions_task(cfg_json: str, out: str, digest: str, report: Callable[..., None]) -> dict[str, Any]:
    """Fit, check and write every direction on this worker; returns the summary."""
    from facegen.cache import localized
    from facegen.generators.gan import build_gan
    from facegen.generators.latent import render_latents
    from facegen.identities.classifiers import load_classifiers
    from facegen.identities.directions import ATTRIBUTES, estimate_attributes, fit_direction, write_directions_npz
    from facegen.images import encode_png
    from facegen.train.generator_fit import spearman

    cfg = FacegenConfig.model_validate_json(cfg_json)
    cfg = cfg.model_copy(update={"generator": localized(cfg.generator, "generator"),
                                 "directions": localized(cfg.directions, "directions")})
    d = cfg.directions
    gan = build_gan(cfg.generator)
    find = landmark_finder(d.detector, d.upscale)
    classifiers = load_classifiers(d.classifiers)
    stream = int(np.random.SeedSequence([cfg.run.seed, DIRECTIONS_TAG]).generate_state(1)[0])
    check_on = gan.gaussian_latents(stream, np.arange(d.samples, d.samples + d.check_identities, dtype=np.int64))
    if d.labelled:
        fit_on, labels, skipped = _invert_labelled(cfg, gan, report)
        detected = len(fit_on)
    else:
        fit_on, labels, skipped = gan.gaussian_latents(stream, np.arange(d.samples, dtype=np.int64)), {}, []
        for start in range(0, d.samples, d.batch_size):
            found = estimate_attributes(render_latents(gan, fit_on[start:start + d.batch_size], d.batch_size), find, classifiers)
            for name, values in found.items():
                labels.setdefault(name, []).append(values)
            report(min(start + d.batch_size, d.samples), d.samples, "labelling samples")
        labels = {name: np.concatenate(parts) for name, parts in labels.items()}
        detected = int(np.isfinite(labels["yaw"]).sum())
    centre = gan.latent_mean.cpu().numpy()
    names, checkable = d.fitted(), {*ATTRIBUTES, *d.classified()}
    total, done = d.check_identities * d.check_steps * len(names), 0
    fitted, checks, grid_rows = [], {}, []
    steps = np.linspace(-d.check_range, d.check_range, d.check_steps)
    for name in names:
        direction = fit_direction(name, fit_on, labels[name], centre, d.method, d.tail, d.svm_c, cfg.run.seed)
        fitted.append(direction)
        means = []
        for step in steps:
            moved = check_on + np.float32(step * direction.spread) * direction.vector
            images = render_latents(gan, moved, d.batch_size)
            if name in checkable:  # a user's label (smile, ...) with no estimator or classifier: shown, not checked
                own = [c for c in classifiers if name in c.names]
                means.append(float(np.nanmean(estimate_attributes(images, find, own)[name])))
            grid_rows.append(images[0])  # the first check latent: the figure's row of this direction
            done += d.check_identities
            report(done, total, f"{name}: step {step:+.2f}")
        checks[name] = {"spearman": round(spearman(steps, means), 4), "means": [round(m, 4) for m in means]} if means else None
    storage.write_bytes_atomic(write_directions_npz(fitted), f"{out}/{NPZ}")
    grid = _grid([grid_rows[i * len(steps):(i + 1) * len(steps)] for i in range(len(fitted))])
    storage.write_bytes_atomic(encode_png(grid), f"{out}/{PNG}")
    summary = {
        "digest": digest, "backend": cfg.generator.backend, "latent_dim": int(fit_on.shape[1]),
        "source": "labelled" if d.labelled else "generated", "samples": len(fit_on) + len(skipped),
        "detected": detected, "skipped": skipped[:20], "method": d.method, "steps": [round(float(s), 4) for s in steps],
        "directions": {f.name: {"spread": round(f.spread, 6), "score": f.score, "labelled": f.samples, "check": checks[f.name],
                                "labels_from": _labels_from(f.name, d)} for f in fitted},
    }
    _track(cfg, summary, grid)
    storage.write_json_atomic(summary, f"{out}/{SUMMARY}")
    return summary


def _track(cfg: FacegenConfig, summary: dict[str, Any], grid: np.ndarray) -> None:
    """The directions' figures and sample rows in the run's W&B group (job ``directions``)."""
    from facegen.tracking import start_run

    tracker = start_run(cfg, "directions")
    try:
        values = {"directions/detected": summary["detected"], "directions/labelled_of": summary["samples"]}
        for name, record in summary["directions"].items():
            values |= {f"directions/{name}/spread": record["spread"], f"directions/{name}/fit": record["score"]}
            if record["check"]:
                values[f"directions/{name}/check_spearman"] = record["check"]["spearman"]
        tracker.summary(values)
        tracker.log_image("directions/grid", grid, caption=f"rows: {', '.join(summary['directions'])}; columns: steps")
    finally:
        tracker.finish()


def run_directions(cfg: FacegenConfig, progress: bool = True) -> StageReport:
    """Fit (or find already fitted) the run's DisCo directions into ``<output_dir>/directions``."""
    from facegen.stages.tasks import run_tracked

    started, out, digest = time.time(), directions_dir(cfg), _digest(cfg)
    check_classifiers(cfg)
    path = f"{out}/{SUMMARY}"
    summary = storage.read_json(path) if storage.exists(path) and not cfg.run.overwrite else None
    written = 0
    if summary is None or summary.get("digest") != digest:
        summary = run_tracked(directions_task, cfg.model_dump_json(), out, digest, resources=cfg.directions.pool,
                              field="directions.pool", name=f"directions ({cfg.directions.samples} samples)", progress=progress)
        written = 1
    totals: dict[str, Any] = {"samples labelled": f"{summary['detected']} of {summary['samples']}"}
    for name, record in summary["directions"].items():
        check = f"check Spearman {record['check']['spearman']:+.2f}" if record["check"] else "no estimator to check"
        totals[name] = f"spread {record['spread']:.3f}, fit {record['score']:.3f}, {check}"
    return StageReport("directions", out, 1, 1 - written, written, round(time.time() - started, 2), totals)
