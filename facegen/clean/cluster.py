"""Per-identity consistency expert: adaptive DBSCAN on face embeddings (ALGORITHMS.md 1.2).

The images of one identity are clustered with DBSCAN (cosine metric, ``eps = 1 - t``); the largest
cluster is the identity's majority person. ``t`` is moved until that cluster holds a plausible
fraction of the images: too small a cluster means ``t`` is too strict for this identity's spread,
too large means outliers are being absorbed. Identity sets are small (tens of images), so
scikit-learn's exact DBSCAN is used; cross-identity search lives elsewhere (faiss).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.cluster import DBSCAN

from facegen.config import DbscanSettings

# Thresholds move in steps of 0.02; rounding keeps repeated steps from drifting (0.6 - 5 * 0.02
# must be the same t as 0.5), which matters for detecting a revisited t.
_T_DECIMALS = 9


@dataclass(frozen=True)
class ClusterDecision:
    """Outcome of :func:`adaptive_dbscan_keep` for one identity.

    ``keep``: bool mask over the input rows. ``threshold``: the cosine threshold ``t`` of the chosen
    round. ``rounds``: DBSCAN runs performed. ``kept_fraction``: kept rows / rows with a finite,
    non-zero embedding (0.0 when there are none). ``landed_in_band``: whether the chosen round's
    fraction was inside ``[keep_fraction_low, keep_fraction_high]``.
    """

    keep: np.ndarray
    threshold: float
    rounds: int
    kept_fraction: float
    landed_in_band: bool

    @property
    def num_kept(self) -> int:
        """Number of kept rows."""
        return int(self.keep.sum())


def _largest_cluster(labels: np.ndarray, unit: np.ndarray) -> np.ndarray | None:
    """Row indices of the largest non-noise cluster, or None when every point is noise.

    Equal sizes are broken by tightness (higher mean cosine to the cluster's own centre), then by
    the lowest row index a cluster contains, so the choice never depends on DBSCAN's label order.
    """
    best_key, best_rows = None, None
    for label in np.unique(labels[labels >= 0]):
        rows = np.flatnonzero(labels == label)
        centre = unit[rows].mean(axis=0)
        norm = np.linalg.norm(centre)
        tightness = float((unit[rows] @ (centre / norm)).mean()) if norm > 0 else -1.0
        key = (len(rows), tightness, -int(rows[0]))
        if best_key is None or key > best_key:
            best_key, best_rows = key, rows
    return best_rows


def _cluster_at(unit: np.ndarray, t: float, min_samples: int) -> np.ndarray | None:
    labels = DBSCAN(eps=max(1.0 - t, 1e-12), min_samples=min_samples, metric="cosine").fit_predict(unit)
    return _largest_cluster(labels, unit)


def adaptive_dbscan_keep(embeddings: np.ndarray, settings: DbscanSettings) -> ClusterDecision:
    """Keep the majority person of one identity's images, adapting the DBSCAN threshold.

    Start at ``t = settings.start_t``; each round keeps the largest non-noise cluster if its
    fraction lies in ``[keep_fraction_low, keep_fraction_high]``; below the band ``t`` is lowered
    by ``step`` (looser), above it raised; ``t`` is clamped to ``[t_min, t_max]``; at most
    ``max_rounds`` rounds. If no round lands in the band, the largest-fraction cluster seen is kept
    (the earliest round wins a tie); when every round found only noise, nothing is kept and the
    reported threshold is the last one tried. Rows whose embedding is non-finite or zero are
    never kept and do not count in the fraction; fewer usable rows than ``min_samples`` keep
    nothing (``rounds = 0``). The search stops early when ``t`` is clamped in place or revisits an earlier value: DBSCAN is
    deterministic, so further rounds could only repeat results already seen.
    """
    emb = np.asarray(embeddings, dtype=np.float64)
    if emb.ndim != 2:
        raise ValueError(f"adaptive_dbscan_keep: embeddings must be 2-D [n, d], got shape {emb.shape}")
    n = emb.shape[0]
    keep = np.zeros(n, dtype=bool)
    norms = np.linalg.norm(np.where(np.isfinite(emb), emb, 0.0), axis=1)
    usable = np.flatnonzero(np.isfinite(emb).all(axis=1) & (norms > 0))
    start_t = round(min(max(settings.start_t, settings.t_min), settings.t_max), _T_DECIMALS)
    if len(usable) == 0 or len(usable) < settings.min_samples:
        return ClusterDecision(keep, start_t, 0, 0.0, False)

    unit = emb[usable] / norms[usable, None]
    low, high = settings.keep_fraction_low, settings.keep_fraction_high
    t = start_t
    seen_t: set[float] = set()
    best_rows, best_fraction, best_t = None, 0.0, t
    rounds, last_t = 0, t
    while rounds < settings.max_rounds and t not in seen_t:
        seen_t.add(t)
        rounds, last_t = rounds + 1, t
        rows = _cluster_at(unit, t, settings.min_samples)
        fraction = 0.0 if rows is None else len(rows) / len(usable)
        if rows is not None and low <= fraction <= high:
            keep[usable[rows]] = True
            return ClusterDecision(keep, t, rounds, fraction, True)
        if rows is not None and fraction > best_fraction:
            best_rows, best_fraction, best_t = rows, fraction, t
        step = -settings.step if fraction < low else settings.step
        t = round(min(max(t + step, settings.t_min), settings.t_max), _T_DECIMALS)

    if best_rows is None:
        return ClusterDecision(keep, last_t, rounds, 0.0, False)
    keep[usable[best_rows]] = True
    return ClusterDecision(keep, best_t, rounds, best_fraction, False)
