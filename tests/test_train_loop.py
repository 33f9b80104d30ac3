"""Curriculum reader on a tiny real shard set, and the Ray Train loop end to end (train, resume)."""

import os

import numpy as np
import pytest
import torch

from facegen.config import config_from_dict
from facegen.faces.align import encode_image
from facegen.schema import rows_to_batch, sample_schema, table_from_batch

SAMPLE = sample_schema(512)
from facegen.shards import split_block_into_buckets, write_manifest
from facegen.config import TrainSettings
from facegen.train.data import CurriculumReader, buckets_in_use, prefetch
from facegen.train.loop import lr_at

NUM_CLASSES = 6
FIRST_ID = 1000
ID_STRIDE = 7  # non-contiguous identity ids: labels must come from labels.parquet, not the ids


def _image(label: int, uid: int, hard: bool, rng: np.random.Generator) -> np.ndarray:
    """A coloured stripe pattern per class; row 0 marks hard rows, row 1 carries the row's uid."""
    palette = np.array([[220, 40, 40], [40, 200, 40], [40, 40, 220], [200, 200, 40], [200, 40, 200], [40, 200, 200]])
    yy, xx = np.mgrid[0:112, 0:112]
    stripes = ((xx * (label % 3 + 1) + yy * (label // 3)) // 8) % 2
    img = palette[label][None, None, :] * (0.6 + 0.4 * stripes[..., None]) + rng.normal(0, 12, (112, 112, 3))
    img = np.clip(img, 0, 255).astype(np.uint8)
    img[0] = 255 if hard else 0
    img[1] = uid * 2
    return img


def make_shard_set(root, per_class: int = 7, corrupt: bool = False) -> dict[int, int]:
    """Two blocks of three identities each, two difficulty buckets; returns uid -> label."""
    rng = np.random.default_rng(0)
    edges = np.array([0.0, 0.5, 1.0])
    uid_label, records, uid = {}, [], 0
    for block in range(2):
        rows = []
        for label in range(3 * block, 3 * block + 3):
            for i in range(per_class):
                difficulty = i / per_class
                image = encode_image(_image(label, uid, difficulty >= 0.5, rng), "png")
                status = "ok"
                if corrupt and uid == 3:
                    status = "error"
                if corrupt and uid == 5:
                    image = b"not an image"
                rows.append({
                    "identity_id": FIRST_ID + ID_STRIDE * label, "block_id": block, "sample_idx": i, "seed": 0,
                    "source": "test", "image": image, "true_identity_id": FIRST_ID + ID_STRIDE * label,
                    "meta": "{}", "embedding": None, "quality": 1.0, "difficulty": difficulty,
                    "status": status, "reason": "", "origin": "generated",
                })
                uid_label[uid] = label
                uid += 1
        table = table_from_batch(rows_to_batch(rows, SAMPLE), SAMPLE)
        records += split_block_into_buckets(table, block, edges, str(root))
    ids = FIRST_ID + ID_STRIDE * np.arange(NUM_CLASSES)
    write_manifest(records, str(root), ids, edges, "test")
    return uid_label


def _decode(images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(uid, hard) per image of a batch, read back from the marker rows."""
    pixels = torch.round((images + 1) * 127.5)
    uid = (pixels[:, 0, 1, :].mean(dim=1) / 2).round().long().numpy()
    hard = (pixels[:, 0, 0, :].mean(dim=1) > 127).numpy()
    return uid, hard


def _epoch(reader: CurriculumReader, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    uids, hards, labels = [], [], []
    for images, lab in reader.batches(epoch):
        assert images.shape == (reader.batch_size, 3, 112, 112) and images.dtype == torch.float32
        assert lab.dtype == torch.int64
        assert float(images.min()) >= -1.0 and float(images.max()) <= 1.0
        u, h = _decode(images)
        uids.append(u), hards.append(h), labels.append(lab.numpy())
    if not uids:
        return np.zeros(0, int), np.zeros(0, bool), np.zeros(0, int)
    return np.concatenate(uids), np.concatenate(hards), np.concatenate(labels)


@pytest.fixture(scope="module")
def shard_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    return str(root), make_shard_set(root)


def test_pacing_reaches_all_buckets_by_mid_training():
    assert [buckets_in_use(e, 8, 4) for e in range(8)] == [1, 2, 3, 4, 4, 4, 4, 4]
    assert [buckets_in_use(e, 26, 4) for e in (0, 3, 12, 25)] == [1, 2, 4, 4]
    assert buckets_in_use(0, 1, 3) == 3 and buckets_in_use(0, 4, 1) == 1


def test_ordered_curriculum_easy_first_and_labels(shard_set):
    root, uid_label = shard_set
    reader = CurriculumReader(root, batch_size=4, seed=1, mode="ordered", total_epochs=4)
    assert reader.num_classes == NUM_CLASSES
    # Epoch 0 of 4 uses only bucket 0 (12 easy rows: 4 per class x 3 per block x 2 blocks).
    assert reader.steps_per_epoch(0) == 24 // 4
    uids, hard, labels = _epoch(reader, 0)
    assert len(uids) == 24 and not hard.any()
    assert len(set(uids.tolist())) == 24  # every easy row exactly once
    assert [uid_label[u] for u in uids] == labels.tolist()  # label = index of the identity in labels.parquet
    # Epoch 1: both buckets, all easy rows before any hard row (manifest order); 42 rows -> 10 batches.
    assert reader.steps_per_epoch(1) == 42 // 4
    uids, hard, labels = _epoch(reader, 1)
    assert len(uids) == 40
    assert not hard[:24].any() and hard[24:].all()


def test_rows_shuffled_within_shard_and_flip_applied(shard_set):
    root, _ = shard_set
    reader = CurriculumReader(root, batch_size=4, seed=1, mode="ordered", total_epochs=4)
    first, _, _ = _epoch(reader, 0)
    again, _, _ = _epoch(CurriculumReader(root, batch_size=4, seed=1, mode="ordered", total_epochs=4), 0)
    other_seed, _, _ = _epoch(CurriculumReader(root, batch_size=4, seed=2, mode="ordered", total_epochs=4), 0)
    later_epoch, _, _ = _epoch(CurriculumReader(root, batch_size=4, seed=1, mode="ordered", total_epochs=1), 0)
    np.testing.assert_array_equal(first, again)  # deterministic
    assert not np.array_equal(first, other_seed)
    assert sorted(first.tolist()) == sorted(other_seed.tolist())
    assert len(later_epoch) == 40  # a 1-epoch run uses every bucket at once
    # Horizontal flip: the class stripes of a flipped image are mirrored, so some batches differ from
    # the same rows unflipped.
    flips = []
    for images, _ in CurriculumReader(root, batch_size=4, seed=1, total_epochs=4, hflip_p=1.0).batches(0):
        flips.append(images)
    plain = [images for images, _ in CurriculumReader(root, batch_size=4, seed=1, total_epochs=4, hflip_p=0.0).batches(0)]
    for f, p in zip(flips, plain):
        torch.testing.assert_close(f, torch.flip(p, dims=[3]))


def test_two_ranks_disjoint_rows_and_equal_steps(shard_set):
    root, _ = shard_set
    ranks = [CurriculumReader(root, rank=r, world_size=2, batch_size=4, seed=3, total_epochs=4) for r in (0, 1)]
    for epoch in (0, 1):
        steps = {reader.steps_per_epoch(epoch) for reader in ranks}
        assert len(steps) == 1
        seen = [_epoch(reader, epoch)[0] for reader in ranks]
        assert len(seen[0]) == len(seen[1]) == steps.pop() * 4
        assert not set(seen[0].tolist()) & set(seen[1].tolist())
    # Hard shards have 9 rows per block: rank 0 gets 5 and rank 1 gets 4, so steps follow rank 1.
    per_rank = [sum(len(range(r, int(s["rows"]), 2)) for s in ranks[0].shards) for r in (0, 1)]
    assert per_rank == [22, 20] and ranks[0].steps_per_epoch(1) == 20 // 4


def test_shuffled_mode_mixes_buckets(shard_set):
    root, _ = shard_set
    reader = CurriculumReader(root, batch_size=6, seed=0, mode="shuffled", total_epochs=4)
    orders = {tuple(reader.epoch_shards(e)) for e in range(4)}
    assert all(sorted(o) == list(range(len(reader.shards))) for o in orders)
    assert len(orders) > 1  # reshuffled per epoch
    uids, hard, _ = _epoch(reader, 0)
    assert len(uids) == 42 and hard.any() and not hard.all()


def test_bad_rows_skipped_and_steps_kept(tmp_path):
    make_shard_set(tmp_path, corrupt=True)
    reader = CurriculumReader(str(tmp_path), batch_size=4, seed=0, total_epochs=1)
    steps = reader.steps_per_epoch(0)
    uids, _, _ = _epoch(reader, 0)
    assert len(uids) == steps * 4 == 40
    assert reader.skipped >= 1
    assert 3 not in uids and 5 not in uids


def test_reader_errors_name_the_problem(tmp_path, shard_set):
    root, _ = shard_set
    with pytest.raises(ValueError, match="mode"):
        CurriculumReader(root, mode="random")
    with pytest.raises(ValueError, match="rank 2"):
        CurriculumReader(root, rank=2, world_size=2)
    with pytest.raises(ValueError, match="manifest"):
        CurriculumReader(str(tmp_path / "missing"))


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


def test_lr_schedule_steps_and_warmup():
    s = TrainSettings(lr=0.1, lr_steps=[12, 20, 24], epochs=26)
    assert [round(lr_at(s, e), 6) for e in (0, 11.9, 12, 20, 25)] == [0.1, 0.1, 0.01, 0.001, 0.0001]
    w = TrainSettings(lr=0.1, lr_steps=[3], warmup_epochs=2, epochs=4)
    assert lr_at(w, 0.0) < lr_at(w, 1.0) < lr_at(w, 1.99) <= 0.1 and lr_at(w, 2.0) == pytest.approx(0.1)


# --- Ray Train end to end ----------------------------------------------------------------------


def _write_pairs_bin(path, uid_label_rng_seed: int = 5) -> None:
    from facegen.eval.verification import write_bin

    rng = np.random.default_rng(uid_label_rng_seed)
    images, issame = [], []
    for k in range(20):
        a = int(rng.integers(NUM_CLASSES))
        b = a if k % 2 == 0 else int((a + 1 + rng.integers(NUM_CLASSES - 1)) % NUM_CLASSES)
        images += [_image(a, 0, False, rng), _image(b, 0, False, rng)]
        issame.append(a == b)
    write_bin(str(path), np.stack(images), issame)


@pytest.mark.slow
def test_train_resume_and_export(tmp_path, ray_local):
    from facegen.tracking import read_offline_run
    from facegen.models.iresnet_checkpoint import load_backbone
    from facegen.train.loop import train

    shards = tmp_path / "shards"
    make_shard_set(shards, per_class=8)
    bin_path = tmp_path / "pairs.bin"
    _write_pairs_bin(bin_path)
    settings = {
        "run": {"name": "tiny-train", "output_dir": str(tmp_path / "out"), "seed": 0},
        "train": {"arch": "iresnet18", "width": 8, "embedding_size": 64, "batch_size": 8, "epochs": 2,
                  "lr": 0.05, "lr_steps": [10], "num_workers": 1, "cpus_per_worker": 0.5, "curriculum": "ordered"},
        "eval": {"batch_size": 16, "nrof_folds": 5},
        "tracking": {"mode": "offline"},
    }
    cfg = config_from_dict(settings)
    result = train(cfg, str(shards), eval_bins=[str(bin_path)])

    run_dir = os.path.abspath(str(tmp_path / "out" / "train" / "tiny-train"))
    assert result.run_dir == run_dir and result.epochs_completed == 2 and result.resumed_from_epoch == 0
    assert [h["epoch"] for h in result.history] == [1, 2]
    for row in result.history:
        assert np.isfinite(row["loss"]) and row["throughput"] > 0 and 0 <= row["train_accuracy"] <= 1
        assert 0.0 <= row["val/pairs"] <= 1.0 and row["lr"] == pytest.approx(0.05) and row["skipped_rows"] == 0
    assert result.history[0]["images"] == 48  # a 2-epoch run uses every bucket from the first epoch
    for name in ("backbone/backbone.safetensors", "epoch-0002/backbone/backbone.json", "epoch-0002/state/state.json",
                 "epoch-0002/state/optimizer.pt", "result.json"):
        assert os.path.exists(os.path.join(run_dir, name)), name
    model = load_backbone(result.backbone_dir)
    assert model(torch.zeros(1, 3, 112, 112)).shape == (1, 64)

    # Same run name, one more epoch: continues after epoch 2, runs only epoch 3.
    cfg3 = config_from_dict({**settings, "train": {**settings["train"], "epochs": 3}})
    resumed = train(cfg3, str(shards), eval_bins=[str(bin_path)])
    assert resumed.resumed_from_epoch == 2 and resumed.epochs_completed == 3
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3]
    assert resumed.history[:2] == result.history
    tracked = read_offline_run(str(tmp_path / "out" / "wandb"))
    assert [row["epoch"] for row in tracked.history] == [1, 2, 3]  # one W&B run across both calls
    assert tracked.config["train"]["arch"] == "iresnet18"

    # Everything done: returns the recorded result without starting Ray Train.
    again = train(cfg3, str(shards), eval_bins=[str(bin_path)])
    assert again.epochs_completed == 3 and again.history == resumed.history
