"""The generation stage on a real local Ray: worker-side block files, resume after kills, integrity."""

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pytest

from facegen import blocks as blk
from facegen import storage
from facegen.config import config_from_dict

KILL_SETTINGS = ["identities.num_identities=60", "identities.block_size=2", "generator.images_per_identity=8",
                 "generator.parametric.image_size=96", "generator.pool.min_size=2", "run.seed=11",
                 "ray.num_cpus=2", "tracking.mode=disabled"]


def _config(tmp_path, **identities):
    return config_from_dict(
        {
            "run": {"output_dir": str(tmp_path / "run"), "seed": 7},
            "identities": {"num_identities": 10, "block_size": 4, **identities},
            "generator": {"images_per_identity": 3, "batch_size": 3, "pool": {"num_cpus": 0.25},
                          "parametric": {"image_size": 64, "wrong_identity_rate": 0.2}},
            "faces": {"batch_size": 16, "pool": {"num_cpus": 0.25}, "image_format": "png"},
            "tracking": {"mode": "disabled"},
        },
        "test",
    )


def _read_ids(raw_dir):
    tables = [storage.read_table(blk.block_path(raw_dir, b), columns=["identity_id", "sample_idx", "block_id"])
              for b in blk.done_block_ids(raw_dir)]
    return [(int(i), int(s)) for t in tables for i, s in zip(t.column("identity_id").to_pylist(), t.column("sample_idx").to_pylist())]


def _checksums(raw_dir):
    return {b: storage.sha256_of(blk.block_path(raw_dir, b)) for b in blk.done_block_ids(raw_dir)}


@pytest.mark.slow
def test_generate_writes_one_file_per_block_and_skips_done(ray_local, tmp_path):
    from facegen.stages.generate import run_generate

    cfg = _config(tmp_path)
    report = run_generate(cfg, progress=False)
    raw = cfg.stage_dir("raw")
    assert (report.blocks_total, report.blocks_written, report.blocks_skipped) == (3, 3, 0)
    assert blk.done_block_ids(raw) == [0, 1, 2]
    assert _read_ids(raw) == [(i, s) for i in range(10) for s in range(3)]
    table = storage.read_table(blk.block_path(raw, 1))
    assert set(table.column("block_id").to_pylist()) == {1}
    assert set(table.column("status").to_pylist()) == {"ok"}
    assert report.totals["images"] == 30 and report.totals["identities"] == 10
    record = storage.read_json(blk.stats_path(raw, 1))
    assert record["sha256"] == storage.sha256_of(blk.block_path(raw, 1)) and record["config_digest"]
    checksums = _checksums(raw)

    again = run_generate(cfg, progress=False)
    assert (again.blocks_written, again.blocks_skipped, again.blocks_redone) == (0, 3, 0)
    assert _checksums(raw) == checksums

    # a crash between data file and stats record: the block is redone, the rest stay
    storage.remove(blk.stats_path(raw, 1))
    redo = run_generate(cfg, progress=False)
    assert (redo.blocks_written, redo.blocks_skipped) == (1, 2)
    assert _checksums(raw) == checksums  # deterministic

    # a setting that shapes the images makes every block stale; a pool size does not
    bigger_pool = cfg.model_copy(deep=True)
    bigger_pool.generator.pool.min_size = 3
    assert run_generate(bigger_pool, progress=False).blocks_written == 0
    changed = cfg.model_copy(deep=True)
    changed.generator.parametric.wrong_identity_rate = 0.0
    stale = run_generate(changed, progress=False)
    assert (stale.blocks_written, stale.blocks_redone) == (3, 3)
    assert "settings changed" in stale.notes[0]
    assert stale.totals["injected_wrong"] == 0


def test_failing_samples_become_error_rows_and_the_block_goes_on(tmp_path):
    from facegen.blocks import Block
    from facegen.faces.stage import FaceStage
    from facegen.generators.parametric import ParametricGenerator
    from facegen.stages.generate import block_stats, generate_block_table

    cfg = _config(tmp_path)
    # identity ids -2, -1 are invalid for every generator: their samples must fail alone
    table = generate_block_table(ParametricGenerator(cfg.generator, 7), FaceStage(cfg.faces), Block(-1, -2, 2), 3, 4)
    status = np.array(table.column("status").to_pylist())
    ids = table.column("identity_id").to_numpy()
    assert table.num_rows == 4 * 3
    assert (status[ids < 0] == "error").all() and (status[ids >= 0] == "ok").all()
    reasons = [r for r, i in zip(table.column("reason").to_pylist(), ids) if i < 0]
    assert all(r and "identity" in r for r in reasons)
    stats = block_stats(table, Block(-1, -2, 2))
    assert stats["images_error"] == 6 and sum(stats["error_reasons"].values()) == 6
    assert len(stats["error_reasons"]) == 2  # the sample prefix is stripped: one reason per bad identity


@pytest.fixture(scope="module")
def uninterrupted(ray_local, tmp_path_factory):
    """The reference: the kill-test dataset generated in one go."""
    from facegen.stages.generate import run_generate

    out = tmp_path_factory.mktemp("reference") / "run"
    cfg = config_from_dict({}, "test", KILL_SETTINGS + [f"run.output_dir={out}"])
    run_generate(cfg, progress=False)
    return cfg


@pytest.mark.slow
def test_generate_killed_at_random_points_resumes_to_the_same_dataset(uninterrupted, tmp_path):
    from facegen.stages.generate import run_generate

    raw = str(tmp_path / "run" / "raw")
    settings = KILL_SETTINGS + [f"run.output_dir={tmp_path / 'run'}"]
    cmd = [sys.executable, "-m", "facegen", "generate", "--no-progress"] + [a for s in settings for a in ("--set", s)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    rng = random.Random(20261127)
    total_blocks = 30
    done_counts = []
    for _ in range(3):
        before = len(blk.done_block_ids(raw))
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            deadline = time.time() + 120
            while time.time() < deadline and len(blk.done_block_ids(raw)) <= before:  # some progress first
                assert proc.poll() is None, proc.stdout.read().decode()[-2000:]
                time.sleep(0.05)
            time.sleep(rng.uniform(0.0, 1.0))  # then a random point: mid-block, mid-write or between
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        done_counts.append(len(blk.done_block_ids(raw)))
    assert done_counts[-1] < total_blocks, f"the job must be killed midway each time {done_counts}"
    assert done_counts == sorted(done_counts) and done_counts[0] > 0

    cfg = config_from_dict({}, "test", settings)
    report = run_generate(cfg, progress=False)
    assert report.blocks_skipped + report.blocks_written == total_blocks
    assert blk.done_block_ids(raw) == list(range(total_blocks))
    got = _read_ids(raw)
    assert len(got) == len(set(got)), "duplicates after resume"
    assert sorted(got) == [(i, s) for i in range(60) for s in range(8)], "gaps after resume"
    assert _checksums(raw) == _checksums(uninterrupted.stage_dir("raw"))
    assert not [p for p in os.listdir(raw) if p.startswith(".tmp-")], "stale temp files survived the resume"
    assert not os.listdir(os.path.join(raw, ".claims")), "a finished run leaves its claim behind"


@pytest.mark.slow
def test_truncated_and_corrupt_blocks_are_detected_and_redone(uninterrupted, tmp_path):
    from facegen.stages.generate import run_generate

    reference = uninterrupted.stage_dir("raw")
    raw = str(tmp_path / "run" / "raw")
    shutil.copytree(reference, raw, ignore=shutil.ignore_patterns(".claims"))
    truncated, corrupt = blk.block_path(raw, 4), blk.block_path(raw, 17)
    with open(truncated, "r+b") as f:
        f.truncate(os.path.getsize(truncated) // 2)
    with open(corrupt, "r+b") as f:  # same size, different bytes: only the sha256 tells
        f.seek(os.path.getsize(corrupt) // 2)
        data = f.read(64)
        f.seek(os.path.getsize(corrupt) // 2)
        f.write(bytes(b ^ 0xFF for b in data))

    cfg = config_from_dict({}, "test", KILL_SETTINGS + [f"run.output_dir={tmp_path / 'run'}"])
    report = run_generate(cfg, progress=False)
    assert (report.blocks_redone, report.blocks_written, report.blocks_skipped) == (2, 2, 28)
    notes = "\n".join(report.notes)
    assert "block 4 redone" in notes and "truncated" in notes
    assert "block 17 redone" in notes and "sha256 mismatch" in notes
    assert _checksums(raw) == _checksums(reference)


def test_a_second_run_on_a_held_stage_is_refused_with_other_settings_and_waits_with_the_same(tmp_path):
    import threading

    from facegen.claims import StageClaim

    stage = str(tmp_path / "raw")
    with StageClaim(stage, settings="digest-a") as first:
        with StageClaim(stage, settings="digest-b") as other:
            with pytest.raises(ValueError) as info:
                other.wait_for_runs_ahead(poll_s=0.05)
        message = str(info.value)
        assert message.startswith(f"{stage}: another run with other settings is writing this stage (host ") and "\n" not in message
        assert f"pid {os.getpid()}" in message
        assert first.runs_ahead() == []  # the first run never waits for a later one

        waited, notes = [], []
        with StageClaim(stage, settings="digest-a") as same:
            waiter = threading.Thread(target=lambda: (same.wait_for_runs_ahead(poll_s=0.05, on_wait=notes.append),
                                                      waited.append(time.time())))
            waiter.start()
            time.sleep(0.5)
            assert waited == [] and len(notes) == 1 and "same settings" in notes[0]
            released = time.time()
            first.__exit__(None, None, None)
            waiter.join(timeout=5)
    assert waited and waited[0] >= released


def test_temp_files_are_kept_while_another_run_holds_the_stage(tmp_path):
    from facegen.claims import StageClaim

    stage = str(tmp_path / "raw")
    storage.write_table_atomic(pa.table({"a": [1]}), blk.block_path(stage, 0))
    (tmp_path / "raw" / ".tmp-abc-block-000001.parquet").write_bytes(b"half")
    with StageClaim(stage) as other:
        with StageClaim(stage) as mine:
            assert [c["token"] for c in mine.other_live_claims()] == [other.token]
            assert mine.remove_stale_temp_files() == 0
        assert (tmp_path / "raw" / ".tmp-abc-block-000001.parquet").exists()
    # a claim left by a killed process of this host is dead at once
    storage.write_json_atomic({"token": "dead", "host": socket.gethostname(), "pid": 2**22 + 12345,
                               "heartbeat": time.time()}, f"{stage}/.claims/dead.json")
    with StageClaim(stage) as mine:
        assert mine.other_live_claims() == []
        assert mine.remove_stale_temp_files() == 1
    assert sorted(os.listdir(stage)) == [".claims", "block-000000.parquet"]
