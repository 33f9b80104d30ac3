"""IResNet: insightface-compatible parameter names and shapes, forward pass, parameter count."""

import pytest
import torch

from facegen.models.iresnet import ARCH_DEPTHS, IResNet, build_backbone, iresnet18, iresnet50

# Keys and shapes of insightface arcface_torch's iresnet50 state dict (width 64, 512-d).
INSIGHTFACE_R50_KEYS = {
    "conv1.weight": (64, 3, 3, 3),
    "bn1.weight": (64,),
    "bn1.running_var": (64,),
    "prelu.weight": (64,),
    "layer1.0.bn1.weight": (64,),
    "layer1.0.conv1.weight": (64, 64, 3, 3),
    "layer1.0.bn2.num_batches_tracked": (),
    "layer1.0.prelu.weight": (64,),
    "layer1.0.conv2.weight": (64, 64, 3, 3),
    "layer1.0.bn3.bias": (64,),
    "layer1.0.downsample.0.weight": (64, 64, 1, 1),
    "layer1.0.downsample.1.running_mean": (64,),
    "layer1.2.conv2.weight": (64, 64, 3, 3),
    "layer2.0.conv1.weight": (128, 64, 3, 3),
    "layer2.0.downsample.0.weight": (128, 64, 1, 1),
    "layer2.3.bn3.weight": (128,),
    "layer3.0.downsample.1.weight": (256,),
    "layer3.13.conv2.weight": (256, 256, 3, 3),
    "layer4.0.conv1.weight": (512, 256, 3, 3),
    "layer4.2.prelu.weight": (512,),
    "bn2.weight": (512,),
    "bn2.running_mean": (512,),
    "fc.weight": (512, 512 * 7 * 7),
    "fc.bias": (512,),
    "features.weight": (512,),
    "features.bias": (512,),
    "features.running_var": (512,),
}


def test_r50_state_dict_matches_insightface_names_and_shapes():
    state = iresnet50().state_dict()
    for key, shape in INSIGHTFACE_R50_KEYS.items():
        assert key in state, key
        assert tuple(state[key].shape) == shape, key
    # 24 blocks x 18 entries, 4 downsamples x 6, stem 7, bn2 5, fc 2, features 5 (as insightface).
    assert len(state) == 475
    assert "layer3.14.conv1.weight" not in state  # r50 has exactly 14 blocks in stage 3
    assert not any(k.startswith("layer1.1.downsample") for k in state)


def test_r50_parameter_count_is_insightface_size():
    n = sum(p.numel() for p in iresnet50().parameters())
    assert abs(n - 43.6e6) / 43.6e6 < 0.01


def test_features_scale_is_frozen_like_insightface():
    model = iresnet18(width=8)
    assert not model.features.weight.requires_grad
    assert torch.all(model.features.weight == 1)


@pytest.mark.parametrize("arch", sorted(ARCH_DEPTHS))
def test_depths(arch):
    model = build_backbone(arch, width=4, embedding_size=16)
    blocks = [len(getattr(model, f"layer{i}")) for i in range(1, 5)]
    assert blocks == ARCH_DEPTHS[arch]


def test_narrow_model_forward_and_backward():
    torch.manual_seed(0)
    model = build_backbone("iresnet18", width=8, embedding_size=32)
    assert isinstance(model, IResNet)
    x = torch.rand(3, 3, 112, 112) * 2 - 1
    out = model(x)
    assert out.shape == (3, 32)
    assert torch.isfinite(out).all()
    out.pow(2).sum().backward()
    assert model.conv1.weight.grad is not None and torch.isfinite(model.conv1.weight.grad).all()
    assert model.layer4[0].conv2.weight.shape == (64, 64, 3, 3)  # width 8 -> stage 4 has 8 * 8 channels
    assert model.fc.in_features == 64 * 7 * 7

    model.eval()
    with torch.no_grad():
        a, b = model(x[:1]), model(x)[:1]
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)  # eval mode: no batch dependence


def test_bad_arch_is_named():
    with pytest.raises(ValueError, match="iresnet42"):
        build_backbone("iresnet42")
