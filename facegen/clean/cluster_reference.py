"""The adaptive DBSCAN loop of HybridGen on scikit-learn's DBSCAN, one fit per round.

The slow reference that :mod:`facegen.clean.cluster` must agree with: tests compare decisions
identity by identity, ``bench/cleaning.py`` compares speed. Not used by the pipeline.
"""

from __future__ import annotations

import numpy as np
from sklearn.cluster import DBSCAN

from facegen.clean.cluster import ClusterDecision, clamp_t, largest_cluster, usable_unit_rows
from facegen.config import DbscanSettings


def sklearn_adaptive_dbscan_keep(embeddings: np.ndarray, settings: DbscanSettings) -> ClusterDecision:
    """The same contract as :func:`facegen.clean.cluster.adaptive_dbscan_keep`, on sklearn DBSCAN."""
    n = np.asarray(embeddings).shape[0] if np.ndim(embeddings) == 2 else 0
    usable, unit = usable_unit_rows(embeddings)
    keep = np.zeros(n, dtype=bool)
    start_t = clamp_t(settings.start_t, settings)
    if len(usable) == 0 or len(usable) < settings.min_samples:
        return ClusterDecision(keep, start_t, 0, 0.0, False)
    low, high = settings.keep_fraction_low, settings.keep_fraction_high
    t, seen = start_t, set()
    best_rows, best_fraction, best_t = None, 0.0, t
    rounds, last_t = 0, t
    while rounds < settings.max_rounds and t not in seen:
        seen.add(t)
        rounds, last_t = rounds + 1, t
        labels = DBSCAN(eps=max(1.0 - t, 1e-12), min_samples=settings.min_samples, metric="cosine").fit_predict(unit)
        rows = largest_cluster(labels, unit)
        fraction = 0.0 if rows is None else len(rows) / len(usable)
        if rows is not None and low <= fraction <= high:
            keep[usable[rows]] = True
            return ClusterDecision(keep, t, rounds, fraction, True)
        if rows is not None and fraction > best_fraction:
            best_rows, best_fraction, best_t = rows, fraction, t
        t = clamp_t(t + (-settings.step if fraction < low else settings.step), settings)
    if best_rows is None:
        return ClusterDecision(keep, last_t, rounds, 0.0, False)
    keep[usable[best_rows]] = True
    return ClusterDecision(keep, best_t, rounds, best_fraction, False)
