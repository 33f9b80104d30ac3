"""Expansion noise and semi-hard bands: exact cosines, exact shares, per-sample reproducibility."""

import numpy as np
import pytest

from facegen.config import EXPANSION_PRESETS, ConfigError, ExpansionSettings, HybridSettings, config_from_dict
from facegen.generators import sample_seed
from facegen.identities.expansion import (
    add_feature_noise,
    feature_noise,
    band_conditioning,
    cosine,
    format_histograms,
    merge_histograms,
    rotate_to_similarity,
    sample_conditioning,
    sample_rng,
    sigma_schedule,
    similarity_histogram,
    split_counts,
)


def _feature(seed=0, dim=512, norm=23.0):
    f = np.random.default_rng(seed).standard_normal(dim)
    return f / np.linalg.norm(f) * norm


def test_rotation_lands_exactly_on_the_requested_cosine_and_keeps_the_norm():
    f = _feature()
    rng = np.random.default_rng(1)
    for target in (-1.0, -0.3, 0.0, 0.55, 0.8, 0.999, 1.0):
        g = rotate_to_similarity(f, target, rng)
        assert cosine(g, f) == pytest.approx(target, abs=1e-12)
        assert np.linalg.norm(g) == pytest.approx(np.linalg.norm(f), rel=1e-12)
    a, b = rotate_to_similarity(f, 0.7, np.random.default_rng(5)), rotate_to_similarity(f, 0.7, np.random.default_rng(6))
    assert cosine(a, b) < 0.9  # different random directions, not one fixed offset
    with pytest.raises(ValueError, match=r"similarity must be in \[-1, 1\]"):
        rotate_to_similarity(f, 1.2, rng)


def test_band_conditioning_draws_uniform_targets_and_records_them():
    f = _feature(norm=1.0)
    out = [band_conditioning(f, (0.55, 0.8), sample_seed(0, 3, k)) for k in range(2000)]
    requested = np.array([c.requested_similarity for c in out])
    realised = np.array([cosine(c.feature, f) for c in out])
    assert requested.min() >= 0.55 and requested.max() <= 0.8
    np.testing.assert_allclose(realised, requested, atol=1e-6)  # float32 features
    counts = np.histogram(requested, bins=5, range=(0.55, 0.8))[0]
    assert counts.min() > 320 and counts.max() < 480  # uniform: 400 per bin
    assert all(c.band == (0.55, 0.8) and np.isnan(c.sigma) and c.feature.dtype == np.float32 for c in out)


def test_noise_is_rescaled_to_the_original_norm_and_matches_the_expected_cosine():
    f = _feature(norm=25.0)
    rng = np.random.default_rng(0)
    for sigma in (0.2, 0.5):
        g = np.stack([add_feature_noise(f, sigma, rng) for _ in range(300)])
        np.testing.assert_allclose(np.linalg.norm(g, axis=1), 25.0, rtol=1e-12)
        expected = 25.0 / np.sqrt(25.0**2 + 512 * sigma**2)
        assert np.mean([cosine(x, f) for x in g]) == pytest.approx(expected, abs=0.01)


def test_presets_are_the_published_recipes():
    # Vec2Face's HSFace (image_generation.py) and HybridGen's references (image_generation_with_reference.py,
    # epsilons=[0.2], percentages=[1.]): both re-scale to the base vector's own norm (sample_nearby_vectors)
    assert EXPANSION_PRESETS == {
        "hsface": {"sigmas": [0.3, 0.5, 0.7], "shares": [0.4, 0.4, 0.2], "feature_norm": "own"},
        "hybridgen": {"sigmas": [0.2], "shares": [1.0], "feature_norm": "own"},
    }
    for name, published in EXPANSION_PRESETS.items():
        settings = ExpansionSettings(preset=name)
        assert (settings.mode, settings.sigmas, settings.shares, settings.feature_norm) == (
            "noise", published["sigmas"], published["shares"], "own")
    # vec2face takes HybridGen's recipe unless told otherwise; the other expanders keep their defaults
    vec2face = HybridSettings(expander="vec2face").expansion
    assert (vec2face.preset, vec2face.sigmas, vec2face.shares) == ("hybridgen", [0.2], [1.0])
    assert vec2face.feature_norm == "own"
    assert HybridSettings(expander="vec2face", expansion={"preset": "hsface"}).expansion.sigmas == [0.3, 0.5, 0.7]
    mixed = HybridSettings(expander="vec2face", expansion={"sigmas": [0.1, 0.3], "shares": [0.5, 0.5]}).expansion
    assert (mixed.preset, mixed.sigmas, mixed.feature_norm) == (None, [0.1, 0.3], "own")  # only what was left out
    assert HybridSettings(expander="vec2face", expansion={"mode": "band"}).expansion.feature_norm == "own"
    arc2face = HybridSettings().expansion
    assert (arc2face.preset, arc2face.sigmas, arc2face.shares) == (None, [0.3, 0.5, 0.7], [0.4, 0.4, 0.2])
    assert arc2face.feature_norm == 25.0
    # a dumped config loads back to the same settings (preset and its values together agree)
    cfg = config_from_dict({"generator": {"hybrid": {"expander": "vec2face"}}})
    assert config_from_dict(cfg.model_dump(mode="json")).generator.hybrid.expansion == cfg.generator.hybrid.expansion


def test_presets_refuse_contradicting_values_in_one_line():
    def load(expansion):
        return config_from_dict({"generator": {"hybrid": {"expansion": expansion}}})

    with pytest.raises(ConfigError, match=r"^<dict>: generator.hybrid.expansion: sigmas \[0.2\] is not preset hsface's "
                       r"\[0.3, 0.5, 0.7\]: drop the preset to set your own values$"):
        load({"preset": "hsface", "sigmas": [0.2]})
    with pytest.raises(ConfigError, match=r"feature_norm 25.0 is not preset hybridgen's 'own'"):
        load({"preset": "hybridgen", "feature_norm": 25.0})
    with pytest.raises(ConfigError, match=r"preset hybridgen is a noise recipe: mode must be noise \(got 'band'\)"):
        load({"preset": "hybridgen", "mode": "band"})
    with pytest.raises(ConfigError, match=r"expansion.preset: Input should be 'hsface' or 'hybridgen'"):
        load({"preset": "vec2face"})
    with pytest.raises(ConfigError, match=r"expansion.feature_norm: expected a number > 0 or own \(got 'raw'\)$"):
        load({"feature_norm": "raw"})
    agreeing = load({"preset": "hsface", "sigmas": [0.3, 0.5, 0.7], "feature_norm": "own"})
    assert agreeing.generator.hybrid.expansion.preset == "hsface"


def test_hybridgen_noise_has_std_0_2_per_dimension_before_it_is_rescaled_to_each_features_own_norm():
    settings = ExpansionSettings(preset="hybridgen")
    draws, dim = 4000, 512
    norms = np.random.default_rng(7).uniform(15.0, 35.0, 40)  # raw ArcFace features: each its own norm
    noise = np.empty((draws, dim))
    for i in range(draws):
        f = _feature(seed=i % 40, dim=dim, norm=norms[i % 40])
        seed = sample_seed(0, i % 40, i)
        c = sample_conditioning(f, settings, 0, i % 40, i // 40, draws // 40, seed)
        assert c.sigma == 0.2 and c.mode == "noise"
        # the conditioning is exactly f + n re-scaled to |f|, with n the sample's own draw
        n = feature_noise(dim, 0.2, sample_rng(seed))
        expected = (f + n) * (np.linalg.norm(f) / np.linalg.norm(f + n))
        np.testing.assert_allclose(c.feature, expected, rtol=1e-6, atol=1e-6)
        assert np.linalg.norm(c.feature.astype(np.float64)) == pytest.approx(norms[i % 40], rel=1e-6)
        noise[i] = n
    # 2,048,000 draws: the pooled std's standard error is 0.2 / sqrt(2 * 2048000) = 1e-4
    assert noise.std() == pytest.approx(0.2, abs=5e-4) and abs(noise.mean()) < 5e-4
    per_dim = noise.std(axis=0)  # each dimension alone (standard error 0.2 / sqrt(8000) = 0.0022)
    assert per_dim.min() > 0.2 - 0.012 and per_dim.max() < 0.2 + 0.012
    assert abs(np.corrcoef(noise[:, 0], noise[:, 1])[0, 1]) < 0.06  # independent dimensions
    # at norm 25 the cosine to the identity is |f| / sqrt(|f|^2 + d sigma^2) = 0.9119
    f = _feature(norm=25.0)
    cosines = [cosine(sample_conditioning(f, settings, 0, 1, k, 50, sample_seed(0, 1, k)).feature, f) for k in range(50)]
    assert np.mean(cosines) == pytest.approx(25.0 / np.sqrt(25.0**2 + 512 * 0.04), abs=0.002)


def test_sigma_shares_are_exact_per_identity_and_each_sample_is_reproducible_alone():
    assert split_counts([0.4, 0.4, 0.2], 50) == [20, 20, 10]
    assert split_counts([0.4, 0.4, 0.2], 7) == [3, 3, 1]
    schedule = sigma_schedule(0, 11, 50, [0.3, 0.5, 0.7], [0.4, 0.4, 0.2])
    assert sorted(schedule.tolist()) == [0.3] * 20 + [0.5] * 20 + [0.7] * 10
    assert schedule.tolist() != sorted(schedule.tolist())  # shuffled per identity
    settings = ExpansionSettings()
    f = _feature()
    whole = [sample_conditioning(f, settings, 0, 11, k, 50, sample_seed(0, 11, k)) for k in range(50)]
    again = sample_conditioning(f, settings, 0, 11, 37, 50, sample_seed(0, 11, 37))
    assert np.array_equal(again.feature, whole[37].feature) and again.sigma == schedule[37]
    assert [c.sigma for c in whole] == schedule.tolist()


def test_settings_reject_inconsistent_sigmas_shares_and_bands():
    with pytest.raises(ConfigError, match="shares must sum to 1"):
        config_from_dict({"generator": {"hybrid": {"expansion": {"shares": [0.5, 0.4, 0.2]}}}})
    with pytest.raises(ConfigError, match="same non-zero length"):
        config_from_dict({"generator": {"hybrid": {"expansion": {"sigmas": [0.2], "shares": [0.5, 0.5]}}}})
    with pytest.raises(ConfigError, match="band must satisfy"):
        config_from_dict({"generator": {"hybrid": {"expansion": {"mode": "band", "band": [0.8, 0.55]}}}})


def test_histograms_merge_and_print_side_by_side():
    a = similarity_histogram([0.6, 0.61, 0.7, np.nan], bins=4, low=0.0, high=1.0)
    b = similarity_histogram([0.1, 0.9], bins=4, low=0.0, high=1.0)
    assert a["counts"] == [0, 0, 3, 0] and b["counts"] == [1, 0, 0, 1]
    assert merge_histograms([a, b, None])["counts"] == [1, 0, 3, 1]
    text = format_histograms({"band": a, "noise": b})
    assert text.splitlines()[0].split() == ["cosine", "bin", "band", "noise"]
    assert "[+0.50,+0.75)      3" in text
    only = format_histograms({"band": a}, trim=True).splitlines()
    assert len(only) == 2 and only[1].startswith("[+0.50,+0.75)")  # the empty bins around it are gone


def test_block_stats_carry_similarity_histograms_that_sum_per_run():
    from facegen.schema import rows_to_batch, sample_schema, table_from_batch
    from facegen.stages.generate import block_similarity_histograms, run_similarity_histograms

    def block(requested, realised):
        rows = [{
            "identity_id": 1, "block_id": 0, "sample_idx": k, "seed": k, "source": "t", "image": b"",
            "true_identity_id": -1, "meta": "{}", "embedding": None, "quality": 0.0, "difficulty": 0.0,
            "status": "ok", "reason": "", "origin": "generated", "band_low": 0.55, "band_high": 0.8,
            "requested_similarity": q, "realised_similarity": r,
        } for k, (q, r) in enumerate(zip(requested, realised))]
        return table_from_batch(rows_to_batch(rows, sample_schema()), sample_schema())

    first = block_similarity_histograms(block([0.6, 0.7], [0.3, np.nan]), bins=4)
    second = block_similarity_histograms(block([0.75], [0.9]), bins=4)
    assert first["requested"]["counts"] == [0, 0, 0, 2] and first["realised"]["counts"] == [0, 0, 1, 0]
    run = run_similarity_histograms([{"similarity_histograms": first}, {"similarity_histograms": second}, {}])
    assert run["requested"]["counts"] == [0, 0, 0, 3] and run["realised"]["counts"] == [0, 0, 1, 1]
    plain = block([np.nan], [np.nan])
    assert plain.column("requested_similarity").null_count == 1  # NaN in numpy = null in Arrow
    assert block_similarity_histograms(plain, bins=4) == {}


def test_run_histograms_go_to_wandb(tmp_path, monkeypatch):
    from facegen.config import config_from_dict
    from facegen.tracking import start_stage_tracker
    from wandb_offline import read_offline_run

    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    cfg = config_from_dict({"run": {"output_dir": str(tmp_path), "name": "bands"}, "tracking": {"mode": "offline"}})
    hist = similarity_histogram([0.6, 0.7, 0.72], bins=4, low=0.0, high=1.0)
    tracker = start_stage_tracker(cfg, "generate")
    tracker.log_histograms({"requested": hist}, "similarity")
    tracker.tracker.finish()
    run = read_offline_run(str(tmp_path))
    logged = run.history[0]["similarity/requested"]
    assert logged["_type"] == "histogram" and logged["values"] == [0, 0, 3, 0] and logged["bins"] == hist["edges"]
    assert run.summary["similarity/requested_count"] == 3


def test_hybrid_settings_are_checked_when_the_config_loads():
    base = {"backend": "hybrid", "hybrid": {"embedder": {"kind": "dlib"}}}
    config_from_dict({"generator": base})
    with pytest.raises(ConfigError, match=r"generator: hybrid.embedder: the identity feature needs an embedder"):
        config_from_dict({"generator": {"backend": "hybrid"}})
    with pytest.raises(ConfigError, match=r"hybrid.vec2face.checkpoint: the vec2face expander needs its .pth"):
        config_from_dict({"generator": base | {"hybrid": {"embedder": {"kind": "dlib"}, "expander": "vec2face"}}})
    with pytest.raises(ConfigError, match=r"hybrid.detector.kind: references must go through a face detector"):
        config_from_dict({"generator": base | {"hybrid": {"embedder": {"kind": "dlib"}, "detector": {"kind": "none"}}}})
    with pytest.raises(ConfigError, match=r"expander gan perturbs a GAN reference's latent"):
        config_from_dict({"generator": {"hybrid": {"expander": "gan"}}})
    config_from_dict({"generator": {"backend": "parametric", "hybrid": {"expander": "vec2face"}}})  # not used: not checked
