"""An embedder's similarity scale, so cleaning thresholds mean the same thing for every embedder.

ArcFace-family models put two photos of one person at cosine 0.3-0.9 and different people near 0;
dlib's 128-d descriptor puts different people at 0.8-0.95. A threshold written as a bare cosine is
therefore only right for the embedder it was chosen for. A :class:`Calibration` records an
embedder's scale: the genuine and impostor cosine distributions of a verification set (as
percentiles) and the cosine above which two faces are taken as one person (``same_person``: the
10-fold best-accuracy threshold of that set), or, where only a published rule exists, that rule
alone (dlib: Euclidean distance 0.6 between descriptors).

Every cleaning threshold may then be written on that scale (:func:`resolve_threshold`):

- a number: a cosine, used as it is;
- ``same_person``: the embedder's same-person threshold;
- ``far:X``: the cosine that a fraction X of impostor pairs exceed (false-accept rate X);
- ``genuine:Q``: the Q-th percentile of genuine-pair cosines.

``facegen calibrate`` writes a calibration from a ``.bin`` set; ``faces.embedder.calibration``
names it. dlib needs none: its published rule ships here.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from pydantic import BaseModel, Field

from facegen.config.clean import THRESHOLD_SPEC, check_threshold_spec

#: Percentiles stored of each distribution: 0, 0.1, ..., 1, 2, ..., 99, 99.1, ..., 99.9, 100 (low FAR needs the tail).
PERCENTILES = sorted({*np.round(np.arange(0, 1.0, 0.1), 1), *range(0, 101), *np.round(np.arange(99.0, 100.0, 0.1), 1)})
#: dlib's rule: descriptors closer than 0.6 (Euclidean) are one person. facegen compares unit vectors,
#: so the rule is carried at dlib's typical descriptor norm: 1.58, the median on insightface's t1
#: faces (1.57-1.59; scikit-image's astronaut 1.43), cos = 1 - 0.6^2 / (2 * 1.58^2).
DLIB_DESCRIPTOR_NORM = 1.58
DLIB_SAME_PERSON = round(1.0 - 0.6**2 / (2 * DLIB_DESCRIPTOR_NORM**2), 4)


class Calibration(BaseModel):
    """An embedder's similarity scale (see the module docstring)."""

    embedder_kind: str
    source: str = Field(description="the .bin set it was measured on, or the published rule")
    same_person: float = Field(ge=-1.0, le=1.0)
    percentiles: list[float] = Field(default_factory=list, description="the percentiles the two lists hold")
    genuine: list[float] = Field(default_factory=list, description="cosine of genuine pairs at each percentile")
    impostor: list[float] = Field(default_factory=list, description="cosine of impostor pairs at each percentile")
    pairs: int = 0
    accuracy: float | None = None

    def far_threshold(self, far: float) -> float:
        """The cosine that a fraction ``far`` of impostor pairs exceed."""
        if not self.impostor:
            raise ValueError(f"far:{far}: this calibration ({self.source}) holds no impostor distribution; "
                             "write one with facegen calibrate")
        return float(np.interp(100.0 * (1.0 - far), self.percentiles, self.impostor))

    def genuine_percentile(self, q: float) -> float:
        """The ``q``-th percentile of genuine-pair cosines."""
        if not self.genuine:
            raise ValueError(f"genuine:{q}: this calibration ({self.source}) holds no genuine distribution; "
                             "write one with facegen calibrate")
        return float(np.interp(q, self.percentiles, self.genuine))


#: Calibrations that need no measurement: published rules, per embedder kind.
PUBLISHED: dict[str, Calibration] = {
    "dlib": Calibration(embedder_kind="dlib", same_person=DLIB_SAME_PERSON,
                        source=f"dlib's published rule (distance 0.6) at descriptor norm {DLIB_DESCRIPTOR_NORM}"),
}


def resolve_threshold(value: float | str, calibration: Calibration | None, field: str) -> float:
    """The cosine that ``value`` (a cosine or a spec) means on ``calibration``'s scale."""
    value = check_threshold_spec(value)
    if not isinstance(value, str):
        return value
    if calibration is None:
        raise ValueError(f"{field}: {value} needs the embedder's calibration: set faces.embedder.calibration "
                         "(facegen calibrate writes one) or give a cosine")
    match = THRESHOLD_SPEC.match(value)
    try:
        if match.group("far") is not None:
            return calibration.far_threshold(float(match.group("far")))
        if match.group("q") is not None:
            return calibration.genuine_percentile(float(match.group("q")))
    except ValueError as exc:
        raise ValueError(f"{field}: {exc}") from None
    return calibration.same_person


def measure_calibration(embeddings: np.ndarray, issame: np.ndarray, kind: str, source: str, nrof_folds: int = 10) -> Calibration:
    """The calibration of a verification set's flip-summed unit ``embeddings`` (pairs in
    consecutive rows) with labels ``issame``."""
    from facegen.eval.verification import evaluate_full

    issame = np.asarray(issame, bool)
    cos = np.einsum("ij,ij->i", embeddings[0::2], embeddings[1::2]).astype(np.float64)
    if issame.all() or not issame.any():
        raise ValueError(f"{source}: needs both genuine and impostor pairs to calibrate")
    roc = evaluate_full(embeddings, issame, min(nrof_folds, len(issame)))
    # evaluate_full thresholds a distance (2 - 2 cos on unit vectors); its best thresholds as cosines
    same_person = float(1.0 - np.mean(roc.best_thresholds) / 2.0)
    return Calibration(embedder_kind=kind, source=source, same_person=round(same_person, 4),
                       percentiles=[float(p) for p in PERCENTILES],
                       genuine=[round(float(v), 5) for v in np.percentile(cos[issame], PERCENTILES)],
                       impostor=[round(float(v), 5) for v in np.percentile(cos[~issame], PERCENTILES)],
                       pairs=int(len(issame)), accuracy=round(float(roc.accuracy_mean), 5))


def calibrate_embedder(embedder: Any, bins: list[str], kind: str, batch_size: int = 64, nrof_folds: int = 10,
                       min_pairs: int = 0, source: str | None = None) -> Calibration:
    """The calibration of ``embedder`` measured on local ``.bin`` sets, their pairs pooled; ValueError
    when they hold fewer than ``min_pairs`` pairs (a threshold fitted on a handful of pairs is noise).
    ``source``: what the calibration says it was measured on (default: the local paths)."""
    from facegen.eval.verification import embed_set, load_bin

    embeddings, issame = [], []
    for path in bins:
        images, same = load_bin(path)
        embeddings.append(embed_set(embedder, images, batch_size))
        issame.append(same)
    issame_all = np.concatenate(issame)
    if len(issame_all) < min_pairs:
        raise ValueError(f"{', '.join(bins)}: {len(issame_all)} pairs; a calibration needs at least {min_pairs}")
    return measure_calibration(np.concatenate(embeddings), issame_all, kind, source or ", ".join(bins), nrof_folds)


def load_calibration(settings: Any) -> Calibration | None:
    """The calibration of the embedder ``settings`` (``faces.embedder``): its ``calibration`` file,
    else the published rule of its kind, else None."""
    from facegen import storage

    path = getattr(settings, "calibration", None)
    if path:
        try:
            calibration = Calibration.model_validate(storage.read_json(path))
        except (OSError, ValueError) as exc:
            raise ValueError(f"faces.embedder.calibration: {path}: not a calibration ({' '.join(str(exc).split())[:200]})") from None
        if calibration.embedder_kind != settings.kind:
            raise ValueError(f"faces.embedder.calibration: {path}: measured for a {calibration.embedder_kind} embedder, "
                             f"faces.embedder.kind is {settings.kind}")
        return calibration
    return PUBLISHED.get(settings.kind)
