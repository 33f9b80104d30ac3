"""DisCo's covariate directions, fitted on a GAN's own samples (Langevin-DisCo, seed 001).

The paper labels StyleGAN2 latents of MultiPIE images (pose from the camera, illumination from the
flash, expression from the recording) and fits one linear SVM per covariate; the unit normal of its
hyperplane is the direction, and DisCo scales it by ``max(|mean projection of the negatives|, mean
projection of the positives)``. Here the labels come from facegen's own estimators on generated
samples:

* ``yaw``, ``pitch``, ``roll`` from the detector's five landmarks: the nose's horizontal offset from
  the eye midpoint over the eye distance; where the nose sits between the eye line and the mouth
  line; the eye line's angle (degrees);
* ``illumination`` (light from the subject's right minus from the left, over the mean) and
  ``brightness`` (mean luminance / 255) of the aligned 112 px crop;
* the named outputs of any ONNX classifier in ``directions.classifiers`` (an expression model, ...),
  run on the same crop (:mod:`facegen.identities.classifiers`).

``svm`` trains on the lowest and highest ``tail`` fraction of an attribute (the two classes);
``regression`` fits least squares of the attribute on the latents (all samples). Projections are
measured from the GAN's latent centre (``w_avg``; 0 for the DCGAN).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from facegen.config.identities import ESTIMATED_ATTRIBUTES as ATTRIBUTES


def landmark_pose(landmarks: np.ndarray) -> dict[str, np.ndarray]:
    """Yaw, pitch and roll proxies of ``[n, 5, 2]`` landmarks (eyes, nose, mouth corners)."""
    points = np.asarray(landmarks, np.float64).reshape(-1, 5, 2)
    left_eye, right_eye, nose, left_mouth, right_mouth = (points[:, i] for i in range(5))
    eyes, mouth = (left_eye + right_eye) / 2, (left_mouth + right_mouth) / 2
    eye_line = right_eye - left_eye
    distance = np.maximum(np.linalg.norm(eye_line, axis=1), 1e-6)
    return {
        "yaw": (nose[:, 0] - eyes[:, 0]) / distance,
        "pitch": (nose[:, 1] - eyes[:, 1]) / np.maximum(mouth[:, 1] - eyes[:, 1], 1e-6),
        "roll": np.degrees(np.arctan2(eye_line[:, 1], eye_line[:, 0])),
    }


def crop_lighting(crops: np.ndarray) -> dict[str, np.ndarray]:
    """Illumination side and brightness of aligned RGB crops ``[n, 112, 112, 3]``."""
    luminance = np.asarray(crops, np.float64) @ np.array([0.299, 0.587, 0.114])
    half = luminance.shape[2] // 2
    mean = luminance.mean(axis=(1, 2))
    # the subject's right is the image's left
    side = (luminance[:, :, :half].mean(axis=(1, 2)) - luminance[:, :, half:].mean(axis=(1, 2))) / np.maximum(mean, 1.0)
    return {"illumination": side, "brightness": mean / 255.0}


def estimate_attributes(images: list[np.ndarray], find_landmarks: Callable[[list[np.ndarray]], list[np.ndarray | None]],
                        classifiers: Sequence[Any] = ()) -> dict[str, np.ndarray]:
    """Every attribute of :data:`ATTRIBUTES` per image, then each of ``classifiers``' (callables on
    the aligned crops returning ``{name: [n]}`` for their ``names``, e.g.
    :class:`facegen.identities.classifiers.OnnxAttributeClassifier`); NaN where ``find_landmarks``
    found no face (it returns ``[5, 2]`` landmarks in each image's own pixels, or None)."""
    from facegen.faces.align import align_face

    found = find_landmarks(images)
    names = [*ATTRIBUTES, *(name for classifier in classifiers for name in classifier.names)]
    out = {name: np.full(len(images), np.nan) for name in names}
    rows = [i for i, points in enumerate(found) if points is not None]
    if not rows:
        return out
    points = np.stack([np.asarray(found[i], np.float64).reshape(5, 2) for i in rows])
    crops = np.stack([align_face(images[i], points[k]) for k, i in enumerate(rows)])
    estimated = {**landmark_pose(points), **crop_lighting(crops)}
    for classifier in classifiers:
        estimated |= classifier(crops)
    for name, values in estimated.items():
        out[name][rows] = values
    return out


@dataclass(frozen=True)
class Direction:
    """One fitted covariate: unit ``vector`` in latent space, DisCo's ``spread`` along it, how well
    the fit separates or explains its labels (``score``: SVM accuracy or regression R^2) on
    ``samples`` labelled latents."""

    name: str
    vector: np.ndarray
    spread: float
    score: float
    samples: int


def fit_direction(name: str, latents: np.ndarray, values: np.ndarray, centre: np.ndarray, method: str = "svm",
                  tail: float = 0.3, svm_c: float = 0.01, seed: int = 0) -> Direction:
    """The direction of attribute ``values`` (NaN: unlabelled) in ``latents`` ``[n, d]``."""
    keep = np.isfinite(values)
    x = np.asarray(latents, np.float64)[keep] - np.asarray(centre, np.float64)
    y = np.asarray(values, np.float64)[keep]
    if len(y) < 10 or np.ptp(y) == 0:
        raise ValueError(f"directions: {name}: {len(y)} labelled samples with {'no' if len(y) else 'any'} spread; "
                         "draw more samples (directions.samples) or check the detector finds the GAN's faces")
    low, high = np.quantile(y, [tail, 1 - tail])
    negative, positive = y <= low, y >= high
    if method == "svm":
        from sklearn.svm import LinearSVC

        chosen = negative | positive
        labels = positive[chosen].astype(int)
        if labels.min() == labels.max():
            raise ValueError(f"directions: {name}: its lowest and highest {tail:g} are the same value; use method regression")
        model = LinearSVC(C=svm_c, max_iter=20000, random_state=seed).fit(x[chosen], labels)
        normal, score = model.coef_[0], float(model.score(x[chosen], labels))
    else:
        design = np.hstack([x, np.ones((len(x), 1))])
        coef, *_ = np.linalg.lstsq(design, y, rcond=None)
        normal = coef[:-1]
        residual = y - design @ coef
        score = float(1.0 - residual.var() / y.var())
    vector = normal / np.linalg.norm(normal)
    projection = x @ vector
    spread = max(abs(float(projection[negative].mean())), float(projection[positive].mean()))
    return Direction(name, vector.astype(np.float32), spread, round(score, 4), int(len(y)))


def write_directions_npz(directions: list[Direction]) -> bytes:
    """The ``.npz`` DisCo reads (:func:`facegen.identities.variation.load_directions`): unit
    ``directions`` ``[K, d]``, their ``spreads`` ``[K]`` and ``names`` ``[K]``; no pickled objects."""
    import io

    buffer = io.BytesIO()
    np.savez(buffer, directions=np.stack([d.vector for d in directions]).astype(np.float32),
             spreads=np.array([d.spread for d in directions], np.float32), names=np.array([d.name for d in directions]))
    return buffer.getvalue()
