"""Training batches from a curriculum shard set: streams, shuffle buffers, threads, exact resume.

The rows of an epoch's shards (its curriculum stage) are read by ``data.streams`` independent
streams, a number fixed by the settings and not by the worker count:

- the epoch's rows, listed shard after shard, are cut into pieces of at most ``chunk_rows`` rows
  (every stream gets the same number of rows, +-1) dealt round-robin to the streams; a stream
  reads only the shards under its pieces (a shard cut by a piece boundary is read twice), and
  worker ``r`` of ``w`` serves streams ``r, r + w, ...``, so no worker reads the whole set;
- each stream shuffles its rows in windows of ``shuffle_rows`` (its shuffle buffer, drawing from
  every shard under those rows); a global batch takes ``batch_size / streams`` rows from every
  stream, so it mixes rows (and identities) of many shards;
- decoding and augmentation run in a thread pool; batches are produced ahead in a thread.

Everything is a pure function of ``(seed, epoch, stream, position)``: the global batch of a step
does not depend on the worker count, and a stream's position (rows consumed) is all a checkpoint
needs to resume mid-epoch, on the same or another number of workers. Bad rows (status not ok, an
identity missing from the labels, an undecodable image) are skipped and the stream reads on.

Curriculum pacing (mode ``ordered``): epoch ``e`` of ``E`` uses the ``k(e)`` easiest non-empty
buckets; ``k`` grows linearly and reaches all of them by the middle of training, and pieces are
dealt in manifest (easy-to-hard) order. Mode ``shuffled``: all buckets, shard order permuted.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
from collections import OrderedDict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

import cv2
import numpy as np
import torch

from facegen.config import TrainAugmentSettings, TrainDataSettings
from facegen.images import decode_aligned
from facegen.schema import STATUS_OK
from facegen.shards import load_manifest
from facegen.storage import read_table
from facegen.train.augment import TrainAugment

logger = logging.getLogger(__name__)
T = TypeVar("T")

_COLUMNS = ["image", "identity_id", "status"]


def buckets_in_use(epoch: int, total_epochs: int, num_buckets: int) -> int:
    """How many of the easiest buckets epoch ``epoch`` (0-based) trains on: 1 .. num_buckets."""
    half = max(1, math.ceil(total_epochs / 2))
    return int(min(num_buckets, max(1, math.ceil(num_buckets * (epoch + 1) / half))))


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
    """Run ``items`` in a background thread, at most ``depth`` ahead, so reading overlaps compute.

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


@dataclass
class Batch:
    """This worker's share of one global batch, and where its streams stand after it."""

    images: torch.Tensor  # float32 [B / workers, 3, 112, 112] in [-1, 1]
    labels: torch.Tensor  # int64 class indices (rows of labels.parquet)
    step: int  # 0-based step within the epoch
    positions: dict[int, int]  # stream -> rows consumed this epoch, after this batch


@dataclass
class ReadStats:
    """Counters of this worker's reader (for the ingest benchmark and read amplification)."""

    shard_reads: int = 0
    rows_read: int = 0  # rows of shard files loaded from storage
    rows_used: int = 0  # rows delivered in batches
    skipped: int = 0  # bad rows passed over
    per_shard_reads: dict[int, int] = field(default_factory=dict)


class _Stream:
    """One stream's rows in an epoch: ``take(n)`` -> ``n`` good ``(image bytes, label, position)``."""

    def __init__(self, reader: "CurriculumReader", epoch: int, stream: int, position: int):
        self.reader, self.epoch, self.stream = reader, epoch, stream
        self.shards, self.rows = reader.stream_slots(epoch, stream)
        self.position = position
        self._window = -1
        self._images: list[bytes] = []
        self._labels = np.zeros(0, np.int64)

    def _load_window(self, window: int) -> None:
        size = self.reader.data.shuffle_rows
        lo, hi = window * size, min((window + 1) * size, len(self.rows))
        order = np.random.default_rng([self.reader.seed, self.epoch, self.stream, window]).permutation(hi - lo) + lo
        shards, rows = self.shards[order], self.rows[order]
        images: list = [None] * len(order)
        labels = np.empty(len(order), np.int64)
        for shard in np.unique(shards):
            where = np.flatnonzero(shards == shard)
            column, shard_labels = self.reader.shard(int(shard))
            picked = column.take(rows[where]).to_pylist()
            for k, data in zip(where, picked):
                images[k] = data
            labels[where] = shard_labels[rows[where]]
        self._window, self._images, self._labels = window, images, labels

    def take(self, n: int) -> list[tuple[bytes, int, int]]:
        out = []
        total = len(self.rows)
        if total == 0:
            raise ValueError(f"{self.reader.shards_dir}: stream {self.stream} has no rows in epoch {self.epoch}")
        size = self.reader.data.shuffle_rows
        while len(out) < n:
            if self.position and self.position % total == 0:
                # Only reached when bad rows made the manifest's counts too optimistic.
                logger.warning("%s: stream %d wraps around its rows in epoch %d", self.reader.shards_dir, self.stream, self.epoch)
            slot = self.position % total
            if slot // size != self._window:
                self._load_window(slot // size)
            k = slot - self._window * size
            if self._labels[k] >= 0:
                out.append((self._images[k], int(self._labels[k]), self.position))
            else:
                self.reader.stats.skipped += 1
            self.position += 1
        return out


class CurriculumReader:
    """This worker's batches of a shard set: ``batches(epoch, start_step, positions)`` yields :class:`Batch`."""

    def __init__(
        self,
        shards_dir: str,
        rank: int = 0,
        world_size: int = 1,
        batch_size: int = 128,
        seed: int = 0,
        mode: str = "ordered",
        total_epochs: int = 1,
        data: TrainDataSettings | None = None,
        augment: TrainAugmentSettings | None = None,
    ):
        self.data = data or TrainDataSettings()
        streams = self.data.streams
        if mode not in ("ordered", "shuffled"):
            raise ValueError(f"CurriculumReader: mode must be 'ordered' or 'shuffled', got {mode!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"CurriculumReader: rank {rank} outside world_size {world_size}")
        if batch_size < 1 or total_epochs < 1:
            raise ValueError("CurriculumReader: batch_size and total_epochs must be >= 1")
        if streams % world_size or batch_size % streams:
            raise ValueError(f"CurriculumReader: data.streams ({streams}) must be a multiple of the workers ({world_size}) "
                             f"and divide batch_size ({batch_size})")
        self.shards_dir = str(shards_dir).rstrip("/")
        self.rank, self.world_size = rank, world_size
        self.batch_size, self.seed, self.mode, self.total_epochs = batch_size, seed, mode, total_epochs
        self.rows_per_stream = batch_size // streams
        self.local_streams = list(range(rank, streams, world_size))
        self.augment = TrainAugment(augment)
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
        self.stats = ReadStats()
        self._cache: OrderedDict[int, tuple] = OrderedDict()
        self._plans: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {}

    @property
    def num_classes(self) -> int:
        """Number of identities (the classifier's output size)."""
        return int(self.identity_ids.size)

    @property
    def skipped(self) -> int:
        """Bad rows passed over by this worker so far."""
        return self.stats.skipped

    def epoch_shards(self, epoch: int) -> list[int]:
        """Indices into the manifest's shards, in the order epoch ``epoch`` deals them out."""
        if self.mode == "shuffled":
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.shards))
            return [int(i) for i in order]
        used = set(self.bucket_ids[: buckets_in_use(epoch, self.total_epochs, len(self.bucket_ids))])
        return [i for i, s in enumerate(self.shards) if int(s["bucket"]) in used]

    def _plan(self, epoch: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per stream: ``(shard index, row)`` arrays of its rows in order (before window shuffling)."""
        if epoch not in self._plans:
            order = np.asarray(self.epoch_shards(epoch), np.int64)
            counts = np.asarray([int(self.shards[i]["rows"]) for i in order], np.int64)
            total = int(counts.sum())
            streams = self.data.streams
            pieces_per_stream = max(1, math.ceil(total / (streams * self.data.chunk_rows)))
            # Stream v gets exactly its share of the rows, in pieces_per_stream near-equal pieces; pieces
            # are laid out round by round (stream 0, 1, .., V-1, then again), so streams advance together.
            share = total // streams + (np.arange(streams) < total % streams)
            sizes = np.stack([share // pieces_per_stream + (r < share % pieces_per_stream) for r in range(pieces_per_stream)])
            bounds = np.concatenate([[0], np.cumsum(sizes.ravel())])
            starts = np.concatenate([[0], np.cumsum(counts)])
            plan = []
            for stream in range(streams):
                pieces = range(stream, streams * pieces_per_stream, streams)
                slots = np.concatenate([np.arange(bounds[j], bounds[j + 1]) for j in pieces]).astype(np.int64)
                where = np.searchsorted(starts, slots, side="right") - 1
                plan.append((order[where], slots - starts[where]))
            self._plans = {epoch: plan}  # one epoch at a time
        return self._plans[epoch]

    def stream_slots(self, epoch: int, stream: int) -> tuple[np.ndarray, np.ndarray]:
        """``(shard index, row in shard)`` of every row stream ``stream`` reads in ``epoch``, in order."""
        return self._plan(epoch)[stream]

    def steps_per_epoch(self, epoch: int) -> int:
        """Global batches in ``epoch``: the same number on every worker, whatever the worker count."""
        return min(len(rows) for _, rows in self._plan(epoch)) // self.rows_per_stream

    def shard(self, index: int) -> tuple:
        """``(image column, labels)`` of a shard, label -1 for bad rows; a few shards stay cached."""
        if index in self._cache:
            self._cache.move_to_end(index)
            return self._cache[index]
        path = f"{self.shards_dir}/{self.shards[index]['path']}"
        table = read_table(path, columns=_COLUMNS)
        ok = np.asarray([st == STATUS_OK for st in table.column("status").to_pylist()], bool)
        ids = np.asarray(table.column("identity_id").to_numpy(zero_copy_only=False), np.int64)
        labels = np.minimum(np.searchsorted(self.identity_ids, ids), self.identity_ids.size - 1)
        known = self.identity_ids[labels] == ids
        if (ok & ~known).any():
            logger.warning("%s: %d rows of identities missing from the labels file skipped", path, int((ok & ~known).sum()))
        entry = (table.column("image").combine_chunks(), np.where(ok & known, labels, -1))
        self.stats.shard_reads += 1
        self.stats.rows_read += table.num_rows
        self.stats.per_shard_reads[index] = self.stats.per_shard_reads.get(index, 0) + 1
        self._cache[index] = entry
        while len(self._cache) > self.data.cached_shards:
            self._cache.popitem(last=False)
        return entry

    def _decode(self, epoch: int, stream: int, row: tuple[bytes, int, int]) -> np.ndarray | None:
        data, _, position = row
        try:
            img = decode_aligned(data)
        except (ValueError, cv2.error):
            return None
        return self.augment(img, np.random.default_rng([self.seed, epoch, stream, position, 0xA06]))

    def batches(self, epoch: int, start_step: int = 0, positions: dict[int, int] | None = None) -> Iterator[Batch]:
        """This worker's share of global batches ``start_step ..`` of ``epoch`` (last partial batch dropped).

        ``positions`` (stream -> rows consumed, from a checkpoint) resumes mid-epoch; streams that
        are not listed start at 0.
        """
        positions = positions or {}
        streams = {v: _Stream(self, epoch, v, int(positions.get(v, 0))) for v in self.local_streams}
        pool = ThreadPoolExecutor(self.data.decode_threads) if self.data.decode_threads > 0 else None
        run = pool.map if pool is not None else map
        try:
            for step in range(start_step, self.steps_per_epoch(epoch)):
                taken = [(v, row) for v, stream in streams.items() for row in stream.take(self.rows_per_stream)]
                decoded = list(run(lambda item: self._decode(epoch, *item), taken))
                images, labels = [], []
                for v, stream in streams.items():
                    mine = [(row, img) for (u, row), img in zip(taken, decoded) if u == v]
                    while any(img is None for _, img in mine):  # undecodable: the stream reads on
                        bad = sum(img is None for _, img in mine)
                        self.stats.skipped += bad
                        logger.warning("%s: %d undecodable images skipped (stream %d)", self.shards_dir, bad, v)
                        mine = [(r, img) for r, img in mine if img is not None]
                        mine += [(r, self._decode(epoch, v, r)) for r in stream.take(bad)]
                    images += [img for _, img in mine]
                    labels += [label for (_, label, _), _ in mine]
                self.stats.rows_used += len(labels)
                yield Batch(to_tensor(np.stack(images)), torch.tensor(labels, dtype=torch.int64), step,
                            {v: s.position for v, s in streams.items()})
        finally:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
