"""Identity leakage audit (ALGORITHMS.md 6): synthetic identities against embeddings of real people.

References are ``.npy`` ``[n, d]`` arrays (memory-mapped) or Parquet files with an ``embedding``
column and optionally ``label`` and ``image`` (encoded bytes) or ``image_path``; they must come
from the same embedder kind as the synthetic embeddings. The threshold is a fixed cosine or the
one that gives a chosen false-accept rate on a verification set (``.npz`` with ``embeddings`` and
``labels``, or Parquet with ``embedding`` and ``label``): the ``1 - far`` quantile of its impostor
(different-label) pair similarities. An identity whose centre (or, optionally, any kept sample)
reaches the threshold against any reference is leaked and removed.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from facegen.clean.search import ChunkSource, SearchPlan, search_pairs
from facegen.config import LeakageSettings, SearchSettings
from facegen.schema import vectors_from_column
from facegen.vectors import l2_normalize

HISTOGRAM_BINS = 100  # of the best cosine per synthetic vector, over [-1, 1]
MAX_VERIFICATION = 20_000  # embeddings used for impostor pairs (about 2e8 pairs)


def _vectors(column: pa.ChunkedArray) -> np.ndarray:
    return vectors_from_column(column, "reference embeddings")


class ReferenceSet(ChunkSource):
    """Reference embeddings from several files, numbered 0.. in file order."""

    def __init__(self, paths: list[str], chunk: int = 65536):
        from facegen import storage

        if not paths:
            raise ValueError("clean.leakage.references: no reference files given")
        self.paths, self.chunk, self.sizes, self.dim = list(paths), chunk, [], 0
        for path in self.paths:
            if not storage.exists(path):
                raise FileNotFoundError(f"clean.leakage.references: {path} not found")
            if path.endswith(".npy"):
                n, d = storage.npy_shape(path)
            elif path.endswith(".parquet"):
                import pyarrow.parquet as pq

                schema = pq.read_schema(path)
                if "embedding" not in schema.names:
                    raise ValueError(f"{path}: needs an 'embedding' column")
                n, d = pq.read_metadata(path).num_rows, self._parquet_vectors(path, 0, 1).shape[1]
            else:
                raise ValueError(f"{path}: references must be .npy or .parquet")
            if self.dim and d != self.dim:
                raise ValueError(f"{path}: {d}-d embeddings, earlier references are {self.dim}-d")
            self.dim = d
            self.sizes.append(int(n))
        self.total = int(sum(self.sizes))

    @staticmethod
    def _parquet_vectors(path: str, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` of a Parquet file's ``embedding`` column as float32 ``[k, d]``."""
        from facegen.storage import read_table

        return _vectors(read_table(path, columns=["embedding"]).column("embedding").slice(start, stop - start))

    def chunks(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        offset = 0
        for path, n in zip(self.paths, self.sizes):
            if path.endswith(".npy"):
                from facegen.storage import read_npy_rows

                for s in range(0, n, self.chunk):  # only the chunk's bytes, from any storage
                    vec = l2_normalize(np.asarray(read_npy_rows(path, s, s + self.chunk), np.float32))
                    yield np.arange(offset + s, offset + s + len(vec), dtype=np.int64), vec
            else:
                from facegen.storage import read_table

                col = read_table(path, columns=["embedding"]).column("embedding")
                for s in range(0, n, self.chunk):
                    vec = l2_normalize(_vectors(col.slice(s, self.chunk)))
                    yield np.arange(offset + s, offset + s + len(vec), dtype=np.int64), vec
            offset += n

    def _locate(self, row: int) -> tuple[str, int]:
        for path, n in zip(self.paths, self.sizes):
            if row < n:
                return path, row
            row -= n
        raise IndexError(row)

    def describe(self, row: int) -> tuple[str, bytes | None]:
        """A label for a reference row (its file and label, when given) and its image bytes, if any."""
        path, local = self._locate(int(row))
        if not path.endswith(".parquet"):
            return f"{path}#{local}", None
        import pyarrow.parquet as pq

        from facegen.storage import read_bytes, read_table

        names = pq.read_schema(path).names
        wanted = [c for c in ("label", "image", "image_path") if c in names]
        if not wanted:
            return f"{path}#{local}", None
        rec = read_table(path, columns=wanted).slice(local, 1).to_pylist()[0]
        label = f"{rec['label']} ({path}#{local})" if "label" in rec else f"{path}#{local}"
        image = rec.get("image")
        if image is None and rec.get("image_path"):
            try:
                image = read_bytes(rec["image_path"])
            except (OSError, FileNotFoundError):
                image = None
        return label, image


def load_verification(path: str) -> tuple[np.ndarray, np.ndarray]:
    """(unit embeddings float32 [n, d], labels [n]) of a verification set."""
    from facegen import storage

    if not storage.exists(path):
        raise FileNotFoundError(f"clean.leakage.verification: {path} not found")
    if path.endswith(".npz"):
        import io

        with np.load(io.BytesIO(storage.read_bytes(path)), allow_pickle=False) as data:
            if "embeddings" not in data or "labels" not in data:
                raise ValueError(f"{path}: needs arrays 'embeddings' and 'labels'")
            emb, labels = np.asarray(data["embeddings"], np.float32), np.asarray(data["labels"])
    elif path.endswith(".parquet"):
        table = storage.read_table(path)
        if "embedding" not in table.column_names or "label" not in table.column_names:
            raise ValueError(f"{path}: needs columns 'embedding' and 'label'")
        emb = _vectors(table.column("embedding"))
        labels = table.column("label").to_numpy(zero_copy_only=False)
    else:
        raise ValueError(f"{path}: the verification set must be .npz or .parquet")
    if emb.ndim != 2 or len(emb) != len(labels):
        raise ValueError(f"{path}: embeddings {emb.shape} and labels {labels.shape} do not match")
    return l2_normalize(emb), labels


def calibrate_far(embeddings: np.ndarray, labels: np.ndarray, far: float, seed: int = 0) -> dict[str, Any]:
    """The cosine threshold with false-accept rate ``far`` on all impostor pairs of a verification set."""
    if len(embeddings) > MAX_VERIFICATION:
        pick = np.sort(np.random.default_rng(seed).choice(len(embeddings), MAX_VERIFICATION, replace=False))
        embeddings, labels = embeddings[pick], labels[pick]
    impostor, genuine = [], []
    for s in range(0, len(embeddings), 1024):
        sims = embeddings[s : s + 1024] @ embeddings.T
        same = labels[s : s + 1024, None] == labels[None, :]
        upper = np.arange(s, s + len(sims))[:, None] < np.arange(len(embeddings))[None, :]
        impostor.append(sims[upper & ~same].astype(np.float32))
        genuine.append(sims[upper & same].astype(np.float32))
    impostor_all, genuine_all = np.concatenate(impostor), np.concatenate(genuine)
    if impostor_all.size * far < 10:
        raise ValueError(f"clean.leakage.far: {far} needs at least {int(np.ceil(10 / far))} impostor pairs, the verification set gives {impostor_all.size}")
    threshold = float(np.quantile(impostor_all.astype(np.float64), 1.0 - far, method="higher"))
    return {"threshold": threshold, "far": far, "impostor_pairs": int(impostor_all.size), "genuine_pairs": int(genuine_all.size),
            "measured_far": float((impostor_all > threshold).mean()),
            "tar": float((genuine_all > threshold).mean()) if genuine_all.size else None}


@dataclass
class LeakageResult:
    """Pairs above the threshold (query_id = synthetic identity or sample key, base_id = reference
    row), the threshold used and how, the histogram of each query's best cosine, the nearest pairs."""

    pairs: pa.Table
    threshold: float
    calibration: dict[str, Any]
    histogram: np.ndarray
    nearest: list[tuple[float, int, int]] = field(default_factory=list)  # (cosine, query_id, reference row)
    plan: SearchPlan | None = None


def leakage_threshold(settings: LeakageSettings) -> tuple[float, dict[str, Any]]:
    """The fixed threshold, or the one calibrated to ``settings.far`` on the verification set."""
    if settings.far is None:
        return settings.threshold, {"method": "fixed", "threshold": settings.threshold}
    emb, labels = load_verification(settings.verification)
    return_info = calibrate_far(emb, labels, settings.far)
    return return_info["threshold"], {"method": "far", "verification": settings.verification, **return_info}


def audit(queries: ChunkSource, references: ReferenceSet, settings: LeakageSettings, search: SearchSettings) -> LeakageResult:
    """Search every query vector against the references; keep the histogram and the nearest pairs."""
    threshold, calibration = leakage_threshold(settings)
    best: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}  # query chunk number -> (ids, refs, sims)

    def on_best(key: int, ids: np.ndarray, base_ids: np.ndarray, sims: np.ndarray) -> None:
        if key in best:
            _, refs, old = best[key]
            better = sims > old
            refs[better], old[better] = base_ids[better], sims[better]
        else:
            best[key] = (ids.copy(), base_ids.copy(), sims.copy())

    pairs, plan = search_pairs(queries, references, threshold, search, on_best=on_best)
    ids = np.concatenate([v[0] for v in best.values()]) if best else np.zeros(0, np.int64)
    refs = np.concatenate([v[1] for v in best.values()]) if best else np.zeros(0, np.int64)
    sims = np.concatenate([v[2] for v in best.values()]) if best else np.zeros(0, np.float32)
    found = refs >= 0
    ids, refs, sims = ids[found], refs[found], sims[found]
    histogram = np.histogram(np.clip(sims, -1.0, 1.0), bins=HISTOGRAM_BINS, range=(-1.0, 1.0))[0]
    top = np.argsort(-sims, kind="stable")[: settings.report_pairs]
    nearest = [(float(sims[i]), int(ids[i]), int(refs[i])) for i in top]
    return LeakageResult(pairs, threshold, calibration, histogram, nearest, plan)
