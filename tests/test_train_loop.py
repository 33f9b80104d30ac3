"""The Ray Train loop end to end (train, resume) and the learning-rate schedule."""

import os

import numpy as np
import pytest
import torch

from facegen.config import TrainSettings, config_from_dict
from facegen.train.loop import lr_at
from train_shards import class_image, make_shard_set

NUM_CLASSES = 6


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
        images += [class_image(a, 0, False, rng), class_image(b, 0, False, rng)]
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
