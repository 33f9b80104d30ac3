"""Export: ONNX that insightface's model zoo loads as an ArcFace recogniser, arcface_torch state dicts."""

import os

import cv2
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from facegen.cli import app
from facegen.models.iresnet import build_backbone
from facegen.models.iresnet_checkpoint import save_backbone
from facegen.train.export import export_backbone


def _trained_like(arch: str, width: int, embedding_size: int) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_backbone(arch, width=width, embedding_size=embedding_size)
    model.train()
    with torch.no_grad():
        model(torch.randn(4, 3, 112, 112))  # BN running statistics away from their init
    return model.eval()


def test_onnx_loads_in_insightface_model_zoo_with_torch_embeddings(tmp_path):
    from insightface.model_zoo import get_model
    from insightface.model_zoo.arcface_onnx import ArcFaceONNX

    model = _trained_like("iresnet18", 8, 64)
    save_backbone(str(tmp_path / "run" / "backbone"), model, "iresnet18", 8, 64)
    result = export_backbone(str(tmp_path / "run"), "onnx")  # a run directory resolves to its backbone/
    assert result.path == str(tmp_path / "run" / "backbone" / "iresnet18.onnx") and result.max_abs_diff < 1e-4

    recogniser = get_model(result.path)
    assert isinstance(recogniser, ArcFaceONNX) and recogniser.input_size == (112, 112)
    assert (recogniser.input_mean, recogniser.input_std) == (127.5, 127.5)
    rng = np.random.default_rng(1)
    faces_bgr = [cv2.resize(rng.integers(0, 256, (14, 14, 3), dtype=np.uint8), (112, 112)) for _ in range(3)]
    got = recogniser.get_feat(faces_bgr)
    rgb = np.stack([f[:, :, ::-1] for f in faces_bgr]).astype(np.float32)
    with torch.no_grad():
        want = model(torch.from_numpy(rgb).permute(0, 3, 1, 2).contiguous() / 127.5 - 1.0).numpy()
    assert got.shape == (3, 64)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_arcface_torch_state_dict_loads_strictly(tmp_path):
    model = _trained_like("iresnet18", 64, 512)
    save_backbone(str(tmp_path / "bb"), model, "iresnet18", 64, 512)
    result = export_backbone(str(tmp_path / "bb"), "arcface_torch", str(tmp_path / "r18.pth"))
    assert result.max_abs_diff == 0.0
    state = torch.load(tmp_path / "r18.pth", weights_only=True)  # plain tensors: no pickled code
    # arcface_torch's parameter names: iresnet18 with 64-wide stem, 512-d features.
    assert state["conv1.weight"].shape == (64, 3, 3, 3) and state["fc.weight"].shape == (512, 512 * 7 * 7)
    assert {"layer4.1.bn3.running_var", "layer1.0.downsample.1.weight", "features.weight", "prelu.weight"} <= set(state)
    net = build_backbone("iresnet18", width=64, embedding_size=512)
    net.load_state_dict(state, strict=True)


def test_narrow_backbone_refused_for_arcface_torch_and_cli(tmp_path):
    save_backbone(str(tmp_path / "bb"), _trained_like("iresnet18", 8, 32), "iresnet18", 8, 32)
    with pytest.raises(ValueError, match="width 64"):
        export_backbone(str(tmp_path / "bb"), "arcface_torch")
    runner = CliRunner()
    ok = runner.invoke(app, ["export", "--checkpoint", str(tmp_path / "bb"), "--format", "onnx",
                             "--output", str(tmp_path / "m.onnx")], terminal_width=200)
    assert ok.exit_code == 0, ok.output
    assert os.path.exists(tmp_path / "m.onnx") and "max |export - torch|" in ok.output
    bad = runner.invoke(app, ["export", "--checkpoint", str(tmp_path / "nowhere"), "--format", "onnx"], terminal_width=200)
    assert bad.exit_code == 2 and "no backbone here" in bad.output and len(bad.output.strip().splitlines()) == 1
    wrong = runner.invoke(app, ["export", "--checkpoint", str(tmp_path / "bb"), "--format", "tflite"], terminal_width=200)
    assert wrong.exit_code == 2 and "onnx or arcface_torch" in wrong.output
