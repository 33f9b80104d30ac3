"""Embedders from every source: facegen folders, arcface_torch .pth, ONNX exports, dlib's ResNet."""

import numpy as np
import pytest
import torch

from facegen.config import ConfigError, EmbedderSettings, config_from_dict
from facegen.faces.align import ARCFACE_CROP
from facegen.faces.embed import build_embedder, describe_embedder, embed_with_model
from facegen.models.iresnet import build_backbone
from facegen.models.iresnet_checkpoint import save_backbone
from facegen.storage import sha256_of


def _crops(n: int, seed: int = 0) -> np.ndarray:
    """Smooth random 112 crops (a face-like spread of values, not white noise)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (n, 14, 14, 3)).astype(np.float32)
    return np.clip(np.kron(small, np.ones((1, 8, 8, 1))) + rng.normal(0, 8, (n, 112, 112, 3)), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def seeded_r18() -> torch.nn.Module:
    torch.manual_seed(7)
    model = build_backbone("iresnet18", width=8, embedding_size=512).eval()
    with torch.no_grad():  # give the BatchNorm statistics non-trivial values, so eval mode is really tested
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.8, 1.2)
    return model


def test_arcface_torch_pth_onnx_export_and_network_give_one_embedding(seeded_r18, tmp_path):
    images = _crops(5)
    direct = embed_with_model(seeded_r18, images, batch_size=4, device="cpu", flip=False)

    pth = tmp_path / "backbone.pth"
    torch.save({f"module.{k}": v for k, v in seeded_r18.state_dict().items()}, pth)  # as DDP training saves it
    from_pth = build_embedder(EmbedderSettings(kind="arcface_torch", path=str(pth), arch="iresnet18", device="cpu"))

    onnx_path = tmp_path / "r18.onnx"
    torch.onnx.export(seeded_r18, torch.zeros(1, 3, 112, 112), str(onnx_path), input_names=["input.1"], output_names=["fc1"],
                      dynamic_axes={"input.1": {0: "n"}, "fc1": {0: "n"}}, dynamo=False, opset_version=17)
    from_onnx = build_embedder(EmbedderSettings(kind="onnx", path=str(onnx_path), batch_size=2))

    for embedder, file in ((from_pth, "backbone.pth"), (from_onnx, "r18.onnx")):
        assert embedder.dim == 512 and embedder.crop is ARCFACE_CROP
        np.testing.assert_allclose(embedder.embed(images), direct, atol=2e-5)
        assert embedder.record == {"kind": embedder.kind, "file": file, "sha256": sha256_of(str(tmp_path / file)), "dim": 512}
    flipped = embed_with_model(seeded_r18, images, batch_size=4, device="cpu", flip=True)
    np.testing.assert_allclose(from_onnx.embed(images, flip=True), flipped, atol=2e-5)
    np.testing.assert_allclose(from_pth.embed(images, flip=True), flipped, atol=2e-5)
    assert not np.allclose(flipped, direct, atol=1e-3)
    assert from_onnx.embed(images[:0]).shape == (0, 512)
    # the raw output (what Vec2Face conditions on): the network's own feature, its norm kept
    with torch.no_grad():
        network = seeded_r18((torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0)).numpy()
    for embedder in (from_pth, from_onnx):
        raw = embedder.embed_raw(images)
        assert raw.dtype == np.float32 and raw.shape == (5, 512)
        np.testing.assert_allclose(raw, network, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(raw / np.linalg.norm(raw, axis=1, keepdims=True), direct, atol=2e-5)
    assert not np.allclose(np.linalg.norm(network, axis=1), 1.0, atol=0.05)
    assert from_onnx.embed_raw(images[:0]).shape == (0, 512)


def test_facegen_folder_embedder_and_its_record(seeded_r18, tmp_path):
    folder = save_backbone(str(tmp_path / "r18"), seeded_r18, "iresnet18", 8, 512)
    settings = EmbedderSettings(kind="facegen", path=folder, device="cpu")
    embedder = build_embedder(settings)
    np.testing.assert_allclose(embedder.embed(_crops(3)), embed_with_model(seeded_r18, _crops(3), flip=False), atol=1e-5)
    assert embedder.record["file"] == "backbone.safetensors" and embedder.record["dim"] == 512
    # what the driver records reads no weights: the folder's metadata digest, stable until the folder changes
    described = describe_embedder(settings)
    assert described == {"kind": "facegen", "file": "r18", "digest": described["digest"]} and described["digest"].startswith("meta:")
    assert describe_embedder(settings) == described
    save_backbone(folder, seeded_r18, "iresnet18", 8, 512)  # rewritten: a new input
    assert describe_embedder(settings)["digest"] != described["digest"]
    (tmp_path / "r18.sha256").write_text("ab12" * 16 + "  r18\n")  # a recorded content digest wins
    assert describe_embedder(settings)["digest"] == "sha256:" + ("ab12" * 4)
    assert describe_embedder(EmbedderSettings()) is None  # no path: nothing is embedded


def test_dlib_embedder_is_128_wide_and_reads_its_own_chip():
    embedder = build_embedder(EmbedderSettings(kind="dlib"))
    assert embedder.dim == 128 and embedder.crop.size == 150 and embedder.record["file"] == "dlib_face_recognition_resnet_model_v1.dat"
    images = _crops(2)
    out = embedder.embed(images)
    assert out.shape == (2, 128) and out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(embedder.embed_crops(embedder.crop.from_aligned(images)), out, atol=1e-6)
    raw = embedder.embed_raw(images)  # dlib's descriptors as computed: the same direction, their own norm
    np.testing.assert_allclose(raw / np.linalg.norm(raw, axis=1, keepdims=True), out, atol=1e-6)
    assert describe_embedder(EmbedderSettings(kind="dlib"))["file"] == embedder.record["file"]


def test_embedder_settings_fail_with_one_line_naming_the_field(tmp_path):
    with pytest.raises(ConfigError, match="faces.embedder: .*checkpoint was renamed: use faces.embedder.path"):
        config_from_dict({"faces": {"embedder": {"checkpoint": "/x"}}}, "run.yaml")
    with pytest.raises(ConfigError, match="arch: an arcface_torch .pth needs its network"):
        config_from_dict({"faces": {"embedder": {"kind": "arcface_torch", "path": "/x.pth"}}}, "run.yaml")
    with pytest.raises(ConfigError, match="path: the onnx embedder needs a weights file"):
        config_from_dict({"faces": {"embedder": {"kind": "onnx"}}}, "run.yaml")
    with pytest.raises(FileNotFoundError, match="no_such.onnx: no such ONNX file"):
        build_embedder(EmbedderSettings(kind="onnx", path=str(tmp_path / "no_such.onnx")))
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="bad.onnx: not a loadable ONNX model"):
        build_embedder(EmbedderSettings(kind="onnx", path=str(bad)))
    with pytest.raises(ValueError, match="a .pth file is kind arcface_torch"):
        build_embedder(EmbedderSettings(kind="facegen", path=str(tmp_path / "x.pth")))


def test_clean_refuses_raw_blocks_of_another_embedder(seeded_r18, tmp_path):
    import pyarrow as pa

    from facegen import blocks as blk
    from facegen.stages.clean import check_same_embedder

    folder = save_backbone(str(tmp_path / "r18"), seeded_r18, "iresnet18", 8, 512)
    raw = str(tmp_path / "raw")
    dlib_record = describe_embedder(EmbedderSettings(kind="dlib"))
    blk.commit_block(raw, 0, pa.table({"x": [1]}), {"embedder": dlib_record})
    cfg = config_from_dict({"faces": {"embedder": {"kind": "facegen", "path": folder}}})
    with pytest.raises(ValueError, match=r"faces.embedder: .*raw block 0 was embedded by dlib dlib_face_recognition_resnet_model_v1.dat \(.*\), the config names facegen r18"):
        check_same_embedder(cfg, raw)
    check_same_embedder(config_from_dict({"faces": {"embedder": {"kind": "dlib"}}}), raw)  # the same one passes


def test_detector_settings_fail_with_one_line_naming_the_field():
    with pytest.raises(ConfigError, match="faces.detector: .*path: the insightface detector needs a model folder"):
        config_from_dict({"faces": {"detector": {"kind": "insightface"}}}, "run.yaml")
    with pytest.raises(ConfigError, match="faces.detector: kind: unknown detector kind 'yolo', expected one of mtcnn, dlib, insightface or none"):
        config_from_dict({"faces": {"detector": {"kind": "yolo"}}}, "run.yaml")
