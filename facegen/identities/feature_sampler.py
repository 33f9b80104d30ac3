"""Vec2Face's identity sampler: identity features that no two identities share.

Candidates come in rounds of ``candidates_per_round`` from one seeded stream per round: standard
normal vectors of width ``dim`` (``gaussian``), or draws from the multivariate normal of a real set's
class-centre features (``pca``: mean plus the principal axes scaled by their standard deviations).
They are accepted greedily in stream order: a candidate is kept when its cosine to every identity
kept before it, in earlier rounds (an exact faiss inner-product search) or earlier in its round (one
Gram matrix), is below ``max_similarity``. So the first ``n`` accepted features are the same for any
``n`` asked, and the largest cosine any accepted feature had to those before it is the largest
pairwise cosine of the whole set, recorded without a second pass.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

#: Domain tag of the candidate stream (distinct from every other seeded stream of a run).
CANDIDATE_TAG = 0x5EC2


@dataclass(frozen=True)
class PcaModel:
    """A multivariate normal in principal axes: ``mean + (z * std) @ axes`` with ``z ~ N(0, I)``."""

    mean: np.ndarray  # [d]
    axes: np.ndarray  # [k, d], orthonormal rows
    std: np.ndarray  # [k]

    @property
    def dim(self) -> int:
        return int(self.mean.shape[0])


def fit_pca(centres: np.ndarray, components: int | None = None) -> PcaModel:
    """The normal of ``centres`` ``[m, d]`` (raw features, not normalised) in its top ``components`` axes."""
    centres = np.asarray(centres, np.float64)
    if centres.ndim != 2 or len(centres) < 2:
        raise ValueError(f"class centres must be [m >= 2, d], got shape {centres.shape}")
    mean = centres.mean(axis=0)
    _, singular, axes = np.linalg.svd(centres - mean, full_matrices=False)
    keep = min(components or len(singular), len(singular))
    std = singular[:keep] / np.sqrt(len(centres) - 1)
    return PcaModel(mean.astype(np.float32), axes[:keep].astype(np.float32), std.astype(np.float32))


def draw_candidates(seed: int, round_index: int, count: int, dim: int, pca: PcaModel | None = None) -> np.ndarray:
    """Round ``round_index``'s ``count`` candidate features ``[count, dim]`` (float32)."""
    from facegen.identities.seeds import identity_rng

    rng = identity_rng(seed, round_index, CANDIDATE_TAG)
    if pca is None:
        return rng.standard_normal((count, dim), dtype=np.float32)
    z = rng.standard_normal((count, len(pca.std)), dtype=np.float32)
    return pca.mean + (z * pca.std) @ pca.axes


def _unit(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return np.ascontiguousarray(vectors / np.maximum(norms, 1e-12), np.float32)


def filter_round(units: np.ndarray, nearest_kept: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Greedy acceptance within one round: rows of ``units`` (unit vectors) in order, each kept when
    its cosine to the earlier rounds' identities (``nearest_kept``, the largest) and to the rows kept
    before it in this round is below ``threshold``. Returns the kept row numbers and, for each, the
    largest cosine it had to any identity kept before it."""
    open_rows = np.flatnonzero(nearest_kept < threshold)
    if len(open_rows) == 0:
        return open_rows, np.zeros(0, np.float32)
    gram = units[open_rows] @ units[open_rows].T
    closest = nearest_kept[open_rows].astype(np.float32).copy()
    blocked = np.zeros(len(open_rows), bool)
    kept = []
    for i in range(len(open_rows)):
        if blocked[i]:
            continue
        kept.append(i)
        later = gram[i, i + 1 :]
        blocked[i + 1 :] |= later >= threshold
        np.maximum(closest[i + 1 :], later, out=closest[i + 1 :])
    kept = np.asarray(kept, np.int64)
    return open_rows[kept], closest[kept]


def sample_feature_identities(settings: Any, seed: int, count: int, centres: np.ndarray | None = None,
                              report: Callable[[int, int], None] | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """``count`` identity features ``[count, d]`` (float32, their drawn norms) by Vec2Face's sampler
    (``settings``: :class:`~facegen.config.identities.Vec2FaceSamplerSettings`), and the sampler's
    figures. Raises a one-line ``ValueError`` when ``max_candidates_ratio * count`` candidates do not
    yield ``count`` identities."""
    from facegen.clean.search import flat_index

    pca = fit_pca(centres, settings.components) if settings.distribution == "pca" else None
    dim = pca.dim if pca is not None else settings.dim
    threshold = float(settings.max_similarity)
    budget = int(np.ceil(settings.max_candidates_ratio * count))
    index = flat_index(dim, settings.search_device != "cpu")
    kept: list[np.ndarray] = []
    largest, accepted, drawn, round_index = -1.0, 0, 0, 0
    while accepted < count:
        if drawn >= budget:
            raise ValueError(f"identities.sampler.vec2face.max_similarity: only {accepted} of {count} identities have "
                             f"pairwise cosine below {threshold:g} after {drawn} candidates (dim {dim}); raise "
                             "max_similarity or max_candidates_ratio, or ask for fewer identities")
        candidates = draw_candidates(seed, round_index, settings.candidates_per_round, dim, pca)
        units = _unit(candidates)
        if accepted:
            nearest, _ = index.search(units, 1)
            nearest = nearest[:, 0]
        else:
            nearest = np.full(len(units), -np.inf, np.float32)
        rows, closest = filter_round(units, nearest, threshold)
        rows, closest = rows[: count - accepted], closest[: count - accepted]
        if len(rows):
            index.add(units[rows])
            kept.append(candidates[rows])
            largest = max(largest, float(closest.max()))
        accepted += len(rows)
        drawn += len(units)
        round_index += 1
        if report is not None:
            report(accepted, count)
    features = np.concatenate(kept).astype(np.float32)
    norms = np.linalg.norm(features, axis=1)
    figures = {"distribution": settings.distribution, "dim": dim, "max_similarity": threshold, "candidates": drawn,
               "accepted": int(count), "acceptance": round(count / drawn, 4), "rounds": round_index,
               "max_pairwise_similarity": round(largest, 6) if count > 1 else None,
               "norm_mean": round(float(norms.mean()), 4), "norm_std": round(float(norms.std()), 4)}
    if pca is not None:
        figures["components"] = len(pca.std)
    return features, figures
