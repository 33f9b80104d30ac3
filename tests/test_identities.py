"""Identity sampling: faiss pairs, feature- and latent-space Langevin, checkpoint/resume, the stage files."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from facegen.config import LangevinSettings, load_config
from facegen.identities import knn
from facegen.identities.langevin import FeatureSpace, LangevinSampler, normalize_rows
from facegen.stages.identities import load_reference_embeddings, run_identities
from facegen.stages.identity_blocks import read_latents


def _unit(n, d, seed):
    return normalize_rows(np.random.default_rng(seed).standard_normal((n, d), dtype=np.float32), 4096)


def test_neighbour_pairs_contain_every_close_pair_once():
    x = _unit(400, 16, 0)
    sims = x @ x.T
    np.fill_diagonal(sims, -2)
    top8 = np.argsort(-sims, axis=1)[:, :8]
    expected = {(min(i, int(j)), max(i, int(j))) for i, row in enumerate(top8) for j in row}
    pairs = knn.neighbour_pairs(x, knn.KnnOptions(k=8, index="exact", use_gpu=False))
    assert (pairs[:, 0] < pairs[:, 1]).all() and len(np.unique(pairs, axis=0)) == len(pairs)
    assert {tuple(p) for p in pairs} == expected
    # the IVF index of large runs finds the same pairs when it searches every list
    ivf = knn.neighbour_pairs(x, knn.KnnOptions(k=8, index="ivf", cluster_size=50, nprobe=8, use_gpu=False))
    assert {tuple(p) for p in ivf} == expected


def _feature_config(tmp_path, n, iterations=10, extra=()):
    return load_config(None, [
        f"run.output_dir={tmp_path}/out", "tracking.mode=disabled", f"identities.num_identities={n}",
        "identities.block_size=1000", "identities.sampler.kind=langevin", "identities.sampler.langevin.space=feature",
        f"identities.sampler.langevin.iterations={iterations}", "identities.sampler.langevin.search_device=cpu", *extra])


def test_feature_space_langevin_spreads_identities_and_keeps_away_from_real_faces(tmp_path, ray_local):
    """ALGORITHMS.md 2 at test size: 3,000 identities in 512-d, d0 = 1.4 rad, 1,000 real embeddings."""
    np.save(tmp_path / "real.npy", np.random.default_rng(9).standard_normal((1000, 512)).astype(np.float32))
    cfg = _feature_config(tmp_path, 3000, extra=[f"identities.sampler.langevin.real_embeddings={tmp_path}/real.npy"])
    report = run_identities(cfg, progress=False)
    assert report.blocks_written == 3
    summary = json.loads((tmp_path / "out/identities/sampler.json").read_text())
    gaussian, final = summary["gaussian"], summary["final"]
    assert gaussian["pairs_within_d0"] >= 100 and gaussian["within_real"] >= 50  # what independent draws give
    assert final["pairs_within_d0"] * 20 <= gaussian["pairs_within_d0"]
    assert abs(final["min_angle"] - 1.4) <= 0.02 * 1.4
    assert final["within_real"] == 0 and final["nearest_real_angle"] >= 1.4
    assert len(summary["iterations"]) == 10
    first = summary["iterations"][0]
    for key in ("min_angle", "mean_angle", "max_angle", "pairs_within_d0", "within_real", "force_mean", "force_max", "dt"):
        assert key in first
    ids, latents = read_latents(cfg)
    assert np.array_equal(ids, np.arange(3000)) and latents.shape == (3000, 512)
    np.testing.assert_allclose(np.linalg.norm(latents, axis=1), 1.0, atol=1e-5)
    # a rerun finds the stage done
    assert run_identities(cfg, progress=False).blocks_skipped == 3


def test_langevin_resumes_from_its_checkpoint_to_the_same_particles(tmp_path, monkeypatch, ray_local):
    extra = ["identities.sampler.langevin.feature_dim=32", "identities.sampler.langevin.d0=1.2",
             "identities.sampler.langevin.checkpoint_every=5", "identities.block_size=100"]
    whole = _feature_config(tmp_path / "a", 300, iterations=12, extra=extra)
    run_identities(whole, progress=False)
    broken = _feature_config(tmp_path / "b", 300, iterations=12, extra=extra)
    original_step = LangevinSampler.step

    def crash_at_8(self, state, rebuild):
        if state.iteration == 8:
            raise KeyboardInterrupt("killed")
        return original_step(self, state, rebuild)

    # the Langevin task itself, killed at iteration 8 in this process (on a cluster: its node dies)
    from facegen.stages.identities import _digest, langevin_task

    monkeypatch.setattr(LangevinSampler, "step", crash_at_8)
    with pytest.raises(KeyboardInterrupt):
        langevin_task(broken.model_dump_json(), broken.stage_dir("identities"), _digest(broken), lambda *a: None)
    assert not (tmp_path / "b/out/identities/sampler.json").exists()
    monkeypatch.setattr(LangevinSampler, "step", original_step)
    run_identities(broken, progress=False)
    summary = json.loads((tmp_path / "b/out/identities/sampler.json").read_text())
    assert summary["resumed_from_iteration"] == 5 and len(summary["iterations"]) == 12
    np.testing.assert_array_equal(read_latents(broken)[1], read_latents(whole)[1])


def test_reference_embeddings_from_parquet_and_their_errors(tmp_path):
    rows = np.random.default_rng(1).standard_normal((5, 8)).astype(np.float32)
    pq.write_table(pa.table({"embedding": pa.array(rows.tolist(), pa.list_(pa.float32(), 8))}), tmp_path / "real.parquet")
    loaded = load_reference_embeddings(str(tmp_path / "real.parquet"), "embedding", 8)
    np.testing.assert_allclose(loaded, rows / np.linalg.norm(rows, axis=1, keepdims=True), rtol=1e-6)
    with pytest.raises(ValueError, match=r"real.parquet: real embeddings must have shape \[M, 16\]"):
        load_reference_embeddings(str(tmp_path / "real.parquet"), "embedding", 16)
    with pytest.raises(ValueError, match="no column 'emb'"):
        load_reference_embeddings(str(tmp_path / "real.parquet"), "emb", 8)
    with pytest.raises(FileNotFoundError, match="real_embeddings: .*gone.npy: no such file or folder"):
        load_reference_embeddings(str(tmp_path / "gone.npy"), "embedding", 8)


def test_brownian_noise_on_the_sphere_is_scaled_to_the_dimension():
    """Without forces a particle moves about eta0 * sqrt(dt) radians per step, whatever the dimension;
    the step cap (dt_max, 1.0 by default) is what sets dt there."""
    for dim in (64, 512):
        settings = LangevinSettings(space="feature", eta0=0.01, k=0.0, search_device="cpu")
        sampler = LangevinSampler(settings, FeatureSpace())
        from facegen.identities.langevin import LangevinState

        start = _unit(200, dim, 3)
        state = LangevinState(start.copy(), 0, np.random.default_rng(0))
        stats = sampler.step(state, rebuild=True)
        assert stats["dt"] == 1.0 and stats["dt_capped"]
        moved = np.arccos(np.clip((state.particles * start).sum(axis=1), -1, 1))
        assert 0.008 < moved.mean() < 0.012


def test_without_dt_max_the_step_is_the_papers_adaptive_rule():
    """dt = tau * mu * min pair distance / max force, uncapped; with no force at all nothing moves."""
    from facegen.identities.langevin import LangevinState

    start = _unit(300, 32, 4)
    for cap, expect_capped in ((None, False), (0.05, True)):
        sampler = LangevinSampler(LangevinSettings(space="feature", d0=1.3, tau=0.3, mu=2.0, dt_max=cap, search_device="cpu"), FeatureSpace())
        stats = sampler.step(LangevinState(start.copy(), 0, np.random.default_rng(0)), rebuild=True)
        adaptive = 0.3 * 2.0 * stats["min_distance"] / stats["force_max"]
        assert stats["force_max"] > 0 and stats["dt_capped"] == expect_capped
        assert stats["dt"] == pytest.approx(adaptive if cap is None else cap, rel=1e-6)
    assert adaptive > 0.05
    still = LangevinSampler(LangevinSettings(space="feature", k=0.0, dt_max=None, search_device="cpu"), FeatureSpace())
    state = LangevinState(start.copy(), 0, np.random.default_rng(0))
    assert still.step(state, rebuild=True)["dt"] == 0.0
    np.testing.assert_allclose(state.particles, start, atol=1e-6)  # renormalised, not moved


def test_latent_space_langevin_pushes_dcgan_identities_apart_through_g_and_the_embedder(tmp_path, force_embedder, ray_local):
    from facegen.generators.gan import build_gan
    from facegen.identities.encoder import ForceEmbedder, IdentityEncoder

    base = [f"run.output_dir={tmp_path}/out", "tracking.mode=disabled", "identities.num_identities=24", "identities.block_size=12",
            "generator.backend=dcgan", "generator.device=cpu", f"generator.embedder.path={force_embedder}"]
    cfg = load_config(None, base)
    gan = build_gan(cfg.generator)
    encoder = IdentityEncoder(gan, ForceEmbedder(cfg.generator.embedder), 24)
    start = gan.gaussian_latents(0, np.arange(24))
    e = encoder.embed(start)
    angles = np.arccos(np.clip((e @ e.T)[np.triu_indices(24, 1)], -1, 1))
    d0 = float(np.quantile(angles, 0.3))  # a radius that 30 % of the gaussian pairs violate
    cfg = load_config(None, base + ["identities.sampler.kind=langevin", "identities.sampler.langevin.iterations=4",
                                    f"identities.sampler.langevin.d0={d0}", "identities.sampler.langevin.neighbours=23",
                                    "identities.sampler.langevin.search_device=cpu", "identities.sampler.langevin.eta0=0.0"])
    run_identities(cfg, progress=False)
    summary = json.loads((tmp_path / "out/identities/sampler.json").read_text())
    assert summary["space"] == "latent" and summary["latent_dim"] == 100 and summary["embedding_dim"] == 32
    assert summary["gaussian"]["pairs_within_d0"] == int((angles < d0).sum())
    assert summary["final"]["pairs_within_d0"] < 0.7 * summary["gaussian"]["pairs_within_d0"]
    assert all(it["force_max"] > 0 for it in summary["iterations"])
    # the paper's step (the fastest particle moves tau = 0.3 of the closest pair's distance) under the dt_max cap of 1
    for it in summary["iterations"]:
        adaptive = 0.3 * it["min_distance"] / it["force_max"]
        assert it["dt"] == pytest.approx(min(adaptive, 1.0), rel=1e-6) and it["dt_capped"] == (adaptive > 1.0)
    ids, latents = read_latents(cfg)
    assert latents.shape == (24, 100) and not np.allclose(latents, start)


@pytest.mark.slow
def test_cli_identities_prints_the_sampler_figures_and_names_a_bad_real_file(tmp_path, ray_local):
    from typer.testing import CliRunner

    from facegen.cli import app

    base = ["--set", f"run.output_dir={tmp_path}/out", "--set", "tracking.mode=disabled", "--set", "identities.num_identities=200",
            "--set", "identities.sampler.kind=langevin", "--set", "identities.sampler.langevin.space=feature",
            "--set", "identities.sampler.langevin.feature_dim=32", "--set", "identities.sampler.langevin.d0=1.3",
            "--set", "identities.sampler.langevin.iterations=3", "--set", "identities.sampler.langevin.search_device=cpu"]
    result = CliRunner().invoke(app, ["identities", "--no-progress", *base], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "pairs_within_d0 gaussian" in result.output and "pairs_within_d0 langevin" in result.output
    bad = CliRunner().invoke(app, ["identities", *base, "--set", "run.overwrite=true",
                                   "--set", f"identities.sampler.langevin.real_embeddings={tmp_path}/none.npy"], terminal_width=200)
    # the path check runs before Ray and the sampler: one line naming the setting
    assert bad.exit_code == 2 and f"identities.sampler.langevin.real_embeddings: {tmp_path}/none.npy: no such file" in bad.output
    assert "Traceback" not in bad.output


def test_new_sampler_settings_sample_again(tmp_path, ray_local):
    extra = ["identities.sampler.langevin.feature_dim=16", "identities.block_size=20", "identities.sampler.langevin.d0=1.2"]
    run_identities(_feature_config(tmp_path, 40, iterations=2, extra=extra), progress=False)
    before = read_latents(_feature_config(tmp_path, 40, iterations=2, extra=extra))[1]
    changed = _feature_config(tmp_path, 40, iterations=2, extra=extra + ["identities.sampler.langevin.d0=1.0"])
    assert run_identities(changed, progress=False).blocks_written == 2  # not "done": sampled under other settings
    assert not np.allclose(read_latents(changed)[1], before)


def test_generation_reads_the_sampled_latents_and_their_digest(tmp_path, ray_local):
    from facegen import blocks as blk
    from facegen.generators.gan_backend import GanGenerator
    from facegen.stages.identity_blocks import identity_block_inputs, with_latents

    base = [f"run.output_dir={tmp_path}/out", "tracking.mode=disabled", "identities.num_identities=4",
            "identities.block_size=2", "generator.backend=dcgan", "generator.device=cpu", "generator.images_per_identity=2"]
    langevin = load_config(None, base + ["identities.sampler.kind=langevin"])
    with pytest.raises(FileNotFoundError, match="identities.sampler.kind is langevin but the sampler has not run"):
        identity_block_inputs(langevin, blk.plan_blocks(langevin.identities))
    cfg = load_config(None, base)
    planned = blk.plan_blocks(cfg.identities)
    assert identity_block_inputs(cfg, planned) is None  # no sampler run: the backend draws the same gaussian latents
    run_identities(cfg, progress=False)
    row_inputs, digest = identity_block_inputs(cfg, planned)
    assert row_inputs(planned[1]) == {"identity_block": blk.block_path(cfg.stage_dir("identities"), 1)}
    generate = with_latents(GanGenerator(cfg.generator, cfg.run.seed), row_inputs(planned[1])["identity_block"])
    out = generate({"identity_id": np.array([2, 3]), "block_id": np.array([1, 1])})
    assert list(out["status"]) == ["ok"] * 4 and all(json.loads(m)["latent"] == "sampled" for m in out["meta"])
    with pytest.raises(ValueError, match="no latent for identities \\[0\\]"):
        generate({"identity_id": np.array([0]), "block_id": np.array([0])})
    # identities sampled again with other latents give the raw blocks another digest: generation redoes them
    reseeded = load_config(None, base + ["run.seed=1"])
    assert run_identities(reseeded, progress=False).blocks_written == 2
    assert identity_block_inputs(reseeded, planned)[1] != digest
