"""Input paths named by the settings are checked before Ray starts: one line naming the field."""

import pytest
from typer.testing import CliRunner

from facegen.cli import app
from facegen.config import config_from_dict
from facegen.preflight import check_input_paths, input_paths


def test_a_missing_checkpoint_fails_in_one_line_before_ray_starts():
    import ray

    started_before = ray.is_initialized()
    result = CliRunner().invoke(app, ["generate", "--set", "faces.embedder.path=/nope"], terminal_width=300)
    assert result.exit_code == 2
    assert result.output.strip() == "error: --set faces.embedder.path=/nope: faces.embedder.path: /nope: no such file or folder"
    assert ray.is_initialized() == started_before  # nothing was started for it


def test_every_marked_input_path_is_checked(tmp_path):
    good = tmp_path / "lfw.bin"
    good.write_bytes(b"x")
    cfg = config_from_dict({"eval": {"bins": [str(good), str(tmp_path / "agedb_30.bin")]},
                            "generator": {"diffusion": {"model": "stabilityai/sd-turbo"}}}, "test")
    fields = {field for field, _, _ in input_paths(cfg)}
    # the hybrid models are hub ids by default: listed, but only a path-like value is checked
    assert fields == {"eval.bins[0]", "eval.bins[1]", "generator.diffusion.model",
                      "generator.hybrid.reference.text_to_image.model", "generator.hybrid.arc2face.unet",
                      "generator.hybrid.arc2face.encoder", "generator.hybrid.arc2face.base_model"}
    with pytest.raises(ValueError) as missing_bin:
        check_input_paths(cfg, "x.yaml")
    assert str(missing_bin.value) == f"x.yaml: eval.bins[1]: {tmp_path / 'agedb_30.bin'}: no such file or folder"
    cfg.eval.bins = [str(good)]
    check_input_paths(cfg)  # a hub id is not a path: not checked
    cfg.generator.diffusion.model = str(tmp_path / "sd")
    with pytest.raises(ValueError, match=r"generator\.diffusion\.model"):
        check_input_paths(cfg)


def test_gan_input_paths_are_marked_and_checked(tmp_path):
    weights = tmp_path / "weights.tar"
    weights.write_bytes(b"x")
    cfg = config_from_dict({"generator": {
        "backend": "stylegan2", "stylegan2": {"checkpoint": str(tmp_path / "ffhq-256.pkl")},
        "dcgan": {"weights": str(weights)}, "embedder": {"path": str(tmp_path / "student")},
        "disco": {"directions": str(tmp_path / "directions.npz")}},
        "identities": {"sampler": {"langevin": {"real_embeddings": str(tmp_path / "real.npy")}}}}, "test")
    fields = {field for field, _, kind in input_paths(cfg) if kind == "required"}
    assert {"generator.stylegan2.checkpoint", "generator.dcgan.weights", "generator.embedder.path",
            "generator.disco.directions", "identities.sampler.langevin.real_embeddings"} <= fields
    with pytest.raises(ValueError) as missing_file:
        check_input_paths(cfg, "gan.yaml")
    assert str(missing_file.value) == (
        f"gan.yaml: identities.sampler.langevin.real_embeddings: {tmp_path / 'real.npy'}: no such file or folder")
