"""Input paths named by the settings are checked before Ray starts: one line naming the field."""

from typer.testing import CliRunner

from facegen.cli import app
from facegen.config import config_from_dict
from facegen.preflight import check_input_paths, input_paths


def test_a_missing_checkpoint_fails_in_one_line_before_ray_starts():
    import ray

    started_before = ray.is_initialized()
    result = CliRunner().invoke(app, ["generate", "--set", "faces.embedder.path=/nope"], terminal_width=300)
    assert result.exit_code == 2
    assert result.output.strip() == "error: settings: faces.embedder.path: /nope: no such file or folder"
    assert ray.is_initialized() == started_before  # nothing was started for it


def test_every_marked_input_path_is_checked(tmp_path):
    good = tmp_path / "lfw.bin"
    good.write_bytes(b"x")
    cfg = config_from_dict({"eval": {"bins": [str(good), str(tmp_path / "agedb_30.bin")]},
                            "generator": {"diffusion": {"model": "stabilityai/sd-turbo"}}}, "test")
    fields = {field for field, _, _ in input_paths(cfg)}
    # the hybrid reference model is a hub id by default: listed, but only a path-like value is checked
    assert fields == {"eval.bins[0]", "eval.bins[1]", "generator.diffusion.model",
                      "generator.hybrid.reference.text_to_image.model"}
    try:
        check_input_paths(cfg, "x.yaml")
    except ValueError as exc:
        assert str(exc) == f"x.yaml: eval.bins[1]: {tmp_path / 'agedb_30.bin'}: no such file or folder"
    else:
        raise AssertionError("a missing .bin set passed the check")
    cfg.eval.bins = [str(good)]
    check_input_paths(cfg)  # a hub id is not a path: not checked
    cfg.generator.diffusion.model = str(tmp_path / "sd")
    try:
        check_input_paths(cfg)
    except ValueError as exc:
        assert "generator.diffusion.model" in str(exc)
    else:
        raise AssertionError("a missing local model folder passed the check")


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
    try:
        check_input_paths(cfg, "gan.yaml")
    except ValueError as exc:
        assert str(exc) == f"gan.yaml: identities.sampler.langevin.real_embeddings: {tmp_path / 'real.npy'}: no such file or folder"
    else:
        raise AssertionError("a missing real-embeddings file passed the check")
