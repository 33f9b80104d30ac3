"""The generation stage on a real local Ray: block files, resume, kill-and-resume, error rows."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from facegen import blocks as blk
from facegen import storage
from facegen.config import config_from_dict

pytestmark = pytest.mark.slow


def _config(tmp_path, **identities):
    return config_from_dict(
        {
            "run": {"output_dir": str(tmp_path / "run"), "seed": 7},
            "identities": {"num_identities": 10, "block_size": 4, **identities},
            "generator": {"images_per_identity": 3, "batch_size": 3, "num_cpus": 0.25,
                          "parametric": {"image_size": 64, "wrong_identity_rate": 0.2}},
            "faces": {"batch_size": 16, "num_cpus": 0.25, "image_format": "png"},
            "tracking": {"mode": "disabled"},
        },
        "test",
    )


def _read_ids(raw_dir):
    tables = [storage.read_table(blk.block_path(raw_dir, b), columns=["identity_id", "sample_idx", "block_id"])
              for b in blk.done_block_ids(raw_dir)]
    return [(int(i), int(s)) for t in tables for i, s in zip(t.column("identity_id").to_pylist(), t.column("sample_idx").to_pylist())]


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
    checksums = {b: storage.sha256_of(blk.block_path(raw, b)) for b in (0, 1, 2)}

    again = run_generate(cfg, progress=False)
    assert (again.blocks_written, again.blocks_skipped) == (0, 3)
    assert {b: storage.sha256_of(blk.block_path(raw, b)) for b in (0, 1, 2)} == checksums

    # a crash between data file and stats record: the block is redone, the rest stay
    storage.remove(blk.stats_path(raw, 1))
    redo = run_generate(cfg, progress=False)
    assert (redo.blocks_written, redo.blocks_skipped) == (1, 2)
    assert storage.sha256_of(blk.block_path(raw, 1)) == checksums[1]  # deterministic


def test_failing_samples_become_error_rows_and_the_job_goes_on(ray_local, tmp_path):
    from facegen.blocks import Block
    from facegen.schema import sample_schema, table_from_batch

    SAMPLE = sample_schema(512)
    from facegen.stages.generate import build_sample_dataset

    cfg = _config(tmp_path)
    # identity ids -2, -1 are invalid for every generator: their samples must fail alone
    pending = [Block(-1, -2, 0), Block(0, 0, 2)]
    rows = [table_from_batch(b, SAMPLE) for b in build_sample_dataset(cfg, pending).iter_batches(batch_size=None, batch_format="numpy")]
    import pyarrow as pa

    table = pa.concat_tables(rows)
    status = np.array(table.column("status").to_pylist())
    ids = table.column("identity_id").to_numpy()
    assert table.num_rows == 4 * 3
    assert (status[ids < 0] == "error").all()
    assert (status[ids >= 0] == "ok").all()
    reasons = [r for r, i in zip(table.column("reason").to_pylist(), ids) if i < 0]
    assert all(r and "identity" in r for r in reasons)


def test_killed_generate_resumes_without_duplicates_or_gaps(ray_local, tmp_path):
    from facegen.stages.generate import run_generate

    num_identities, block_size = 120, 2
    overrides = [f"run.output_dir={tmp_path / 'run'}", f"identities.num_identities={num_identities}",
                 f"identities.block_size={block_size}", "generator.images_per_identity=8",
                 "generator.parametric.image_size=96", "ray.num_cpus=2", "tracking.mode=disabled"]
    raw = str(tmp_path / "run" / "raw")
    cmd = [sys.executable, "-m", "facegen", "generate", "--no-progress"] + [a for o in overrides for a in ("--set", o)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    total_blocks = num_identities // block_size
    deadline = time.time() + 240
    try:
        while time.time() < deadline and len(blk.done_block_ids(raw)) < 3:
            assert proc.poll() is None, proc.stdout.read().decode()[-2000:]
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    done_before = blk.done_block_ids(raw)
    assert 3 <= len(done_before) < total_blocks, "the job must be killed midway"
    before = {b: storage.sha256_of(blk.block_path(raw, b)) for b in done_before}

    cfg = config_from_dict({}, "test", overrides)
    report = run_generate(cfg, progress=False)
    assert report.blocks_skipped == len(done_before)
    assert report.blocks_written == total_blocks - len(done_before)
    assert blk.done_block_ids(raw) == list(range(total_blocks))
    got = _read_ids(raw)
    assert len(got) == len(set(got)), "duplicates after resume"
    assert sorted(got) == [(i, s) for i in range(num_identities) for s in range(8)], "gaps after resume"
    assert {b: storage.sha256_of(blk.block_path(raw, b)) for b in done_before} == before
    assert not [p for p in os.listdir(raw) if p.startswith(".tmp-")], "stale temp files survived the resume"
