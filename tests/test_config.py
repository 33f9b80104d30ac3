"""Settings: YAML + overrides, and one-line errors naming the file and the field."""

from pathlib import Path

import pytest

from facegen.config import ConfigError, FacegenConfig, config_from_dict, load_config, parse_override


def test_repo_configs_load():
    names = sorted(str(p) for p in Path("configs").glob("*.yaml"))  # every shipped config, so none goes stale
    assert {"configs/local.yaml", "configs/hybrid.yaml", "configs/langevin_disco.yaml", "configs/gan_local.yaml"} <= set(names)
    for name in names:
        cfg = load_config(name)
        assert isinstance(cfg, FacegenConfig)
        assert cfg.train.batch_size % cfg.train.data.streams == 0, name  # the global batch splits over the streams
    assert load_config("configs/local.yaml").generator.backend == "parametric"
    assert load_config("configs/sd_cluster.yaml").train.arch == "iresnet50"
    assert load_config("configs/local.yaml").faces.detector.kind == "none"  # the renderer's landmarks
    assert load_config("configs/ingest.yaml").faces.embedder.kind == "dlib"


def test_overrides_parse_yaml_values(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train: {epochs: 3}\n")
    cfg = load_config(path, ["train.epochs=5", "train.lr_steps=[1, 2]", "generator.pool.resources={generation: 0.5}", "run.name=x y"])
    assert cfg.train.epochs == 5
    assert cfg.train.lr_steps == [1, 2]
    assert cfg.generator.pool.resources == {"generation": 0.5}
    assert cfg.run.name == "x y"
    assert parse_override("a.b=") == ("a.b", "")


def test_bad_value_names_file_and_field(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  lr: -1\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: train.lr: ")


def test_unknown_key_and_override_errors(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("generator:\n  backnd: diffusion\n")
    with pytest.raises(ConfigError, match=r"typo.yaml: generator: backnd: Extra inputs are not permitted \(a backend's own section is named after it"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"generator.backend: unknown backend 'gan', expected one of parametric, diffusion, hybrid, stylegan2, dcgan \(got 'gan'\)"):
        config_from_dict({}, "x.yaml", ["generator.backend=gan"])
    with pytest.raises(ConfigError, match="expected key.path=value"):
        config_from_dict({}, "x.yaml", ["train.epochs"])
    with pytest.raises(ConfigError, match="is a value"):
        config_from_dict({"train": {"epochs": 2}}, "x.yaml", ["train.epochs.x=1"])


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("train: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(broken)
    listed = tmp_path / "list.yaml"
    listed.write_text("- 1\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(listed)


def test_cross_field_checks():
    with pytest.raises(ConfigError, match="clean.dbscan: t_min must not exceed t_max"):
        config_from_dict({"clean": {"dbscan": {"t_min": 0.8, "t_max": 0.4}}}, "x.yaml")


def test_digest_is_stable_and_sensitive():
    a, b = FacegenConfig(), FacegenConfig()
    assert a.digest() == b.digest()
    b.train.epochs = 3
    assert a.digest() != b.digest()


def test_the_old_pool_fields_still_load_and_mixing_both_spellings_names_the_new_one():
    old = config_from_dict({"generator": {"concurrency": 3, "num_gpus": 0.5, "resources": {"generation": 0.5}},
                            "faces": {"num_cpus": 0.25}, "clean": {"concurrency": 2},
                            "identities": {"sampler": {"num_gpus": 1}}}, "old.yaml")
    pool = old.generator.pool
    assert (pool.min_size, pool.max_size, pool.num_gpus, pool.resources) == (3, 3, 0.5, {"generation": 0.5})
    assert old.faces.pool.num_cpus == 0.25 and old.clean.pool.largest == 2 and old.identities.sampler.pool.num_gpus == 1
    new = load_config(None, ["generator.pool.min_size=2", "generator.pool.max_size=8"])
    assert new.generator.pool.largest == 8 and new.generator.pool.ray_resources() == {"CPU": 0.5}
    with pytest.raises(ConfigError, match=r"^x.yaml: generator: concurrency is now pool.min_size; give only pool.min_size"):
        config_from_dict({"generator": {"concurrency": 3, "pool": {"min_size": 2}}}, "x.yaml")
    with pytest.raises(ConfigError, match=r"generator.pool: max_size \(1\) must be >= min_size \(2\)"):
        config_from_dict({"generator": {"pool": {"min_size": 2, "max_size": 1}}}, "x.yaml")


def test_every_yaml_example_in_the_readme_is_a_valid_config():
    import re

    import yaml

    blocks = re.findall(r"```yaml\n(.*?)```", (Path(__file__).resolve().parents[1] / "README.md").read_text(), re.S)
    assert len(blocks) >= 2
    for block in blocks:
        config_from_dict(yaml.safe_load(block), "README.md")


def test_devices_are_checked_when_the_config_loads_and_the_old_search_switch_still_reads():
    with pytest.raises(ConfigError, match=r"--set faces.embedder.device=cuda:O: faces.embedder.device: 'cuda:O': expected auto, cpu, cuda, cuda:N or mps"):
        load_config(None, ["faces.embedder.device=cuda:O"])
    assert load_config(None, ["generator.device=cuda:1"]).generator.device == "cuda:1"
    old = FacegenConfig.model_validate({"identities": {"sampler": {"langevin": {"search_on_gpu": False},
                                                                   "vec2face": {"search_on_gpu": True}}}})
    assert (old.identities.sampler.langevin.search_device, old.identities.sampler.vec2face.search_device) == ("cpu", "auto")
    with pytest.raises(ConfigError, match="search_on_gpu is now search_device"):
        load_config(None, ["identities.sampler.langevin.search_on_gpu=false", "identities.sampler.langevin.search_device=cpu"])


def test_an_unknown_embedder_kind_fails_in_one_line():
    with pytest.raises(ConfigError, match=r"^run.yaml: faces.embedder: kind: unknown embedder kind "
                                          r"'facenet', expected one of facegen, arcface_torch, onnx, dlib$"):
        config_from_dict({"faces": {"embedder": {"kind": "facenet"}}}, "run.yaml")


def test_a_kind_error_inside_a_section_blames_the_set_that_gave_it(tmp_path):
    """A section's own validator names the field inside it; a --set of that field is what the user typed."""
    path = tmp_path / "run.yaml"
    path.write_text("faces: {detector: {kind: mtcnn}}\n")
    with pytest.raises(ConfigError) as bad_kind:
        load_config(str(path), ["faces.embedder.kind=nope"])
    assert str(bad_kind.value).startswith("--set faces.embedder.kind=nope: faces.embedder: kind: unknown embedder kind 'nope'")
    with pytest.raises(ConfigError) as bad_field:
        load_config(str(path), ["faces.detector.mtcnn_min_face=5"])
    assert str(bad_field.value).startswith("--set faces.detector.mtcnn_min_face=5: faces.detector: mtcnn_min_face: Input "
                                           "should be greater than or equal to 12")
    path.write_text("faces: {detector: {kind: mtcnn, mtcnn_min_face: 5}}\n")
    with pytest.raises(ConfigError) as from_file:
        load_config(str(path), ["faces.detector.min_size=30"])
    assert str(from_file.value).startswith(f"{path}: faces.detector: mtcnn_min_face:")
