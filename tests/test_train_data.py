"""Training data: streams over a real shard set, shuffle buffers, exact resume, augmentations."""

import cv2
import numpy as np
import pytest
import torch

from facegen.config import TrainAugmentSettings, TrainDataSettings
from facegen.train.augment import TrainAugment, crop_in_place, photometric, random_erase, random_low_resolution
from facegen.train.data import CurriculumReader, buckets_in_use, prefetch
from train_shards import make_shard_set, read_markers

NUM_CLASSES = 6


def _reader(root, **kw) -> CurriculumReader:
    data = TrainDataSettings(**{"streams": 2, "decode_threads": 2, **kw.pop("data", {})})
    augment = TrainAugmentSettings(**kw.pop("augment", {"hflip_p": 0.0}))
    return CurriculumReader(root, data=data, augment=augment, **{"batch_size": 4, "seed": 1, "total_epochs": 4, **kw})


def _epoch(reader: CurriculumReader, epoch: int, **kw):
    uids, hards, labels = [], [], []
    for batch in reader.batches(epoch, **kw):
        assert batch.images.dtype == torch.float32 and batch.labels.dtype == torch.int64
        assert float(batch.images.min()) >= -1.0 and float(batch.images.max()) <= 1.0
        u, h = read_markers(batch.images)
        uids.append(u), hards.append(h), labels.append(batch.labels.numpy())
    if not uids:
        return np.zeros((0, 0), int), np.zeros((0, 0), bool), np.zeros((0, 0), int)
    return np.stack(uids), np.stack(hards), np.stack(labels)


@pytest.fixture(scope="module")
def shard_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    return str(root), make_shard_set(root)


@pytest.fixture(scope="module")
def many_ids(tmp_path_factory):
    """16 blocks of 8 identities, 4 images each: 128 identities, 32 shards of at most 8 identities."""
    root = tmp_path_factory.mktemp("many")
    return str(root), make_shard_set(root, per_class=4, blocks=16, ids_per_block=8)


def test_pacing_reaches_all_buckets_by_mid_training():
    assert [buckets_in_use(e, 8, 4) for e in range(8)] == [1, 2, 3, 4, 4, 4, 4, 4]
    assert [buckets_in_use(e, 26, 4) for e in (0, 3, 12, 25)] == [1, 2, 4, 4]
    assert buckets_in_use(0, 1, 3) == 3 and buckets_in_use(0, 4, 1) == 1


def test_ordered_curriculum_paces_buckets_and_labels(shard_set):
    root, uid_label = shard_set
    reader = _reader(root, mode="ordered")
    assert reader.num_classes == NUM_CLASSES
    # Epoch 0 of 4 uses bucket 0 only: 24 easy rows, 12 per stream, 2 rows per stream per batch.
    assert reader.steps_per_epoch(0) == 6
    uids, hard, labels = _epoch(reader, 0)
    assert uids.shape == (6, 4) and not hard.any()
    assert len(set(uids.ravel().tolist())) == 24  # every easy row exactly once
    assert [uid_label[u] for u in uids.ravel()] == labels.ravel().tolist()  # label = index in labels.parquet
    # Epoch 1: both buckets, 42 rows (21 per stream) -> 10 batches; every row at most once.
    assert reader.steps_per_epoch(1) == 10
    uids, hard, _ = _epoch(reader, 1)
    assert len(set(uids.ravel().tolist())) == 40 and hard.any() and not hard.all()


def test_deterministic_per_seed_and_reshuffled_per_epoch(shard_set):
    root, _ = shard_set
    first, _, _ = _epoch(_reader(root), 0)
    again, _, _ = _epoch(_reader(root), 0)
    other, _, _ = _epoch(_reader(root, seed=2), 0)
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other) and sorted(first.ravel()) == sorted(other.ravel())
    shuffled = _reader(root, mode="shuffled")
    assert len({tuple(shuffled.epoch_shards(e)) for e in range(4)}) > 1
    a, hard, _ = _epoch(shuffled, 0)
    assert hard.any() and not hard.all() and len(set(a.ravel())) == a.size


def test_global_batches_do_not_depend_on_worker_count(shard_set):
    root, _ = shard_set
    one, _, _ = _epoch(_reader(root, batch_size=8, data={"streams": 4}), 1)
    two = [_reader(root, rank=r, world_size=2, batch_size=8, data={"streams": 4}) for r in (0, 1)]
    assert two[0].local_streams == [0, 2] and two[1].local_streams == [1, 3]
    halves = [_epoch(reader, 1)[0] for reader in two]
    assert halves[0].shape == halves[1].shape == (one.shape[0], 4)
    for step in range(one.shape[0]):
        assert not set(halves[0][step]) & set(halves[1][step])
        assert sorted(np.concatenate([halves[0][step], halves[1][step]])) == sorted(one[step])


def test_batches_mix_many_identities(many_ids):
    root, _ = many_ids
    reader = _reader(root, batch_size=32, total_epochs=1, data={"streams": 8})
    assert len(reader.shards) == 32 and reader.steps_per_epoch(0) == 16
    per_batch = [len(set(batch.labels.tolist())) for batch in reader.batches(0)]
    # A batch read from one shard holds at most 8 identities; these hold about 29 of 32 rows.
    assert np.mean(per_batch) >= 26 and min(per_batch) >= 22


def test_each_shard_read_by_one_worker_when_pieces_are_large(many_ids):
    root, _ = many_ids
    readers = [_reader(root, rank=r, world_size=2, batch_size=32, total_epochs=1, data={"streams": 2, "chunk_rows": 1 << 20})
               for r in (0, 1)]
    for reader in readers:
        for _ in reader.batches(0):
            pass
    reads = [reader.stats.per_shard_reads for reader in readers]
    shared = set(reads[0]) & set(reads[1])
    total_rows = sum(int(s["rows"]) for s in readers[0].shards)
    rows_read = sum(reader.stats.rows_read for reader in readers)
    # 512 rows in 4 pieces per stream: only shards cut by a piece boundary are read by both workers.
    assert len(shared) <= 7 and rows_read <= 1.25 * total_rows
    assert sum(reader.stats.rows_used for reader in readers) == 512


def test_resume_mid_epoch_on_same_and_other_worker_count(shard_set):
    root, _ = shard_set
    full, _, _ = _epoch(_reader(root, batch_size=8, data={"streams": 4}), 1)
    # Two workers run 3 steps, then stop; their stream positions are the checkpoint.
    positions = {}
    for r in (0, 1):
        reader = _reader(root, rank=r, world_size=2, batch_size=8, data={"streams": 4})
        for batch in reader.batches(1):
            if batch.step == 2:
                positions.update(batch.positions)
                break
    assert sorted(positions) == [0, 1, 2, 3] and all(p == 6 for p in positions.values())
    rest, _, _ = _epoch(_reader(root, batch_size=8, data={"streams": 4}), 1, start_step=3, positions=positions)
    np.testing.assert_array_equal(rest, full[3:])


def test_bad_rows_skipped_and_steps_kept(tmp_path):
    make_shard_set(tmp_path, corrupt=True)
    reader = _reader(tmp_path, total_epochs=1)
    steps = reader.steps_per_epoch(0)
    uids, _, _ = _epoch(reader, 0)
    assert uids.shape == (steps, 4) == (10, 4)
    assert reader.skipped == 2 and 3 not in uids and 5 not in uids


def test_reader_errors_name_the_problem(tmp_path, shard_set):
    root, _ = shard_set
    with pytest.raises(ValueError, match="mode"):
        _reader(root, mode="random")
    with pytest.raises(ValueError, match="rank 2"):
        _reader(root, rank=2, world_size=2)
    with pytest.raises(ValueError, match="streams"):
        _reader(root, batch_size=6, data={"streams": 4})
    with pytest.raises(ValueError, match="manifest"):
        _reader(str(tmp_path / "missing"))


def test_prefetch_order_errors_and_early_stop():
    assert list(prefetch(iter(range(50)), depth=3)) == list(range(50))

    def failing():
        yield 1
        raise ValueError("shard 7 unreadable")

    got = []
    with pytest.raises(ValueError, match="shard 7"):
        for item in prefetch(failing()):
            got.append(item)
    assert got == [1]
    stream = prefetch(iter(range(1000)), depth=1)
    assert next(stream) == 0
    stream.close()  # the producer thread is stopped and joined, not left blocked on a full queue


# --- augmentations ---------------------------------------------------------------------------


@pytest.fixture
def face():
    rng = np.random.default_rng(0)
    return cv2.resize(rng.integers(30, 226, (14, 14, 3), dtype=np.uint8), (112, 112), interpolation=cv2.INTER_LINEAR)


def test_flip_applied_by_the_reader(shard_set):
    root, _ = shard_set
    flipped = [b.images for b in _reader(root, augment={"hflip_p": 1.0}).batches(0)]
    plain = [b.images for b in _reader(root, augment={"hflip_p": 0.0}).batches(0)]
    for f, p in zip(flipped, plain):
        torch.testing.assert_close(f, torch.flip(p, dims=[3]))


def test_each_augmentation_does_what_it_says(face):
    rng = np.random.default_rng(3)
    cropped = crop_in_place(face, rng, (0.2, 0.5), (0.75, 4 / 3))
    kept = np.all(cropped == face, axis=2)
    ys, xs = np.nonzero(kept)
    box = np.zeros_like(kept)
    box[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1] = True
    assert np.all(cropped[~box] == 0) and 0.15 <= box.mean() <= 0.55  # one box kept in place, rest black
    low = random_low_resolution(face, np.random.default_rng(4), (0.2, 0.3))
    assert low.shape == face.shape and np.abs(low.astype(int) - face).mean() > 1.0
    bright = photometric(face, np.random.default_rng(5), (0.5, 0.5, 0.5))
    assert bright.dtype == np.uint8 and not np.array_equal(bright, face)
    erased = random_erase(face, np.random.default_rng(6), (0.1, 0.2), (0.5, 2.0))
    changed = np.any(erased != face, axis=2)
    assert 0.05 <= changed.mean() <= 0.2 and np.all(erased[changed] == 128)


def test_probabilities_are_data(face):
    off = TrainAugment(TrainAugmentSettings(hflip_p=0.0))
    assert np.array_equal(off(face, np.random.default_rng(0)), face)
    recipe = TrainAugmentSettings(hflip_p=0.5, crop_p=0.2, low_res_p=0.2, photometric_p=0.2, erase_p=0.1)
    augment = TrainAugment(recipe)
    outs = [augment(face, np.random.default_rng([9, i])) for i in range(400)]
    unchanged = np.mean([np.array_equal(o, face) for o in outs])
    # P(no operation) = 0.5 * 0.8^3 * 0.9 = 0.23
    assert 0.16 <= unchanged <= 0.30
    assert all(o.shape == face.shape and o.dtype == np.uint8 for o in outs)
    np.testing.assert_array_equal(augment(face, np.random.default_rng([9, 7])), outs[7])  # reproducible from the seed
    with pytest.raises(ValueError, match="crop_scale"):
        TrainAugmentSettings(crop_scale=(0.5, 0.2))
