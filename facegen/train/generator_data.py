"""CemiFace training pairs: a shard set embedded once, then a deterministic stream of pair batches.

:func:`prepare_pairs` decodes every ``ok`` row of a shard set, embeds its aligned crop with the
configured embedder (C_id and m come from it), resizes it to the model's size and writes three
arrays and an index (``images.npy``, ``features.npy``, ``labels.npy``, ``pairs.json``) atomically;
an existing set made from the same shards, embedder and size is reused. Rows that do not decode are
skipped and counted with their reason. ``holdout_identities`` identities, drawn from the run seed,
are kept out of training for the similarity-control figure.

:class:`PairSampler` makes global batch ``(epoch, step)`` from the run seed alone: the targets are
the epoch's permutation of the training rows, each target's inquiry is a random row of the same
identity (itself included: m near 1), m = cos(C_id, embedding of the target) rounded to the
``similarity_step`` grid, and the timesteps and noise are drawn for the whole global batch. A worker
takes its contiguous slice, so a run continues on any worker count with the same batches.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any, Callable

import cv2
import numpy as np
import torch

from facegen.shards import load_manifest, manifest_set_digest, shard_paths
from facegen.storage import exists, read_bytes, read_json, read_table, write_bytes_atomic, write_json_atomic

INDEX_FILE = "pairs.json"
ARRAYS = ("images", "features", "labels")
#: Domain tags of the pair stream's draws.
PERMUTATION_TAG, PAIR_TAG, NOISE_TAG, HOLDOUT_TAG = 0x9A1, 0x9A2, 0x9A3, 0x9A4


def _save_array(array: np.ndarray, path: str) -> None:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array))
    write_bytes_atomic(buffer.getvalue(), path)


def _decoded_rows(shards_dir: str, skipped: dict[str, int], report: Callable[[int, int, str], None] | None):
    """``(identity_id, uint8 112 crop)`` of every decodable ok row, shard by shard."""
    from facegen.images import decode_aligned

    paths = shard_paths(load_manifest(shards_dir), shards_dir)
    for done, path in enumerate(paths):
        if report is not None:
            report(done, len(paths), "shards embedded")
        table = read_table(path, columns=["identity_id", "image", "status"])
        ids = table.column("identity_id").to_numpy()
        status = table.column("status").to_pylist()
        for identity_id, data, state in zip(ids, table.column("image").to_pylist(), status):
            if state != "ok":
                skipped[f"status {state}"] = skipped.get(f"status {state}", 0) + 1
                continue
            try:
                yield int(identity_id), decode_aligned(data)
            except Exception as exc:  # noqa: BLE001 - one bad image is counted, never fatal
                reason = f"undecodable image ({type(exc).__name__})"
                skipped[reason] = skipped.get(reason, 0) + 1


def prepare_pairs(shards_dir: str, settings: Any, seed: int, out_dir: str, embed_batch: int = 256,
                  report: Callable[[int, int, str], None] | None = None) -> dict[str, Any]:
    """Embed and resize a shard set for ``train_generator`` (see the module docstring); its index."""
    from facegen.faces.embed import build_embedder

    out_dir = str(out_dir).rstrip("/")
    manifest = load_manifest(shards_dir)
    embedder = build_embedder(settings.embedder)
    size = settings.net.image_size
    key = {"shards": manifest_set_digest(manifest), "embedder": embedder.record, "image_size": size, "seed": int(seed),
           "holdout_identities": settings.holdout_identities}
    if exists(f"{out_dir}/{INDEX_FILE}"):
        index = read_json(f"{out_dir}/{INDEX_FILE}")
        if index.get("key") == key and all(exists(f"{out_dir}/{a}.npy") for a in ARRAYS):
            return index
    skipped: dict[str, int] = {}
    ids, images, features, pending, pending_ids = [], [], [], [], []

    def flush() -> None:
        crops = np.stack(pending)
        features.append(embedder.embed(crops).astype(np.float32))
        images.append(crops if size == crops.shape[1] else
                      np.stack([cv2.resize(c, (size, size), interpolation=cv2.INTER_AREA) for c in crops]))
        ids.extend(pending_ids)
        pending.clear()
        pending_ids.clear()

    for identity_id, crop in _decoded_rows(shards_dir, skipped, report):
        pending.append(crop)
        pending_ids.append(identity_id)
        if len(pending) == embed_batch:
            flush()
    if pending:
        flush()
    if not ids:
        raise ValueError(f"{shards_dir}: no decodable ok rows to train the generator on")
    identity_ids = np.asarray(ids, np.int64)
    unique, labels = np.unique(identity_ids, return_inverse=True)
    if len(unique) <= settings.holdout_identities:
        raise ValueError(f"train_generator.holdout_identities: {settings.holdout_identities} held out of "
                         f"{len(unique)} identities in {shards_dir} leaves none to train on")
    held = np.random.default_rng([int(seed), HOLDOUT_TAG]).permutation(len(unique))[: settings.holdout_identities]
    _save_array(np.concatenate(images), f"{out_dir}/images.npy")
    _save_array(np.concatenate(features), f"{out_dir}/features.npy")
    _save_array(labels.astype(np.int64), f"{out_dir}/labels.npy")
    index = {"key": key, "rows": len(ids), "train_rows": int((~np.isin(labels, held)).sum()), "identities": int(len(unique)), "feature_dim": int(embedder.dim),
             "holdout_labels": sorted(int(h) for h in held), "skipped": skipped, "image_size": size}
    write_json_atomic(index, f"{out_dir}/{INDEX_FILE}")
    return index


def _load_array(path: str) -> np.ndarray:
    from facegen.cache import fetch
    from facegen.storage import is_remote

    if is_remote(path):  # a worker sees object storage: fetch once per node, then map it
        return np.load(fetch(path, "train_generator data"), mmap_mode="r")
    if "://" in path:
        return np.load(io.BytesIO(read_bytes(path)))
    return np.load(path, mmap_mode="r")


@dataclass
class PairTable:
    """The prepared arrays of one run (memory-mapped where local)."""

    images: np.ndarray  # uint8 [N, S, S, 3]
    features: np.ndarray  # float32 [N, d], unit rows
    labels: np.ndarray  # int64 [N], dense identity labels
    index: dict[str, Any]

    @classmethod
    def load(cls, data_dir: str) -> "PairTable":
        """The arrays :func:`prepare_pairs` wrote to ``data_dir``."""
        data_dir = str(data_dir).rstrip("/")
        arrays = [_load_array(f"{data_dir}/{name}.npy") for name in ARRAYS]
        return cls(*arrays, read_json(f"{data_dir}/{INDEX_FILE}"))

    @property
    def holdout(self) -> np.ndarray:
        """Boolean mask of the rows whose identity is held out."""
        return np.isin(self.labels, np.asarray(self.index["holdout_labels"], np.int64))


def quantise(m: np.ndarray, step: float) -> np.ndarray:
    """``m`` rounded to the grid ``step`` and clipped to [-1, 1]."""
    return np.clip(np.round(np.asarray(m, np.float64) / step) * step, -1.0, 1.0).astype(np.float32)


@dataclass
class PairBatch:
    """One worker's slice of a global batch: targets in [-1, 1], C_id, m, timesteps and noise."""

    images: torch.Tensor
    id_features: torch.Tensor
    similarity: torch.Tensor
    timesteps: torch.Tensor
    noise: torch.Tensor


class PairSampler:
    """Global batches of training pairs, the same on every worker count (module docstring)."""

    def __init__(self, table: PairTable, batch_size: int, seed: int, similarity_step: float, num_train_timesteps: int):
        self.table, self.batch_size, self.seed = table, int(batch_size), int(seed)
        self.step, self.timesteps = float(similarity_step), int(num_train_timesteps)
        rows = np.flatnonzero(~table.holdout)
        self.train_rows = rows
        order = rows[np.argsort(table.labels[rows], kind="stable")]  # training rows grouped by identity
        self.grouped = order
        labels = table.labels[order]
        starts = np.flatnonzero(np.r_[True, labels[1:] != labels[:-1]])
        counts = np.diff(np.r_[starts, len(order)])
        self.group_start = dict(zip(labels[starts].tolist(), starts.tolist()))
        self.group_count = dict(zip(labels[starts].tolist(), counts.tolist()))
        self.steps_per_epoch = len(rows) // self.batch_size
        if self.steps_per_epoch == 0:
            raise ValueError(f"train_generator.batch_size: {self.batch_size} is more than the {len(rows)} training rows")
        self._permutation: tuple[int, np.ndarray] | None = None

    def _targets(self, epoch: int, step: int) -> np.ndarray:
        if self._permutation is None or self._permutation[0] != epoch:
            rng = np.random.default_rng([self.seed, PERMUTATION_TAG, epoch])
            self._permutation = (epoch, rng.permutation(self.train_rows))
        return self._permutation[1][step * self.batch_size : (step + 1) * self.batch_size]

    def pairs(self, epoch: int, step: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(target rows, inquiry rows, quantised m)`` of global batch ``(epoch, step)``."""
        targets = self._targets(epoch, step)
        labels = self.table.labels[targets]
        u = np.random.default_rng([self.seed, PAIR_TAG, epoch, step]).random(len(targets))
        start = np.array([self.group_start[int(label)] for label in labels])
        count = np.array([self.group_count[int(label)] for label in labels])
        inquiries = self.grouped[start + np.minimum((u * count).astype(np.int64), count - 1)]
        f = self.table.features
        m = np.einsum("nd,nd->n", f[inquiries].astype(np.float64), f[targets].astype(np.float64))
        return targets, inquiries, quantise(m, self.step)

    def batch(self, epoch: int, step: int, rank: int = 0, world_size: int = 1) -> PairBatch:
        """Worker ``rank``'s slice of global batch ``(epoch, step)``."""
        targets, inquiries, m = self.pairs(epoch, step)
        size = self.table.images.shape[1]
        g = torch.Generator().manual_seed(int(np.random.SeedSequence([self.seed, NOISE_TAG, epoch, step]).generate_state(1)[0]))
        timesteps = torch.randint(0, self.timesteps, (self.batch_size,), generator=g)
        noise = torch.randn(self.batch_size, 3, size, size, generator=g)
        part = self.batch_size // world_size
        lo, hi = rank * part, (rank + 1) * part
        mine = targets[lo:hi]
        order = np.argsort(mine, kind="stable")  # ascending reads from the memory map
        pixels = np.empty((len(mine), size, size, 3), np.uint8)
        pixels[order] = self.table.images[mine[order]]
        images = torch.from_numpy(pixels).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
        return PairBatch(images, torch.from_numpy(np.ascontiguousarray(self.table.features[inquiries[lo:hi]], np.float32)),
                         torch.from_numpy(m[lo:hi]), timesteps[lo:hi], noise[lo:hi])
