"""Identity features for feature-conditioned generators: Vec2Face's sampler (Gaussian / PCA, faiss
pairwise filter) in the identities stage, read by the hybrid backend with ``reference.backend:
identities`` (tiny Arc2Face through Ray generation, tiny Vec2Face and CemiFace through the block
path), and refused by a GAN in one line."""

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from facegen.config import ConfigError, load_config  # noqa: E402
from facegen.config.identities import Vec2FaceSamplerSettings  # noqa: E402
from facegen.identities.feature_sampler import draw_candidates, fit_pca, sample_feature_identities  # noqa: E402


def _max_offdiagonal_cosine(features: np.ndarray) -> float:
    units = features / np.linalg.norm(features, axis=1, keepdims=True)
    gram = units.astype(np.float64) @ units.T.astype(np.float64)
    np.fill_diagonal(gram, -1.0)
    return float(gram.max())


def test_gaussian_sampling_leaves_no_pair_above_the_threshold_and_records_the_largest():
    settings = Vec2FaceSamplerSettings(dim=128, max_similarity=0.3, candidates_per_round=512, search_device="cpu")
    features, figures = sample_feature_identities(settings, 7, 3000)
    assert features.shape == (3000, 128) and features.dtype == np.float32
    largest = _max_offdiagonal_cosine(features)  # every pair, exactly
    assert largest < 0.3
    assert figures["max_pairwise_similarity"] == pytest.approx(largest, abs=2e-6)
    # without the filter the same stream has many pairs above it: the filter is what removed them
    raw = np.concatenate([draw_candidates(7, r, 512, 128) for r in range(6)])[:3000]
    units = raw / np.linalg.norm(raw, axis=1, keepdims=True)
    assert int((np.triu(units @ units.T, 1) >= 0.3).sum()) > 500
    assert figures["candidates"] > 3000 and figures["acceptance"] == pytest.approx(3000 / figures["candidates"], abs=1e-4)
    # features keep their drawn norm (about sqrt(128)), and fewer identities are a prefix of more
    assert figures["norm_mean"] == pytest.approx(np.sqrt(128), rel=0.02)
    fewer, _ = sample_feature_identities(settings, 7, 700)
    assert np.array_equal(fewer, features[:700])


def test_pca_sampling_draws_from_the_class_centres_normal():
    rng = np.random.default_rng(0)
    axes = np.linalg.qr(rng.standard_normal((32, 32)))[0].T  # orthonormal rows
    spread = np.geomspace(4.0, 0.1, 32)
    mean = np.zeros(32)
    mean[0] = 3.0
    centres = mean + (rng.standard_normal((6000, 32)) * spread) @ axes
    model = fit_pca(centres)
    assert model.std[0] == pytest.approx(4.0, rel=0.05) and np.abs(model.axes[0] @ axes[0]) > 0.99

    settings = Vec2FaceSamplerSettings(distribution="pca", centres="centres.npy", max_similarity=1.0, candidates_per_round=4000,
                                       search_device="cpu")
    drawn, figures = sample_feature_identities(settings, 1, 4000, centres)
    assert figures["dim"] == 32 and figures["components"] == 32
    np.testing.assert_allclose(drawn.mean(axis=0), mean, atol=0.2)
    along = (drawn - mean) @ axes[:3].T
    np.testing.assert_allclose(along.std(axis=0), spread[:3], rtol=0.06)  # the centres' spread on each axis
    two = Vec2FaceSamplerSettings(distribution="pca", centres="centres.npy", components=2, max_similarity=1.0,
                                  search_device="cpu")
    flat, _ = sample_feature_identities(two, 1, 200, centres)
    residual = (flat - model.mean) - ((flat - model.mean) @ model.axes[:2].T) @ model.axes[:2]
    assert np.abs(residual).max() < 1e-3  # two components: draws stay in their plane
    filtered, figures = sample_feature_identities(settings.model_copy(update={"max_similarity": 0.9}), 1, 300, centres)
    assert _max_offdiagonal_cosine(filtered) < 0.9 and figures["max_pairwise_similarity"] < 0.9


def test_bad_sampler_settings_fail_in_one_line():
    settings = Vec2FaceSamplerSettings(dim=8, max_similarity=-0.5, candidates_per_round=64, max_candidates_ratio=2,
                                       search_device="cpu")
    with pytest.raises(ValueError, match=r"^identities.sampler.vec2face.max_similarity: only \d of 50 identities"):
        sample_feature_identities(settings, 0, 50)
    with pytest.raises(ConfigError, match="identities.sampler.vec2face: centres: distribution pca fits class-centre"):
        load_config(None, ["identities.sampler.kind=vec2face", "identities.sampler.vec2face.distribution=pca"])


def test_a_gan_refuses_feature_identities_and_a_feature_generator_refuses_latents_in_one_line():
    with pytest.raises(ConfigError) as gan:
        load_config(None, ["generator.backend=dcgan", "identities.sampler.kind=vec2face"])
    line = str(gan.value)
    assert "\n" not in line and "vec2face makes identity features, which generator.backend dcgan would read as latents" in line
    with pytest.raises(ConfigError, match="langevin makes identity features, which generator.backend stylegan2"):
        load_config(None, ["generator.backend=stylegan2", "identities.sampler.kind=langevin",
                           "identities.sampler.langevin.space=feature"])
    hybrid = ["generator.backend=hybrid", "generator.hybrid.reference.backend=identities", "generator.hybrid.embedder.kind=dlib"]
    with pytest.raises(ConfigError, match="reference.backend: identities reads identity features; set identities.sampler.kind"):
        load_config(None, hybrid)
    with pytest.raises(ConfigError, match="feature_norm: own takes each feature's own norm, but Langevin's feature identities are unit"):
        load_config(None, hybrid + ["identities.sampler.kind=langevin", "identities.sampler.langevin.space=feature",
                                    "generator.hybrid.expander=vec2face", "generator.hybrid.vec2face.checkpoint=v.pth"])
    assert load_config(None, hybrid + ["identities.sampler.kind=vec2face", "generator.hybrid.expander=vec2face",
                                       "generator.hybrid.vec2face.checkpoint=v.pth"])


@pytest.fixture(scope="module")
def arc2face(tmp_path_factory):
    from facegen.testing.tiny_diffusers import build_tiny_arc2face

    return build_tiny_arc2face(str(tmp_path_factory.mktemp("a2f")))


def _run_config(tmp_path, arc2face):
    a2f = {"unet": arc2face["models"], "encoder": arc2face["models"], "base_model": arc2face["base"],
           "num_inference_steps": 2, "height": 64, "width": 64, "local_files_only": True, "micro_batch": 2}
    sets = {"run.output_dir": str(tmp_path / "out"), "tracking.mode": "disabled",
            "identities.num_identities": 4, "identities.block_size": 2, "identities.sampler.kind": "vec2face",
            "identities.sampler.vec2face.dim": 128, "identities.sampler.vec2face.candidates_per_round": 64,
            "identities.sampler.vec2face.search_device": "cpu", "identities.sampler.pool.num_cpus": 0.5,
            "generator.backend": "hybrid", "generator.images_per_identity": 2, "generator.batch_size": 2,
            "generator.pool.num_cpus": 0.5, "generator.hybrid.reference.backend": "identities",
            "generator.hybrid.detector.kind": "dlib", "generator.hybrid.embedder.kind": "dlib",
            "generator.hybrid.expander": "arc2face", "generator.hybrid.measure_similarity": False,
            "generator.hybrid.expansion.mode": "band", "generator.hybrid.expansion.band": "[0.55, 0.8]",
            **{f"generator.hybrid.arc2face.{k}": v for k, v in a2f.items()},
            "faces.detector.kind": "none", "faces.embedder.kind": "dlib", "faces.image_format": "png", "faces.batch_size": 8}
    return load_config(None, [f"{k}={v}" for k, v in sets.items()])


@pytest.mark.slow
def test_sampled_features_reach_a_tiny_arc2face_through_generation(tmp_path, arc2face, ray_local):
    from facegen import blocks as blk
    from facegen import storage
    from facegen.stages.generate import run_generate
    from facegen.stages.identities import run_identities
    from facegen.stages.identity_blocks import identity_block_inputs, read_latents

    cfg = _run_config(tmp_path, arc2face)
    with pytest.raises(FileNotFoundError, match="identities.sampler.kind is vec2face but the sampler has not run"):
        identity_block_inputs(cfg, blk.plan_blocks(cfg.identities))
    report = run_identities(cfg, progress=False)
    assert report.totals["candidates drawn"] >= 4 and report.totals["max pairwise cosine"] < 0.3
    summary = storage.read_json(f"{cfg.stage_dir('identities')}/sampler.json")
    assert summary["space"] == "feature" and summary["latent_dim"] == 128 and summary["unit_norm"] is False
    ids, features = read_latents(cfg)
    assert _max_offdiagonal_cosine(features) < 0.3

    generated = run_generate(cfg, progress=False)
    assert generated.totals["images"] == 8 and generated.totals["images_ok"] == 8
    table = storage.read_table(blk.block_path(cfg.stage_dir("raw"), 1))
    assert set(table.column("source").to_pylist()) == {"hybrid:identities+arc2face"}
    norms = dict(zip(ids.tolist(), np.linalg.norm(features.astype(np.float64), axis=1)))
    for identity_id, meta in zip(table.column("identity_id").to_pylist(), table.column("meta").to_pylist()):
        reference = json.loads(meta)["reference"]  # each row was made from its identity's sampled feature
        assert reference == {"backend": "identities", "feature_norm": round(norms[identity_id], 4)}

    # the same identities handed to a GAN: one line before any block is made
    gan = load_config(None, [f"run.output_dir={tmp_path}/out", "generator.backend=dcgan", "identities.num_identities=4",
                             "identities.block_size=2"])
    with pytest.raises(ValueError, match="holds identity features, but generator.backend dcgan reads identity latents"):
        identity_block_inputs(gan, blk.plan_blocks(gan.identities))

    # a tiny Vec2Face (in memory) and a tiny CemiFace read the same identity blocks through the block path
    _vec2face_reads_the_blocks(cfg, ids, features)
    _cemiface_reads_the_blocks(cfg, ids, features, tmp_path)


def _vec2face_reads_the_blocks(cfg, ids, features):
    import torch

    from facegen import blocks as blk
    from facegen.config import Vec2FaceSettings
    from facegen.generators.hybrid import HybridGenerator
    from facegen.generators.vec2face import Vec2FaceExpander
    from facegen.models.vec2face import Vec2Face
    from facegen.stages.identity_blocks import with_latents

    torch.manual_seed(0)
    small = Vec2Face(embed_dim=64, depth=1, num_heads=4, decoder_embed_dim=64, decoder_depth=1, decoder_num_heads=4,
                     decoder_ch=32, feature_dim=128)
    hybrid = cfg.generator.hybrid.model_copy(update={"expander": "vec2face", "vec2face": Vec2FaceSettings(micro_batch=2),
                                                     "expansion": cfg.generator.hybrid.expansion.model_copy(
                                                         update={"mode": "noise", "sigmas": [0.2], "shares": [1.0],
                                                                 "feature_norm": "own", "preset": None})})
    settings = cfg.generator.model_copy(update={"hybrid": hybrid})

    class Seen(Vec2FaceExpander):
        features: list = []

        def render(self, conditioning, sample_seeds, phrases=None):
            self.features.append(np.asarray(conditioning, np.float64))
            return super().render(conditioning, sample_seeds, phrases)

    generator = HybridGenerator(settings, seed=0, expander=Seen(hybrid.vec2face, model=small))
    source = with_latents(generator, blk.block_path(cfg.stage_dir("identities"), 0))
    out = source({"identity_id": np.array([0, 1], np.int64), "block_id": np.zeros(2, np.int64)})
    assert out["status"].tolist() == ["ok"] * 4 and set(out["source"]) == {"hybrid:identities+vec2face"}
    drawn = np.concatenate(Seen.features)  # 2 identities x 2 samples, in order
    own = np.repeat(np.linalg.norm(features[:2].astype(np.float64), axis=1), 2)
    np.testing.assert_allclose(np.linalg.norm(drawn, axis=1), own, rtol=1e-5)  # each at its identity's own norm
    cosines = [drawn[i] @ features[i // 2] / (np.linalg.norm(drawn[i]) * np.linalg.norm(features[i // 2])) for i in range(4)]
    assert min(cosines) > 0.9  # sigma 0.2 per dimension around a feature of norm ~11: its own identity
    alone = generator.regenerate(1, 1, feature=features[1])
    assert alone["image"] == out["image"][3]
    with pytest.raises(ValueError, match=r"identity features are \(64,\)-wide, generator.hybrid.embedder \(dlib\) gives 128"):
        generator({"identity_id": np.array([0]), "block_id": np.array([0]), "latent": np.ones((1, 64))})


def _cemiface_reads_the_blocks(cfg, ids, features, tmp_path):
    from facegen import blocks as blk
    from facegen.config import CemiFaceSettings
    from facegen.generators.hybrid import HybridGenerator
    from facegen.models.cemiface import CemiFaceUNet, noise_scheduler, save_generator
    from facegen.stages.identity_blocks import with_latents

    import torch

    torch.manual_seed(0)
    model = CemiFaceUNet(image_size=16, id_dim=128, similarity_dim=8, context_tokens=2, cross_attention_dim=16,
                         block_out_channels=(16, 32), layers_per_block=1, attention_head_dim=4, norm_num_groups=8)
    save_generator(str(tmp_path / "cemiface"), model.eval(), dict(noise_scheduler(1000).config),
                   {"embedder": {"kind": "dlib", "dim": 128}})
    hybrid = cfg.generator.hybrid.model_copy(update={"expander": "cemiface", "cemiface": CemiFaceSettings(
        model=str(tmp_path / "cemiface"), ddim_steps=2, micro_batch=2, similarity=[0.0, 0.5])})
    generator = HybridGenerator(cfg.generator.model_copy(update={"hybrid": hybrid}), seed=0)
    source = with_latents(generator, blk.block_path(cfg.stage_dir("identities"), 1))
    out = source({"identity_id": np.array([2, 3], np.int64), "block_id": np.ones(2, np.int64)})
    assert out["status"].tolist() == ["ok"] * 4 and set(out["source"]) == {"hybrid:identities+cemiface"}
    assert out["requested_similarity"].tolist() == [0.0, 0.5, 0.0, 0.5]
    other = generator({"identity_id": np.array([2]), "block_id": np.array([1]), "latent": features[3:4]})
    assert other["image"][0] != out["image"][0]  # another identity feature, another image at the same seed
