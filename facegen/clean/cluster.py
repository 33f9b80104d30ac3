"""Per-identity consistency expert: adaptive DBSCAN on face embeddings (ALGORITHMS.md 1.2).

The images of one identity are clustered with DBSCAN (cosine metric, ``eps = 1 - t``); the largest
cluster is the identity's majority person. ``t`` is moved until that cluster holds a plausible
fraction of the images: too small a cluster means ``t`` is too strict for this identity's spread,
too large means outliers are being absorbed.

This is the fast path. The cosine-distance matrix of an identity is computed once and every
threshold round reuses it: DBSCAN at one ``eps`` is "connected components of the core points
(points with at least ``min_samples`` neighbours within ``eps``, themselves included), plus every
border point attached to the first cluster that reaches it". Identities of similar size are
processed together as one padded batch, so a round costs a few numpy calls for the whole batch.
The decisions equal scikit-learn's ``DBSCAN(metric="cosine")`` in the same loop
(:mod:`facegen.clean.cluster_reference`; tests and ``bench/cleaning.py`` compare them).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from facegen.config import DbscanSettings

if TYPE_CHECKING:
    from facegen.clean.view import BlockView
    from facegen.clean.votes import ExpertVotes

# Thresholds move in steps of 0.02; rounding keeps repeated steps from drifting (0.6 - 5 * 0.02
# must be the same t as 0.5), which matters for detecting a revisited t.
_T_DECIMALS = 9
# Padded batch size bound: identities x rows x rows distance cells per batch (float64: 8 bytes each).
_BATCH_CELLS = 1 << 16


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


def clamp_t(t: float, settings: DbscanSettings) -> float:
    """``t`` clamped to ``[t_min, t_max]`` and rounded so repeated steps land on the same value."""
    return round(min(max(t, settings.t_min), settings.t_max), _T_DECIMALS)


def usable_unit_rows(embeddings: np.ndarray, name: str = "embeddings") -> tuple[np.ndarray, np.ndarray]:
    """Indices of the rows with a finite, non-zero embedding, and those rows L2-normalised (float64)."""
    emb = np.asarray(embeddings, dtype=np.float64)
    if emb.ndim != 2:
        raise ValueError(f"adaptive_dbscan_keep: {name} must be 2-D [n, d], got shape {emb.shape}")
    finite = np.isfinite(emb).all(axis=1)
    norms = np.linalg.norm(np.where(finite[:, None], emb, 0.0), axis=1)
    usable = np.flatnonzero(finite & (norms > 0))
    return usable, emb[usable] / norms[usable, None]


def largest_cluster(labels: np.ndarray, unit: np.ndarray) -> np.ndarray | None:
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


def dbscan_labels(distance: np.ndarray, valid: np.ndarray, eps: np.ndarray, min_samples: int) -> np.ndarray:
    """DBSCAN labels of a padded batch from precomputed distances.

    ``distance`` ``[b, n, n]``, ``valid`` ``[b, n]`` (padding rows False), ``eps`` ``[b]``. A label is
    the smallest core-row index of the cluster (-1 = noise or padding), so clusters are ordered as
    scikit-learn numbers them (by their first core row) and a border row within ``eps`` of several
    clusters joins the first, as scikit-learn's expansion order does.
    """
    b, n, _ = distance.shape
    adjacent = (distance <= eps[:, None, None]) & valid[:, :, None] & valid[:, None, :]
    core = adjacent.sum(axis=2) >= min_samples
    links = adjacent & core[:, :, None] & core[:, None, :]
    none = n  # larger than any row index
    index = np.broadcast_to(np.arange(n), (b, n))
    labels = np.where(core, index, none)
    while True:  # min-label propagation over core links, with pointer jumping
        spread = np.where(links, labels[:, None, :], none).min(axis=2)
        spread = np.minimum(labels, spread)
        extended = np.concatenate([spread, np.full((b, 1), none)], axis=1)
        jumped = np.minimum(spread, np.take_along_axis(extended, spread, axis=1))
        if np.array_equal(jumped, labels):
            break
        labels = jumped
    border = np.where(adjacent & core[:, None, :], labels[:, None, :], none).min(axis=2)
    labels = np.where(core, labels, border)
    return np.where(labels < none, labels, -1)


@dataclass
class _Search:
    """The adaptive-threshold state of one identity."""

    usable: np.ndarray
    unit: np.ndarray
    t: float
    seen: set
    rounds: int = 0
    last_t: float = 0.0
    best_rows: np.ndarray | None = None
    best_fraction: float = 0.0
    best_t: float = 0.0
    result: tuple | None = None  # (rows, t, fraction, landed)

    def step(self, rows: np.ndarray | None, settings: DbscanSettings) -> None:
        """Record one round's largest cluster and move ``t`` (or finish)."""
        fraction = 0.0 if rows is None else len(rows) / len(self.usable)
        low, high = settings.keep_fraction_low, settings.keep_fraction_high
        if rows is not None and low <= fraction <= high:
            self.result = (rows, self.t, fraction, True)
            return
        if rows is not None and fraction > self.best_fraction:
            self.best_rows, self.best_fraction, self.best_t = rows, fraction, self.t
        self.t = clamp_t(self.t + (-settings.step if fraction < low else settings.step), settings)
        if self.rounds >= settings.max_rounds or self.t in self.seen:
            self.result = (self.best_rows, self.best_t if self.best_rows is not None else self.last_t, self.best_fraction, False)

    def start_round(self) -> None:
        self.seen.add(self.t)
        self.rounds, self.last_t = self.rounds + 1, self.t


def _pick_cluster(labels: np.ndarray, unit: np.ndarray) -> np.ndarray | None:
    clustered = labels[labels >= 0]
    if clustered.size == 0:
        return None
    sizes = np.bincount(clustered)
    biggest = sizes.max()
    if (sizes == biggest).sum() > 1:  # a tie: the slow, exact tie-break of the reference
        return largest_cluster(labels, unit)
    return np.flatnonzero(labels == int(sizes.argmax()))


def _run_batch(searches: list[_Search], settings: DbscanSettings) -> None:
    """Advance every search of one batch, all rounds, on their precomputed distances."""
    n = max(len(s.usable) for s in searches)
    dim = searches[0].unit.shape[1]
    padded = np.zeros((len(searches), n, dim))
    valid = np.zeros((len(searches), n), dtype=bool)
    for i, s in enumerate(searches):
        padded[i, : len(s.usable)] = s.unit
        valid[i, : len(s.usable)] = True
    distance = np.clip(1.0 - np.matmul(padded, padded.transpose(0, 2, 1)), 0.0, 2.0)
    active = np.arange(len(searches))
    while active.size:
        for i in active:
            searches[i].start_round()
        eps = np.array([max(1.0 - searches[i].t, 1e-12) for i in active])
        labels = dbscan_labels(distance[active], valid[active], eps, settings.min_samples)
        for row, i in enumerate(active):
            s = searches[i]
            s.step(_pick_cluster(labels[row, : len(s.usable)], s.unit), settings)
        active = np.array([i for i in active if searches[i].result is None], dtype=np.int64)


def adaptive_dbscan_keep_many(embeddings: Sequence[np.ndarray], settings: DbscanSettings) -> list[ClusterDecision]:
    """:func:`adaptive_dbscan_keep` for many identities at once (one decision per input, in order).

    Identities are sorted by size and run in padded batches, every threshold round of a batch
    together, each on its distance matrix computed once.
    """
    decisions: list[ClusterDecision | None] = [None] * len(embeddings)
    start_t = clamp_t(settings.start_t, settings)
    searches: dict[int, _Search] = {}
    for i, emb in enumerate(embeddings):
        usable, unit = usable_unit_rows(emb)
        if len(usable) == 0 or len(usable) < settings.min_samples:
            decisions[i] = ClusterDecision(np.zeros(len(emb), dtype=bool), start_t, 0, 0.0, False)
        else:
            searches[i] = _Search(usable, unit, start_t, set())
    order = sorted(searches, key=lambda i: len(searches[i].usable))
    batch: list[int] = []
    for pos, i in enumerate(order):
        batch.append(i)
        size = len(searches[batch[-1]].usable)
        if pos + 1 == len(order) or len(batch) * len(searches[order[pos + 1]].usable) ** 2 > _BATCH_CELLS or len(batch) * size**2 > _BATCH_CELLS:
            _run_batch([searches[j] for j in batch], settings)
            batch = []
    for i, s in searches.items():
        rows, t, fraction, landed = s.result
        keep = np.zeros(len(embeddings[i]), dtype=bool)
        if rows is not None:
            keep[s.usable[rows]] = True
        decisions[i] = ClusterDecision(keep, t, s.rounds, float(fraction), landed)
    return decisions  # type: ignore[return-value]


def adaptive_dbscan_keep(embeddings: np.ndarray, settings: DbscanSettings) -> ClusterDecision:
    """Keep the majority person of one identity's images, adapting the DBSCAN threshold.

    Start at ``t = settings.start_t``; each round keeps the largest non-noise cluster if its
    fraction lies in ``[keep_fraction_low, keep_fraction_high]``; below the band ``t`` is lowered
    by ``step`` (looser), above it raised; ``t`` is clamped to ``[t_min, t_max]``; at most
    ``max_rounds`` rounds. If no round lands in the band, the largest-fraction cluster seen is kept
    (the earliest round wins a tie); when every round found only noise, nothing is kept and the
    reported threshold is the last one tried. Rows whose embedding is non-finite or zero are
    never kept and do not count in the fraction; fewer usable rows than ``min_samples`` keep
    nothing (``rounds = 0``). The search stops early when ``t`` is clamped in place or revisits an
    earlier value: DBSCAN is deterministic, so further rounds could only repeat results already seen.
    """
    return adaptive_dbscan_keep_many([embeddings], settings)[0]


def cluster_votes(view: BlockView, settings: DbscanSettings) -> ExpertVotes:
    """The cluster expert over a block: keep the rows of each identity's chosen cluster, drop the rest.

    Confidence grows with the distance of a row's cosine to its kept cluster's centre from the
    chosen ``t`` (0 at ``t``, 1 at 0.2 away); identities where no cluster formed drop with 0.5.
    """
    from facegen.clean.votes import DROP, KEEP, ExpertVotes

    votes = ExpertVotes.abstaining("cluster", view.num_rows)
    identities = [i for i, rows in view.groups.items() if len(rows)]
    calibrated = settings.mode == "calibrated"
    search = calibrated_search(settings) if calibrated else settings
    decisions = adaptive_dbscan_keep_many([view.unit[view.groups[i]] for i in identities], search)
    thresholds, landed, rescued = [], 0, 0
    for ident, decision in zip(identities, decisions):
        rows = view.groups[ident]
        if decision.rounds == 0 or not decision.keep.any():
            votes.set(rows, DROP, 0.5, "cluster: no cluster formed")
            continue
        thresholds.append(decision.threshold)
        landed += decision.landed_in_band
        members = view.unit[rows[decision.keep]]
        if calibrated:
            # The cluster only finds the majority person; each face is then judged on the pair scale the
            # threshold was calibrated on: its mean cosine to the majority's faces (itself left out).
            # A face the same person as the majority on average is never dropped, one that is not is.
            total = view.unit[rows] @ members.sum(axis=0)
            others = np.where(decision.keep, len(members) - 1, len(members))
            cos = np.where(others > 0, (total - decision.keep) / np.maximum(others, 1), 1.0)
            keep = cos >= decision.threshold
            rescued += int((keep & ~decision.keep).sum())
        else:  # cosine to the kept cluster's centre, for the confidence
            centre = members.mean(axis=0)
            cos, keep = view.unit[rows] @ (centre / np.linalg.norm(centre)), decision.keep
        confidence = np.abs(cos - decision.threshold) / 0.2
        t = f"t={decision.threshold:.2f}, {keep.mean():.0%} kept"
        kept, dropped = rows[keep], rows[~keep]
        if calibrated:
            votes.set(kept, KEEP, confidence[keep], f"cluster: the majority's person (mean cosine to it >= {t})")
            votes.set(dropped, DROP, confidence[~keep], f"cluster: not the majority's person (mean cosine to it < {t})")
        else:
            votes.set(kept, KEEP, confidence[keep], f"cluster: in the largest cluster ({t})")
            votes.set(dropped, DROP, confidence[~keep], f"cluster: outside the largest cluster ({t})")
    votes.info = {
        "identities": len(thresholds),
        "t_mean": float(np.mean(thresholds)) if thresholds else None,
        "t_min": float(np.min(thresholds)) if thresholds else None,
        "t_max": float(np.max(thresholds)) if thresholds else None,
        "rounds_mean": float(np.mean([d.rounds for d in decisions])) if decisions else None,
        "landed_in_band_fraction": landed / len(thresholds) if thresholds else None,
        "mode": settings.mode,
        "kept_outside_the_cluster": rescued,
    }
    return votes


def calibrated_search(settings: DbscanSettings) -> DbscanSettings:
    """The ``calibrated`` mode as one round of the search: ``t`` fixed at ``settings.threshold``
    (a resolved cosine), any fraction accepted."""
    if isinstance(settings.threshold, str):
        raise ValueError(f"clean.dbscan.threshold: {settings.threshold} was not resolved to a cosine")
    t = round(float(settings.threshold), _T_DECIMALS)
    return settings.model_copy(update={"start_t": t, "t_min": t, "t_max": t, "keep_fraction_low": 0.0,
                                       "keep_fraction_high": 1.0, "max_rounds": 1})
