"""Filesystem faults a user can type end in one line naming the field, before Ray starts."""

import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from typer.testing import CliRunner

from facegen.config import ConfigError, load_config
from facegen.eval.verification import verify_bins, write_bin
from facegen.faces.embedders.iresnet import IResNetEmbedder
from facegen.preflight import check_output_location
from facegen.stages.generate import reason_kind
from tiny_pipeline import tiny_embedder


def _invoke(*args: str):
    from facegen.cli import app

    return CliRunner().invoke(app, list(args), terminal_width=300)


def _one_error_line(result) -> str:
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and "Traceback" not in result.output, result.output
    return lines[0]


def test_an_output_dir_under_a_file_is_one_line_before_ray_starts(tmp_path):
    import ray

    started_before = ray.is_initialized()
    afile = tmp_path / "hostname"
    afile.write_text("a file")
    result = _invoke("generate", "--set", f"run.output_dir={afile}/x")
    assert _one_error_line(result) == (f"error: --set run.output_dir={afile}/x: run.output_dir: {afile}/x: "
                                       f"{afile} is a file, not a folder")
    assert ray.is_initialized() == started_before
    # the output folder itself a file, named in the YAML this time
    config = tmp_path / "c.yaml"
    config.write_text(f"run:\n  output_dir: {afile}\n")
    assert _one_error_line(_invoke("clean", "--config", str(config))) == (
        f"error: {config}: run.output_dir: {afile}: {afile} is a file, not a folder")


@pytest.mark.parametrize("value", ["", "/", ".", "s3://", "  "])
def test_an_output_dir_that_names_no_folder_is_refused(value):
    with pytest.raises(ConfigError) as info:
        load_config(None, [f"run.output_dir={value}"])
    assert str(info.value).startswith(f"--set run.output_dir={value}: run.output_dir: names no folder of its own")


def test_an_unwritable_output_dir_is_one_line(tmp_path):
    if os.geteuid() == 0:  # root writes through permission bits; /sys refuses new entries to anyone
        target = "/sys/facegen-not-writable"
    else:
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o555)
        target = str(locked / "out")
    with pytest.raises(ConfigError) as info:
        check_output_location("run.output_dir", target, "c.yaml")
    assert str(info.value).startswith(f"c.yaml: run.output_dir: {target}: not writable (")
    assert not os.path.exists(target)


def test_a_writable_output_dir_passes_and_nothing_is_left_behind(tmp_path):
    check_output_location("run.output_dir", str(tmp_path / "new" / "run"))
    check_output_location("run.output_dir", str(tmp_path))
    assert os.listdir(tmp_path) == []


def test_report_output_faults_are_one_line(tmp_path):
    folder = tmp_path / "a-folder"
    folder.mkdir()
    assert _one_error_line(_invoke("report", "--output", str(folder))) == f"error: --output: {folder}: is a folder; give a file name"
    afile = tmp_path / "plain"
    afile.write_text("x")
    assert _one_error_line(_invoke("report", "--output", f"{afile}/report.html")) == (
        f"error: --output: {afile}/report.html: {afile} is a file, not a folder")


def test_one_bad_bin_keeps_the_other_sets_results(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (40, 112, 112, 3), dtype=np.uint8)
    good = str(tmp_path / "good.bin")
    write_bin(good, images, [True, False] * 10)
    folder = tmp_path / "lfw"
    folder.mkdir()
    embedder = IResNetEmbedder(tiny_embedder(tmp_path), device="cpu")
    results = verify_bins(embedder, [good, str(folder), good], batch_size=20, nrof_folds=10)
    assert [r.name for r in results] == ["good", "lfw", "good"]
    assert results[0].pairs == 20 and results[0] == results[2] and not results[0].error
    assert results[1].error == f"{folder}: is a folder, not a .bin file" and math.isnan(results[1].accuracy_mean)
    [too_many] = verify_bins(embedder, [good], nrof_folds=30)
    assert too_many.error == f"{good}: its 20 pairs cannot make 30 folds (folds: 2 to 20)"

    result = _invoke("eval", "--checkpoint", str(tmp_path / "embedder"), "--bin", good, "--bin", str(folder), "--device", "cpu")
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "good" in result.output and "failed" in result.output
    assert result.output.strip().splitlines()[-1] == f"error: 1 of 2 set(s) could not be scored; first: {folder}: is a folder, not a .bin file"


def test_error_reasons_are_counted_without_the_files_they_name():
    reasons = [f"identity_id={i} sample_idx=0: ValueError: /data/faces/p{i}/0{i}.jpg: cannot decode image" for i in range(3)]
    reasons.append("OSError: s3://bucket/faces/x.png: not found (HTTP 404)")
    assert {reason_kind(r) for r in reasons} == {"ValueError: <path>: cannot decode image", "OSError: <path>: not found"}


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"), reason="mounts a small tmpfs in a private mount namespace (root)")
def test_a_full_disk_is_one_line_before_any_work(tmp_path):
    """A real 1 MiB tmpfs, mounted in a mount namespace of the check's own process."""
    small = tmp_path / "small"
    small.mkdir()
    check = ("from facegen.preflight import check_output_location\n"
             f"check_output_location('run.output_dir', '{small}/run', 'c.yaml')\n")
    done = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                           f"mount -t tmpfs -o size=1m tmpfs {small} && {sys.executable} -c \"{check}\""],
                          capture_output=True, text=True, timeout=60)
    last = done.stderr.strip().splitlines()[-1]
    assert last == f"facegen.config._base.ConfigError: c.yaml: run.output_dir: {small}/run: out of space (1 MiB free)", done.stderr
