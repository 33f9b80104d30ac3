"""All pairs above a cosine threshold between two sets of unit vectors, with faiss, in bounded memory.

The base set is indexed in parts of at most ``max_vectors_per_part`` vectors (one part in memory at
a time); query vectors stream through each part in chunks. ``index: auto`` (the default) searches
a part exactly (flat inner product) up to ``exact_max_cpu`` / ``exact_max_gpu`` base vectors and
with IVF-Flat above, on the GPU when faiss has one (``device: auto``). IVF's lists hold about
``vectors_per_list`` vectors each, so with a fixed ``nprobe`` the scan per query does not grow
with the base, up to ``max_lists`` lists (4096: above ``HNSW_QUANTIZER_LISTS`` the centroids would
be searched through a graph, whose cost and misses grew with N: see bench/RESULTS.md); capped lists
hold more vectors and only ``capped_nprobe`` of them are searched; the lists
come from spherical k-means on ``train_per_list`` sampled vectors per list. Small lists matter
more than nprobe: on bench/cleaning.py's 512-d centres clustered around 1000 modes, a pair at
cosine 0.75-0.9 fell outside the 16 lists probed for 4.6 % of queries with 390 lists over 100k
vectors (256 per list), 1.1 % with 781 and 0.07 % with 1562 (64 per list, the default), which
also scans fewer vectors per query; dedup finds a pair from either side, leakage from one.
``index: hnsw`` (CPU only) keeps a graph instead; its recall fell with N there (0.79 at 1M). Each query asks for ``knn`` neighbours first and again with 4x as many while
its last neighbour is still above the threshold, so no pair above it is cut off by k.

Vectors arrive as chunks ``(ids int64 [k], vectors float32 [k, d])`` from a :class:`ChunkSource`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from facegen.clean import list_join
from facegen.config import SearchSettings

GPU_MAX_K = 2048  # faiss GPU k-NN limit: a query with more neighbours above the threshold is cut there
HNSW_QUANTIZER_LISTS = 4096  # above this many IVF lists (CPU), centroids are found through an HNSW graph
PAIRS = pa.schema([pa.field("query_id", pa.int64()), pa.field("base_id", pa.int64()), pa.field("cosine", pa.float32())])


class ChunkSource:
    """A re-iterable source of ``(ids, vectors)`` chunks; ``total`` vectors in all."""

    total: int
    dim: int

    def chunks(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        raise NotImplementedError


@dataclass
class ArrayChunks(ChunkSource):
    """Vectors in memory or memory-mapped (``np.load(..., mmap_mode="r")``); ids default to row numbers."""

    vectors: np.ndarray
    ids: np.ndarray | None = None
    chunk: int = 65536

    def __post_init__(self) -> None:
        if self.vectors.ndim != 2:
            raise ValueError(f"vectors must be 2-D [n, d], got shape {self.vectors.shape}")
        self.total, self.dim = self.vectors.shape
        if self.ids is not None and len(self.ids) != self.total:
            raise ValueError(f"{len(self.ids)} ids for {self.total} vectors")

    def chunks(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for start in range(0, self.total, self.chunk):
            stop = min(self.total, start + self.chunk)
            ids = np.arange(start, stop, dtype=np.int64) if self.ids is None else np.asarray(self.ids[start:stop], np.int64)
            yield ids, np.ascontiguousarray(self.vectors[start:stop], dtype=np.float32)


@dataclass
class ParquetChunks(ChunkSource):
    """A fixed-size-list vector column of Parquet files (local or ``s3://``), read a file at a time.

    ``filter_column``/``filter_value`` keep only matching rows (e.g. ``status == "ok"``).
    """

    paths: Sequence[str]
    id_column: str
    vector_column: str
    chunk: int = 65536
    filter_column: str | None = None
    filter_value: str | None = None
    total: int = field(init=False, default=0)
    dim: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        import pyarrow.parquet as pq

        from facegen.storage import _resolve

        for path in self.paths:
            fs, local = _resolve(path)
            with fs.open_input_file(local) as handle:
                meta = pq.ParquetFile(handle)
                schema = meta.schema_arrow
                if self.vector_column not in schema.names or self.id_column not in schema.names:
                    raise ValueError(f"{path}: needs columns {self.id_column!r} and {self.vector_column!r}")
                self.dim = schema.field(self.vector_column).type.list_size
                self.total += meta.metadata.num_rows if self.filter_column is None else self._rows(path).num_rows

    def _rows(self, path: str) -> pa.Table:
        from facegen.storage import read_table

        columns = [self.id_column, self.vector_column] + ([self.filter_column] if self.filter_column else [])
        table = read_table(path, columns=columns)
        if self.filter_column:
            table = table.filter(pc.equal(table.column(self.filter_column), self.filter_value))
        return table.filter(pc.is_valid(table.column(self.vector_column)))

    def chunks(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        ids: list[np.ndarray] = []
        vecs: list[np.ndarray] = []
        held = 0
        for path in self.paths:
            table = self._rows(path)
            if table.num_rows == 0:
                continue
            ids.append(table.column(self.id_column).to_numpy().astype(np.int64))
            flat = pc.list_flatten(table.column(self.vector_column)).to_numpy(zero_copy_only=False)
            vecs.append(flat.astype(np.float32).reshape(table.num_rows, self.dim))
            held += table.num_rows
            if held >= self.chunk:
                yield np.concatenate(ids), np.concatenate(vecs)
                ids, vecs, held = [], [], 0
        if held:
            yield np.concatenate(ids), np.concatenate(vecs)


def gpu_available() -> bool:
    """Whether this faiss build has GPU support and sees a GPU."""
    import faiss

    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def _on_gpu(settings: SearchSettings) -> bool:
    if settings.device == "cuda":
        if not gpu_available():
            raise ValueError("clean.search.device: cuda asked for, but faiss has no GPU support here (install faiss-gpu)")
        return True
    return settings.device == "auto" and gpu_available()


@dataclass
class SearchPlan:
    """What :func:`build_plan` chose for a base of ``total`` vectors."""

    kind: str  # "flat" or "ivf"
    gpu: bool
    nlist: int
    parts: int
    nprobe: int = 0  # IVF lists searched per query
    capped: bool = False  # max_lists capped the lists (they hold more than vectors_per_list)


def build_plan(total: int, settings: SearchSettings) -> SearchPlan:
    """The index ``settings.index`` names; for ``auto``, exact below the device's limit and IVF above.
    Also the number of base parts bounding memory."""
    gpu = _on_gpu(settings)
    exact_max = settings.exact_max_gpu if gpu else settings.exact_max_cpu
    parts = max(1, -(-total // settings.max_vectors_per_part))
    per_part = -(-total // parts)
    kind = settings.index
    if kind == "auto":
        kind = "flat" if total <= exact_max else "ivf"
    if kind == "hnsw" and gpu:
        raise ValueError("clean.search.index: hnsw runs on CPU only; use ivf or flat with device cuda, or device cpu")
    if kind != "ivf":
        return SearchPlan(kind, gpu, 0, parts)
    wanted = max(1, per_part // settings.vectors_per_list)
    nlist = min(settings.max_lists, wanted)
    nprobe = settings.nprobe if wanted <= settings.max_lists else min(settings.nprobe, settings.capped_nprobe)
    return SearchPlan("ivf", gpu, nlist, parts, min(nprobe, nlist), capped=wanted > settings.max_lists)


def _training_sample(base: ChunkSource, size: int, seed: int = 0) -> np.ndarray:
    """About ``size`` base vectors drawn evenly over all chunks (one pass)."""
    rng = np.random.default_rng(seed)
    keep_p = min(1.0, size / max(1, base.total))
    picked = [vecs[rng.random(len(vecs)) < keep_p] for _, vecs in base.chunks()]
    return np.ascontiguousarray(np.concatenate(picked), dtype=np.float32)


def _new_index(plan: SearchPlan, dim: int, trained: "object | None", settings: SearchSettings):
    import faiss

    if plan.kind == "flat":
        index = faiss.IndexIDMap(faiss.IndexFlatIP(dim))
    elif plan.kind == "hnsw":
        graph = faiss.IndexHNSWFlat(dim, settings.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        graph.hnsw.efConstruction = settings.hnsw_ef_construction
        graph.hnsw.efSearch = settings.hnsw_ef_search
        index = faiss.IndexIDMap(graph)
        index.own_fields = True
        graph.this.disown()
    else:
        index = faiss.clone_index(trained)
    if plan.gpu:
        resources = faiss.StandardGpuResources()
        index = faiss.index_cpu_to_gpu(resources, 0, index)
        index.gpu_resources = resources  # must outlive the index
    return index


def _train_ivf(base: ChunkSource, plan: SearchPlan, settings: SearchSettings):
    import faiss

    large = plan.nlist > HNSW_QUANTIZER_LISTS and not plan.gpu  # a GPU index needs a flat quantizer
    quantizer = faiss.IndexHNSWFlat(base.dim, 32, faiss.METRIC_INNER_PRODUCT) if large else faiss.IndexFlatIP(base.dim)
    index = faiss.IndexIVFFlat(quantizer, base.dim, plan.nlist, faiss.METRIC_INNER_PRODUCT)
    index.cp.seed = 1234
    index.cp.niter = settings.train_iterations
    index.cp.min_points_per_centroid = 1  # the sample size is ours to choose (train_per_list)
    index.cp.spherical = True  # unit centroids: inner product ranks lists by angle, not by centroid norm
    assign = faiss.IndexHNSWFlat(base.dim, 32, faiss.METRIC_INNER_PRODUCT) if large else None
    if assign is not None:  # k-means assignment through a graph over the centroids: training stays near-linear in N
        index.clustering_index = assign
    per_list = settings.capped_train_per_list if plan.capped else settings.train_per_list
    sample = _training_sample(base, plan.nlist * per_list)
    index.train(sample)
    if assign is not None:
        index.clustering_index = None
    index.nprobe = plan.nprobe
    if large:
        faiss.downcast_index(index.quantizer).hnsw.efSearch = max(64, 4 * index.nprobe)
    index.own_fields = True
    quantizer.this.disown()
    return index


def flat_index(dim: int, gpu: bool):
    """An exact inner-product faiss index, on the GPU when ``gpu`` and faiss has one."""
    import faiss

    index = faiss.IndexFlatIP(dim)
    if gpu and gpu_available():
        resources = faiss.StandardGpuResources()
        index = faiss.index_cpu_to_gpu(resources, 0, index)
        index.gpu_resources = resources  # must outlive the index
    return index


def ivf_index(vectors: np.ndarray, settings: SearchSettings, chunk: int = 65536):
    """An IVF index over ``vectors`` (unit rows) built as the dedup's: :func:`build_plan`'s lists
    and probes, spherical k-means on a sample, on the GPU where the plan says; filled in chunks."""
    base = ArrayChunks(np.asarray(vectors, np.float32), chunk=chunk)
    plan = build_plan(base.total, settings.model_copy(update={"index": "ivf", "max_vectors_per_part": max(1, base.total)}))
    index = _new_index(plan, base.dim, _train_ivf(base, plan, settings), settings)
    for _, vecs in base.chunks():
        index.add(vecs)
    return index


def _graph_of(index):
    """The HNSW index inside an ID map, or None."""
    import faiss

    inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap) else None
    return inner if isinstance(inner, faiss.IndexHNSWFlat) else None


def _search_chunk(index, ids: np.ndarray, vecs: np.ndarray, threshold: float, k: int, size: int, self_join: bool) -> tuple[list, np.ndarray, np.ndarray]:
    """Pairs above ``threshold`` for one query chunk, k grown while needed; and each query's best
    (id, cosine) excluding itself."""
    found = []
    best_sim = np.full(len(ids), -np.inf, np.float32)
    best_id = np.full(len(ids), -1, np.int64)
    rows = np.arange(len(ids))
    k = min(k, size)
    graph = _graph_of(index)
    while rows.size:
        if graph is not None:  # the graph search must look at least at k candidates
            graph.hnsw.efSearch = max(graph.hnsw.efSearch, k)
        sims, hits = index.search(vecs[rows], k)
        valid = hits >= 0
        if self_join:
            valid &= hits != ids[rows, None]
        masked = np.where(valid, sims, -np.inf)
        top = masked.argmax(axis=1)
        top_sim = masked[np.arange(len(rows)), top]
        better = top_sim > best_sim[rows]
        best_sim[rows[better]] = top_sim[better]
        best_id[rows[better]] = hits[np.arange(len(rows)), top][better]
        above = valid & (sims >= threshold)
        r, c = np.nonzero(above)
        found.append((ids[rows[r]], hits[r, c], sims[r, c]))
        more = above[:, -1] & (k < size)
        if not more.any():
            break
        rows, k = rows[more], min(size, k * 4)
        found[-1] = tuple(a[~more[r]] for a in found[-1])  # those rows are searched again with a larger k
    return found, best_id, best_sim


def _list_centroids(base: ChunkSource, plan: SearchPlan, settings: SearchSettings):
    """The IVF lists' centroids for the list-major scan (bfloat16, as :func:`list_join.assign` takes
    them), by :func:`list_join.spherical_kmeans` on the same training sample faiss would get."""
    per_list = settings.capped_train_per_list if plan.capped else settings.train_per_list
    sample = _training_sample(base, plan.nlist * per_list)
    return list_join.as_low(list_join.spherical_kmeans(sample, plan.nlist, settings.train_iterations))


def _listed_part(centroids, held: list[tuple[np.ndarray, np.ndarray]], plan: SearchPlan,
                 queries_are_base: bool) -> tuple[list_join.ListedBase, np.ndarray | None]:
    """One base part grouped by IVF list for :mod:`facegen.clean.list_join`, and, when the queries
    are the very same vectors (a self-join in one part), each listed vector's probed lists: the
    listed base is then the one query batch, each vector assigned once (its nearest probed list is
    the one that holds it), and every list meets all of its probers in one product."""
    probes = np.concatenate([list_join.assign(centroids, vecs, plan.nprobe if queries_are_base else 1) for _, vecs in held])
    listed, order = list_join.list_base(held, probes[:, 0], plan.nlist, centroids)
    return listed, probes[order] if queries_are_base else None


def search_pairs(
    queries: ChunkSource,
    base: ChunkSource,
    threshold: float,
    settings: SearchSettings,
    *,
    self_join: bool = False,
    on_best: Callable[[int, np.ndarray, np.ndarray, np.ndarray], None] | None = None,
) -> tuple[pa.Table, SearchPlan]:
    """Every (query, base) pair with cosine >= ``threshold`` (PAIRS schema), and the plan used.

    ``self_join``: queries and base are the same set; a vector never pairs with itself and each
    pair is reported once as (smaller id, larger id). ``on_best(chunk_number, query_ids,
    best_base_ids, cosines)`` is called per query chunk (numbered from 0 in every base part) with
    each query's nearest base vector in the part just searched (-1 / -inf when none).
    """
    if queries.dim != base.dim:
        raise ValueError(f"search: query vectors have {queries.dim} dimensions, base vectors {base.dim}")
    plan = build_plan(base.total, settings)
    if self_join and plan.kind == "ivf":  # a pair is missed only when each of its vectors misses the other's list
        plan = replace(plan, nprobe=max(1, -(-plan.nprobe // 2)))
    by_lists = plan.kind == "ivf" and not plan.gpu and settings.scan == "lists"  # facegen.clean.list_join
    trained = centroids = None
    if plan.kind == "ivf" and base.total:
        if by_lists:
            centroids = _list_centroids(base, plan, settings)
        else:
            trained = _train_ivf(base, plan, settings)
    per_part = -(-base.total // plan.parts) if base.total else 0
    parts: list[pa.Table] = []
    base_iter = base.chunks()
    pending: tuple[np.ndarray, np.ndarray] | None = None
    for _ in range(plan.parts):
        index = None if by_lists else _new_index(plan, base.dim, trained, settings)
        held: list[tuple[np.ndarray, np.ndarray]] = []
        size = 0
        while size < per_part:
            if pending is None:
                pending = next(base_iter, None)
                if pending is None:
                    break
            ids, vecs = pending
            take = min(len(ids), per_part - size)
            if by_lists:
                held.append((ids[:take], vecs[:take]))
            else:
                index.add_with_ids(vecs[:take], ids[:take])
            size += take
            pending = (ids[take:], vecs[take:]) if take < len(ids) else None
        if size == 0:
            continue
        if by_lists:
            listed, self_probes = _listed_part(centroids, held, plan, self_join and queries is base and plan.parts == 1)
            del held
            chunks = iter([(listed.ids, listed.vectors)]) if self_probes is not None else list_join.batches(queries.chunks())
            inverse = np.argsort(listed.ids, kind="stable") if self_join and self_probes is None else None
        else:
            chunks = queries.chunks()
        for number, (ids, vecs) in enumerate(chunks):
            if by_lists:
                batch_probes = self_probes if self_probes is not None else list_join.assign(listed.centroids, vecs, plan.nprobe)
                self_rows = np.arange(len(ids)) if self_probes is not None else None
                if inverse is not None:  # each query's own row, where it is a base vector of this part
                    at = np.minimum(np.searchsorted(listed.ids, ids, sorter=inverse), len(inverse) - 1)
                    self_rows = np.where(listed.ids[inverse[at]] == ids, inverse[at], -1)
                found, best_id, best_sim = list_join.join_batch(listed, ids, vecs, batch_probes, threshold, self_rows,
                                                                want_best=on_best is not None)
                found = [found]
            else:
                limit = min(size, GPU_MAX_K) if plan.gpu else size
                found, best_id, best_sim = _search_chunk(index, ids, vecs, threshold, settings.knn, limit, self_join)
            if on_best is not None:
                on_best(number, ids, best_id, best_sim)
            for q, b, s in found:
                if len(q):
                    parts.append(pa.table({"query_id": q, "base_id": b, "cosine": s.astype(np.float32)}, schema=PAIRS))
        del index
    pairs = pa.concat_tables(parts) if parts else PAIRS.empty_table()
    if self_join and pairs.num_rows:
        q, b = pairs.column("query_id").to_numpy(), pairs.column("base_id").to_numpy()
        lo, hi = np.minimum(q, b), np.maximum(q, b)
        pairs = pa.table({"query_id": lo, "base_id": hi, "cosine": pairs.column("cosine")}, schema=PAIRS)
        pairs = pairs.group_by(["query_id", "base_id"]).aggregate([("cosine", "max")]).rename_columns(["query_id", "base_id", "cosine"])
        pairs = pairs.select(["query_id", "base_id", "cosine"]).cast(PAIRS)
    return pairs.sort_by([("query_id", "ascending"), ("base_id", "ascending")]), plan
