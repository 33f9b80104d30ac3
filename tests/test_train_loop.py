"""Ray Train end to end: 2 CPU workers, a worker killed mid-run, FailureConfig restart from the latest
step checkpoint, validation, W&B, the finished-run shortcut and the shard-set guard."""

import json
import os
import signal
import threading
import time

import numpy as np
import psutil
import pytest
import torch
from safetensors.torch import load_file

from facegen.config import config_from_dict
from facegen.lineage import TrainingInputChanged, check_training_input
from facegen.shards import shard_set_digest
from facegen.train.checkpoint import read_state
from facegen.train.fit import LocalSession, fit
from facegen.train.loop import check_run_against_shards, train
from gloo_workers import spawn_gloo
from train_shards import make_shard_set, write_pairs_bin

SETTINGS = {"arch": "iresnet18", "width": 8, "embedding_size": 32, "batch_size": 8, "epochs": 2, "lr": 0.05,
            "lr_steps": [1], "scale": 16.0, "margin": 0.2, "amp": "off", "num_workers": 2,
            "cpus_per_worker": 0.5, "data": {"streams": 2, "decode_threads": 1}, "checkpoint_every_steps": 2,
            "max_failures": 1, "checkpoints_to_keep": 3}


def _cfg(tmp_path, **train):
    return config_from_dict({"run": {"name": "tiny-train", "output_dir": str(tmp_path / "out"), "seed": 0},
                             "train": {**SETTINGS, **train}, "eval": {"batch_size": 16, "nrof_folds": 5},
                             "tracking": {"mode": "offline"}})


def _my_train_workers() -> list[psutil.Process]:
    """Ray Train worker processes started by this test process (its descendants only)."""
    found = []
    for proc in psutil.Process(os.getpid()).children(recursive=True):
        try:
            if "RayTrainWorker" in " ".join(proc.cmdline()):
                found.append(proc)
        except psutil.Error:
            pass
    return found


def _registered_checkpoint(run_dir: str) -> str | None:
    """The latest checkpoint Ray Train has registered for the run (what a restart resumes from)."""
    try:
        with open(f"{run_dir}/checkpoint_manager_snapshot.json") as f:
            latest = json.load(f).get("latest_checkpoint_result") or {}
    except (OSError, ValueError):
        return None
    return latest.get("checkpoint_dir_name")


def _params(checkpoint_dir: str) -> dict[str, torch.Tensor]:
    out = {f"backbone.{k}": v for k, v in load_file(f"{checkpoint_dir}/backbone/backbone.safetensors").items()}
    state = read_state(checkpoint_dir)
    out["head"] = torch.cat([load_file(f"{checkpoint_dir}/{s['file']}")["weight"] for s in state["head_shards"]])
    return {k: v for k, v in out.items() if "running" not in k and "num_batches" not in k}


def _local_worker(rank: int, tmp: str, shards: str) -> None:
    from pathlib import Path

    fit(LocalSession(f"{tmp}/local"), _cfg(Path(tmp), max_failures=0), shards, [], "local")


@pytest.mark.slow
def test_killed_worker_resumes_and_matches_an_uninterrupted_run(tmp_path, ray_local):
    from wandb_offline import read_offline_run

    shards = tmp_path / "shards"
    make_shard_set(shards, per_class=8)  # 48 rows: 6 global batches of 8 per epoch
    bin_path = tmp_path / "pairs.bin"
    write_pairs_bin(bin_path)
    cfg = _cfg(tmp_path)
    run_dir = os.path.abspath(str(tmp_path / "out" / "train" / "tiny-train"))

    outcome: dict = {}
    worker = threading.Thread(target=lambda: outcome.update(result=train(cfg, str(shards), eval_bins=[str(bin_path)])))
    worker.start()
    killed = None
    deadline = time.time() + 300
    while killed is None and worker.is_alive() and time.time() < deadline:
        if _registered_checkpoint(run_dir) and _my_train_workers():
            killed = _my_train_workers()[-1]
            os.kill(killed.pid, signal.SIGKILL)
        time.sleep(0.05)
    worker.join(timeout=600)
    assert killed is not None, "training ended before a worker could be killed"
    result = outcome["result"]

    assert result.epochs_completed == 2 and result.global_step == 12
    assert len(result.resumes) == 1 and 2 <= result.resumes[0]["global_step"] < 12  # restarted from a step checkpoint
    assert result.resumes[0]["world_size"] == result.resumes[0]["from_world_size"] == 2
    assert [h["epoch"] for h in result.history] == [1, 2]
    for row in result.history:
        assert np.isfinite(row["loss"]) and row["throughput"] > 0 and row["skipped_rows"] == 0
        assert {"val/pairs", "val/pairs_std", "val/mean", "val/best_mean"} <= set(row)
    final = f"{run_dir}/step-000000012"
    state = read_state(final)
    assert state["best"]["val/mean"] == max(h["val/mean"] for h in result.history) == result.best["val/mean"]
    assert state["validation"]["val/pairs"] == result.history[-1]["val/pairs"]
    assert len(state["head_shards"]) == 2 and os.path.exists(f"{final}/head/shard-00001.safetensors")
    assert os.path.exists(f"{run_dir}/backbone/backbone.safetensors")
    tracked = read_offline_run(str(tmp_path / "out" / "wandb"))
    assert [row["epoch"] for row in tracked.history if "epoch" in row][-2:] == [1, 2]

    # The same training by two plain-PyTorch workers (gloo), uninterrupted: the same parameters.
    spawn_gloo(_local_worker, str(tmp_path), str(shards))
    got, want = _params(final), _params(str(tmp_path / "local" / "step-000000012"))
    for key, value in want.items():
        torch.testing.assert_close(got[key], value, rtol=1e-6, atol=1e-7, msg=key)

    # Done: returns the recorded result without starting Ray Train.
    again = train(cfg, str(shards), eval_bins=[str(bin_path)])
    assert again.global_step == 12 and again.history == result.history

    # Another shard set under the same run name is refused in one line, before any work.
    other = tmp_path / "other"
    make_shard_set(other, per_class=9)
    with pytest.raises(TrainingInputChanged, match="trained on shard set.*run.overwrite") as err:
        train(cfg, str(other), eval_bins=[])
    assert "\n" not in str(err.value)
    # A run without dataset.json (older than it) is still refused: its checkpoints record their shard set.
    os.remove(f"{run_dir}/dataset.json")
    with pytest.raises(TrainingInputChanged, match="trained on shard set"):
        check_run_against_shards(run_dir, shard_set_digest(str(other)))
    assert check_run_against_shards(run_dir, shard_set_digest(str(shards)))["global_step"] == 12
    # run.overwrite starts afresh: the old run goes.
    assert check_training_input(run_dir, str(other), shard_set_digest(str(other)), overwrite=True) is True
    assert os.listdir(run_dir) == ["dataset.json"] and check_run_against_shards(run_dir, "0" * 16) is None
