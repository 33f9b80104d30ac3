"""Leakage audit (planted copies found, fresh identities flagged at the configured FAR) and dedup search."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from facegen.clean.dedup import find_duplicates, survivors
from facegen.clean.leakage import ReferenceSet, audit, calibrate_far
from facegen.clean.search import ArrayChunks, build_plan, search_pairs
from facegen.config import DedupSettings, LeakageSettings, SearchSettings

DIM = 512


def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def samples_around(rng, centres, per, sigma):
    """Per-sample embeddings of people: normalise(centre + sigma * noise)."""
    noise = rng.standard_normal((len(centres), per, DIM)) * sigma / np.sqrt(DIM)
    return unit(centres[:, None, :] + noise)


def test_planted_copies_are_found_and_fresh_identities_flagged_at_the_far(tmp_path):
    rng = np.random.default_rng(0)
    sigma = 1.0  # genuine pairs of single images at cosine about 0.5
    # a verification set of 500 real people x 4 images, for the threshold at FAR 1e-4
    verification = samples_around(rng, unit(rng.standard_normal((500, DIM))), 4, sigma).reshape(-1, DIM)
    np.savez(tmp_path / "verification.npz", embeddings=verification.astype(np.float32), labels=np.repeat(np.arange(500), 4))
    # reference centres of 2000 real people, half in .npy, half in Parquet
    real = unit(rng.standard_normal((2000, DIM)))
    ref_centres = unit(samples_around(rng, real, 10, sigma).mean(axis=1)).astype(np.float32)
    np.save(tmp_path / "refs.npy", ref_centres[:1000])
    pq.write_table(pa.table({"embedding": list(ref_centres[1000:]), "label": [f"person {i}" for i in range(1000, 2000)]}), tmp_path / "refs.parquet")
    references = ReferenceSet([str(tmp_path / "refs.npy"), str(tmp_path / "refs.parquet")])
    # synthetic identities: 1000 fresh people, 10 copies and 10 noisy copies of real ones (ids 1000..1019)
    fresh = unit(samples_around(rng, unit(rng.standard_normal((1000, DIM))), 10, sigma).mean(axis=1))
    copied = rng.choice(2000, 20, replace=False)
    copies = unit(samples_around(rng, real[copied[:10]], 10, sigma).mean(axis=1))
    noisy = unit(samples_around(rng, unit(real[copied[10:]] + 0.8 * unit(rng.standard_normal((10, DIM)))), 10, sigma).mean(axis=1))
    synthetic = np.vstack([fresh, copies, noisy]).astype(np.float32)

    settings = LeakageSettings(references=[str(tmp_path / "refs.npy")], far=1e-4, verification=str(tmp_path / "verification.npz"), report_pairs=5)
    result = audit(ArrayChunks(synthetic), references, settings, SearchSettings())
    cal = result.calibration
    assert cal["method"] == "far" and cal["impostor_pairs"] == 2000 * 1999 // 2 - 500 * 6
    assert cal["measured_far"] <= 1e-4
    pairs = result.pairs.to_pylist()
    flagged = {p["query_id"] for p in pairs}
    planted = set(range(1000, 1020))
    assert planted <= flagged  # every copy and noisy copy found
    for k, q in enumerate(range(1000, 1020)):  # ... against the right person
        assert any(p["query_id"] == q and p["base_id"] == copied[k] for p in pairs)
    fresh_pairs = sum(p["query_id"] < 1000 for p in pairs)
    rate = fresh_pairs / (1000 * 2000)
    print(f"threshold {result.threshold:.4f}; fresh identity x reference false accepts {fresh_pairs} ({rate:.2e} per comparison)")
    assert rate <= 1.3e-4  # the configured FAR 1e-4, with room for sampling noise (expected count 200 +- 14)
    assert result.histogram.sum() == len(synthetic)
    assert [n[1] for n in result.nearest][:1][0] in planted and references.describe(1500)[0].startswith("person 1500")


def test_far_needs_enough_impostor_pairs_and_a_verification_set():
    emb = unit(np.random.default_rng(1).standard_normal((20, DIM)))
    with pytest.raises(ValueError, match="impostor pairs"):
        calibrate_far(emb, np.arange(20), 1e-4)
    with pytest.raises(ValueError, match="verification"):
        LeakageSettings(references=["x.npy"], far=1e-3)


def clustered_centres(rng, n, modes=50, weight=0.5):
    """Identity centres around a few modes (like real embeddings) with planted near-duplicates."""
    m = unit(rng.standard_normal((modes, DIM)))
    x = unit(weight * m[rng.integers(0, modes, n)] + unit(rng.standard_normal((n, DIM))))
    src, dst = np.arange(0, 40, 2), np.arange(1, 40, 2)
    x[dst] = unit(x[src] + rng.uniform(0.02, 0.05, (20, 1)) * rng.standard_normal((20, DIM)))
    return x.astype(np.float32)


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf"])
def test_search_finds_the_pairs_exact_search_finds(kind):
    rng = np.random.default_rng(2)
    x = clustered_centres(rng, 4000)
    exact = x @ x.T
    np.fill_diagonal(exact, -1)
    want = {(int(i), int(j)) for i, j in zip(*np.nonzero(np.triu(exact >= 0.7, 1)))}
    settings = SearchSettings(index=kind, vectors_per_list=64, nprobe=8, query_chunk=1000,
                              max_vectors_per_part=1500)  # three base parts: memory bounded by one
    pairs, plan = search_pairs(ArrayChunks(x, chunk=700), ArrayChunks(x, chunk=700), 0.7, settings, self_join=True)
    got = set(zip(pairs.column("query_id").to_pylist(), pairs.column("base_id").to_pylist()))
    assert plan.kind == kind and plan.parts == 3 and len(want) >= 15
    assert len(got & want) / len(want) >= {"flat": 1.0, "hnsw": 0.99, "ivf": 0.99}[kind] and got <= want


def test_automatic_index_is_exact_on_small_data_and_ivf_finds_every_planted_pair_above():
    rng = np.random.default_rng(4)
    x = clustered_centres(rng, 6000, modes=200)
    planted = {(i, i + 1) for i in range(0, 40, 2)}  # clustered_centres plants these near-duplicates
    exact = x @ x.T
    np.fill_diagonal(exact, -1)
    want = {(int(i), int(j)) for i, j in zip(*np.nonzero(np.triu(exact >= 0.7, 1)))}
    assert len(planted & want) >= 10  # the planted pairs above the threshold (the noisiest fall below)
    assert build_plan(len(x), SearchSettings()).kind == "flat"  # the default keeps small data exact
    settings = SearchSettings(exact_max_cpu=5000, query_chunk=2000)  # IVF defaults: 64 vectors per list, nprobe 16
    pairs, plan = search_pairs(ArrayChunks(x), ArrayChunks(x), 0.7, settings, self_join=True)
    got = set(zip(pairs.column("query_id").to_pylist(), pairs.column("base_id").to_pylist()))
    assert (plan.kind, plan.nlist) == ("ivf", 6000 // 64)
    assert len(got & want) / len(want) == 1.0 and got <= want


def test_capped_lists_probe_fewer_lists_and_still_find_every_pair():
    # 1M centres: 4096 lists (the cap, flat quantizer), 8 probed; 100k: 64 per list, 16 probed
    big, small = build_plan(1_000_000, SearchSettings()), build_plan(100_000, SearchSettings())
    assert (big.nlist, big.nprobe, small.nlist, small.nprobe) == (4096, 8, 1562, 16)
    rng = np.random.default_rng(5)
    x = clustered_centres(rng, 6000, modes=20)  # more lists than modes, as at 1M (4096 lists, 1000 modes)
    exact = x @ x.T
    np.fill_diagonal(exact, -1)
    want = {(int(i), int(j)) for i, j in zip(*np.nonzero(np.triu(exact >= 0.7, 1)))}
    settings = SearchSettings(exact_max_cpu=5000, max_lists=24, query_chunk=2000)  # 250 vectors per list
    pairs, plan = search_pairs(ArrayChunks(x), ArrayChunks(x), 0.7, settings, self_join=True)
    got = set(zip(pairs.column("query_id").to_pylist(), pairs.column("base_id").to_pylist()))
    # a self-join probes half the lists: a pair is missed only when each vector misses the other's list
    assert (plan.kind, plan.nlist, plan.nprobe) == ("ivf", 24, 4) and len(want) >= 10
    assert len(got & want) / len(want) == 1.0 and got <= want


@pytest.mark.parametrize("self_join", [True, False])
def test_the_list_major_scan_finds_what_faiss_ivf_scan_finds(self_join):
    """clean.search.scan lists (list_join's matrix products on its own bfloat16 k-means lists) against
    faiss's own IVF scan (faiss's k-means) and exact search: no false pair, the same cosines, at
    least as many of the pairs and of the best matches (the exact nearest neighbour where that is
    above the threshold) as faiss's scan finds."""
    rng = np.random.default_rng(8)
    x = clustered_centres(rng, 6000, modes=20)
    base = x
    if not self_join:  # references: 3000 others, 100 of them copies of centres at cosine about 0.7-0.95
        base = clustered_centres(rng, 3000, modes=20)
        base[:100] = unit(x[::60] + rng.uniform(0.02, 0.05, (100, 1)) * rng.standard_normal((100, DIM)))
    results = {}
    for scan in ("lists", "faiss"):
        best = {}
        settings = SearchSettings(exact_max_cpu=1000, max_lists=24, query_chunk=1500, scan=scan)
        pairs, plan = search_pairs(ArrayChunks(x), ArrayChunks(base), 0.6, settings, self_join=self_join,
                                   on_best=lambda n, ids, b, s: best.update(zip(ids.tolist(), zip(b.tolist(), s.tolist()))))
        results[scan] = ({(q, b): c for q, b, c in zip(*(pairs.column(k).to_pylist() for k in ("query_id", "base_id", "cosine")))}, best)
    (lists, best_lists), (faiss_pairs, best_faiss) = results["lists"], results["faiss"]
    sims = x @ base.T
    if self_join:
        np.fill_diagonal(sims, -np.inf)
    exact = {(int(q), int(b)) for q, b in zip(*np.nonzero(sims >= 0.6)) if not self_join or q < b}
    assert len(exact) >= 20 and set(lists) <= exact and set(faiss_pairs) <= exact
    assert max(abs(lists[k] - faiss_pairs[k]) for k in set(lists) & set(faiss_pairs)) < 1e-5
    # 24 capped lists over 3000-6000 vectors, 4 probed (self-join) or 8: at this toy size a few
    # planted pairs fall outside the probed lists for both (lists 97 of 100, faiss 94)
    assert len(lists) >= len(faiss_pairs) >= 0.9 * len(exact)
    nearest, close = sims.argmax(axis=1), np.flatnonzero(sims.max(axis=1) >= 0.6)
    assert len(best_lists) == len(best_faiss) == len(x) and len(close) >= 20
    right = {scan: sum(best[q][0] == nearest[q] for q in close.tolist()) for scan, best in (("lists", best_lists), ("faiss", best_faiss))}
    assert right["lists"] >= right["faiss"] >= 0.9 * len(close)
    assert all(best_lists[q][1] <= sims[q, nearest[q]] + 1e-5 for q in range(len(x)))


def test_dedup_keeps_the_identity_with_more_images():
    pairs = pa.table({"query_id": [1, 2, 7], "base_id": [2, 3, 8], "cosine": [0.9, 0.8, 0.95]})
    absorbed = survivors(pairs, {1: 10, 2: 30, 3: 5, 7: 4, 8: 4})
    assert absorbed == {1: 2, 3: 2, 8: 7}  # a chain is one group; a tie keeps the lower id
    x = clustered_centres(np.random.default_rng(3), 500)
    result = find_duplicates(ArrayChunks(x), lambda ids: {int(i): int(i % 7) for i in ids}, DedupSettings(threshold=0.7), SearchSettings())
    assert result.pairs.num_rows >= 15 and len(result.absorbed) == result.pairs.num_rows


def test_mean_pair_dedup_separates_people_whose_centres_averaging_brought_close():
    """Images at pair cosine about 0.6 within a person: two different people at 0.3 between their
    images have centres at about 0.5, above a same-person threshold of 0.45; compared as the mean
    cosine between their images they stay apart, and one person split in two ids is still one."""
    from facegen.clean.thresholds import resolve_clean_settings
    from facegen.config import CleanSettings
    from facegen.faces.calibration import Calibration

    rng = np.random.default_rng(11)
    a = unit(rng.standard_normal(DIM))
    v = rng.standard_normal(DIM)
    b = unit(0.5 * a + np.sqrt(0.75) * unit(v - (v @ a) * a))  # cos(a, b) = 0.5
    people = {0: a, 1: b, 2: a}  # identity 2 is identity 0's person again
    images = {i: unit(p + rng.standard_normal((40, DIM)) * np.sqrt(0.667 / DIM)) for i, p in people.items()}
    means = {i: x.mean(axis=0) for i, x in images.items()}
    centres = ArrayChunks(np.stack([unit(m) for m in means.values()]).astype(np.float32), np.array(list(means), np.int64))
    lengths = {i: float(np.linalg.norm(m)) for i, m in means.items()}
    assert float(images[0].mean(0) @ images[1].mean(0)) == pytest.approx(0.3, abs=0.03)  # their images' mean cosine
    assert float(unit(means[0]) @ unit(means[1])) == pytest.approx(0.5, abs=0.05)  # their centres'

    kept = lambda ids: {int(i): 40 for i in ids}  # noqa: E731
    by_centre = find_duplicates(centres, kept, DedupSettings(threshold=0.45, measure="centre"), SearchSettings())
    assert by_centre.absorbed == {1: 0, 2: 0}  # the other person is dropped as a duplicate
    by_pairs = find_duplicates(centres, kept, DedupSettings(threshold=0.45, measure="mean_pair"), SearchSettings(),
                               mean_length=lambda ids: {int(i): lengths[int(i)] for i in ids})
    assert by_pairs.absorbed == {2: 0}

    calibration = Calibration(embedder_kind="facegen", source="test", same_person=0.45, accuracy=0.97)
    resolved = resolve_clean_settings(CleanSettings(), calibration).dedup  # auto on a calibration: mean pairs
    assert (resolved.threshold, resolved.measure) == (0.45, "mean_pair")
    assert resolve_clean_settings(CleanSettings(dedup={"threshold": 0.8})).dedup.measure == "centre"  # a cosine as written
    assert resolve_clean_settings(CleanSettings()).dedup.measure == "centre"  # no calibration: ArcFace's 0.7 on centres


def test_references_stream_from_object_storage_as_from_disk(tmp_path):
    """A .npy of real embeddings on s3:// is read chunk by chunk (only each chunk's bytes), as a local one."""
    from s3 import BUCKET, moto_server, s3_env, upload

    refs = np.random.default_rng(5).standard_normal((300, 16)).astype(np.float32)
    np.save(tmp_path / "refs.npy", refs)
    local = ReferenceSet([str(tmp_path / "refs.npy")], chunk=128)
    with moto_server() as endpoint, s3_env(endpoint):
        uri = f"s3://{BUCKET}/refs.npy"
        upload(str(tmp_path / "refs.npy"), uri)
        remote = ReferenceSet([uri], chunk=128)
        assert (remote.total, remote.dim) == (local.total, local.dim) == (300, 16)
        got = list(remote.chunks())
    want = list(local.chunks())
    assert [len(ids) for ids, _ in got] == [128, 128, 44]
    for (ids_a, vec_a), (ids_b, vec_b) in zip(got, want):
        np.testing.assert_array_equal(ids_a, ids_b)
        np.testing.assert_array_equal(vec_a, vec_b)
