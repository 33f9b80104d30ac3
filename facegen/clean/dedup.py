"""Cross-identity deduplication: identities whose centres are too close are one person.

The centres of all identities are searched against themselves (:mod:`facegen.clean.search`); pairs
at or above ``threshold`` (compared with the centres' cosine, or with ``measure: mean_pair`` the
mean cosine between the two identities' images, the scale of a same-person threshold) link
identities into groups (connected components). In each group the identity with the most kept images survives (ties: the lower id); the others are dropped or, with
``action: merge``, their kept images join the survivor. Every pair is recorded.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from facegen.clean.search import ChunkSource, SearchPlan, search_pairs
from facegen.config import DedupSettings, SearchSettings


@dataclass
class DedupResult:
    """``pairs``: (query_id, base_id, cosine) with query_id < base_id; ``absorbed``: removed identity ->
    the survivor of its group; ``plan``: the search used."""

    pairs: pa.Table
    absorbed: dict[int, int]
    plan: SearchPlan


def _groups(a: np.ndarray, b: np.ndarray) -> dict[int, list[int]]:
    parent: dict[int, int] = {}

    def root(x: int) -> int:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for x, y in zip(a.tolist(), b.tolist()):
        rx, ry = root(x), root(y)
        if rx != ry:
            parent[max(rx, ry)] = min(rx, ry)
    groups: dict[int, list[int]] = {}
    for x in parent:
        groups.setdefault(root(x), []).append(x)
    return groups


def survivors(pairs: pa.Table, num_kept: dict[int, int]) -> dict[int, int]:
    """Removed identity -> survivor, for the groups that ``pairs`` link."""
    a, b = pairs.column("query_id").to_numpy(), pairs.column("base_id").to_numpy()
    absorbed = {}
    for members in _groups(a, b).values():
        keeper = max(members, key=lambda i: (num_kept.get(i, 0), -i))
        absorbed.update({i: keeper for i in members if i != keeper})
    return absorbed


def mean_pair_cosines(pairs: pa.Table, lengths: dict[int, float]) -> np.ndarray:
    """The mean cosine between two identities' images for each centre pair: the centres' cosine
    times the lengths of both identities' mean unit embeddings."""
    a = np.array([lengths[i] for i in pairs.column("query_id").to_pylist()], np.float64)
    b = np.array([lengths[i] for i in pairs.column("base_id").to_pylist()], np.float64)
    return pairs.column("cosine").to_numpy().astype(np.float64) * a * b


def find_duplicates(centres: ChunkSource, num_kept: Callable[[np.ndarray], dict[int, int]], settings: DedupSettings,
                    search: SearchSettings, mean_length: Callable[[np.ndarray], dict[int, float]] | None = None) -> DedupResult:
    """Search ``centres`` (ids = identity ids) against themselves and decide who survives;
    ``num_kept(ids)`` gives the kept-image counts of the identities found in pairs, ``mean_length(ids)``
    their mean unit embeddings' lengths (for ``measure: mean_pair``)."""
    pairs, plan = search_pairs(centres, centres, settings.threshold, search, self_join=True)
    if settings.measure == "mean_pair" and pairs.num_rows:
        if mean_length is None:
            raise ValueError("clean.dedup.measure: mean_pair needs the identities' mean lengths")
        # a mean pair cosine never exceeds the centres' cosine (lengths <= 1): the search above missed none
        ids = np.unique(np.concatenate([pairs.column("query_id").to_numpy(), pairs.column("base_id").to_numpy()]))
        pairs = pairs.filter(pa.array(mean_pair_cosines(pairs, mean_length(ids)) >= settings.threshold))
    involved = np.unique(np.concatenate([pairs.column("query_id").to_numpy(), pairs.column("base_id").to_numpy()]))
    return DedupResult(pairs, survivors(pairs, num_kept(involved) if involved.size else {}), plan)
