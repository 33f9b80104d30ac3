"""Every stage tracked in one W&B group, and `facegen report` rendered by headless Chromium."""

import os
import re
import shutil
import subprocess

import numpy as np
import pytest
import yaml

from facegen import storage
from facegen.config import config_from_dict
from tiny_pipeline import tiny_embedder, tiny_settings

pytestmark = pytest.mark.slow
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="module")
def tiny_run(ray_local, tmp_path_factory):
    from facegen.pipeline import run_pipeline

    root = tmp_path_factory.mktemp("report")
    settings = tiny_settings(str(root / "run"), tiny_embedder(root), name="tiny-report")
    config = root / "tiny.yaml"
    config.write_text(yaml.safe_dump(settings))
    cfg = config_from_dict(settings, "test")
    return cfg, str(config), run_pipeline(cfg, progress=False)


def test_every_stage_logs_per_block_statistics_to_the_training_group(tiny_run):
    from facegen.tracking import read_offline_run, run_id

    cfg, _, summary = tiny_run
    wandb_dir = f"{cfg.run.output_dir}/wandb"
    runs = {job: read_offline_run(wandb_dir, run_id=run_id(name, job))
            for job, name in (("generate", "tiny-report"), ("clean", "tiny-report"), ("shard", "tiny-report"),
                              ("train", "tiny-report"))}
    assert {r.group for r in runs.values()} == {"tiny-report"}
    assert {job: r.job_type for job, r in runs.items()} == {job: job for job in runs}
    generated = [row for row in runs["generate"].history if "block_id" in row]
    assert sorted(row["block_id"] for row in generated) == [0, 1]
    assert sum(row["images"] for row in generated) == summary.generate["totals"]["images"] == 48
    assert runs["generate"].summary["images"] == 48 and runs["generate"].summary["blocks_written"] == 2
    cleaned = [row for row in runs["clean"].history if "block_id" in row]
    assert sum(row["images_removed"] for row in cleaned) == summary.clean["totals"]["images_removed"]
    assert all(row["difficulty"]["_type"] == "histogram" for row in cleaned)
    histogram = [row["difficulty"] for row in runs["shard"].history if "difficulty" in row]
    assert len(histogram) == 1 and sum(histogram[0]["values"]) == summary.shard["totals"]["rows"]
    assert runs["train"].history and "loss" in runs["train"].history[-1]
    assert summary.verification[0]["worker_pid"] != os.getpid()  # the final evaluation ran in a Ray worker


def _chromium():
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.skip("Debian's chromium is not installed (make test installs it)")
    return path


def test_report_page_shows_the_dataset_in_headless_chromium(tiny_run, tmp_path):
    from typer.testing import CliRunner

    from facegen.cli import app
    from facegen.shards import load_manifest

    cfg, config, summary = tiny_run
    result = CliRunner().invoke(app, ["report", "--config", config], terminal_width=300)
    assert result.exit_code == 0, result.output
    page = f"{cfg.run.output_dir}/report.html"
    assert page in result.output
    html_text = open(page).read()
    assert not re.search(r'(src|href)="(https?:)?//', html_text), "self-contained: no external resource"

    chromium = _chromium()
    profile = tmp_path / "profile"
    dom = subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--virtual-time-budget=5000",
                          "--dump-dom", f"file://{page}"], capture_output=True, text=True, timeout=120).stdout
    shot = tmp_path / "report.png"
    subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--window-size=1200,2400",
                    f"--screenshot={shot}", f"file://{page}"], capture_output=True, timeout=120)

    check = re.search(r'id="render-check"[^>]*data-rendered="(\d+)"[^>]*data-images="(\d+)"', dom) or \
        re.search(r'data-rendered="(\d+)" data-images="(\d+)"', dom)
    assert check, "the page's script did not run"
    rendered, images = map(int, check.groups())
    grid = re.search(r'<div class="grid" id="identity-grid".*?</div>', dom, re.S).group(0)
    assert grid.count("<img") == 4 * 6  # block 0: 4 identities x 6 images each, after top-up
    assert rendered == images >= 24, "every inlined image decodes in the browser"
    totals = dict(re.findall(r"<tr><td>([^<]+)</td><td>([^<]+)</td></tr>", dom))
    assert totals["generated: images"] == "48"
    assert totals["cleaning: images_removed"] == str(summary.clean["totals"]["images_removed"])
    c = summary.clean["totals"]
    assert totals["injected wrong-identity images removed"] == f"{c['injected_wrong_removed']} of {c['injected_wrong_in']}"
    assert dom.count('class="similarity-summary"') == 2
    manifest = load_manifest(cfg.stage_dir("shards"))
    assert dom.count('stroke-dasharray="3,3"') == manifest["num_buckets"] - 1  # the bucket edges
    [heldout] = summary.verification
    assert f"{100 * heldout['accuracy_mean']:.2f}%" in dom
    # training curves: loss, training accuracy and the held-out validation against the step
    curves = re.search(r'<div class="training-curves" data-run="tiny-report">(.*?)</div>', dom, re.S)
    assert curves, "no training curves"
    names = re.findall(r'<polyline class="curve" data-name="([^"]+)"', curves.group(1))
    assert names == ["loss", "train accuracy", "validation heldout", "validation mean"], names
    # what cleaning removed: thumbnails, each with its recorded reason
    removed = re.search(r'<div class="grid" id="removed-grid".*?</div>(?=<h2>)', dom, re.S).group(0)
    reasons = re.findall(r'<span class="why">([^<]+)</span>', removed)
    dropped = int(re.search(r"\((\d+) dropped in the blocks shown", dom).group(1))
    assert dropped >= summary.clean["totals"]["images_removed"] > 0 and len(reasons) == min(24, dropped)
    assert removed.count("<img") == len(reasons) and all(r.strip() for r in reasons)

    from PIL import Image

    pixels = np.asarray(Image.open(shot).convert("L"), np.float32)
    assert pixels.std() > 20, "the screenshot is blank"
    assert storage.exists(page)
