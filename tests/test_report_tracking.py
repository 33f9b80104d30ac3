"""Every stage tracked in one W&B group, and `facegen report` rendered by headless Chromium (on
conftest's shared ``pipeline_run``)."""

import os
import re
import shutil
import subprocess

import numpy as np
import pytest

from facegen import blocks as blk
from facegen import storage

pytestmark = pytest.mark.slow
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"]


def test_every_stage_logs_per_block_statistics_to_the_training_group(pipeline_run):
    from facegen.tracking import run_id
    from wandb_offline import read_offline_run

    cfg, _, summary = pipeline_run
    wandb_dir = f"{cfg.run.output_dir}/wandb"
    runs = {job: read_offline_run(wandb_dir, run_id=run_id("e2e", job)) for job in ("generate", "clean", "shard", "train")}
    assert {r.group for r in runs.values()} == {"e2e"}
    assert {job: r.job_type for job, r in runs.items()} == {job: job for job in runs}
    generated = [row for row in runs["generate"].history if "block_id" in row]
    assert sorted(row["block_id"] for row in generated) == [0, 1]
    assert sum(row["images"] for row in generated) == summary.generate["totals"]["images"] == 12 * 12
    # the run's summary is its latest session's (the end-to-end tests run the pipeline again, skipping)
    assert runs["generate"].summary["images"] == 12 * 12 and runs["generate"].summary["blocks_total"] == 2
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


def test_report_page_shows_the_dataset_in_headless_chromium(pipeline_run, tmp_path):
    from typer.testing import CliRunner

    from facegen.cli import app
    from facegen.shards import load_manifest

    cfg, config, summary = pipeline_run
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
    block = storage.read_table(blk.block_path(cfg.stage_dir("clean"), 0), columns=["identity_id", "status"])
    kept = len({i for i, s in zip(block.column("identity_id").to_pylist(), block.column("status").to_pylist()) if s == "ok"})
    assert grid.count("<img") == kept * 8  # block 0's kept identities, 8 of their 12 images (after top-up) each
    assert rendered == images >= kept * 8, "every inlined image decodes in the browser"
    totals = dict(re.findall(r"<tr><td>([^<]+)</td><td>([^<]+)</td></tr>", dom))
    assert totals["generated: images"] == "144"
    assert totals["cleaning: images_removed"] == str(summary.clean["totals"]["images_removed"])
    c = summary.clean["totals"]
    assert totals["injected wrong-identity images removed"] == f"{c['injected_wrong_removed']} of {c['injected_wrong_in']}"
    assert dom.count('class="similarity-summary"') == 2
    manifest = load_manifest(cfg.stage_dir("shards"))
    assert dom.count('stroke-dasharray="3,3"') == manifest["num_buckets"] - 1  # the bucket edges
    [heldout] = summary.verification
    assert f"{100 * heldout['accuracy_mean']:.2f}%" in dom
    # training curves: loss, training accuracy and the held-out validation against the step
    curves = re.search(r'<div class="training-curves" data-run="e2e">(.*?)</div>', dom, re.S)
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
