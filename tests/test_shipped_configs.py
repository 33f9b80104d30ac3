"""The shipped configs and README's commands run as documented, as a user runs them (the facegen
command in a process of its own, its own local Ray), on a fresh output directory shrunk with --set."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest

from facegen import storage

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def facegen(*args: str, timeout: float = 900) -> str:
    """Run ``facegen ARGS`` from the repository root; returns its output, asserting a clean success."""
    env = {**os.environ, "TQDM_DISABLE": "1", "COLUMNS": "300"}  # tables unfolded, paths on one line
    done = subprocess.run([sys.executable, "-m", "facegen", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-6000:]
    assert "Traceback" not in output, output[-6000:]
    return output


def _sets(values: dict) -> list[str]:
    return [a for key, value in values.items() for a in ("--set", f"{key}={value}")]


SMALL_TRAINING = {"train.epochs": 1, "train.lr_steps": "[1]", "train.width": 8, "train.batch_size": 16,
                  "train.cpus_per_worker": 0.5, "eval.batch_size": 64}


def test_make_demo_config_and_readme_commands_run_on_a_fresh_output(tmp_path):
    out = tmp_path / "local"
    shrink = _sets({"run.output_dir": out, "identities.num_identities": 8, "identities.block_size": 4,
                    "generator.images_per_identity": 8, "generator.pool.num_cpus": 0.5, "generator.parametric.image_size": 96,
                    "clean.min_images": 4, "clean.target_images": 8, "clean.pool.num_cpus": 0.25, **SMALL_TRAINING,
                    "demo.bootstrap_identities": 8, "demo.bootstrap_images_per_identity": 6, "demo.bootstrap_epochs": 1,
                    "demo.heldout_identities": 6, "demo.heldout_pairs": 20,
                    "demo.calibration_identities": 20, "demo.calibration_pairs": 200})
    output = facegen("pipeline", "--config", "configs/local.yaml", *shrink)
    assert "facegen pipeline summary" in output
    # the bootstrap embedder's scale was measured on 200 pairs of further identities, and cleaning says
    # which scale it ran on (a 1-epoch embedder measures below clean.dbscan.min_calibration_accuracy:
    # the cluster expert then runs HybridGen's band)
    [calibration_file] = (out / "calibration").glob("calibration-*.json")
    calibration = storage.read_json(str(calibration_file))
    assert calibration["pairs"] == 200 and calibration["embedder_kind"] == "facegen"
    mode = "calibrated at cosine" if calibration["accuracy"] >= 0.8 else "in HybridGen's band mode"
    [scale] = [n for n in storage.read_json(str(out / "summary.json"))["clean"]["notes"] if n.startswith("cluster expert")]
    assert scale.startswith(f"cluster expert {mode}") and f"{100 * calibration['accuracy']:.1f}% pair accuracy" in scale
    # worker lines are shown as facegen wrote them: no Ray prefix, no colour codes
    assert "RayTrainWorker" not in output and "pid=" not in output and "\x1b[" not in output, output[-3000:]
    summary = storage.read_json(str(out / "summary.json"))
    assert summary["generate"]["totals"]["images"] == 8 * 8 and summary["train"]["epochs_completed"] == 1
    [heldout] = summary["verification"]
    assert heldout["pairs"] == 20

    # README's per-stage commands on the same settings resume what the pipeline made
    for command in ("generate", "clean", "shard"):
        again = facegen(command, "--config", "configs/local.yaml", "--no-progress", *shrink)
        assert re.search(r"blocks_written\W+0\b", again), again
    run_dir = summary["train"]["run_dir"]
    backbone = summary["train"]["backbone_dir"]
    table = facegen("eval", "--checkpoint", backbone, "--bin", str(out / "heldout" / "heldout.bin"))
    assert re.search(r"heldout\W+20\W", table), table
    exported = facegen("export", "--checkpoint", run_dir, "--format", "onnx")
    assert Path(re.search(r"file\W+(/\S+\.onnx)", exported).group(1)).is_file()
    report = facegen("report", "--config", "configs/local.yaml", *shrink)
    assert (out / "report.html").stat().st_size > 10_000 and "report.html" in report


def test_gan_local_pipeline_runs_as_documented_with_its_langevin_sampler(tmp_path):
    out = tmp_path / "gan_local"
    shrink = _sets({
        "run.output_dir": out,
        "identities.num_identities": 8, "identities.block_size": 4,
        "identities.sampler.langevin.iterations": 2, "identities.sampler.langevin.knn_every": 1,
        "identities.sampler.langevin.checkpoint_every": 1, "identities.sampler.langevin.neighbours": 4,
        "identities.sampler.langevin.batch_size": 8,
        "generator.images_per_identity": 6, "generator.dispersion.iterations": 1, "generator.pool.num_cpus": 0.5,
        "directions.samples": 60, "directions.check_identities": 1, "directions.check_steps": 3,
        "directions.pool.num_cpus": 0.5,
        "clean.min_images": 3, "clean.target_images": 6, "clean.pool.num_cpus": 0.25, **SMALL_TRAINING,
        "demo.bootstrap_identities": 8, "demo.bootstrap_images_per_identity": 4, "demo.bootstrap_epochs": 1,
        "demo.heldout_identities": 6, "demo.heldout_pairs": 20,
        "demo.calibration_identities": 20, "demo.calibration_pairs": 200,
    })
    facegen("pipeline", "--config", "configs/gan_local.yaml", *shrink)
    summary = storage.read_json(str(out / "summary.json"))
    # the main run's identities are Langevin's (the bootstrap side run trained their embedder first)
    assert storage.read_json(str(out / "identities" / "sampler.json"))["kind"] == "langevin"
    fitted = storage.read_json(str(out / "directions" / "directions.json"))  # DisCo's directions, fitted first
    assert list(fitted["directions"]) == ["yaw", "pitch", "roll", "illumination"] and fitted["samples"] == 60
    raw = storage.read_table(str(sorted((out / "raw").glob("*.parquet"))[0]), columns=["meta"])
    assert "disco" in raw.column("meta")[0].as_py()
    again = facegen("directions", "--config", "configs/gan_local.yaml", "--no-progress", *shrink)  # README's command
    assert re.search(r"blocks_written\W+0\b", again) and "check Spearman" in again, again
    assert "<h2>DisCo directions</h2>" in (out / "report.html").read_text()
    assert summary["identities"]["totals"]["identities"] == 8
    assert summary["generate"]["totals"]["images"] == 8 * 6 and summary["train"]["epochs_completed"] == 1
    [heldout] = summary["verification"]
    assert heldout["pairs"] == 20
    cemiface_cpu_trains_on_these_shards_and_generates(tmp_path, out / "shards")
    hybridgen_cpu_assembles_with_this_clean_set_and_trains(tmp_path, out)


def hybridgen_cpu_assembles_with_this_clean_set_and_trains(tmp_path, stand_in):
    """configs/hybridgen_cpu.yaml's command as documented, with gan_local's clean set (shrunk) as HSFace."""
    from facegen import blocks as blk
    from facegen.shards import load_manifest

    clean = pa.concat_tables([storage.read_table(blk.block_path(str(stand_in / "clean"), b), columns=["identity_id", "status"])
                              for b in blk.done_block_ids(str(stand_in / "clean"))])
    ok = [i for i, s in zip(clean.column("identity_id").to_pylist(), clean.column("status").to_pylist()) if s == "ok"]
    kept = sum(ok.count(i) >= 3 for i in set(ok))  # the stand-in's identities assembly keeps
    out = tmp_path / "hybridgen"
    shrink = _sets({
        "run.output_dir": out, "identities.num_identities": 8, "identities.block_size": 4,
        "generator.images_per_identity": 6, "generator.pool.num_cpus": 0.5,
        "faces.embedder.path": stand_in / "bootstrap" / "train" / "bootstrap-embedder" / "backbone",
        "clean.min_images": 3, "clean.target_images": 6, "clean.pool.num_cpus": 0.25,
        "shards.assembly.ingested": stand_in / "clean", "shards.assembly.num_identities": kept + 2,
        "shards.assembly.min_images": 3, "eval.bins": f"[{stand_in / 'heldout' / 'heldout.bin'}]", **SMALL_TRAINING,
    })
    output = facegen("pipeline", "--config", "configs/hybridgen_cpu.yaml", *shrink)
    manifest = load_manifest(str(out / "shards"))
    counts = manifest["assembly"]["counts"]
    assert counts["ingested"]["kept"] == kept and counts["generated"]["used"] == 2 and manifest["num_identities"] == kept + 2
    groups = [s["group"] for s in manifest["shards"]]
    assert groups[0] == "generated" and groups == sorted(groups, key=["generated", "ingested"].index)  # new ones first
    [heldout] = storage.read_json(str(out / "summary.json"))["verification"]  # gan_local's held-out DCGAN people
    assert heldout["pairs"] == 20 and "verification accuracy: heldout" in output
    raw = storage.read_table(str(sorted((out / "raw").glob("*.parquet"))[0]), columns=["source", "status"])
    assert set(raw.column("source").to_pylist()) == {"hybrid:dcgan+gan"}


def cemiface_cpu_trains_on_these_shards_and_generates(tmp_path, shards):
    """configs/cemiface_cpu.yaml's commands as documented, on gan_local's shard set (shrunk)."""
    out = tmp_path / "cemiface"
    shrink = _sets({
        "run.output_dir": out, "train_generator.shards": shards,
        "train_generator.max_steps": 4, "train_generator.checkpoint_every_steps": 2, "train_generator.batch_size": 8,
        "train_generator.holdout_identities": 2, "train_generator.control_images": 1, "train_generator.ddim_steps": 2,
        "train_generator.cpus_per_worker": 0.5, "train_generator.prepare_cpus": 0.5,
        "generator.hybrid.cemiface.model": out / "generator" / "cemiface-cpu" / "model",
        "generator.hybrid.cemiface.ddim_steps": 2, "identities.num_identities": 4, "identities.block_size": 2,
        "generator.images_per_identity": 4, "generator.pool.num_cpus": 0.5,
    })
    trained = facegen("train-generator", "--config", "configs/cemiface_cpu.yaml", *shrink)
    assert re.search(r"steps\W+4\W", trained) and "realised at m=0.9" in trained, trained
    result = storage.read_json(str(out / "generator" / "cemiface-cpu" / "result.json"))
    assert result["global_step"] == 4 and [b["m"] for b in result["control"]["by_m"]] == [0.0, 0.3, 0.6, 0.9]
    from facegen.tracking import run_id
    from wandb_offline import read_offline_run

    logged = read_offline_run(str(out / "wandb"), run_id=run_id("cemiface-cpu", "train-generator"))
    curves = [row for row in logged.history if "control/spearman" in row]
    assert len(curves) == 2 and all("control/m=0.9" in row for row in curves)  # a control figure per checkpoint
    assert sum("samples" in row for row in logged.history) == 2  # and a sample grid
    assert sum("train/mse" in row for row in logged.history) == 2
    generated = facegen("generate", "--config", "configs/cemiface_cpu.yaml", "--no-progress", *shrink)
    assert re.search(r"images\W+16\W", generated), generated
    rows = pa.concat_tables([storage.read_table(str(p), columns=["source", "requested_similarity", "status"])
                             for p in sorted((out / "raw").rglob("*.parquet"))])
    ok = [i for i, s in enumerate(rows.column("status").to_pylist()) if s == "ok"]
    assert ok and {rows.column("source")[i].as_py() for i in ok} == {"hybrid:parametric+cemiface"}
    assert {rows.column("requested_similarity")[i].as_py() for i in ok} == {0.0}


@pytest.fixture(scope="module")
def empty_s3():
    """A loopback S3 server holding none of the configs' buckets: a missing object is answered at once,
    where a closed port costs each case the SDK's retries (about 6 s)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from s3 import moto_server, s3_env

    with moto_server() as endpoint, s3_env(endpoint):
        yield endpoint


@pytest.mark.parametrize("name, command, first_input", [
    ("sd_cluster.yaml", "pipeline", "faces.embedder.path"),
    ("hybrid.yaml", "pipeline", "generator.hybrid.reference.text_to_image.model"),
    ("langevin_disco.yaml", "pipeline", "identities.sampler.langevin.real_embeddings"),
    ("train_datacv_r50.yaml", "train", "eval.bins[0]"),
    ("ingest.yaml", "ingest", "ingest.images_dir"),
    ("hybridgen.yaml", "shard", "shards.assembly.ingested"),
    ("cemiface.yaml", "train-generator", "train_generator.shards"),
    ("cemiface.yaml", "pipeline", "generator.hybrid.reference.text_to_image.model"),
])
def test_configs_that_need_gpus_or_weights_validate_down_to_their_input_paths(name, command, first_input, empty_s3):
    """Every setting of the config validates and its inputs are checked before any work: here, where
    their weights and buckets are absent, the first one fails in one line naming its field."""
    from typer.testing import CliRunner

    from facegen.cli import app

    # the buckets are asked of a server on loopback: never a request leaving the machine
    result = CliRunner().invoke(app, [command, "--config", f"configs/{name}", "--set", f"storage.s3_endpoint={empty_s3}"],
                                terminal_width=400)
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert lines[0].startswith(f"error: configs/{name}: {first_input}: "), lines[0]
    assert lines[0].endswith(("no such file or folder", ")")), lines[0]
