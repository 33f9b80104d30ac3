"""W&B tracking: offline runs written and read back, stable ids for resume, disabled mode."""

import os
import subprocess
import sys

import pytest

from facegen.config import config_from_dict
from facegen.tracking import Tracker, resolve_mode, run_id, start_run
from wandb_offline import read_offline_run


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)


def _cfg(tmp_path, mode="offline"):
    return config_from_dict({"run": {"name": "tiny", "output_dir": str(tmp_path / "out")},
                             "tracking": {"mode": mode}, "train": {"epochs": 3}})


def test_offline_run_roundtrip_and_resume(tmp_path):
    cfg = _cfg(tmp_path)
    tracker = start_run(cfg, "train")
    assert tracker.enabled
    for epoch in (1, 2):
        tracker.log({"epoch": epoch, "loss": 3.0 / epoch, "val/heldout": 0.5 + 0.1 * epoch}, step=epoch)
    tracker.finish()
    tracker.finish()  # idempotent

    first = read_offline_run(str(tmp_path / "out"))
    assert first.run_id == run_id("tiny", "train")
    assert first.config["train"]["epochs"] == 3 and first.config["run"]["name"] == "tiny"
    assert [row["epoch"] for row in first.history] == [1, 2]
    assert first.history[1]["loss"] == pytest.approx(1.5)
    assert first.history[1]["_step"] == 2
    assert first.summary["val/heldout"] == pytest.approx(0.7)

    # A resumed training (same name and job type) appends to the same run id.
    again = start_run(cfg, "train")
    again.log({"epoch": 3, "loss": 1.0, "val/heldout": 0.8}, step=3)
    again.summary({"best/heldout": 0.8})
    again.finish()
    merged = read_offline_run(str(tmp_path / "out" / "wandb"))
    assert [row["epoch"] for row in merged.history] == [1, 2, 3]
    assert merged.summary["best/heldout"] == pytest.approx(0.8)


def test_run_dir_overrides_location_and_ids_are_stable(tmp_path):
    cfg = _cfg(tmp_path)
    tracker = start_run(cfg, "eval", run_dir=str(tmp_path / "elsewhere"), name="custom")
    tracker.log({"acc": 0.9})
    tracker.finish()
    run = read_offline_run(str(tmp_path / "elsewhere"))
    assert run.run_id == run_id("custom", "eval") and run.history[0]["acc"] == pytest.approx(0.9)
    assert not (tmp_path / "out" / "wandb").exists()
    assert run_id("custom", "eval") == run_id("custom", "eval") != run_id("custom", "train")
    assert set(run_id("a b/c:d", "train")) <= set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_")


def test_read_offline_run_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no offline wandb run"):
        read_offline_run(str(tmp_path))
    bad = tmp_path / "run-x.wandb"
    bad.write_bytes(b"not a wandb file")
    with pytest.raises(ValueError, match="bad header"):
        read_offline_run(str(bad))


def test_auto_mode_without_key_is_offline(monkeypatch):
    assert resolve_mode("auto") == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert resolve_mode("auto") == "online"
    assert resolve_mode("disabled") == "disabled"


def test_disabled_tracker_never_imports_wandb(tmp_path):
    code = (
        "import sys\n"
        "from facegen.config import config_from_dict\n"
        "from facegen.tracking import start_run\n"
        f"cfg = config_from_dict({{'run': {{'output_dir': {str(tmp_path)!r}}}, 'tracking': {{'mode': 'disabled'}}}})\n"
        "t = start_run(cfg, 'train')\n"
        "t.log({'a': 1}, step=1); t.summary({'b': 2}); t.finish()\n"
        "assert not t.enabled and 'wandb' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60, env={**os.environ})
    assert not (tmp_path / "wandb").exists()
    assert Tracker(None).enabled is False
