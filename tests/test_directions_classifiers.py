"""ONNX attribute classifiers in ``facegen directions``: a real ONNX model, exported here from a small
torch module, labels the DCGAN's samples; the direction fitted to its score must move that score."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import warnings  # noqa: E402

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from facegen.config import ClassifierSettings, ConfigError, load_config  # noqa: E402
from facegen.identities.classifiers import OnnxAttributeClassifier  # noqa: E402


class MouthBrightness(torch.nn.Module):
    """Column 0: the mean of the crop's lower half (where the mouth is), a 'mouth brightness' score;
    column 1: the mean of its first channel (which channel that is shows the channel order)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        half = x.shape[2] // 2
        return torch.stack([x[:, :, half:].mean(dim=(1, 2, 3)), x[:, 0].mean(dim=(1, 2))], dim=1)


def _export(path, size=64) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(MouthBrightness(), torch.zeros(1, 3, size, size), str(path), input_names=["crop"],
                          output_names=["scores"], dynamic_axes={"crop": {0: "n"}, "scores": {0: "n"}}, dynamo=False)
    return str(path)


def test_the_classifier_reads_crops_as_its_settings_describe(tmp_path):
    path = _export(tmp_path / "mouth.onnx")
    crops = np.random.default_rng(0).integers(0, 256, (5, 112, 112, 3), dtype=np.uint8)
    small = np.stack([cv2.resize(c, (64, 64), interpolation=cv2.INTER_AREA) for c in crops]).astype(np.float64) / 255
    rgb = OnnxAttributeClassifier(ClassifierSettings(path=path, outputs=["mouth", "red"], input_size=64, mean=[0], std=[255]))
    found = rgb(crops)
    assert rgb.names == ["mouth", "red"]
    np.testing.assert_allclose(found["mouth"], small[:, 32:].mean(axis=(1, 2, 3)), atol=1e-5)
    np.testing.assert_allclose(found["red"], small[..., 0].mean(axis=(1, 2)), atol=1e-5)
    bgr = OnnxAttributeClassifier(ClassifierSettings(path=path, outputs=["_", "blue"], input_size=64, channels="bgr",
                                                     mean=[0], std=[255], output="sigmoid"))(crops)
    assert list(bgr) == ["blue"]  # _ is read, not an attribute
    np.testing.assert_allclose(bgr["blue"], 1 / (1 + np.exp(-small[..., 2].mean(axis=(1, 2)))), atol=1e-5)
    softmax = OnnxAttributeClassifier(ClassifierSettings(path=path, outputs=["mouth", "red"], input_size=64,
                                                         mean=[0], std=[255], output="logits"))(crops)
    np.testing.assert_allclose(softmax["mouth"] + softmax["red"], 1.0, atol=1e-6)
    assert ((softmax["mouth"] > 0.5) == (found["mouth"] > found["red"])).all()


def test_classifiers_are_refused_in_one_line(tmp_path):
    from facegen.stages.directions import check_classifiers

    path = _export(tmp_path / "mouth.onnx")

    def cfg(classifier: str):
        return load_config(None, [f"run.output_dir={tmp_path}/out", "generator.backend=dcgan",
                                  f"directions.classifiers=[{{{classifier}}}]"])

    with pytest.raises(ConfigError, match=r"classifiers: outputs \['yaw'\] name a built-in estimator"):
        cfg(f"path: {path}, outputs: [yaw, _], input_size: 64")
    with pytest.raises(ValueError, match=r"^directions.classifiers\[0\]: .*mouth.onnx gives 2 outputs per image but "
                                         r"outputs names 3 \(smile, surprise, scream\); name every column"):
        check_classifiers(cfg(f"path: {path}, outputs: [smile, surprise, scream], input_size: 64"))
    with pytest.raises(ConfigError, match=r"^settings: directions.classifiers\[0\].path: .*gone.onnx: no such file or folder$"):
        check_classifiers(cfg(f"path: {tmp_path}/gone.onnx, outputs: [smile]"))
    with pytest.raises(ValueError, match=r"refused a \[1, 3, 112, 112\] input .*; check input_size, channels and layout$"):
        check_classifiers(cfg(f"path: {path}, outputs: [smile, _]"))  # exported for 64 px

    from typer.testing import CliRunner

    from facegen.cli import app

    given = f"directions.classifiers=[{{path: {tmp_path}/gone.onnx, outputs: [smile]}}]"
    result = CliRunner().invoke(app, ["directions", "--set", "generator.backend=dcgan", "--set", given], terminal_width=400)
    assert result.exit_code == 2  # before Ray, the --set blamed as typed (brackets and all)
    assert result.output.strip() == f"error: --set {given}: directions.classifiers[0].path: {tmp_path}/gone.onnx: no such file or folder"


def test_a_classifier_is_part_of_the_settings_by_its_content(tmp_path):
    from facegen.lineage import settings_digest

    cfg = load_config(None, [f"directions.classifiers=[{{path: {_export(tmp_path / 'm.onnx')}, outputs: [a, b]}}]"])
    before = settings_digest(cfg.directions)
    assert settings_digest(cfg.directions) == before
    _export(tmp_path / "m.onnx", size=32)  # another model at the same path: the directions are fitted again
    assert settings_digest(cfg.directions) != before


@pytest.mark.slow
def test_the_direction_fitted_to_a_classifier_moves_its_score_on_the_dcgan(tmp_path, ray_local):
    from facegen import storage
    from facegen.generators.gan import build_gan
    from facegen.generators.latent import render_latents
    from facegen.identities.directions import estimate_attributes
    from facegen.identities.variation import load_directions
    from facegen.stages.directions import landmark_finder, run_directions, with_fitted_directions
    from facegen.train.generator_fit import spearman

    path = _export(tmp_path / "mouth.onnx")
    cfg = load_config(None, [f"run.output_dir={tmp_path}/out", "tracking.mode=disabled", "generator.backend=dcgan",
                             "generator.device=cpu", "generator.variation=disco", "generator.disco.fit=true",
                             "directions.samples=200", "directions.attributes=[mouth_brightness]",
                             "directions.check_identities=8", "directions.pool.num_cpus=0.5",
                             f"directions.classifiers=[{{path: {path}, outputs: [mouth_brightness, _], input_size: 64, "
                             "mean: [0], std: [255]}]"])
    run_directions(cfg, progress=False)
    summary = storage.read_json(f"{tmp_path}/out/directions/directions.json")
    record = summary["directions"]["mouth_brightness"]
    assert list(summary["directions"]) == ["mouth_brightness"] and record["labels_from"] == "mouth.onnx"
    assert record["labelled"] == summary["detected"] >= 150 and record["check"]["spearman"] >= 0.8, record

    # measured here, on other latents: 9 steps along the direction brighten the mouth region one way
    vectors, spreads = load_directions(with_fitted_directions(cfg).generator.disco, 100)
    gan = build_gan(cfg.generator)
    find = landmark_finder(cfg.directions.detector, cfg.directions.upscale)
    classifier = OnnxAttributeClassifier(cfg.directions.classifiers[0])
    start = gan.gaussian_latents(321, np.arange(8))
    steps = np.linspace(-2, 2, 9)
    means = [np.nanmean(estimate_attributes(render_latents(gan, start + np.float32(s * spreads[0]) * vectors[0], 8), find,
                                            [classifier])["mouth_brightness"]) for s in steps]
    assert spearman(steps, means) >= 0.8, means
    assert means[-1] - means[0] > 0.2, means  # a visible change: a fifth of the pixel range

    from facegen.eval.html_report import disco_directions

    assert "<td>mouth.onnx</td>" in disco_directions(cfg)
