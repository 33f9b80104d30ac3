"""The GAN configs load and carry the settings of ALGORITHMS.md section 2."""

from facegen.config import load_config


def test_langevin_disco_config_is_seed_001s_dataset_on_stylegan2_ffhq256():
    cfg = load_config("configs/langevin_disco.yaml")
    assert cfg.generator.backend == "stylegan2" and cfg.generator.variation == "disco"
    assert cfg.identities.num_identities == 10_000 and cfg.generator.embedder.arch == "iresnet50"
    assert cfg.generator.stylegan2.truncation_psi == 0.7 and cfg.generator.images_per_identity == 64
    lv = cfg.identities.sampler.langevin
    assert cfg.identities.sampler.kind == "langevin" and lv.space == "latent"
    assert (lv.iterations, lv.k, lv.d0, lv.k_l, lv.eta0, lv.tau, lv.batch_size, lv.checkpoint_every) == (100, 1.0, 1.4, 0.1, 0.01, 0.3, 64, 10)
    d = cfg.generator.dispersion
    assert (d.sigma, d.iterations, d.k_e, d.k_w, d.r_w, d.k_g, d.eta0, d.dt) == (0.2, 20, 20.0, 1.0, 12.0, 1.0, 0.05, 0.05)
    assert cfg.identities.sampler.pool.num_gpus == 1


def test_gan_local_config_runs_the_dcgan_with_langevin_and_disco_on_its_fitted_directions():
    cfg = load_config("configs/gan_local.yaml")
    assert cfg.generator.backend == "dcgan" and cfg.generator.variation == "disco"
    assert cfg.generator.disco.fit and cfg.generator.disco.directions is None
    assert cfg.directions.attributes == ["yaw", "pitch", "roll", "illumination"] and cfg.directions.method == "svm"
    assert cfg.identities.sampler.langevin.space == "latent" and cfg.generator.device == "cpu"
    assert cfg.demo.bootstrap_identities > 0 and cfg.demo.heldout_identities > 0


def test_force_embedder_uses_the_faces_embedder_names():
    import pytest

    from facegen.config import ConfigError, config_from_dict

    cfg = config_from_dict({"generator": {"embedder": {"kind": "arcface_torch", "path": "/m/r100.pth", "arch": "iresnet100"}}}, "x.yaml")
    assert (cfg.generator.embedder.kind, cfg.generator.embedder.path, cfg.generator.embedder.arch) == ("arcface_torch", "/m/r100.pth", "iresnet100")
    with pytest.raises(ConfigError, match=r"x.yaml: generator.embedder.*checkpoint was renamed: use generator.embedder.path"):
        config_from_dict({"generator": {"embedder": {"checkpoint": "/m/student"}}}, "x.yaml")
    with pytest.raises(ConfigError, match=r"generator.embedder.*arch: an arcface_torch .pth needs its network"):
        config_from_dict({"generator": {"embedder": {"kind": "arcface_torch", "path": "/m/r100.pth"}}}, "x.yaml")
