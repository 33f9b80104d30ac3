"""Difficulty scores and easy-to-hard bucketing (ALGORITHMS.md 1.7 and 3).

Difficulty of a sample is ``1 - cos(embedding, identity centre)``: 0 for a sample at its identity's
centre, growing as it strays. Training reads buckets of increasing difficulty (curriculum); the
same similarity selects CemiFace-style semi-hard samples (moderate similarity to the centre).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from facegen.vectors import l2_normalize


def identity_centre(embeddings: np.ndarray) -> np.ndarray:
    """Unit centre of one identity: mean of its L2-normalised embeddings, renormalised ``[d]``."""
    return l2_normalize(l2_normalize(np.asarray(embeddings, dtype=np.float64)).mean(axis=0))


def difficulty_to_centre(embeddings: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """``1 - cos(embedding, centre of its label)`` as float32 ``[n]``.

    Centres are computed from the rows with a finite, non-zero embedding; other rows (and labels
    with no such row) get NaN.
    """
    emb = np.asarray(embeddings, dtype=np.float64)
    labels = np.asarray(labels)
    if emb.ndim != 2 or labels.shape != (emb.shape[0],):
        raise ValueError(f"difficulty_to_centre: need embeddings [n, d] and labels [n], got {emb.shape} and {labels.shape}")
    out = np.full(emb.shape[0], np.nan, dtype=np.float32)
    valid = np.isfinite(emb).all(axis=1)
    valid[valid] = np.linalg.norm(emb[valid], axis=1) > 0
    if not valid.any():
        return out
    unit = l2_normalize(emb[valid])
    _, group = np.unique(labels[valid], return_inverse=True)
    order = np.argsort(group, kind="stable")
    starts = np.flatnonzero(np.r_[True, np.diff(group[order]) != 0])
    centres = l2_normalize(np.add.reduceat(unit[order], starts, axis=0))
    out[valid] = 1.0 - np.einsum("ij,ij->i", unit, centres[group])
    return out


def bucket_edges(difficulties: np.ndarray, num_buckets: int) -> np.ndarray:
    """``num_buckets + 1`` strictly increasing float64 edges: min, the inner quantiles, max.

    NaN values are ignored. Where ties make quantiles coincide, each edge is nudged to the next
    representable float above its predecessor, so edges stay strictly increasing and the tied
    values share one bucket (leaving neighbours empty). The ends are finite (JSON-safe);
    :func:`assign_buckets` puts values beyond them into the first or last bucket.
    """
    if num_buckets < 1:
        raise ValueError(f"bucket_edges: num_buckets must be >= 1, got {num_buckets}")
    d = np.asarray(difficulties, dtype=np.float64).ravel()
    d = d[np.isfinite(d)]
    if d.size == 0:
        raise ValueError("bucket_edges: no finite difficulties to place edges on")
    edges = np.quantile(d, np.linspace(0.0, 1.0, num_buckets + 1))
    edges[0], edges[-1] = d.min(), d.max()
    for k in range(1, len(edges)):
        if edges[k] <= edges[k - 1]:
            edges[k] = np.nextafter(edges[k - 1], np.inf)
    return edges


#: Mergeable difficulty histograms: fixed bins over the whole range of ``1 - cos`` ([0, 2]).
SKETCH_BINS = 4096
SKETCH_RANGE = (0.0, 2.0)


def difficulty_sketch(difficulties: np.ndarray) -> dict[str, Any]:
    """A mergeable summary of finite difficulties: counts on :data:`SKETCH_BINS` fixed bins, min, max.

    Sketches of blocks add up (:func:`merge_sketches`), so global quantiles never need every row
    in one process; a quantile from the merged sketch is off by at most one bin width (2 / 4096).
    """
    d = np.asarray(difficulties, dtype=np.float64).ravel()
    d = d[np.isfinite(d)]
    counts, _ = np.histogram(np.clip(d, *SKETCH_RANGE), bins=SKETCH_BINS, range=SKETCH_RANGE)
    return {"counts": counts.astype(np.int64), "min": float(d.min()) if d.size else np.inf,
            "max": float(d.max()) if d.size else -np.inf}


def merge_sketches(sketches: list[dict[str, Any]]) -> dict[str, Any]:
    """The sketch of the union of the blocks the ``sketches`` summarise."""
    counts = np.zeros(SKETCH_BINS, np.int64)
    low, high = np.inf, -np.inf
    for sketch in sketches:
        counts += np.asarray(sketch["counts"], np.int64)
        low, high = min(low, float(sketch["min"])), max(high, float(sketch["max"]))
    return {"counts": counts, "min": low, "max": high}


def bucket_edges_from_sketch(sketch: dict[str, Any], num_buckets: int) -> np.ndarray:
    """:func:`bucket_edges` computed from a merged sketch instead of every value.

    Inner edges are the quantiles of the binned distribution (linear within a bin), the ends are
    the exact min and max; ties are nudged apart the same way.
    """
    if num_buckets < 1:
        raise ValueError(f"bucket_edges: num_buckets must be >= 1, got {num_buckets}")
    counts = np.asarray(sketch["counts"], np.float64)
    total = counts.sum()
    if total == 0:
        raise ValueError("bucket_edges: no finite difficulties to place edges on")
    low, high = float(sketch["min"]), float(sketch["max"])
    bin_edges = np.linspace(*SKETCH_RANGE, SKETCH_BINS + 1)
    cumulative = np.concatenate([[0.0], np.cumsum(counts)])
    targets = np.linspace(0.0, 1.0, num_buckets + 1)[1:-1] * total
    inner = np.interp(targets, cumulative, bin_edges) if len(targets) else np.zeros(0)
    edges = np.concatenate([[low], np.clip(inner, low, high), [high]])
    for k in range(1, len(edges)):
        if edges[k] <= edges[k - 1]:
            edges[k] = np.nextafter(edges[k - 1], np.inf)
    return edges


def assign_buckets(difficulties: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Bucket index (int64) per value: bucket ``b`` holds ``edges[b] <= d < edges[b + 1]``.

    Values below the first edge go to bucket 0, values at or above the last inner edge (and NaN)
    to the last bucket.
    """
    edges = np.asarray(edges, dtype=np.float64)
    if edges.ndim != 1 or len(edges) < 2:
        raise ValueError(f"assign_buckets: edges must be 1-D with at least 2 values, got shape {edges.shape}")
    return np.searchsorted(edges[1:-1], np.asarray(difficulties, dtype=np.float64), side="right").astype(np.int64)


def semi_hard_mask(similarity: np.ndarray, low: float, high: float) -> np.ndarray:
    """CemiFace band selection: True where ``low <= similarity <= high`` (NaN is never selected)."""
    if low > high:
        raise ValueError(f"semi_hard_mask: low ({low}) must not exceed high ({high})")
    s = np.asarray(similarity, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        return (s >= low) & (s <= high)


def difficulty_histogram(difficulties: np.ndarray, bins: int = 40, value_range: tuple[float, float] = (0.0, 2.0)) -> dict[str, Any]:
    """JSON-ready histogram for reports: ``bin_edges``, ``counts``, ``num_values``, ``num_nonfinite``,
    ``mean``, ``median``. Finite values outside ``value_range`` are counted in the end bins.
    """
    d = np.asarray(difficulties, dtype=np.float64).ravel()
    finite = d[np.isfinite(d)]
    counts, edges = np.histogram(np.clip(finite, *value_range), bins=bins, range=value_range)
    return {
        "bin_edges": [float(e) for e in edges],
        "counts": [int(c) for c in counts],
        "num_values": int(finite.size),
        "num_nonfinite": int(d.size - finite.size),
        "mean": float(finite.mean()) if finite.size else None,
        "median": float(np.median(finite)) if finite.size else None,
    }
