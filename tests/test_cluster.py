"""Adaptive per-identity DBSCAN (ALGORITHMS.md 1.2) on synthetic clustered embeddings."""

import numpy as np
import pytest

from facegen.clean.cluster import adaptive_dbscan_keep
from facegen.config import DbscanSettings

DIM = 512


def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def around(rng, centre, n, sigma):
    """n embeddings around a unit centre; pairwise cosine is about 1 / (1 + sigma**2)."""
    return unit(centre + sigma * rng.standard_normal((n, DIM)) / np.sqrt(DIM))


def orthonormal(rng, k):
    """k orthonormal rows in DIM dimensions."""
    q, _ = np.linalg.qr(rng.standard_normal((DIM, k)))
    return q.T


def random_dirs(rng, n):
    return unit(rng.standard_normal((n, DIM)))


def test_clean_identity_with_20_percent_outliers_keeps_exactly_the_inliers():
    rng = np.random.default_rng(0)
    inliers = around(rng, random_dirs(rng, 1)[0], 40, sigma=0.5)  # pairwise cos ~0.8
    emb = np.vstack([inliers, random_dirs(rng, 10)])
    order = rng.permutation(len(emb))
    emb, is_inlier = emb[order], (order < 40)

    decision = adaptive_dbscan_keep(emb.astype(np.float32), DbscanSettings())

    np.testing.assert_array_equal(decision.keep, is_inlier)
    assert decision.landed_in_band and decision.rounds == 1
    assert decision.threshold == pytest.approx(0.6)
    assert decision.kept_fraction == pytest.approx(0.8)
    assert decision.num_kept == 40


def test_spread_identity_lowers_t_until_the_cluster_forms():
    basis = orthonormal(np.random.default_rng(1), 31)
    rho = 0.55  # every inlier pair has cosine exactly 0.55, below the start t of 0.6
    inliers = np.sqrt(rho) * basis[0] + np.sqrt(1 - rho) * basis[1:25]
    emb = np.vstack([inliers, basis[25:31]])  # 6 outliers orthogonal to everything

    decision = adaptive_dbscan_keep(emb, DbscanSettings())

    assert decision.landed_in_band
    assert decision.rounds == 4 and decision.threshold == pytest.approx(0.54)  # 0.60, 0.58, 0.56, 0.54
    np.testing.assert_array_equal(decision.keep, np.arange(30) < 24)


def test_two_close_people_raise_t_until_the_majority_separates():
    basis = orthonormal(np.random.default_rng(2), 33)
    shared, within = 0.65, 0.25  # cos 0.9 inside each person, 0.65 across: one cluster at t = 0.6
    spread = np.sqrt(1 - shared - within)
    a = np.sqrt(shared) * basis[0] + np.sqrt(within) * basis[1] + spread * basis[3:21]
    b = np.sqrt(shared) * basis[0] + np.sqrt(within) * basis[2] + spread * basis[21:33]
    emb = np.vstack([a, b])

    decision = adaptive_dbscan_keep(emb, DbscanSettings())

    assert decision.landed_in_band
    assert decision.rounds == 4 and decision.threshold == pytest.approx(0.66)  # 0.60, 0.62, 0.64, 0.66
    np.testing.assert_array_equal(decision.keep, np.arange(30) < 18)
    assert decision.kept_fraction == pytest.approx(0.6)


def test_no_round_in_band_keeps_the_largest_fraction_seen():
    rng = np.random.default_rng(3)
    emb = around(rng, random_dirs(rng, 1)[0], 20, sigma=0.05)  # one tight cluster at every t

    decision = adaptive_dbscan_keep(emb, DbscanSettings())

    assert not decision.landed_in_band
    assert decision.keep.all() and decision.kept_fraction == 1.0
    assert decision.rounds == 10  # t climbs 0.6 -> 0.78 without reaching the band
    assert decision.threshold == pytest.approx(0.6)  # earliest round with the best fraction


def test_t_is_clamped_and_the_search_stops_when_t_cannot_move():
    rng = np.random.default_rng(4)
    settings = DbscanSettings(start_t=0.86, t_max=0.9, max_rounds=50)
    decision = adaptive_dbscan_keep(around(rng, random_dirs(rng, 1)[0], 10, sigma=0.05), settings)
    assert decision.rounds == 3  # 0.86, 0.88, 0.90, then clamped at 0.90: no new t to try
    assert decision.keep.all() and not decision.landed_in_band


def test_all_noise_keeps_nothing():
    rng = np.random.default_rng(5)
    decision = adaptive_dbscan_keep(random_dirs(rng, 12), DbscanSettings())
    assert not decision.keep.any()
    assert decision.kept_fraction == 0.0 and not decision.landed_in_band
    assert decision.threshold == pytest.approx(0.6 - 9 * 0.02)  # the last (loosest) t tried


def test_fewer_rows_than_min_samples_keeps_nothing():
    rng = np.random.default_rng(6)
    decision = adaptive_dbscan_keep(random_dirs(rng, 2), DbscanSettings(min_samples=3))
    assert not decision.keep.any() and decision.rounds == 0
    empty = adaptive_dbscan_keep(np.zeros((0, DIM), np.float32), DbscanSettings())
    assert empty.keep.shape == (0,) and empty.rounds == 0


def test_nan_and_zero_embeddings_are_never_kept_nor_counted():
    rng = np.random.default_rng(7)
    emb = np.vstack([around(rng, random_dirs(rng, 1)[0], 16, sigma=0.5), random_dirs(rng, 6)]).astype(np.float32)
    emb[3] = np.nan
    emb[5, 7] = np.inf
    emb[17] = 0.0  # an outlier without an embedding: 14 usable inliers of 19 usable rows

    decision = adaptive_dbscan_keep(emb, DbscanSettings())

    expected = np.arange(22) < 16
    expected[[3, 5]] = False
    np.testing.assert_array_equal(decision.keep, expected)
    assert decision.kept_fraction == pytest.approx(14 / 19)


def test_equal_clusters_break_ties_by_tightness_then_order():
    rng = np.random.default_rng(8)
    tight = around(rng, random_dirs(rng, 1)[0], 10, sigma=0.3)
    loose = around(rng, random_dirs(rng, 1)[0], 10, sigma=0.5)
    settings = DbscanSettings()
    first = adaptive_dbscan_keep(np.vstack([loose, tight]), settings)
    second = adaptive_dbscan_keep(np.vstack([tight, loose]), settings)
    np.testing.assert_array_equal(first.keep, np.arange(20) >= 10)
    np.testing.assert_array_equal(second.keep, np.arange(20) < 10)


def test_decision_is_deterministic():
    rng = np.random.default_rng(9)
    emb = np.vstack([around(rng, random_dirs(rng, 1)[0], 15, sigma=0.9), random_dirs(rng, 5)])
    runs = [adaptive_dbscan_keep(emb, DbscanSettings()) for _ in range(3)]
    for other in runs[1:]:
        np.testing.assert_array_equal(other.keep, runs[0].keep)
        assert (other.threshold, other.rounds, other.kept_fraction) == (runs[0].threshold, runs[0].rounds, runs[0].kept_fraction)


def test_rejects_non_matrix_input():
    with pytest.raises(ValueError, match="2-D"):
        adaptive_dbscan_keep(np.zeros(DIM), DbscanSettings())


def random_identity(rng, n_min=4, n_max=70):
    """One identity of varied shape: a majority person, sometimes a second person, random outliers."""
    n = int(rng.integers(n_min, n_max))
    sigma = rng.uniform(0.2, 1.4)
    majority = around(rng, random_dirs(rng, 1)[0], n, sigma)
    parts = [majority]
    if rng.random() < 0.4:
        parts.append(around(rng, random_dirs(rng, 1)[0], int(rng.integers(1, max(2, n // 2))), rng.uniform(0.2, 1.0)))
    parts.append(random_dirs(rng, int(rng.integers(0, max(1, n // 3)))))
    emb = np.vstack(parts)
    if rng.random() < 0.1:
        emb[int(rng.integers(len(emb)))] = np.nan
    return emb[rng.permutation(len(emb))].astype(np.float32)


def test_fast_path_makes_the_same_decisions_as_sklearn_dbscan_on_many_identities():
    from facegen.clean.cluster import adaptive_dbscan_keep_many
    from facegen.clean.cluster_reference import sklearn_adaptive_dbscan_keep

    rng = np.random.default_rng(10)
    identities = [random_identity(rng, 4, 50) for _ in range(200)]
    settings = DbscanSettings()
    fast = adaptive_dbscan_keep_many(identities, settings)
    rounds = 0
    for emb, got in zip(identities, fast):
        want = sklearn_adaptive_dbscan_keep(emb, settings)
        np.testing.assert_array_equal(got.keep, want.keep)
        assert (got.threshold, got.rounds, got.landed_in_band) == (want.threshold, want.rounds, want.landed_in_band)
        assert got.kept_fraction == pytest.approx(want.kept_fraction)
        rounds += want.rounds
    assert rounds > 2 * len(identities)  # the threshold really moved: many multi-round searches compared
    landed = sum(d.landed_in_band for d in fast)
    assert 0 < landed < len(identities)


def test_fast_path_matches_sklearn_with_other_settings():
    from facegen.clean.cluster import adaptive_dbscan_keep_many
    from facegen.clean.cluster_reference import sklearn_adaptive_dbscan_keep

    rng = np.random.default_rng(11)
    identities = [random_identity(rng, 3, 30) for _ in range(80)]
    settings = DbscanSettings(min_samples=4, start_t=0.5, step=0.05, keep_fraction_low=0.6, keep_fraction_high=0.9)
    for emb, got in zip(identities, adaptive_dbscan_keep_many(identities, settings)):
        want = sklearn_adaptive_dbscan_keep(emb, settings)
        np.testing.assert_array_equal(got.keep, want.keep)
        assert (got.threshold, got.rounds) == (want.threshold, want.rounds)
