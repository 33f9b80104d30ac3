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


# The DataCV organisers' SE-IResNet-50 (HaiyuWu/iccv2025-fr-competition, model/iresnet.py, iresnet("50",
# mode="se")), written out as data: its stem, its blocks (bn1, conv1, bn2, prelu, conv2, bn3), a 1x1
# downsample and an SEModule ``attn`` (fc1, fc2: 1x1 convs without bias, reduction 16) on the first block
# of each stage only, then bn2, fc, features. BatchNorms carry weight, bias, running stats and a counter.
BN = {"weight": "c", "bias": "c", "running_mean": "c", "running_var": "c", "num_batches_tracked": None}
ORGANISERS_STEM = {"conv1.weight": (64, 3, 3, 3), "bn1": 64, "prelu.weight": (64,)}
ORGANISERS_STAGES = [(64, 64, 3), (64, 128, 4), (128, 256, 14), (256, 512, 3)]  # (in, planes, blocks)
ORGANISERS_HEAD = {"bn2": 512, "fc.weight": (512, 512 * 7 * 7), "fc.bias": (512,), "features": 512}


def organisers_se_r50_keys() -> dict[str, tuple]:
    keys: dict[str, tuple] = {}

    def add(name, spec):
        if isinstance(spec, int):  # a BatchNorm of that many channels
            keys.update({f"{name}.{k}": ((spec,) if v else ()) for k, v in BN.items()})
        else:
            keys[name] = spec

    for name, spec in ORGANISERS_STEM.items():
        add(name.removesuffix(".weight") if isinstance(spec, int) else name, spec)
    for stage, (inplanes, planes, blocks) in enumerate(ORGANISERS_STAGES, start=1):
        for b in range(blocks):
            p = f"layer{stage}.{b}"
            cin = inplanes if b == 0 else planes
            add(f"{p}.bn1", cin)
            add(f"{p}.conv1.weight", (planes, cin, 3, 3))
            add(f"{p}.bn2", planes)
            add(f"{p}.prelu.weight", (planes,))
            add(f"{p}.conv2.weight", (planes, planes, 3, 3))
            add(f"{p}.bn3", planes)
            if b == 0:
                add(f"{p}.downsample.0.weight", (planes, inplanes, 1, 1))
                add(f"{p}.downsample.1", planes)
                add(f"{p}.attn.fc1.weight", (planes // 16, planes, 1, 1))
                add(f"{p}.attn.fc2.weight", (planes, planes // 16, 1, 1))
    for name, spec in ORGANISERS_HEAD.items():
        add(name, spec)
    return keys


def test_se_r50_has_the_organisers_parameter_names_and_loads_their_state_dict_strictly(tmp_path):
    from facegen.models.iresnet import iresnet50_se
    from facegen.models.iresnet_checkpoint import load_backbone

    expected = organisers_se_r50_keys()
    assert len(expected) == 483 and sum("attn" in k for k in expected) == 8
    model = build_backbone("iresnet50_se")
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == expected
    # a state dict under their names (random values) loads with strict=True and is what the model holds
    torch.manual_seed(0)
    theirs = {k: (torch.tensor(7) if not shape else torch.randn(shape)) for k, shape in expected.items()}
    model.load_state_dict(theirs, strict=True)
    assert torch.equal(model.layer3[0].attn.fc2.weight, theirs["layer3.0.attn.fc2.weight"])
    # a checkpoint of their trainer (model.module.state_dict(), a plain .pth) loads as arch iresnet50_se
    torch.save(theirs, tmp_path / "model.pth")
    loaded = load_backbone(str(tmp_path / "model.pth"), arch="iresnet50_se")
    assert torch.equal(loaded.state_dict()["layer1.0.attn.fc1.weight"], theirs["layer1.0.attn.fc1.weight"])
    with pytest.raises(ValueError, match=r"weights do not match the model \(.*Unexpected key\(s\).*attn"):
        load_backbone(str(tmp_path / "model.pth"), arch="iresnet50")  # the plain network has no attn
    assert sum(p.numel() for p in iresnet50_se().parameters()) - sum(p.numel() for p in iresnet50().parameters()) == sum(
        2 * p * (p // 16) for _, p, _ in ORGANISERS_STAGES)


def test_se_excites_the_shortcut_of_each_stages_first_block():
    torch.manual_seed(0)
    model = build_backbone("iresnet18_se", width=32, embedding_size=16).eval()
    assert [block.attn is not None for block in model.layer2] == [True, False]
    block = model.layer2[0]
    x = torch.randn(2, 32, 28, 28)
    with torch.no_grad():
        residual = block.bn3(block.conv2(block.prelu(block.bn2(block.conv1(block.bn1(x))))))
        shortcut = block.downsample(x)
        gate = torch.sigmoid(block.attn.fc2(torch.relu(block.attn.fc1(shortcut.mean(dim=(2, 3), keepdim=True)))))
        torch.testing.assert_close(block(x), residual + shortcut * gate)
    assert gate.shape == (2, 64, 1, 1) and block.attn.fc1.weight.shape == (4, 64, 1, 1)
