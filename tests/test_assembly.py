"""HybridGen's dataset assembly and curriculum by source (issue 18, item 3), on real clean blocks
written with the block helpers: exact kept / dropped / replacement identities, new identities first
in shard order with difficulty ascending inside each group, one-line errors, difficulty order as before."""

import numpy as np
import pytest

from facegen import blocks as blk
from facegen import storage
from facegen.assembly import check_source_order, plan_assembly
from facegen.config import config_from_dict
from facegen.schema import rows_to_batch, sample_schema, table_from_batch

SCHEMA = sample_schema(8)
INGESTED = {0: 12, 1: 3, 2: 10, 3: 9, 4: 15, 5: 0}  # id -> usable images; 5 was dropped whole by cleaning
GENERATED = {100 + k: (5 if k == 2 else 11) for k in range(8)}  # 102 has too few


def clean_block(folder, block_id, usable: dict[int, int], origin: str, seed: int, augmented: int = 0) -> None:
    """One finished clean block: ``usable[id]`` status-ok rows (the last ``augmented`` of them top-up
    copies) and two dropped rows per identity, random difficulties."""
    rng = np.random.default_rng(seed)
    rows = []
    for identity, ok in usable.items():
        for k in range(ok + 2):
            status = "ok" if k < ok else "dropped"
            rows.append({"identity_id": identity, "block_id": block_id, "sample_idx": k, "seed": k, "source": origin,
                         "image": rng.bytes(16), "true_identity_id": identity, "meta": "{}",
                         "embedding": rng.standard_normal(8).astype(np.float32), "quality": np.float32(1.0),
                         "difficulty": np.float32(rng.uniform(0.0, 0.8)), "status": status, "reason": "",
                         "origin": "augmented" if ok - augmented <= k < ok else origin})
    blk.commit_block(str(folder), block_id, table_from_batch(rows_to_batch(rows, SCHEMA), SCHEMA), {"embedder": None})


@pytest.fixture
def inputs(tmp_path):
    ingested, generated = tmp_path / "hsface" / "clean", tmp_path / "new" / "clean"
    clean_block(ingested, 0, {i: INGESTED[i] for i in (0, 1, 2)}, "ingested", 0)
    clean_block(ingested, 1, {i: INGESTED[i] for i in (3, 4, 5)}, "ingested", 1, augmented=2)
    clean_block(generated, 0, {i: GENERATED[i] for i in range(100, 104)}, "generated", 2)
    clean_block(generated, 1, {i: GENERATED[i] for i in range(104, 108)}, "generated", 3)
    return str(ingested), str(generated)


def settings(tmp_path, **shards):
    return config_from_dict({"run": {"output_dir": str(tmp_path / "run")}, "shards": {"num_buckets": 3, **shards}}, "test")


def read_shards(shards_dir, manifest):
    return [storage.read_table(f"{shards_dir}/{s['path']}") for s in manifest["shards"]]


def test_plan_keeps_ingested_with_min_images_and_fills_with_generated_in_identity_order():
    plan = plan_assembly(INGESTED, GENERATED, 7, 10, {"ingested": "a", "generated": "b"})
    assert plan.kept.tolist() == [0, 2, 4] and plan.replacements.tolist() == [100, 101, 103, 104]
    assert plan.counts == {"ingested": {"identities": 6, "kept": 3, "dropped_min_images": 3},
                           "generated": {"identities": 8, "used": 4, "too_few_images": 1, "unused": 3}}
    assert plan.labels("generated") == {100: 0, 101: 1, 103: 2, 104: 3} and plan.labels("ingested") == {0: 4, 2: 5, 4: 6}
    table = plan.table()
    assert table.column("group").to_pylist() == ["generated"] * 4 + ["ingested"] * 3
    assert table.column("images").to_pylist() == [11, 11, 11, 11, 12, 10, 15]


def test_plan_errors_are_one_line_and_say_how_many_short():
    where = {"ingested": "runs/hsface/clean", "generated": "runs/new/clean"}
    with pytest.raises(ValueError) as short:
        plan_assembly(INGESTED, GENERATED, 12, 10, where)  # 3 kept, 9 needed, 7 eligible
    assert str(short.value) == ("shards.assembly.generated: runs/new/clean has 7 identities with >= 10 images, 2 short of "
                                "the 9 needed to reach num_identities 12 (3 ingested identities kept)")
    with pytest.raises(ValueError, match=r"^shards.assembly.num_identities: runs/hsface/clean keeps 3 identities .* target 2$"):
        plan_assembly(INGESTED, GENERATED, 2, 10, where)
    with pytest.raises(ValueError, match=r"^shards.source_order: ingested names no source present in x \(present: generated\)$"):
        check_source_order(["generated", "ingested"], {"generated"}, "x")


@pytest.mark.slow
def test_assembled_set_holds_the_target_with_replacements_new_identities_first(ray_local, tmp_path, inputs):
    from facegen.shards import load_manifest, verify_shards
    from facegen.stages.shard import run_shard

    ingested, generated = inputs
    cfg = settings(tmp_path, order="source", assembly={"ingested": ingested, "generated": generated,
                                                       "num_identities": 7, "min_images": 10})
    report = run_shard(cfg, progress=False)
    shards_dir = cfg.stage_dir("shards")
    manifest = load_manifest(shards_dir)
    assert verify_shards(shards_dir) == []
    assert manifest["num_identities"] == 7 and manifest["num_rows"] == 4 * 11 + 12 + 10 + 15
    assert storage.read_table(f"{shards_dir}/labels.parquet").column("identity_id").to_pylist() == list(range(7))
    assembled = storage.read_table(f"{shards_dir}/assembly.parquet").to_pydict()
    assert assembled["source_identity_id"] == [100, 101, 103, 104, 0, 2, 4]
    kept = {i for i, g in zip(assembled["source_identity_id"], assembled["group"]) if g == "ingested"}
    assert set(INGESTED) - kept == {i for i, n in INGESTED.items() if n < 10} == {1, 3, 5}  # dropped: exactly those
    assert manifest["assembly"]["counts"]["ingested"] == {"identities": 6, "kept": 3, "dropped_min_images": 3}
    assert manifest["assembly"]["counts"]["generated"]["used"] == 4
    assert report.totals["ingested: dropped (< min_images)"] == 3 and report.totals["generated: replacements used"] == 4
    assert report.totals["order 1: generated (rows)"] == 44 and report.totals["order 2: ingested (rows)"] == 37

    tables = read_shards(shards_dir, manifest)
    groups = [s["group"] for s in manifest["shards"]]
    assert groups == sorted(groups, key=["generated", "ingested"].index)  # every new identity's shard first
    assert [s["bucket"] for s in manifest["shards"]] == sorted(s["bucket"] for s in manifest["shards"])
    assert {s["bucket"] for s in manifest["shards"] if s["group"] == "ingested"} <= {3, 4, 5}
    for group, labels in (("generated", {0, 1, 2, 3}), ("ingested", {4, 5, 6})):
        mine = [t for t, g in zip(tables, groups) if g == group]
        assert {i for t in mine for i in t.column("identity_id").to_pylist()} == labels
        by_bucket = [t.column("difficulty").to_numpy() for t in mine]
        # easy to hard inside the group: each bucket's rows sorted, and no row harder than the next bucket's
        assert all(np.all(np.diff(d) >= 0) for d in by_bucket)
        buckets = [s["bucket"] for s in manifest["shards"] if s["group"] == group]
        for (b1, d1), (b2, d2) in zip(zip(buckets, by_bucket), zip(buckets[1:], by_bucket[1:])):
            assert b1 == b2 or d1.max() <= d2.min()
    # the ingested identities' top-up rows stayed with them; the dropped rows of every identity are gone
    rows = sum(t.num_rows for t in tables)
    assert rows == manifest["num_rows"] and {s for t in tables for s in t.column("status").to_pylist()} == {"ok"}

    again = run_shard(cfg, progress=False)
    assert (again.blocks_written, again.blocks_skipped) == (0, 4) and again.totals == report.totals


@pytest.mark.slow
def test_difficulty_order_is_unchanged_for_existing_configs(ray_local, tmp_path, inputs):
    from facegen.lineage import shards_digest
    from facegen.shards import load_manifest
    from facegen.stages.shard import run_shard

    ingested, _ = inputs
    cfg = settings(tmp_path)
    assert shards_digest(cfg) == "4d4b202b98f3bf2d"  # the digest before order / assembly existed: no rebuild
    run_shard(cfg, source_dir=ingested, progress=False)
    manifest = load_manifest(cfg.stage_dir("shards"))
    assert "curriculum" not in manifest and "assembly" not in manifest
    assert [s["path"] for s in manifest["shards"]] == [f"bucket-{b:03d}/block-{k:06d}.parquet" for b in range(3) for k in (0, 1)]
    assert manifest["num_identities"] == 5 and manifest["num_rows"] == 12 + 3 + 10 + 9 + 15


@pytest.mark.slow
def test_one_run_orders_its_replacements_first_by_origin(ray_local, tmp_path):
    """clean.replace_dropped's flow: one clean folder, replacements generated into later blocks."""
    from facegen.shards import load_manifest
    from facegen.stages.shard import run_shard

    clean = tmp_path / "run" / "clean"
    clean_block(clean, 0, {0: 6, 1: 4}, "ingested", 0, augmented=2)
    clean_block(clean, 1, {2: 5, 3: 5}, "generated", 1, augmented=1)
    cfg = settings(tmp_path, order="source", num_buckets=2)
    run_shard(cfg, progress=False)
    manifest = load_manifest(cfg.stage_dir("shards"))
    assert [(s["group"], s["block"]) for s in manifest["shards"]] == [("generated", 1)] * 2 + [("ingested", 0)] * 2
    assert manifest["curriculum"] == {"order": "source", "groups": [
        {"name": "generated", "first_bucket": 0, "identities": 2, "rows": 10},
        {"name": "ingested", "first_bucket": 2, "identities": 2, "rows": 10}]}

    with pytest.raises(ValueError) as unnamed:
        run_shard(settings(tmp_path, order="source", source_order=["generated"]), progress=False)
    assert str(unnamed.value) == f"shards.source_order: {clean} holds identities of ingested, which it does not name"


@pytest.mark.slow
def test_bad_inputs_fail_in_one_line_before_any_shard_is_written(ray_local, tmp_path, inputs):
    from facegen.stages.shard import run_shard

    ingested, generated = inputs
    missing = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError) as absent:
        run_shard(settings(tmp_path, assembly={"ingested": missing, "generated": generated, "num_identities": 7}), progress=False)
    assert str(absent.value) == f"shards.assembly.ingested: {missing}: no such folder"
    with pytest.raises(ValueError, match=r"^shards.assembly.generated: .* 2 short of the 9 needed"):
        run_shard(settings(tmp_path, assembly={"ingested": ingested, "generated": generated, "num_identities": 12}), progress=False)
    with pytest.raises(ValueError) as absent_group:
        run_shard(settings(tmp_path, order="source"), source_dir=generated, progress=False)
    assert str(absent_group.value) == f"shards.source_order: ingested names no source present in {generated} (present: generated)"
    assert not storage.exists(str(tmp_path / "run" / "shards" / "manifest.json"))
    with pytest.raises(ValueError, match="source_order: names a group twice"):
        settings(tmp_path, order="source", source_order=["generated", "generated"])
