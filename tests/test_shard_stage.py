"""The shard stage on real generated blocks: skip when unchanged, rebuild when the sources change."""

import pytest

from facegen import storage
from facegen.config import config_from_dict

pytestmark = pytest.mark.slow


def test_shard_set_is_reused_until_its_source_blocks_change(ray_local, tmp_path):
    from facegen.shards import load_manifest, verify_shards
    from facegen.stages.generate import run_generate
    from facegen.stages.shard import run_shard

    settings = {
        "run": {"output_dir": str(tmp_path / "run")},
        "identities": {"num_identities": 4, "block_size": 2},
        "generator": {"images_per_identity": 3, "pool": {"num_cpus": 0.25}, "parametric": {"image_size": 64}},
        "faces": {"pool": {"num_cpus": 0.25}},
        "shards": {"num_buckets": 1},
    }
    cfg = config_from_dict(settings, "test")
    run_generate(cfg, progress=False)
    first = run_shard(cfg, source_dir=cfg.stage_dir("raw"), progress=False)
    shards = cfg.stage_dir("shards")
    manifest = load_manifest(shards)
    assert first.blocks_written == 2 and manifest["num_rows"] == 12 and manifest["num_identities"] == 4
    assert set(manifest["sources"]) == {"0", "1"}

    again = run_shard(cfg, source_dir=cfg.stage_dir("raw"), progress=False)
    assert (again.blocks_written, again.blocks_skipped) == (0, 2)
    assert load_manifest(shards)["created"] == manifest["created"]

    grown = config_from_dict({**settings, "identities": {"num_identities": 6, "block_size": 2}}, "test")
    run_generate(grown, progress=False)
    rebuilt = run_shard(grown, source_dir=grown.stage_dir("raw"), progress=False)
    after = load_manifest(shards)
    assert rebuilt.blocks_written == 3 and after["num_rows"] == 18 and after["num_identities"] == 6
    assert verify_shards(shards) == []
    listed = {s["path"] for s in after["shards"]}
    on_disk = {p.rsplit("/", 2)[-2] + "/" + p.rsplit("/", 1)[-1] for p in storage.list_dir(f"{shards}/bucket-000", ".parquet")}
    assert on_disk == listed
