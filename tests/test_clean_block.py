"""Cleaning v1 of a block: cluster expert, drop, trim/top-up, difficulty, stats.

The block is built from images whose embeddings come from a fixed random projection of their
pixels, so injected wrong images (another identity's pattern) really are outliers in embedding
space, and the same projection embeds the augmented images.
"""

import json

import cv2
import numpy as np
import pyarrow.compute as pc
import pytest

from facegen.clean.block import clean_block
from facegen.config import CleanSettings
from facegen.images import decode_image, encode_image
from facegen.schema import clean_schema, rows_to_batch, sample_schema, table_from_batch

SAMPLE = sample_schema(512)
CLEAN = clean_schema(512)

SMALL = 16  # images are embedded from a 16x16 thumbnail


class ProjectionEmbedder:
    """Deterministic embedder: centred 16x16 thumbnail -> fixed random projection -> unit 512-d."""

    def __init__(self, seed=0):
        self.matrix = np.random.default_rng(seed).standard_normal((SMALL * SMALL * 3, 512)).astype(np.float32)

    def __call__(self, images):
        thumbs = np.stack([cv2.resize(im, (SMALL, SMALL), interpolation=cv2.INTER_AREA) for im in images]).astype(np.float32)
        feats = (thumbs.reshape(len(images), -1) - 128.0) @ self.matrix
        return feats / np.linalg.norm(feats, axis=1, keepdims=True)


def pattern(rng):
    return rng.normal(0.0, 50.0, (SMALL, SMALL, 3))


def render(base, rng, noise):
    thumb = np.clip(128.0 + base + rng.normal(0.0, noise, base.shape), 0, 255).astype(np.uint8)
    return cv2.resize(thumb, (112, 112), interpolation=cv2.INTER_NEAREST)


def build_block(embedder):
    """Identity 0 (PNG): 8 good + 2 injected wrong. Identity 1: 3 good + 2 random (too few).
    Identity 2 (JPEG): 15 clean + 5 noisier + one error row + one ok row without an embedding."""
    rng = np.random.default_rng(42)
    bases = {i: pattern(rng) for i in range(4)}
    rows = []

    def add(identity, img, fmt, true_id=-1, status="ok", has_embedding=True):
        data = encode_image(img, fmt) if img is not None else b""
        emb = embedder(decode_image(data)[None])[0] if (img is not None and has_embedding) else None
        rows.append({
            "identity_id": identity, "block_id": 0, "sample_idx": 100 + sum(r["identity_id"] == identity for r in rows),
            "seed": 1000 + len(rows), "source": "test", "image": data, "true_identity_id": true_id, "meta": "{}",
            "embedding": emb, "quality": np.float32(0.9), "difficulty": np.float32(np.nan), "status": status,
            "reason": "" if status == "ok" else "no face", "origin": "generated",
        })

    for _ in range(8):
        add(0, render(bases[0], rng, 10), "png", true_id=0)
    for _ in range(2):
        add(0, render(bases[3], rng, 10), "png", true_id=3)  # injected wrong identity
    for _ in range(3):
        add(1, render(bases[1], rng, 10), "png")
    for _ in range(2):
        add(1, render(pattern(rng), rng, 10), "png")
    for _ in range(15):
        add(2, render(bases[2], rng, 10), "jpeg", true_id=2)
    for _ in range(5):
        add(2, render(bases[2], rng, 45), "jpeg", true_id=2)  # same person, much noisier
    add(2, None, "jpeg", status="error")
    add(2, render(bases[2], rng, 10), "jpeg", has_embedding=False)
    order = rng.permutation(len(rows))  # file order must not matter
    return table_from_batch(rows_to_batch([rows[i] for i in order], SAMPLE), SAMPLE)


@pytest.fixture(scope="module")
def embedder():
    return ProjectionEmbedder()


@pytest.fixture(scope="module")
def block(embedder):
    return build_block(embedder)


SETTINGS = CleanSettings(min_images=4, target_images=12)


def rows_of(table, identity):
    """The kept rows of one identity."""
    return [r for r in table.to_pylist() if r["identity_id"] == identity and r["status"] == "ok"]


def test_block_is_cleaned_dropped_trimmed_and_topped_up(block, embedder):
    out, stats = clean_block(block, SETTINGS, seed=3, embed_fn=embedder)

    assert out.schema == CLEAN
    keys = list(zip(out.column("identity_id").to_pylist(), out.column("sample_idx").to_pylist()))
    assert keys == sorted(keys)
    rows = out.to_pylist()
    assert len([r for r in rows if r["origin"] == "generated"]) == 37  # every input row keeps its decision
    assert sorted({r["identity_id"] for r in rows if r["status"] == "ok"}) == [0, 2]  # identity 1 dropped
    by_status = {s: [r for r in rows if r["status"] == s] for s in ("ok", "dropped", "error")}
    assert len(by_status["error"]) == 1 and by_status["error"][0]["decided_by"] == "upstream"
    assert all(r["reason"] for r in by_status["dropped"])
    first_dropped = [r for r in rows if r["identity_id"] == 1]
    assert all(r["status"] == "dropped" for r in first_dropped)
    assert {r["decided_by"] for r in first_dropped} == {"min_images", "rule 4 (any) -> cluster"}
    injected = [r for r in rows if r["true_identity_id"] == 3]
    assert len(injected) == 2 and all(r["status"] == "dropped" and "cluster: outside" in r["reason"] for r in injected)
    for r in rows:
        if r["origin"] == "generated" and r["status"] != "error" and r["embedding"] is not None:
            assert [v["expert"] for v in r["votes"]] == ["cluster"]

    first = rows_of(out, 0)
    generated = [r for r in first if r["origin"] == "generated"]
    augmented = [r for r in first if r["origin"] == "augmented"]
    assert len(first) == 12 and len(generated) == 8 and len(augmented) == 4
    assert all(r["true_identity_id"] == 0 for r in first)  # both injected images removed
    assert [r["sample_idx"] for r in augmented] == [110, 111, 112, 113]  # after the max sample_idx 109
    kept_idx = {r["sample_idx"] for r in generated}
    for r in augmented:
        meta = json.loads(r["meta"])
        assert meta["augmented_from"] in kept_idx and meta["embedding"] == "embedder"
        assert r["image"].startswith(b"\x89PNG")  # same format as the source
        img = decode_image(r["image"])
        assert img.shape == (112, 112, 3)
        np.testing.assert_allclose(r["embedding"], embedder(img[None])[0], atol=1e-5)  # PNG is lossless
        assert np.isnan(r["quality"])

    second = rows_of(out, 2)
    assert len(second) == 12 and all(r["origin"] == "generated" for r in second)
    assert all(r["image"][:2] == b"\xff\xd8" for r in second)
    assert all(100 <= r["sample_idx"] < 115 for r in second)  # trimmed to clean (central) images only

    assert stats["identities_in"] == 3 and stats["identities_kept"] == 2 and stats["identities_dropped"] == 1
    assert stats["dropped_identity_ids"] == [1]
    assert stats["images_in"] == 37 and stats["images_error"] == 1 and stats["images_no_embedding"] == 1
    assert stats["images_augmented"] == 4 and stats["images_out"] == 24 and stats["images_trimmed"] > 0
    assert stats["injected_wrong_in"] == 2 and stats["injected_wrong_removed"] == 2
    removed = (stats["images_error"] + stats["images_no_embedding"] + stats["images_removed"]
               + stats["images_dropped_with_identity"] + stats["images_trimmed"])
    assert stats["images_in"] - removed + stats["images_augmented"] == stats["images_out"]
    assert stats["experts"]["cluster"]["identities"] == 3
    assert 0.3 <= stats["experts"]["cluster"]["t_min"] <= stats["experts"]["cluster"]["t_max"] <= 0.9
    json.dumps(stats)


def test_difficulty_is_one_minus_cosine_to_the_kept_centre(block, embedder):
    out, _ = clean_block(block, SETTINGS, seed=3, embed_fn=embedder)
    for identity in (0, 2):
        rows = rows_of(out, identity)
        originals = np.array([r["embedding"] for r in rows if r["origin"] == "generated"], np.float64)
        centre = originals.mean(0)
        centre /= np.linalg.norm(centre)
        for r in rows:
            e = np.asarray(r["embedding"], np.float64)
            assert r["difficulty"] == pytest.approx(1.0 - e @ centre / np.linalg.norm(e), abs=1e-5)
    out = out.filter(pc.equal(out.column("status"), "ok"))
    difficulty = out.column("difficulty").to_numpy()
    assert np.isfinite(difficulty).all() and (difficulty > -1e-5).all()
    aug = out.filter(pc.equal(out.column("origin"), "augmented")).column("difficulty").to_numpy()
    gen = out.filter(pc.equal(out.column("origin"), "generated")).column("difficulty").to_numpy()
    assert aug.mean() > gen.mean()  # flips, blur and low resolution move images away from the centre


def test_without_embedder_the_source_embedding_is_copied(block):
    out, stats = clean_block(block, SETTINGS, seed=3, embed_fn=None)
    by_idx = {r["sample_idx"]: r for r in rows_of(out, 0)}
    augmented = [r for r in by_idx.values() if r["origin"] == "augmented"]
    assert len(augmented) == 4 and stats["images_augmented"] == 4
    for r in augmented:
        meta = json.loads(r["meta"])
        assert meta["embedding"] == "copied_from_source"
        source = by_idx[meta["augmented_from"]]
        np.testing.assert_allclose(r["embedding"], source["embedding"], atol=1e-6)
        assert r["difficulty"] == pytest.approx(source["difficulty"], abs=1e-6)


def test_same_seed_same_block_other_seed_other_augmentations(block, embedder):
    a, stats_a = clean_block(block, SETTINGS, seed=3, embed_fn=embedder)
    b, stats_b = clean_block(block.take(np.arange(block.num_rows)[::-1]), SETTINGS, seed=3, embed_fn=embedder)
    assert stats_a == stats_b
    assert a.drop_columns(["quality", "difficulty"]).equals(b.drop_columns(["quality", "difficulty"]))  # Arrow's NaN != NaN
    for name in ("quality", "difficulty"):
        np.testing.assert_array_equal(a.column(name).to_numpy(), b.column(name).to_numpy())
    c, _ = clean_block(block, SETTINGS, seed=4, embed_fn=embedder)
    aug = lambda t: [r["image"] for r in t.to_pylist() if r["origin"] == "augmented"]  # noqa: E731
    assert aug(a) != aug(c)


def test_identity_without_usable_rows_is_dropped_and_bad_input_is_named(block):
    only_errors = block.filter(pc.equal(block.column("status"), "error"))
    out, stats = clean_block(only_errors, SETTINGS, seed=0)
    assert out.num_rows == 1 and out.schema == CLEAN and out.column("status").to_pylist() == ["error"]
    assert stats["identities_dropped"] == 1 and stats["experts"]["cluster"]["t_mean"] is None
    with pytest.raises(ValueError, match="embedding"):
        clean_block(block.drop_columns(["embedding"]), SETTINGS, seed=0)
    with pytest.raises(ValueError, match="seed"):
        clean_block(block, SETTINGS, seed=-1)
