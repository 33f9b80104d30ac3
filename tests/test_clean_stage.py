"""The clean stage on Ray: expert pass, global dedup + leakage, final pass, resume, plan changes."""

import json

import numpy as np
import pyarrow.compute as pc
import pytest

from facegen import blocks as blk
from facegen import storage
from facegen.config import config_from_dict
from planted import planted_block

pytestmark = pytest.mark.slow


def write_raw(raw_dir):
    """Two blocks of 6 identities; identity 9 is identity 2's person again (a duplicate across blocks)."""
    first = planted_block(6, 12, 0.15, seed=3)
    second = planted_block(6, 12, 0.15, seed=4, first_id=6)
    dup = planted_block(6, 12, 0.0, seed=3).filter(pc.equal(pc.field("identity_id"), 2))
    dup = dup.set_column(0, "identity_id", pc.add(dup.column("identity_id"), 7))  # a second sitting of identity 2
    second = second.filter(pc.not_equal(pc.field("identity_id"), 9))
    import pyarrow as pa

    second = pa.concat_tables([second, dup.cast(second.schema)])
    for block_id, table in ((0, first), (1, second)):
        table = table.set_column(1, "block_id", pa.array([block_id] * table.num_rows, pa.int64()))
        blk.commit_block(raw_dir, block_id, table, {"identities": 6})
    return first, second


def config(tmp_path, **clean):
    return config_from_dict({"run": {"output_dir": str(tmp_path / "run"), "seed": 1},
                             "identities": {"num_identities": 12, "block_size": 6},
                             "clean": {"min_images": 5, "target_images": 8, "pool": {"num_cpus": 0.25}, **clean}}, "test")


def test_stage_dedups_audits_and_finishes_blocks(ray_local, tmp_path):
    from facegen.stages.clean import run_clean

    raw = str(tmp_path / "run" / "raw")
    first, _ = write_raw(raw)
    # the references: identity 4's person (noisy copies of its images' embeddings) and 200 strangers
    rng = np.random.default_rng(0)
    emb = np.array(first.filter(pc.equal(pc.field("identity_id"), 4)).column("embedding").to_pylist())
    strangers = rng.standard_normal((200, 512))
    refs = np.vstack([emb[:3] + 0.01 * rng.standard_normal((3, 512)), strangers / np.linalg.norm(strangers, axis=1, keepdims=True)])
    np.save(tmp_path / "refs.npy", refs.astype(np.float32))
    cfg = config(tmp_path, dedup={"threshold": 0.9, "action": "drop_smaller"},
                 leakage={"references": [str(tmp_path / "refs.npy")], "threshold": 0.6})
    report = run_clean(cfg, progress=False)
    assert report.blocks_written == 2
    totals = report.totals
    assert totals["identities_in"] == 12 and totals["identities_removed_dedup"] == 1 and totals["identities_removed_leakage"] == 1
    assert totals["identities_kept"] + totals["identities_dropped"] == 10
    glob = storage.read_json(str(tmp_path / "run" / "clean_global" / "global.json"))
    assert glob["dedup"]["pairs"] == 1 and glob["leakage"]["identities_leaked"] == 1
    pairs = storage.read_table(str(tmp_path / "run" / "clean_global" / "dedup_pairs.parquet")).to_pylist()
    assert [(p["query_id"], p["base_id"]) for p in pairs] == [(2, 9)]
    page = (tmp_path / "run" / "clean_global" / "leakage.html").read_text()
    assert "data:image/png;base64" in page and "identity 4" in page
    rows = [r for b in (0, 1) for r in storage.read_table(blk.block_path(cfg.stage_dir("clean"), b)).to_pylist()]
    leaked = [r for r in rows if r["identity_id"] == 4]
    assert leaked and all(r["status"] == "dropped" for r in leaked)
    assert sum(r["decided_by"] == "leakage" and r["reason"].startswith("leakage: cosine") for r in leaked) >= 5
    removed = {r["identity_id"] for r in rows if r["decided_by"] == "dedup"}
    assert len(removed) == 1 and removed <= {2, 9}
    kept = [r for r in rows if r["status"] == "ok"]
    assert len(kept) == 8 * totals["identities_kept"] == totals["images_out"]

    summary = storage.read_json(str(tmp_path / "run" / "clean_global" / "clean_summary.json"))
    sims = summary["similarity_to_centre"]
    assert sims["after_selection"]["count"] == totals["images_out"] - totals["images_augmented"]
    assert sum(sims["before_selection"]["histogram"]) == sims["before_selection"]["count"] >= sims["after_selection"]["count"]
    assert summary["expert_votes"]["cluster"]["keep"] > 0 and summary["global"]["dedup"]["identities_removed"] == 1
    from facegen.tracking import run_id
    from wandb_offline import read_offline_run

    logged = read_offline_run(str(tmp_path / "run" / "wandb"), run_id=run_id(cfg.run.name, "clean"))
    assert logged.summary["clean/images_out"] == totals["images_out"]
    assert "clean/cos_to_centre_after_selection/in_band" in logged.summary

    again = run_clean(cfg, progress=False)  # everything is current: nothing redone
    assert again.blocks_written == 0 and again.totals == totals
    merged_cfg = config(tmp_path, dedup={"threshold": 0.9, "action": "merge"})
    merged = run_clean(merged_cfg, progress=False)  # a new plan: the final blocks are redone
    assert merged.blocks_written == 2 and merged.totals["identities_removed_leakage"] == 0
    rows = [r for b in (0, 1) for r in storage.read_table(blk.block_path(cfg.stage_dir("clean"), b)).to_pylist()]
    survivor = [r for r in rows if r["status"] == "ok" and "merged_from" in json.loads(r["meta"] or "{}")]
    assert survivor and len({r["identity_id"] for r in survivor}) == 1
    ids = [(r["identity_id"], r["sample_idx"]) for r in rows]
    assert len(ids) == len(set(ids))


def test_removed_identities_are_replaced_by_new_ones_from_the_generator(ray_local, tmp_path):
    import torch

    from facegen.models.iresnet import iresnet18
    from facegen.models.iresnet_checkpoint import save_backbone
    from facegen.stages.clean import run_clean
    from facegen.stages.generate import run_generate

    torch.manual_seed(0)
    embedder = save_backbone(str(tmp_path / "embedder"), iresnet18(width=8).eval(), "iresnet18", 8, 512)
    cfg = config_from_dict({
        "run": {"output_dir": str(tmp_path / "run"), "seed": 2},
        "identities": {"num_identities": 6, "block_size": 4},
        "generator": {"images_per_identity": 8, "batch_size": 3, "pool": {"num_cpus": 0.25}, "parametric": {"image_size": 96, "wrong_identity_rate": 0.2}},
        "faces": {"batch_size": 32, "pool": {"num_cpus": 0.25}, "embedder": {"path": embedder}},
        "clean": {"min_images": 6, "target_images": 8, "pool": {"num_cpus": 0.25}, "replace_dropped": True, "dedup": {"enabled": False}},
        "tracking": {"mode": "disabled"},
    }, "test")
    run_generate(cfg, progress=False)
    report = run_clean(cfg, progress=False)
    plan = storage.read_json(str(tmp_path / "run" / "clean_global" / "replacements.json"))
    assert plan["first_id"] == 8 and plan["count"] >= 1  # after the last planned block (ids 0-7)
    raw_ids = sorted({i for b in blk.done_block_ids(cfg.stage_dir("raw"))
                      for i in storage.read_table(blk.block_path(cfg.stage_dir("raw"), b), columns=["identity_id"]).column("identity_id").to_pylist()})
    assert raw_ids == list(range(6)) + list(range(8, 8 + plan["count"]))
    assert report.totals["identities_in"] == 6 + plan["count"]
    again = run_clean(cfg, progress=False)  # resumes: the same replacements, nothing generated or redone
    assert again.blocks_written == 0 and again.totals == report.totals
    assert storage.read_json(str(tmp_path / "run" / "clean_global" / "replacements.json")) == plan
