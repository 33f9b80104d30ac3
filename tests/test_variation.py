"""Dispersion and DisCo: variants of one identity pulled back to its embedding, covariate directions."""

import json

import numpy as np
import pytest
import torch

from facegen.config import DiscoSettings, DispersionSettings, load_config
from facegen.generators.gan import build_gan
from facegen.identities.encoder import ForceEmbedder, IdentityEncoder
from facegen.identities.variation import covariate_offsets, disperse, load_directions, noise_variants


def _angles(encoder, latents, reference):
    e = encoder.embed(latents)
    r = encoder.embed(reference[None])[0]
    return np.arccos(np.clip(e @ r, -1, 1))


def test_dispersion_keeps_variants_closer_to_the_reference_identity_than_noise_of_the_same_spread(force_embedder):
    cfg = load_config(None, ["generator.backend=dcgan", "generator.device=cpu", f"generator.embedder.path={force_embedder}"])
    gan = build_gan(cfg.generator)
    encoder = IdentityEncoder(gan, ForceEmbedder(cfg.generator.embedder), 16)
    reference = gan.gaussian_latents(0, np.array([3]))[0]
    start = noise_variants(reference, list(range(6)), 0.2)
    settings = DispersionSettings(iterations=4)
    variants, summary = disperse(reference, start, encoder, np.zeros(100, np.float32), settings, np.random.default_rng(0))
    moved = np.linalg.norm(variants - reference, axis=1).mean()
    assert moved > np.linalg.norm(start - reference, axis=1).mean()  # they still vary, more than the start
    matched = noise_variants(reference, list(range(100, 106)), moved / np.sqrt(100))
    assert _angles(encoder, variants, reference).mean() < _angles(encoder, matched, reference).mean()
    assert summary["mean_distance_to_reference"] == pytest.approx(moved, rel=1e-4)
    # the same seeds give the same variants
    again, _ = disperse(reference, start, encoder, np.zeros(100, np.float32), settings, np.random.default_rng(0))
    np.testing.assert_array_equal(again, variants)


def test_disco_directions_spreads_and_offsets(tmp_path):
    vectors = np.zeros((3, 6), np.float32)
    vectors[0, 0], vectors[1, 1], vectors[2, 2] = 2.0, 0.5, 4.0
    np.save(tmp_path / "dirs.npy", vectors)
    units, spreads = load_directions(DiscoSettings(directions=str(tmp_path / "dirs.npy")), 6)
    np.testing.assert_allclose(np.linalg.norm(units, axis=1), 1.0)
    np.testing.assert_allclose(spreads, [2.0, 0.5, 4.0])
    np.savez(tmp_path / "dirs.npz", directions=vectors, spreads=np.array([1.0, 1.0, 1.0]))
    _, spreads = load_directions(DiscoSettings(directions=str(tmp_path / "dirs.npz")), 6)
    np.testing.assert_allclose(spreads, 1.0)
    _, spreads = load_directions(DiscoSettings(directions=str(tmp_path / "dirs.npy"), spreads=[3, 3, 3]), 6)
    np.testing.assert_allclose(spreads, 3.0)
    offsets = covariate_offsets(units, np.array([2.0, 0.5, 4.0], np.float32), 500, 0.5, np.random.default_rng(0))
    assert np.all(offsets[:, 3:] == 0)
    assert np.abs(offsets[:, 0]).max() <= 1.0 and np.abs(offsets[:, 0]).max() > 0.9
    assert np.abs(offsets[:, 2]).max() <= 2.0 and np.abs(offsets[:, 2]).max() > 1.8
    with pytest.raises(ValueError, match=r"dirs.npy: directions must have shape \[K, 8\]"):
        load_directions(DiscoSettings(directions=str(tmp_path / "dirs.npy")), 8)
    with pytest.raises(ValueError, match="3 directions"):
        load_directions(DiscoSettings(directions=str(tmp_path / "dirs.npy"), spreads=[1.0]), 6)
    with pytest.raises(ValueError, match="generator.disco.directions"):
        load_directions(DiscoSettings(), 6)


@pytest.mark.slow
def test_identities_then_disco_generation_on_a_ray_actor_pool(tmp_path, force_embedder, ray_local):
    from facegen import blocks as blk
    from facegen import storage
    from facegen.stages.generate import run_generate
    from facegen.stages.identities import run_identities
    from facegen.stages.identity_blocks import read_latents

    directions = np.random.default_rng(0).standard_normal((7, 100)).astype(np.float32)
    np.save(tmp_path / "dirs.npy", directions)
    cfg = load_config(None, [
        f"run.output_dir={tmp_path}/out", "tracking.mode=disabled", "identities.num_identities=4", "identities.block_size=2",
        "generator.backend=dcgan", "generator.device=cpu", "generator.variation=disco", "generator.images_per_identity=3",
        "generator.batch_size=2", "generator.dispersion.iterations=2", f"generator.disco.directions={tmp_path}/dirs.npy",
        f"generator.embedder.path={force_embedder}", "faces.image_format=png"])
    run_identities(cfg, progress=False)
    ids, latents = read_latents(cfg)
    report = run_generate(cfg, progress=False)
    assert report.blocks_written == 2 and report.totals["images_ok"] == 12
    table = storage.read_table(blk.block_path(cfg.stage_dir("raw"), 0))
    assert table.column("source").to_pylist() == ["dcgan"] * 6
    meta = json.loads(table.column("meta")[0].as_py())
    assert meta["variation"] == "disco" and meta["latent"] == "sampled"
    assert "aligned" not in meta  # aligned from the crop's landmarks, not a centre crop
    assert len(set(table.column("image").to_pylist())) == 6
    assert ids.tolist() == [0, 1, 2, 3] and latents.shape == (4, 100)
