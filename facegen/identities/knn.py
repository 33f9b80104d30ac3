"""Neighbour search on unit embeddings, in chunks, never an N x N matrix.

Identity repulsion only acts between embeddings closer than a radius, so each particle needs its few
nearest neighbours, not every other particle. Two searches:

``exact``  inner products of a block of queries against all points, top-k per row: faiss's GPU flat
           index when faiss-gpu and CUDA are present (the ``[gpu]`` extra), else torch matmul + topk
           (on CUDA when present): exact, and the fastest choice up to a few hundred thousand points
           on CPU (on 2 cores it beats faiss's CPU flat index) and to millions on a GPU.
``ivf``    a faiss inverted-file index (about ``cluster_size`` points per list, ``nprobe`` lists
           searched), built as the cleaning's dedup builds its own (:func:`facegen.clean.search.ivf_index`:
           a flat quantizer up to 4096 lists, spherical k-means on a sample): per-query cost
           independent of N, so a neighbour rebuild stays near-linear at millions of points on CPU,
           at the price of recall.

``auto`` picks exact up to ``exact_max`` points (or always, on a GPU), IVF beyond.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from facegen.clean.search import gpu_available
from facegen.devices import resolve_device

#: Inner-product scores held at once by an exact search (floats): bounds its memory to ~1 GiB.
_SCORE_BUDGET = 1 << 28


@dataclass(frozen=True)
class KnnOptions:
    """How neighbour lists are searched."""

    k: int = 16
    chunk_size: int = 65536
    index: str = "auto"  # "auto" | "exact" | "ivf"
    exact_max: int = 200_000
    cluster_size: int = 1000
    nprobe: int = 8
    use_gpu: bool = True


class ExactIndex:
    """All points in one (device) matrix; queries scored in blocks that fit the score budget."""

    def __init__(self, points: np.ndarray, device: torch.device):
        self.device = device
        self.points = torch.from_numpy(np.ascontiguousarray(points, np.float32)).to(device)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        n = self.points.shape[0]
        block = max(1, min(len(queries), _SCORE_BUDGET // max(n, 1)))
        sims = np.empty((len(queries), k), np.float32)
        ids = np.empty((len(queries), k), np.int64)
        for start in range(0, len(queries), block):
            q = torch.from_numpy(np.ascontiguousarray(queries[start : start + block], np.float32)).to(self.device)
            values, indices = torch.topk(q @ self.points.T, k, dim=1)
            sims[start : start + len(q)] = values.cpu().numpy()
            ids[start : start + len(q)] = indices.cpu().numpy()
        return sims, ids


class FaissGpuExact:
    """faiss ``GpuIndexFlatIP``: exact search on the GPU, tiled by faiss itself."""

    def __init__(self, points: np.ndarray, chunk_size: int):
        from facegen.clean.search import flat_index

        points = np.ascontiguousarray(points, np.float32)
        self.index = flat_index(points.shape[1], gpu=True)
        for start in range(0, len(points), chunk_size):
            self.index.add(points[start : start + chunk_size])
        self.chunk_size = chunk_size

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return _search_in_chunks(self.index, queries, k, self.chunk_size)


def _search_in_chunks(index, queries: np.ndarray, k: int, chunk_size: int) -> tuple[np.ndarray, np.ndarray]:
    queries = np.ascontiguousarray(queries, np.float32)
    sims = np.empty((len(queries), k), np.float32)
    ids = np.empty((len(queries), k), np.int64)
    for start in range(0, len(queries), chunk_size):
        stop = start + chunk_size
        sims[start:stop], ids[start:stop] = index.search(queries[start:stop], k)
    return sims, ids


class IvfIndex:
    """A faiss IVF index (inner product) over the points, from the one IVF builder facegen has."""

    def __init__(self, points: np.ndarray, options: KnnOptions):
        from facegen.clean.search import ivf_index
        from facegen.config import SearchSettings

        settings = SearchSettings(device="auto" if options.use_gpu else "cpu", vectors_per_list=options.cluster_size,
                                  nprobe=options.nprobe, capped_nprobe=options.nprobe)
        self.index = ivf_index(points, settings, options.chunk_size)
        self.chunk_size = options.chunk_size

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return _search_in_chunks(self.index, queries, k, self.chunk_size)


def build_index(points: np.ndarray, options: KnnOptions) -> ExactIndex | FaissGpuExact | IvfIndex:
    """The index ``options.index`` asks for (``auto``: exact up to ``exact_max`` or on a GPU)."""
    device = resolve_device("auto" if options.use_gpu else "cpu")
    kind = options.index
    if kind == "auto":
        kind = "exact" if len(points) <= options.exact_max or device.type == "cuda" else "ivf"
    if kind == "exact":
        if device.type == "cuda" and gpu_available():
            return FaissGpuExact(points, options.chunk_size)
        return ExactIndex(points, device)
    if kind == "ivf":
        return IvfIndex(points, options)
    raise ValueError(f"neighbour index must be auto, exact or ivf, got {options.index!r}")


def neighbour_pairs(points: np.ndarray, options: KnnOptions) -> np.ndarray:
    """Undirected pairs ``(i, j), i < j`` of each point with its ``k`` nearest others, deduplicated."""
    n = len(points)
    if n < 2:
        return np.zeros((0, 2), np.int64)
    k = min(options.k + 1, n)
    index = build_index(points, options)
    _, ids = index.search(points, k)
    del index
    rows = np.repeat(np.arange(n, dtype=np.int64), k)
    cols = ids.reshape(-1)
    del ids
    keep = (cols >= 0) & (cols != rows)
    lo, hi = np.minimum(rows[keep], cols[keep]), np.maximum(rows[keep], cols[keep])
    keys = np.unique(lo * n + hi)
    return np.stack([keys // n, keys % n], axis=1)
