"""The invalidation chain raw -> clean -> shards -> train: digests recorded, changes redone, refusals."""

import numpy as np
import pyarrow.compute as pc
import pytest

from facegen import blocks as blk
from facegen import storage
from facegen.config import config_from_dict
from tiny_pipeline import tiny_embedder, tiny_settings


def test_quantiles_from_merged_block_sketches_match_exact_ones_within_a_bin():
    from facegen.curriculum import SKETCH_BINS, SKETCH_RANGE, bucket_edges, bucket_edges_from_sketch, difficulty_sketch, merge_sketches

    rng = np.random.default_rng(0)
    blocks = [rng.beta(2, 5, size=n) * 1.2 for n in (500, 3000, 17, 1200)]
    merged = merge_sketches([difficulty_sketch(b) for b in blocks])
    approx = bucket_edges_from_sketch(merged, 4)
    exact = bucket_edges(np.concatenate(blocks), 4)
    width = (SKETCH_RANGE[1] - SKETCH_RANGE[0]) / SKETCH_BINS
    assert approx[0] == exact[0] and approx[-1] == exact[-1]  # the ends are exact
    assert np.abs(approx - exact).max() <= width
    assert np.all(np.diff(bucket_edges_from_sketch(merge_sketches([difficulty_sketch(np.zeros(9))]), 3)) > 0)


def test_training_refuses_another_shard_set_unless_overwrite(tmp_path):
    from facegen.lineage import TrainingInputChanged, check_training_input

    run_dir = str(tmp_path / "train" / "r1")
    assert check_training_input(run_dir, "shards", "aaaa", overwrite=False) is False
    storage.write_json_atomic({"epoch": 1}, f"{run_dir}/epoch-0001/state/state.json")
    check_training_input(run_dir, "shards", "aaaa", overwrite=False)  # same set: resumes
    with pytest.raises(TrainingInputChanged) as refused:
        check_training_input(run_dir, "shards", "bbbb", overwrite=False)
    message = str(refused.value)
    assert "\n" not in message and "aaaa" in message and "bbbb" in message and "run.overwrite" in message
    assert storage.exists(f"{run_dir}/epoch-0001/state/state.json")
    assert check_training_input(run_dir, "shards", "bbbb", overwrite=True) is True  # afresh
    assert not storage.exists(f"{run_dir}/epoch-0001")
    assert storage.read_json(f"{run_dir}/dataset.json")["manifest_digest"] == "bbbb"


def test_every_digest_exempt_name_is_a_settings_field():
    """A name in SCHEDULING_FIELDS or RESOLVED_FIELDS that no settings model has exempts nothing."""
    import typing

    from pydantic import BaseModel

    from facegen.config import FacegenConfig
    from facegen.config.clean import EXPERTS
    from facegen.config.faces import DETECTORS, EMBEDDERS
    from facegen.config.generation import GENERATORS
    from facegen.lineage import RESOLVED_FIELDS, SCHEDULING_FIELDS

    # the components' own settings are reached through their tables, not through annotations
    tables = (EXPERTS, DETECTORS, EMBEDDERS, GENERATORS)
    own = [t.hook(k, "SETTINGS") for t in tables for k in t.kinds if t.hook(k, "SETTINGS") is not None]
    assert {"MtcnnSettings", "DcganSettings", "IndependentSettings"} <= {m.__name__ for m in own}
    names, todo, seen = set(), [FacegenConfig, *own], set()
    while todo:
        model = todo.pop()
        if model in seen:
            continue
        seen.add(model)
        for name, field in model.model_fields.items():
            names.add(name)
            stack = [field.annotation]
            while stack:
                t = stack.pop()
                stack.extend(typing.get_args(t))
                if isinstance(t, type) and issubclass(t, BaseModel):
                    todo.append(t)
    assert (SCHEDULING_FIELDS | RESOLVED_FIELDS) - names == set()


@pytest.mark.slow
def test_a_changed_raw_block_is_recleaned_and_resharded_and_training_refuses(ray_local, tmp_path):
    from typer.testing import CliRunner

    from facegen.cli import app
    from facegen.lineage import TrainingInputChanged, check_training_input
    from facegen.shards import shard_set_digest
    from facegen.stages.clean import run_clean
    from facegen.stages.generate import run_generate
    from facegen.stages.shard import run_shard
    from facegen.train.loop import train

    settings = tiny_settings(str(tmp_path / "run"), tiny_embedder(tmp_path))
    cfg = config_from_dict(settings, "test")
    run_generate(cfg, progress=False)
    first_clean = run_clean(cfg, progress=False)
    run_shard(cfg, progress=False)
    raw, clean, shards = cfg.stage_dir("raw"), cfg.stage_dir("clean"), cfg.stage_dir("shards")
    assert first_clean.blocks_written == 2
    assert storage.read_json(blk.stats_path(clean, 1))["source_sha256"] == storage.read_json(blk.stats_path(raw, 1))["sha256"]
    digest_before = shard_set_digest(shards)
    run_dir = f"{cfg.stage_dir('train')}/tiny"
    check_training_input(run_dir, shards, digest_before, overwrite=False)  # a run that started on this set

    # raw block 1 is made again with other content (as a regeneration with a fixed generator would)
    old = storage.read_json(blk.stats_path(raw, 1))
    table = storage.read_table(blk.block_path(raw, 1))
    table = table.filter(pc.not_equal(table.column("sample_idx"), 0))
    blk.commit_block(raw, 1, table, {k: v for k, v in old.items() if k not in ("block_id", "rows", "bytes", "sha256")})
    again = run_clean(cfg, progress=False)
    assert (again.blocks_written, again.blocks_skipped, again.blocks_redone) == (1, 1, 1), again.notes
    # the expert pass and the final pass each redo block 1, and only block 1
    assert again.notes == ["clean: experts: block 1 redone: its input block changed",
                           "clean: finish: block 1 redone: its input block changed",
                           # and the scale cleaning ran on (no calibration here: ArcFace's cosines)
                           "cluster expert in HybridGen's band mode (start 0.60), dedup 0.700 (centre), leakage 0.400; "
                           "no calibration (cosines as written)"]
    assert storage.read_json(blk.stats_path(clean, 1))["source_sha256"] == storage.read_json(blk.stats_path(raw, 1))["sha256"]
    resharded = run_shard(cfg, progress=False)
    assert resharded.blocks_written == 2 and "source blocks changed" in resharded.notes[-1]
    assert shard_set_digest(shards) != digest_before

    # training refuses, in one line, before Ray Train starts
    with pytest.raises(TrainingInputChanged):
        train(cfg, shards)
    result = CliRunner().invoke(app, ["train"] + [a for kv in _flat(settings) for a in ("--set", kv)], terminal_width=300)
    assert result.exit_code == 2, result.output
    assert len(result.output.strip().splitlines()) == 1 and "run.overwrite" in result.output

    # a changed shards.num_buckets rebuilds the set; the same settings reuse it
    assert run_shard(cfg, progress=False).blocks_written == 0
    cfg.shards.num_buckets = 3
    rebuilt = run_shard(cfg, progress=False)
    assert rebuilt.blocks_written == 2 and "shard settings changed" in rebuilt.notes[-1]
    assert storage.read_json(f"{shards}/manifest.json")["num_buckets"] == 3


def _flat(tree, prefix=""):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _flat(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}={value}"
