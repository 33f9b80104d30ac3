"""Difficulty scores, bucket edges, and the curriculum shard set (layout, manifest, verification)."""

import json

import numpy as np
import pyarrow as pa
import pytest

from facegen import storage
from facegen.curriculum import (
    assign_buckets,
    bucket_edges,
    difficulty_histogram,
    difficulty_to_centre,
    semi_hard_mask,
)
from facegen.schema import rows_to_batch, sample_schema, table_from_batch

SAMPLE = sample_schema(512)
from facegen.shards import (
    ShardSetError,
    load_manifest,
    shard_paths,
    split_block_into_buckets,
    verify_shards,
    write_manifest,
)


def test_difficulty_to_centre_matches_the_definition():
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((9, 512)).astype(np.float32)
    labels = np.array([5, 5, 5, 2, 2, 9, 5, 2, 9])
    emb[4] = np.nan
    d = difficulty_to_centre(emb * 3.0, labels)
    assert d.dtype == np.float32 and np.isnan(d[4])
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    for label in (5, 2, 9):
        rows = [i for i in np.flatnonzero(labels == label) if i != 4]
        centre = unit[rows].mean(0)
        centre /= np.linalg.norm(centre)
        np.testing.assert_allclose(d[rows], 1 - unit[rows] @ centre, atol=1e-5)


def test_bucket_edges_are_quantiles_with_finite_ends():
    d = np.random.default_rng(1).uniform(0.1, 0.9, 1000).astype(np.float32)
    edges = bucket_edges(d, 4)
    assert len(edges) == 5 and np.all(np.diff(edges) > 0)
    assert edges[0] == pytest.approx(d.min()) and edges[-1] == pytest.approx(d.max())
    counts = np.bincount(assign_buckets(d, edges), minlength=4)
    assert counts.sum() == 1000 and counts.min() >= 245
    json.dumps(edges.tolist())  # finite: JSON-safe


def test_bucket_edges_stay_strictly_increasing_under_ties():
    zeros = np.zeros(100, np.float32)
    edges = bucket_edges(zeros, 3)
    assert np.all(np.diff(edges) > 0)
    assert set(assign_buckets(zeros, edges)) == {0}
    half = np.r_[np.zeros(50), np.linspace(0.1, 0.5, 50)].astype(np.float32)
    edges = bucket_edges(half, 4)
    assert np.all(np.diff(edges) > 0)
    buckets = assign_buckets(half, edges)
    assert len(set(buckets[:50])) == 1  # tied values share one bucket
    assert np.all(np.diff(buckets[50:]) >= 0)
    with pytest.raises(ValueError, match="no finite"):
        bucket_edges(np.array([np.nan]), 2)


def test_assign_buckets_clamps_out_of_range_values():
    edges = np.array([0.0, 0.2, 0.4, 0.6])
    got = assign_buckets(np.array([-1.0, 0.0, 0.19, 0.2, 0.5, 0.6, 7.0, np.nan]), edges)
    assert got.tolist() == [0, 0, 0, 1, 2, 2, 2, 2]


def test_semi_hard_mask_and_histogram():
    sim = np.array([0.1, 0.3, 0.5, 0.8, 0.81, np.nan])
    assert semi_hard_mask(sim, 0.3, 0.8).tolist() == [False, True, True, True, False, False]
    with pytest.raises(ValueError, match="low"):
        semi_hard_mask(sim, 0.9, 0.1)
    hist = difficulty_histogram(np.array([0.0, 0.05, 0.5, 1.99, 3.0, np.nan]), bins=4, value_range=(0.0, 2.0))
    assert hist["counts"] == [2, 1, 0, 2] and hist["num_values"] == 5 and hist["num_nonfinite"] == 1
    assert hist["bin_edges"] == [0.0, 0.5, 1.0, 1.5, 2.0]
    json.dumps(hist)


def clean_table(identities, per_identity, seed, block_id):
    """A small cleaned SAMPLE table (tiny PNG-free payloads) with random difficulties."""
    rng = np.random.default_rng(seed)
    rows = []
    for identity in identities:
        for k in range(per_identity):
            rows.append({
                "identity_id": identity, "block_id": block_id, "sample_idx": k, "seed": k, "source": "test",
                "image": rng.bytes(32), "true_identity_id": identity, "meta": "{}",
                "embedding": rng.standard_normal(512).astype(np.float32), "quality": np.float32(1.0),
                "difficulty": np.float32(rng.uniform(0.0, 0.8)), "status": "ok", "reason": "", "origin": "generated",
            })
    return table_from_batch(rows_to_batch(rows, SAMPLE), SAMPLE)


@pytest.fixture
def shard_set(tmp_path):
    blocks = {0: clean_table([10, 11, 12], 8, seed=0, block_id=0), 1: clean_table([57, 58], 9, seed=1, block_id=1)}
    all_d = np.concatenate([t.column("difficulty").to_numpy() for t in blocks.values()])
    edges = bucket_edges(all_d, 3)
    shards_dir = str(tmp_path / "shards")
    records = []
    for block_id in (1, 0):  # blocks finish in any order
        records += split_block_into_buckets(blocks[block_id], block_id, edges, shards_dir)
    ids = np.concatenate([t.column("identity_id").to_numpy() for t in blocks.values()])
    manifest = write_manifest(records, shards_dir, ids, edges, "digest123")
    return shards_dir, manifest, blocks


def test_manifest_counts_checksums_and_layout(shard_set):
    shards_dir, manifest, blocks = shard_set
    assert manifest == load_manifest(shards_dir)
    assert manifest["format_version"] == 1 and manifest["config_digest"] == "digest123"
    assert manifest["num_rows"] == 24 + 18 and manifest["num_identities"] == 5 and manifest["num_buckets"] == 3
    assert len(manifest["shards"]) == 6  # 3 buckets x 2 blocks, all non-empty
    assert isinstance(manifest["facegen_version"], str) and manifest["created"]
    for shard, path in zip(manifest["shards"], shard_paths(manifest, shards_dir)):
        assert path == f"{shards_dir}/{shard['path']}"
        assert shard["path"] == f"bucket-{shard['bucket']:03d}/block-{shard['block']:06d}.parquet"
        assert storage.sha256_of(path) == shard["sha256"] and storage.size_of(path) == shard["bytes"]
        table = storage.read_table(path)
        assert table.num_rows == shard["rows"] and table.schema.equals(SAMPLE)
    assert verify_shards(shards_dir) == []


def test_shards_go_from_easy_to_hard(shard_set):
    shards_dir, manifest, _ = shard_set
    order = [(s["bucket"], s["block"]) for s in manifest["shards"]]
    assert order == sorted(order) and [b for b, _ in order] == [0, 0, 1, 1, 2, 2]
    by_bucket = {}
    for shard, path in zip(manifest["shards"], shard_paths(manifest, shards_dir)):
        d = storage.read_table(path).column("difficulty").to_numpy()
        assert np.all(np.diff(d) >= 0)  # sorted within the file
        assert shard["difficulty_min"] == pytest.approx(d.min()) and shard["difficulty_max"] == pytest.approx(d.max())
        by_bucket.setdefault(shard["bucket"], []).append(d)
    for b in range(2):
        assert np.concatenate(by_bucket[b]).max() < np.concatenate(by_bucket[b + 1]).min()


def test_labels_are_sorted_unique_and_contiguous(shard_set):
    shards_dir, manifest, _ = shard_set
    labels = storage.read_table(f"{shards_dir}/{manifest['labels_file']}").column("identity_id")
    assert labels.type == pa.int64()
    labels = labels.to_numpy()
    assert labels.tolist() == [10, 11, 12, 57, 58]
    seen = np.concatenate([storage.read_table(p).column("identity_id").to_numpy() for p in shard_paths(manifest, shards_dir)])
    assert sorted(set(np.searchsorted(labels, seen).tolist())) == [0, 1, 2, 3, 4]


def test_verify_detects_corruption_truncation_and_missing_files(shard_set):
    shards_dir, manifest, _ = shard_set
    paths = shard_paths(manifest, shards_dir)
    with open(paths[0], "r+b") as f:
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 0xFF]))
    with open(paths[1], "r+b") as f:
        f.truncate(50)
    storage.remove(paths[2])
    problems = verify_shards(shards_dir)
    assert len(problems) == 3
    assert paths[0] in problems[0] and "sha256" in problems[0]
    assert paths[1] in problems[1] and "size" in problems[1]
    assert paths[2] in problems[2] and "missing" in problems[2]


def test_load_manifest_errors_name_the_path(tmp_path):
    shards_dir = str(tmp_path / "nowhere")
    with pytest.raises(ShardSetError, match="nowhere/manifest.json"):
        load_manifest(shards_dir)
    storage.write_bytes_atomic(b"{not json", f"{shards_dir}/manifest.json")
    with pytest.raises(ShardSetError, match="manifest.json"):
        load_manifest(shards_dir)
    storage.write_json_atomic({"format_version": 1}, f"{shards_dir}/manifest.json")
    with pytest.raises(ShardSetError, match="lacks"):
        load_manifest(shards_dir)


def test_write_manifest_rejects_bad_edges(tmp_path):
    with pytest.raises(ValueError, match="edges"):
        write_manifest([], str(tmp_path), np.array([1]), np.array([0.0, np.inf]), "d")
