"""IVF search turned inside out for CPUs: the probed lists of a batch of queries scanned list by
list, as matrix products.

faiss's IVF search scans the lists one query at a time, reading each probed list from memory for
every query that probes it. Here the lists come from :func:`spherical_kmeans` (faiss's training
done with bfloat16 products); a batch of 65k queries is assigned to its ``nprobe`` nearest lists
by one product with the centroids, then, for each list, all queries of the batch that probe it are
compared with the list's vectors in one float32 BLAS product, so each list is read once per batch.
The vectors compared are those an IVF index compares (base vectors in their nearest list, queries
in their ``nprobe`` nearest lists); the scan runs at the speed of matrix multiplication.

The assignment products run in bfloat16 (twice float32's rate on CPUs with AVX-512 BF16), which
only decides which lists are probed: a list whose centroid score differs from the next one's by
less than about 1e-3 may be swapped for it. A self-join assigns each vector once: its nearest list
holds it as a base vector, its ``nprobe`` nearest are the lists it probes, and the whole listed
base is one query batch, so every list meets all of its probers in one product.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

#: Queries per batch: enough that every list meets dozens of its probers at once (BLAS-sized products).
BATCH_QUERIES = 65536
#: Rows per product with the centroids (bounds the [rows, lists] score matrix).
ASSIGN_ROWS = 16384


def as_low(x: np.ndarray):
    """``x`` as a bfloat16 torch tensor (the assignment's precision)."""
    import torch

    return torch.from_numpy(np.array(x, np.float32, copy=True, order="C")).to(torch.bfloat16)


def assign(centroids, vecs: np.ndarray, k: int) -> np.ndarray:
    """The ``k`` nearest lists of each vector ``[n, k]`` (inner product with the ``centroids``, a
    bfloat16 tensor ``[lists, d]``), nearest first."""
    import torch

    out = []
    for start in range(0, len(vecs), ASSIGN_ROWS):
        scores = as_low(vecs[start : start + ASSIGN_ROWS]) @ centroids.T
        out.append(torch.topk(scores, k, dim=1).indices.numpy())
    return np.concatenate(out) if out else np.zeros((0, k), np.int64)


def spherical_kmeans(sample: np.ndarray, k: int, iterations: int, seed: int = 1234) -> np.ndarray:
    """``k`` unit centroids ``[k, d]`` (float32) of the unit vectors ``sample`` by spherical k-means
    (Lloyd's iterations from ``k`` random sample vectors, centroids renormalised after each), the
    assignment products in bfloat16 as :func:`assign`'s; a list left empty is re-seeded with a
    random sample vector. About twice faiss's float32 training on CPUs with AVX-512 BF16."""
    import torch

    rng = np.random.default_rng(seed)
    x = torch.from_numpy(np.array(sample, np.float32, copy=True, order="C"))
    low = x.to(torch.bfloat16)
    k = min(k, len(x))
    centroids = x[torch.from_numpy(rng.choice(len(x), k, replace=False))]
    for _ in range(iterations):
        targets = centroids.to(torch.bfloat16).T
        nearest = torch.cat([(low[start : start + ASSIGN_ROWS] @ targets).max(dim=1).indices for start in range(0, len(x), ASSIGN_ROWS)])
        sums = torch.zeros_like(centroids).index_add_(0, nearest, x)
        empty = torch.nonzero(torch.bincount(nearest, minlength=k) == 0).flatten()
        if len(empty):
            sums[empty] = x[torch.from_numpy(rng.choice(len(x), len(empty), replace=False))]
        centroids = torch.nn.functional.normalize(sums, dim=1)
    return centroids.numpy()


@dataclass
class ListedBase:
    """Base vectors grouped by list: rows ``offsets[l]:offsets[l + 1]`` of ``ids`` / ``vectors`` are
    list ``l``; ``centroids`` (bfloat16) assign queries to lists."""

    ids: np.ndarray
    vectors: np.ndarray
    offsets: np.ndarray
    centroids: object


def list_base(chunks: list[tuple[np.ndarray, np.ndarray]], lists: np.ndarray, nlist: int, centroids) -> tuple[ListedBase, np.ndarray]:
    """Base vectors, given as ``(ids, vectors)`` chunks, grouped by their list (``lists``: each
    vector's nearest centroid, in chunk order), and the order taken (``listed[k]`` is input row ``order[k]``)."""
    import warnings

    import torch

    order = np.argsort(lists, kind="stable")
    position = np.empty(len(order), np.int64)
    position[order] = np.arange(len(order))
    dim = chunks[0][1].shape[1] if chunks else 0
    vectors = torch.empty((len(order), dim), dtype=torch.float32)
    start = 0
    for _, vecs in chunks:  # scattered straight from the chunks: no concatenated copy of the base
        stop = start + len(vecs)
        with warnings.catch_warnings():  # a read-only (memory-mapped) chunk: only read here
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            source = torch.from_numpy(np.ascontiguousarray(vecs, np.float32))
        vectors.index_copy_(0, torch.from_numpy(position[start:stop]), source)
        start = stop
    ids = np.concatenate([c[0] for c in chunks]) if chunks else np.zeros(0, np.int64)
    return ListedBase(ids[order], vectors.numpy(), np.searchsorted(lists[order], np.arange(nlist + 1)), centroids), order


def batches(chunks: Iterator[tuple[np.ndarray, np.ndarray]], size: int = BATCH_QUERIES) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Query chunks regrouped into batches of about ``size`` (the same batches on every pass)."""
    ids, vecs, held = [], [], 0
    for chunk_ids, chunk_vecs in chunks:
        ids.append(chunk_ids)
        vecs.append(chunk_vecs)
        held += len(chunk_ids)
        if held >= size:
            yield np.concatenate(ids), np.concatenate(vecs)
            ids, vecs, held = [], [], 0
    if held:
        yield np.concatenate(ids), np.concatenate(vecs)


def join_batch(base: ListedBase, ids: np.ndarray, vecs: np.ndarray, probes: np.ndarray, threshold: float,
               self_rows: np.ndarray | None = None, want_best: bool = True
               ) -> tuple[tuple[np.ndarray, np.ndarray, np.ndarray], np.ndarray, np.ndarray]:
    """Pairs (query id, base id, cosine) at or above ``threshold`` for one query batch probing the
    lists ``probes`` ``[n, nprobe]``, and (``want_best``) each query's best (base id, cosine) among
    the vectors compared (-1 / -inf when none). ``self_rows``: each query's own base row (a
    self-join), never paired with it."""
    vecs = np.ascontiguousarray(vecs, np.float32)
    rows = np.repeat(np.arange(len(ids)), probes.shape[1])
    lists = probes.ravel()
    order = np.argsort(lists, kind="stable")
    rows, lists = rows[order], lists[order]
    bounds = np.flatnonzero(np.diff(lists)) + 1
    best_sim = np.full(len(ids), -np.inf, np.float32)
    best_row = np.full(len(ids), -1, np.int64)
    found_q, found_b, found_s = [], [], []
    for start, stop in zip(np.r_[0, bounds], np.r_[bounds, len(lists)]):
        lo, hi = base.offsets[lists[start]], base.offsets[lists[start] + 1]
        if start == stop or lo == hi:
            continue
        probers = rows[start:stop]
        sims = np.take(vecs, probers, axis=0) @ base.vectors[lo:hi].T  # np.take: several times faster than vecs[probers]
        if self_rows is not None:  # -1: not a base vector here
            own = self_rows[probers]
            inside = (own >= lo) & (own < hi)
            sims[np.flatnonzero(inside), own[inside] - lo] = -np.inf
        if want_best:
            top = sims.argmax(axis=1)
            top_sim = sims[np.arange(len(probers)), top]
            better = top_sim > best_sim[probers]
            best_sim[probers[better]] = top_sim[better]
            best_row[probers[better]] = lo + top[better]
        else:
            top_sim = sims.max(axis=1)
        hit = np.flatnonzero(top_sim >= threshold)  # few rows hold a pair: the full mask is built for those only
        if len(hit):
            r, c = np.nonzero(sims[hit] >= threshold)
            r = hit[r]
            found_q.append(ids[probers[r]])
            found_b.append(base.ids[lo + c])
            found_s.append(sims[r, c])
    best_id = np.where(best_row >= 0, base.ids[np.maximum(best_row, 0)], -1) if len(base.ids) else best_row
    if not found_q:
        empty = np.zeros(0, np.int64)
        return (empty, empty, np.zeros(0, np.float32)), best_id, best_sim
    return (np.concatenate(found_q), np.concatenate(found_b), np.concatenate(found_s)), best_id, best_sim
