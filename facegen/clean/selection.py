"""Which kept samples of an identity survive the trim to ``target_images`` (ALGORITHMS.md 3).

CemiFace found that samples of moderate similarity to their identity centre train better FR models
than the most central ones. ``semi_hard`` therefore ranks samples inside the band ``[low, high]``
of cosine to the centre first (nearest ``target`` first), then the too-easy ones above the band
(nearest the band first), then the too-hard ones below it (nearest the band first); ``central`` is
the old rule (most central first). Ties go to the lower ``sample_idx``.
"""

from __future__ import annotations

import numpy as np

from facegen.config import SelectionSettings

SIMILARITY_BINS = 20  # histogram bins of cosine to the centre, over [0, 1]


def selection_order(similarity: np.ndarray, sample_idx: np.ndarray, settings: SelectionSettings) -> np.ndarray:
    """Indices into ``similarity`` from the first to keep to the last."""
    s = np.asarray(similarity, dtype=np.float64)
    tie = np.asarray(sample_idx)
    if settings.mode == "central":
        return np.lexsort((tie, -s))
    low, high = settings.band
    tier = np.where(s > high, 1, np.where(s < low, 2, 0))
    distance = np.where(tier == 0, np.abs(s - settings.target), np.where(tier == 1, s - high, low - s))
    return np.lexsort((tie, distance, tier))


def select(similarity: np.ndarray, sample_idx: np.ndarray, count: int, settings: SelectionSettings) -> np.ndarray:
    """Bool mask of the ``count`` samples to keep (all of them when there are no more than ``count``)."""
    keep = np.zeros(len(similarity), dtype=bool)
    keep[selection_order(similarity, sample_idx, settings)[: max(0, int(count))]] = True
    return keep


def similarity_histogram(similarity: np.ndarray, bins: int = SIMILARITY_BINS) -> list[int]:
    """Counts of cosine-to-centre values in ``bins`` equal bins over [0, 1] (values outside clipped)."""
    s = np.asarray(similarity, dtype=np.float64)
    s = s[np.isfinite(s)]
    return [int(c) for c in np.histogram(np.clip(s, 0.0, 1.0), bins=bins, range=(0.0, 1.0))[0]]


def band_summary(similarity: np.ndarray, settings: SelectionSettings) -> dict:
    """JSON-ready: count, mean, fraction inside / above / below the band, histogram over [0, 1]."""
    s = np.asarray(similarity, dtype=np.float64)
    s = s[np.isfinite(s)]
    low, high = settings.band
    n = max(1, s.size)
    return {
        "count": int(s.size),
        "mean": float(s.mean()) if s.size else None,
        "in_band": float(((s >= low) & (s <= high)).sum() / n),
        "above_band": float((s > high).sum() / n),
        "below_band": float((s < low).sum() / n),
        "histogram": similarity_histogram(s),
    }
