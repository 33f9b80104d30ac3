"""Neighbour search on unit embeddings with faiss, in chunks, never an N x N matrix.

Identity repulsion only acts between embeddings closer than a radius, so each particle needs its few
nearest neighbours, not every other particle. Up to ``exact_max`` points the search is exact
(``IndexFlatIP``); beyond, an inverted-file index (about ``cluster_size`` points per list, ``nprobe``
lists searched) keeps the cost near-linear in the number of particles. With faiss-gpu and CUDA the
index lives on the GPU, where exact search stays affordable at millions of points.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class KnnOptions:
    """How neighbour lists are searched."""

    k: int = 16
    chunk_size: int = 65536
    exact_max: int = 200_000
    cluster_size: int = 1000
    nprobe: int = 8
    use_gpu: bool = True


def _faiss():
    import faiss

    return faiss


def gpu_available() -> bool:
    """Whether faiss was built with GPU support and sees a GPU."""
    faiss = _faiss()
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def build_index(points: np.ndarray, options: KnnOptions):
    """An inner-product index over float32 ``points`` (exact, or IVF above ``exact_max``)."""
    faiss = _faiss()
    points = np.ascontiguousarray(points, dtype=np.float32)
    n, dim = points.shape
    if n <= options.exact_max:
        index = faiss.IndexFlatIP(dim)
    else:
        nlist = max(1, n // options.cluster_size)
        quantizer = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)
        index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.max_points_per_centroid = 64  # k-means on a sample: training stays a small share of the cost
        rng = np.random.default_rng(0)
        sample = points[rng.choice(n, size=min(n, 64 * nlist), replace=False)]
        index.train(sample)
        index.nprobe = options.nprobe
    if options.use_gpu and gpu_available() and n <= options.exact_max * 50:
        index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
    for start in range(0, n, options.chunk_size):
        index.add(points[start : start + options.chunk_size])
    return index


def search(index, queries: np.ndarray, k: int, chunk_size: int) -> tuple[np.ndarray, np.ndarray]:
    """``(similarities, ids)`` of the ``k`` nearest points to each query, searched in chunks."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    sims = np.empty((len(queries), k), np.float32)
    ids = np.empty((len(queries), k), np.int64)
    for start in range(0, len(queries), chunk_size):
        stop = start + chunk_size
        sims[start:stop], ids[start:stop] = index.search(queries[start:stop], k)
    return sims, ids


def neighbour_pairs(points: np.ndarray, options: KnnOptions) -> np.ndarray:
    """Undirected pairs ``(i, j), i < j`` of each point with its ``k`` nearest others, deduplicated."""
    n = len(points)
    if n < 2:
        return np.zeros((0, 2), np.int64)
    k = min(options.k + 1, n)
    index = build_index(points, options)
    _, ids = search(index, points, k, options.chunk_size)
    del index
    rows = np.repeat(np.arange(n, dtype=np.int64), k)
    cols = ids.reshape(-1)
    keep = (cols >= 0) & (cols != rows)
    lo, hi = np.minimum(rows[keep], cols[keep]), np.maximum(rows[keep], cols[keep])
    keys = np.unique(lo * n + hi)
    return np.stack([keys // n, keys % n], axis=1)


def reference_neighbours(points: np.ndarray, reference_index, k: int, chunk_size: int) -> np.ndarray:
    """Ids ``[N, k]`` of the nearest fixed reference points (e.g. real-face embeddings) to each point."""
    _, ids = search(reference_index, points, k, chunk_size)
    return ids
