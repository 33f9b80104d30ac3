"""The whole pipeline on a tiny configuration (conftest's ``pipeline_run``, shared with the report tests),
then the CLI eval command and the notebook on its output."""

import json
import os

import pytest

from facegen import blocks as blk
from facegen import storage

pytestmark = pytest.mark.slow


def test_pipeline_summary_accounts_for_every_image(pipeline_run):
    from facegen.pipeline import summary_rows

    cfg, _, summary = pipeline_run
    gen, clean = summary.generate["totals"], summary.clean["totals"]
    assert gen["identities"] == 12 and gen["images"] == 12 * 12
    assert gen["injected_wrong"] > 0
    assert clean["images_in"] == gen["images"]
    assert clean["injected_wrong_in"] == gen["injected_wrong"]
    # measured 19 of 23 with the 2-epoch bootstrap embedder: cleaning catches most planted images
    assert clean["injected_wrong_removed"] >= 0.6 * clean["injected_wrong_in"]
    assert clean["identities_kept"] + clean["identities_dropped"] == 12
    assert clean["images_out"] == 12 * clean["identities_kept"]  # topped up to target_images
    assert summary.train["epochs_completed"] == 2
    [heldout] = summary.verification
    assert heldout["pairs"] == 60
    # 10 folds of 6 pairs: the mean is a whole number of pairs out of 60; above chance (measured 0.617)
    assert heldout["accuracy_mean"] * 60 == pytest.approx(round(heldout["accuracy_mean"] * 60))
    assert heldout["accuracy_mean"] > 0.5
    on_disk = storage.read_json(summary.outputs["summary"])
    assert on_disk["clean"]["totals"] == clean
    table = dict(summary_rows(summary))
    assert table["identities generated"] == "12"
    assert "verification accuracy: heldout" in table


def test_pipeline_outputs_are_consistent(pipeline_run):
    from facegen.shards import load_manifest, verify_shards

    cfg, _, summary = pipeline_run
    manifest = load_manifest(cfg.stage_dir("shards"))
    assert verify_shards(cfg.stage_dir("shards")) == []
    assert manifest["num_rows"] == summary.clean["totals"]["images_out"]
    buckets = [s["bucket"] for s in manifest["shards"]]
    assert buckets == sorted(buckets)
    assert blk.done_block_ids(cfg.stage_dir("clean")) == blk.done_block_ids(cfg.stage_dir("raw")) == [0, 1]
    assert os.path.isfile(os.path.join(summary.train["backbone_dir"], "backbone.safetensors"))


def test_rerun_skips_every_finished_stage(pipeline_run):
    from facegen.pipeline import run_pipeline

    cfg, _, first = pipeline_run
    again = run_pipeline(cfg, progress=False)
    assert again.generate["blocks_written"] == 0 and again.generate["blocks_skipped"] == 2
    assert again.clean["blocks_written"] == 0
    assert again.train["epochs_completed"] == 2
    assert again.verification[0]["accuracy_mean"] == pytest.approx(first.verification[0]["accuracy_mean"])


def test_cli_eval_prints_a_table(pipeline_run):
    from typer.testing import CliRunner

    from facegen.cli import app

    cfg, _, summary = pipeline_run
    heldout = summary.verification[0]
    bin_path = f"{cfg.run.output_dir}/heldout/heldout.bin"
    result = CliRunner().invoke(app, ["eval", "--checkpoint", summary.train["backbone_dir"], "--bin", bin_path], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "heldout" in result.output and f"{100 * heldout['accuracy_mean']:.2f}%" in result.output
    missing = CliRunner().invoke(app, ["eval", "--checkpoint", summary.train["backbone_dir"], "--bin", "/nonexistent/lfw.bin"], terminal_width=200)
    assert missing.exit_code == 2
    assert "lfw.bin" in missing.output and len(missing.output.strip().splitlines()) == 1


def test_explore_notebook_runs_on_the_output(pipeline_run, tmp_path):
    import nbformat
    from nbclient import NotebookClient

    cfg, _, _ = pipeline_run
    nb = nbformat.read("notebooks/explore_dataset.ipynb", as_version=4)
    figures = tmp_path / "figures"
    os.environ["FACEGEN_DATASET"], os.environ["FACEGEN_FIGURES"] = cfg.stage_dir("clean"), str(figures)
    try:
        NotebookClient(nb, timeout=180, kernel_name="python3", resources={"metadata": {"path": os.getcwd()}}).execute()
    finally:
        del os.environ["FACEGEN_DATASET"], os.environ["FACEGEN_FIGURES"]
    printed = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "usable images of" in printed
    [line] = [ln for ln in printed.splitlines() if ln.startswith("similarity summary:")]
    stats = json.loads(line.split(":", 1)[1])
    assert (figures / "identity_grid.png").stat().st_size > 1000
    assert (figures / "similarity_histograms.png").stat().st_size > 1000
    assert stats["intra_mean"] > stats["inter_mean"]
