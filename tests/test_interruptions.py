"""Ctrl-C, SIGTERM and SIGKILL of a facegen driver: one line, resumable, no Ray process left behind."""

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from facegen import blocks as blk
from facegen import storage

pytestmark = pytest.mark.slow

BLOCKS = 16


def _settings(out: Path) -> dict:
    return {
        "run": {"name": "interrupt", "output_dir": str(out), "seed": 1, "verify": "size"},
        "ray": {"num_cpus": 2},
        "identities": {"num_identities": 2 * BLOCKS, "block_size": 2},
        "generator": {"images_per_identity": 30, "batch_size": 2, "pool": {"min_size": 1, "num_cpus": 1.0},
                      "parametric": {"image_size": 112, "wrong_identity_rate": 0.0}},
        "faces": {"detector": {"kind": "none"}, "batch_size": 64},
        "tracking": {"mode": "disabled"},
    }


def _start(config: Path, ray_tmp: str) -> subprocess.Popen:
    # a session of its own: signals go to the driver's group as a terminal's Ctrl-C would; RAY_TMPDIR
    # tells this driver's Ray processes apart from the test session's
    env = {**os.environ, "RAY_TMPDIR": ray_tmp, "TQDM_DISABLE": "1"}
    return subprocess.Popen([sys.executable, "-m", "facegen", "generate", "--config", str(config), "--no-progress"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)


def _started_run(tmp_path: Path, prefix: str) -> tuple[Path, Path, str, subprocess.Popen]:
    """(output folder, config, Ray temp root, process) of a facegen generate just started."""
    out, config = tmp_path / "run", tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(_settings(out)))
    ray_tmp = tempfile.mkdtemp(prefix=prefix, dir="/tmp")
    return out, config, ray_tmp, _start(config, ray_tmp)


def _wait_for_blocks(out: Path, proc: subprocess.Popen, at_least: int, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while len(list((out / "raw").glob("block-*.stats.json"))) < at_least:
        assert proc.poll() is None, proc.communicate()[0]
        assert time.time() < deadline, "no block was finished in time"
        time.sleep(0.2)


def _ray_processes(ray_tmp: str) -> list[str]:
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if ray_tmp in cmdline:
            found.append(f"{pid} {cmdline[:120]}")
    return found


def _gone_within(ray_tmp: str, seconds: float) -> list[str]:
    deadline = time.time() + seconds
    while time.time() < deadline:
        left = _ray_processes(ray_tmp)
        if not left:
            return []
        time.sleep(0.25)
    return _ray_processes(ray_tmp)


def _identities_once(out: Path) -> list[int]:
    ids = []
    for block_id in blk.done_block_ids(str(out / "raw")):
        ids += sorted(set(storage.read_table(blk.block_path(str(out / "raw"), block_id)).column("identity_id").to_pylist()))
    return ids


@pytest.mark.parametrize("how", ["SIGINT", "SIGTERM"])
def test_an_interrupted_stage_says_so_in_one_line_and_the_same_command_resumes(tmp_path, how):
    """Ctrl-C or SIGTERM: one line, exit 130, no Ray process left; after Ctrl-C the same command
    finishes the stage with every identity exactly once."""
    out, config, ray_tmp, proc = _started_run(tmp_path, "fgi")
    _wait_for_blocks(out, proc, 2)
    if how == "SIGINT":
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: the whole foreground group
    else:
        proc.send_signal(signal.SIGTERM)  # a job manager stopping the driver
    output, _ = proc.communicate(timeout=120)
    lines = [line for line in output.splitlines() if line.strip()]
    assert proc.returncode == 130, output
    assert "Traceback" not in output and "core_worker" not in output, output
    assert len(lines) == 1, output
    match = re.fullmatch(rf"generate interrupted: (\d+) of {BLOCKS} blocks done in {out}/raw; run the same command "
                         "again to resume", lines[0])
    assert match, lines[0]
    done = int(match.group(1))
    assert 2 <= done < BLOCKS and len(blk.done_block_ids(str(out / "raw"))) >= done
    assert _gone_within(ray_tmp, 10) == []
    if how == "SIGTERM":
        return  # the blocks on disk are the same whichever signal stopped the run: one resume shows it

    rerun = _start(config, ray_tmp)
    output, _ = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, output
    assert re.search(rf"blocks_skipped\W+{done}\b", output) or done < len(blk.done_block_ids(str(out / "raw"))), output
    assert _identities_once(out) == list(range(2 * BLOCKS))  # every identity exactly once, no gaps


def test_no_ray_process_outlives_a_killed_driver(tmp_path):
    out, _, ray_tmp, proc = _started_run(tmp_path, "fgk")
    _wait_for_blocks(out, proc, 1)
    assert _ray_processes(ray_tmp)
    proc.kill()
    proc.wait()
    assert _gone_within(ray_tmp, 10) == []
