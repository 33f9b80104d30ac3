"""Curriculum-ordered training batches from a shard set (manifest + labels + Parquet shards).

Every rank derives the same shard order and the same row permutation of each shard from
``(seed, epoch)`` and keeps every ``world_size``-th row of it, so ranks see disjoint rows without
talking to each other. ``steps_per_epoch`` is computed from the manifest alone and is the minimum
over ranks, so every rank runs the same number of steps and DDP never waits on a rank that ran dry.
Only one shard is decoded at a time.

Curriculum pacing (mode ``ordered``): epoch ``e`` of ``E`` uses the ``k(e)`` easiest non-empty buckets; the
number of buckets grows linearly and reaches all of them by the middle of training; shards are
visited in manifest order (easy -> hard). Mode ``shuffled`` is the baseline: all shards every epoch,
shard order and rows shuffled.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import cv2
import numpy as np
import torch

from facegen.faces.align import decode_image
from facegen.schema import ALIGNED_SIZE, STATUS_OK
from facegen.shards import load_manifest
from facegen.storage import read_table

logger = logging.getLogger(__name__)
T = TypeVar("T")

_COLUMNS = ["image", "identity_id", "status"]


def buckets_in_use(epoch: int, total_epochs: int, num_buckets: int) -> int:
    """How many of the easiest buckets epoch ``epoch`` (0-based) trains on: 1 .. num_buckets."""
    half = max(1, math.ceil(total_epochs / 2))
    return int(min(num_buckets, max(1, math.ceil(num_buckets * (epoch + 1) / half))))


def decode_aligned(data: bytes) -> np.ndarray:
    """JPEG/PNG bytes -> ``uint8 [112, 112, 3]`` RGB (resized if stored at another size)."""
    img = decode_image(data)
    if img.shape[:2] != (ALIGNED_SIZE, ALIGNED_SIZE):
        img = cv2.resize(img, (ALIGNED_SIZE, ALIGNED_SIZE), interpolation=cv2.INTER_AREA)
    return img


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """``uint8 [B, H, W, 3]`` RGB -> ``float32 [B, 3, H, W]`` in [-1, 1] (the ArcFace input)."""
    # contiguous(): the permuted view is channels-last in memory, and torch 2.13's CPU oneDNN 1x1-conv
    # weight gradient segfaults on channels-last inputs (reproduced with a plain IResNet backward).
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).contiguous().float()
    return x.div_(127.5).sub_(1.0)


class _Failure:
    def __init__(self, exc: BaseException):
        self.exc = exc


def prefetch(items: Iterator[T], depth: int = 2) -> Iterator[T]:
    """Run ``items`` in a background thread, at most ``depth`` ahead, so decoding overlaps compute.

    Errors of the producer are re-raised in the consumer; closing the consumer early stops it.
    """
    q: queue.Queue = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()
    done = object()

    def put(item: object) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(item):
                    return
        except BaseException as exc:  # handed to the consumer, which re-raises it
            put(_Failure(exc))
            return
        put(done)

    thread = threading.Thread(target=produce, name="facegen-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, _Failure):
                raise item.exc
            yield item
    finally:
        stop.set()
        thread.join()


class CurriculumReader:
    """Per-rank iterator of ``(images [B,3,112,112] float32 in [-1,1], labels int64)`` batches."""

    def __init__(
        self,
        shards_dir: str,
        rank: int = 0,
        world_size: int = 1,
        batch_size: int = 128,
        seed: int = 0,
        mode: str = "ordered",
        total_epochs: int = 1,
        hflip_p: float = 0.5,
        decode_threads: int = 0,
    ):
        if mode not in ("ordered", "shuffled"):
            raise ValueError(f"CurriculumReader: mode must be 'ordered' or 'shuffled', got {mode!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"CurriculumReader: rank {rank} outside world_size {world_size}")
        if batch_size < 1 or total_epochs < 1:
            raise ValueError("CurriculumReader: batch_size and total_epochs must be >= 1")
        self.shards_dir = str(shards_dir).rstrip("/")
        self.rank, self.world_size = rank, world_size
        self.batch_size, self.seed, self.mode = batch_size, seed, mode
        self.total_epochs, self.hflip_p = total_epochs, hflip_p
        self.decode_threads = decode_threads
        self.manifest = load_manifest(self.shards_dir)
        self.shards: list[dict] = list(self.manifest.get("shards") or [])
        if not self.shards:
            raise ValueError(f"{self.shards_dir}/manifest.json: no shards listed")
        # Pacing counts the buckets that hold rows: ties in difficulty can leave some bucket ids empty.
        self.bucket_ids = sorted({int(s["bucket"]) for s in self.shards})
        labels_file = self.manifest.get("labels_file", "labels.parquet")
        ids = read_table(f"{self.shards_dir}/{labels_file}", columns=["identity_id"]).column("identity_id")
        self.identity_ids = np.asarray(ids.to_numpy(zero_copy_only=False), dtype=np.int64)
        if self.identity_ids.size == 0 or np.any(np.diff(self.identity_ids) <= 0):
            raise ValueError(f"{self.shards_dir}/{labels_file}: identity_id must be non-empty, sorted and unique")
        self.skipped = 0  # rows dropped for a bad image or an unknown identity (this rank)

    @property
    def num_classes(self) -> int:
        """Number of identities (the classifier's output size)."""
        return int(self.identity_ids.size)

    def epoch_shards(self, epoch: int) -> list[int]:
        """Indices into the manifest's shards, in the order epoch ``epoch`` visits them."""
        if self.mode == "shuffled":
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.shards))
            return [int(i) for i in order]
        used = set(self.bucket_ids[: buckets_in_use(epoch, self.total_epochs, len(self.bucket_ids))])
        return [i for i, s in enumerate(self.shards) if int(s["bucket"]) in used]

    def _rank_rows(self, n: int, rank: int) -> int:
        return len(range(rank, n, self.world_size))

    def steps_per_epoch(self, epoch: int) -> int:
        """Full batches every rank can produce this epoch (the same number on every rank)."""
        shards = self.epoch_shards(epoch)
        per_rank = [sum(self._rank_rows(int(self.shards[i]["rows"]), r) for i in shards) for r in range(self.world_size)]
        return min(per_rank) // self.batch_size

    def _shard_rows(self, epoch: int, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Decoded images and labels of this rank's rows of one shard, in permuted order."""
        shard = self.shards[index]
        path = f"{self.shards_dir}/{shard['path']}"
        table = read_table(path, columns=_COLUMNS)
        # Same permutation on every rank (seeded by epoch and shard), then a disjoint stride per rank.
        perm = np.random.default_rng([self.seed, epoch, index]).permutation(table.num_rows)
        mine = table.take(perm[self.rank :: self.world_size])
        ok = np.asarray([st == STATUS_OK for st in mine.column("status").to_pylist()], bool)
        ids = np.asarray(mine.column("identity_id").to_numpy(zero_copy_only=False), np.int64)
        labels = np.minimum(np.searchsorted(self.identity_ids, ids), self.identity_ids.size - 1)
        known = self.identity_ids[labels] == ids
        if (ok & ~known).any():
            self.skipped += int((ok & ~known).sum())
            logger.warning("%s: %d rows of identities missing from the labels file skipped", path, int((ok & ~known).sum()))
        images = mine.column("image").to_pylist()
        rows = [(j, int(labels[j])) for j in np.flatnonzero(ok & known)]

        def decode(j: int) -> np.ndarray | None:
            try:
                return decode_aligned(images[j])
            except (ValueError, cv2.error):
                return None

        if self.decode_threads > 0:
            with ThreadPoolExecutor(self.decode_threads) as pool:
                decoded = list(pool.map(decode, [j for j, _ in rows]))
        else:
            decoded = [decode(j) for j, _ in rows]
        keep = [i for i, img in enumerate(decoded) if img is not None]
        if len(keep) < len(rows):
            self.skipped += len(rows) - len(keep)
            logger.warning("%s: %d undecodable images skipped", path, len(rows) - len(keep))
        if not keep:
            return np.zeros((0, ALIGNED_SIZE, ALIGNED_SIZE, 3), np.uint8), np.zeros(0, np.int64)
        return np.stack([decoded[i] for i in keep]), np.asarray([rows[i][1] for i in keep], np.int64)

    def _row_stream(self, epoch: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """This rank's rows shard by shard; repeats the epoch's shards if skipped rows left it short."""
        shards = self.epoch_shards(epoch)
        while True:
            produced = 0
            for index in shards:
                images, labels = self._shard_rows(epoch, index)
                produced += len(labels)
                if len(labels):
                    yield images, labels
            if produced == 0:
                raise ValueError(f"{self.shards_dir}: rank {self.rank} has no readable rows in epoch {epoch}")
            # Only reached when bad rows made the manifest's counts too optimistic: wrap around so
            # this rank still delivers exactly steps_per_epoch batches.
            logger.warning("%s: rank %d wraps around its rows in epoch %d", self.shards_dir, self.rank, epoch)

    def batches(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Exactly ``steps_per_epoch(epoch)`` batches, last partial batch dropped."""
        steps = self.steps_per_epoch(epoch)
        if steps == 0:
            return
        flip_rng = np.random.default_rng([self.seed, epoch, self.rank, 1_000_003])
        pending_images = np.zeros((0, ALIGNED_SIZE, ALIGNED_SIZE, 3), np.uint8)
        pending_labels = np.zeros(0, np.int64)
        done = 0
        for images, labels in self._row_stream(epoch):
            if len(pending_labels):  # a partial batch left over from the previous shard
                images = np.concatenate([pending_images, images])
                labels = np.concatenate([pending_labels, labels])
            start = 0
            while len(labels) - start >= self.batch_size:
                batch_images = images[start : start + self.batch_size].copy()
                batch_labels = labels[start : start + self.batch_size]
                start += self.batch_size
                flip = flip_rng.random(self.batch_size) < self.hflip_p
                batch_images[flip] = batch_images[flip, :, ::-1]
                yield to_tensor(batch_images), torch.from_numpy(batch_labels.astype(np.int64))
                done += 1
                if done == steps:
                    return
            pending_images, pending_labels = images[start:].copy(), labels[start:].copy()
