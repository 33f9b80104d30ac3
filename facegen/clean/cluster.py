"""Per-identity consistency expert: adaptive DBSCAN on face embeddings (ALGORITHMS.md 1.2).

The images of one identity are clustered with DBSCAN (cosine metric, ``eps = 1 - t``); the largest
cluster is the identity's majority person. ``t`` is moved until that cluster holds a plausible
fraction of the images: too small a cluster means ``t`` is too strict for this identity's spread,
too large means outliers are being absorbed.

This is the fast path. The cosine-distance matrix of an identity is computed once. DBSCAN at one
``eps`` is "connected components of the core points (points with at least ``min_samples``
neighbours within ``eps``, themselves included), plus every border point attached to the first
cluster that reaches it"; the core components at every ``eps`` are the edges of at most ``eps`` of
one minimum spanning tree over mutual-reachability weights, so the clusters at every ``t`` the
search can reach (at most ``2 * max_rounds - 1`` values) are found at once, and the search walks
their sizes. Identities of similar size are processed together as one padded batch.
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
_BATCH_CELLS = 1 << 18


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


def usable_rows(embeddings: np.ndarray, name: str = "embeddings") -> np.ndarray:
    """Indices of the rows whose values are all finite and not all zero."""
    emb = np.asarray(embeddings)
    if emb.ndim != 2:
        raise ValueError(f"adaptive_dbscan_keep: {name} must be 2-D [n, d], got shape {emb.shape}")
    return np.flatnonzero(np.isfinite(emb).all(axis=1) & (emb != 0).any(axis=1))


def normalise_rows(x: np.ndarray) -> np.ndarray:
    """``x`` (float64, last axis the vector) divided in place by its L2 norms; all-zero rows stay zero."""
    norms = np.sqrt(np.einsum("...d,...d->...", x, x))
    norms[norms == 0] = 1.0
    x /= norms[..., None]
    return x


def usable_unit_rows(embeddings: np.ndarray, name: str = "embeddings") -> tuple[np.ndarray, np.ndarray]:
    """:func:`usable_rows` and those rows L2-normalised (float64)."""
    usable = usable_rows(embeddings, name)
    return usable, normalise_rows(np.asarray(embeddings)[usable].astype(np.float64))


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


def reachability_tree(distance: np.ndarray, core_distance: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A minimum spanning tree per batch row over mutual-reachability weights
    ``max(d(i, j), core(i), core(j))``, by Prim's algorithm run on the whole batch at once.

    Returns ``parent`` ``[b, n]`` and ``weight`` ``[b, n]``: the tree edge from each row up to its
    parent (the root, row 0, and padding have weight ``inf``). Rows i and j are core and linked
    within ``eps`` exactly when that weight is at most ``eps``, and a spanning tree of minimum
    weight keeps every component of such links connected: DBSCAN's clusters at any ``eps`` are the
    tree's edges of weight at most ``eps`` (single linkage), found in ``O(n)`` per round.
    """
    b, n, _ = distance.shape
    links = np.maximum(distance, np.maximum(core_distance[:, :, None], core_distance[:, None, :]))
    rows = np.arange(b)
    in_tree = np.zeros((b, n), dtype=bool)
    in_tree[:, 0] = True
    best = links[:, 0].copy()
    parent = np.zeros((b, n), dtype=np.intp)
    weight = np.full((b, n), np.inf)
    for _ in range(n - 1):
        nearest = np.where(in_tree, np.inf, best).argmin(axis=1)
        weight[rows, nearest] = best[rows, nearest]
        in_tree[rows, nearest] = True
        reach = links[rows, nearest]
        closer = (reach < best) & ~in_tree
        best = np.where(closer, reach, best)
        parent = np.where(closer, nearest[:, None], parent)
    return parent, weight


def dbscan_labels(distance: np.ndarray, core_distance: np.ndarray, tree: tuple[np.ndarray, np.ndarray],
                  eps: np.ndarray, min_samples: int) -> np.ndarray:
    """DBSCAN labels of a padded batch at ``eps`` ``[b]``.

    ``distance`` ``[b, n, n]`` (``inf`` where a padding row or column is involved); ``core_distance``
    ``[b, n]``: each row's distance to its ``min_samples``-th nearest row, itself included (``inf``
    for padding), so a row is core when it is at most ``eps``; ``tree``: :func:`reachability_tree`.
    A label is the smallest core-row index of the cluster (-1 = noise or padding), so clusters are
    ordered as scikit-learn numbers them (by their first core row) and a border row within ``eps`` of
    several clusters joins the first, as scikit-learn's expansion order does.
    """
    parent, weight = tree
    b, n = parent.shape
    index = np.broadcast_to(np.arange(n), (b, n))
    top = np.where(weight <= eps[:, None], parent, index)  # up the tree while the edge is within eps
    while True:
        higher = np.take_along_axis(top, top, axis=1)
        if np.array_equal(higher, top):
            break
        top = higher
    component = (top + (np.arange(b) * n)[:, None]).ravel()
    smallest = np.full(b * n, n)
    np.minimum.at(smallest, component, index.ravel())
    core = core_distance <= eps[:, None]
    labels = np.where(core, smallest[component].reshape(b, n), n)
    if min_samples > 2:  # border rows (within eps of a core row but not core) exist only then
        to_core = (distance <= eps[:, None, None]) & core[:, None, :]
        border = np.where(to_core, labels[:, None, :], n).min(axis=2)
        labels = np.where(core, labels, border)
    return np.where(labels < n, labels, -1)


def reachable_thresholds(settings: DbscanSettings) -> list[float]:
    """Every ``t`` the search can try: ``start_t`` moved by up to ``max_rounds - 1`` steps either
    way, clamped and rounded as the search moves it."""
    seen = frontier = {clamp_t(settings.start_t, settings)}
    for _ in range(settings.max_rounds - 1):
        frontier = {clamp_t(t + d, settings) for t in frontier for d in (-settings.step, settings.step)} - seen
        seen = seen | frontier
    return sorted(seen)


def _search(sizes: np.ndarray, usable: int, index_of: dict[float, int], settings: DbscanSettings) -> tuple:
    """One identity's threshold search on its largest-cluster sizes at every reachable ``t``
    (``sizes[index_of[t]]``): ``(chosen t's index or None, t, fraction, landed, rounds)``."""
    low, high = settings.keep_fraction_low, settings.keep_fraction_high
    t = clamp_t(settings.start_t, settings)
    seen, rounds, best, best_fraction, best_t = set(), 0, None, 0.0, t
    while True:
        seen.add(t)
        rounds, last_t = rounds + 1, t
        at = index_of[t]
        fraction = sizes[at] / usable
        if sizes[at] and low <= fraction <= high:
            return at, t, fraction, True, rounds
        if sizes[at] and fraction > best_fraction:
            best, best_fraction, best_t = at, fraction, t
        t = clamp_t(t + (-settings.step if fraction < low else settings.step), settings)
        if rounds >= settings.max_rounds or t in seen:
            return best, best_t if best is not None else last_t, best_fraction, False, rounds


def _distances(unit: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Cosine distances ``[b, n, n]`` in float64 of a padded batch (``sizes`` rows used in each),
    ``inf`` where padding is involved.

    torch's batched product: about twice numpy's stacked ``matmul`` for these small matrices.
    """
    import torch

    stacked = torch.from_numpy(unit)
    distance = torch.bmm(stacked, stacked.transpose(1, 2)).numpy()
    # not clipped to [0, 2] as scikit-learn does: no eps tested lies outside (0, 2), so no comparison changes
    np.subtract(1.0, distance, out=distance)
    for i, size in enumerate(sizes):  # padding sits at the end of each identity's rows
        distance[i, size:], distance[i, :, size:] = np.inf, np.inf
    return distance


def _decide_batch(rows: list[np.ndarray], settings: DbscanSettings) -> list[tuple]:
    """The search of each identity of one batch (its usable rows as given), as :func:`_search`
    returns it with the kept row indices in place of the chosen index."""
    ts = reachable_thresholds(settings)
    index_of = {t: g for g, t in enumerate(ts)}
    b, n, grid = len(rows), max(len(r) for r in rows), len(ts)
    unit = np.zeros((b, n, rows[0].shape[1]))
    counts = np.array([len(r) for r in rows])
    for i, r in enumerate(rows):
        unit[i, : len(r)] = r
    normalise_rows(unit)
    distance = _distances(unit, counts)
    # a row is core at eps when its min_samples-th nearest row (itself included) is within eps
    core_distance = np.partition(distance, settings.min_samples - 1, axis=2)[:, :, settings.min_samples - 1]
    parent, weight = reachability_tree(distance, core_distance)
    # DBSCAN at every reachable t at once: batch rows (identity, t), identity-major
    eps = np.tile([max(1.0 - t, 1e-12) for t in ts], b)
    labels = dbscan_labels(np.repeat(distance, grid, axis=0) if settings.min_samples > 2 else distance,
                           np.repeat(core_distance, grid, axis=0), (np.repeat(parent, grid, axis=0), np.repeat(weight, grid, axis=0)),
                           eps, settings.min_samples)
    flat = np.where(labels >= 0, labels + (np.arange(b * grid) * n)[:, None], b * grid * n)
    sizes = np.bincount(flat.ravel(), minlength=b * grid * n + 1)[: b * grid * n].reshape(b * grid, n)
    biggest, winner = sizes.max(axis=1), sizes.argmax(axis=1)
    tied = (sizes == biggest[:, None]).sum(axis=1) > 1
    out = []
    for i in range(b):
        at, t, fraction, landed, rounds = _search(biggest[i * grid : (i + 1) * grid], counts[i], index_of, settings)
        kept = None
        if at is not None:
            own = labels[i * grid + at, : counts[i]]
            if tied[i * grid + at]:  # the slow, exact tie-break of the reference
                kept = largest_cluster(own, unit[i, : counts[i]])
            else:
                kept = np.flatnonzero(own == winner[i * grid + at])
        out.append((kept, t, fraction, landed, rounds))
    return out


def _rows(embeddings: np.ndarray, usable: np.ndarray) -> np.ndarray:
    emb = np.asarray(embeddings)
    return emb if len(usable) == len(emb) else emb[usable]


def adaptive_dbscan_keep_many(embeddings: Sequence[np.ndarray], settings: DbscanSettings) -> list[ClusterDecision]:
    """:func:`adaptive_dbscan_keep` for many identities at once (one decision per input, in order).

    Identities are sorted by size and run in padded batches. Each identity's distances are computed
    once, and its clusters at every ``t`` the search can reach come from one spanning tree
    (:func:`reachability_tree`) for the whole batch at once; the search then walks those sizes.
    """
    decisions: list[ClusterDecision | None] = [None] * len(embeddings)
    start_t = clamp_t(settings.start_t, settings)
    usable: dict[int, np.ndarray] = {}
    for i, emb in enumerate(embeddings):
        rows = usable_rows(emb)
        if len(rows) == 0 or len(rows) < settings.min_samples:
            decisions[i] = ClusterDecision(np.zeros(len(emb), dtype=bool), start_t, 0, 0.0, False)
        else:
            usable[i] = rows
    order = sorted(usable, key=lambda i: len(usable[i]))
    # border rows need the distances at every t (min_samples > 2): they then bound the batch
    grid = len(reachable_thresholds(settings)) if settings.min_samples > 2 else 1
    batch: list[int] = []
    for pos, i in enumerate(order):
        batch.append(i)
        size = len(usable[i])
        following = len(usable[order[pos + 1]]) if pos + 1 < len(order) else 0
        if not following or len(batch) * grid * max(following, size) ** 2 > _BATCH_CELLS:
            decided = _decide_batch([_rows(embeddings[j], usable[j]) for j in batch], settings)
            for j, (kept, t, fraction, landed, rounds) in zip(batch, decided):
                keep = np.zeros(len(embeddings[j]), dtype=bool)
                if kept is not None:
                    keep[usable[j][kept]] = True
                decisions[j] = ClusterDecision(keep, t, rounds, float(fraction), landed)
            batch = []
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
