"""Margin heads (ArcFace, CosFace, combined, classifier) and safe backbone checkpoints."""

import json
import math
import os
import pickle

import pytest
import torch
import torch.nn.functional as F

from facegen.config import TrainSettings
from facegen.models.iresnet_checkpoint import load_backbone, save_backbone
from facegen.train.heads import ArcFace, CombinedMargin, CosFace, MarginClassifier, build_head
from facegen.models.iresnet import build_backbone
from untrusted import RunsShell


# --- margins --------------------------------------------------------------------------------


def test_arcface_adds_angle_to_target_only():
    cosine = torch.tensor([[0.8, 0.1, -0.3], [0.2, 0.5, 0.0]])
    labels = torch.tensor([0, 1])
    out = ArcFace(s=10.0, m=0.5)(cosine, labels)
    assert out[0, 0].item() == pytest.approx(10 * math.cos(math.acos(0.8) + 0.5), rel=1e-5)
    assert out[1, 1].item() == pytest.approx(10 * math.cos(math.acos(0.5) + 0.5), rel=1e-5)
    torch.testing.assert_close(out[0, 1:], 10 * cosine[0, 1:])
    torch.testing.assert_close(out[1, [0, 2]], 10 * cosine[1, [0, 2]])


def test_arcface_past_pi_minus_m_stays_monotone():
    m = 0.5
    arc = ArcFace(s=1.0, m=m)
    cos_values = torch.linspace(-0.99, 0.99, 199)
    logits = cos_values.view(-1, 1).repeat(1, 2)
    target = arc(logits, torch.zeros(len(cos_values), dtype=torch.long))[:, 0]
    # Below cos(pi - m) the fallback cos(theta) - m sin(m) is used instead of cos(theta + m).
    low = cos_values <= math.cos(math.pi - m)
    torch.testing.assert_close(target[low], cos_values[low] - math.sin(math.pi - m) * m)
    assert torch.all(target[1:] >= target[:-1])  # increasing in cos(theta): the margin never rewards a worse angle
    assert torch.all(target <= cos_values)


def test_arcface_gradient_finite_at_cosine_one():
    cosine = torch.tensor([[1.0, 0.0]], requires_grad=True)
    ArcFace()(cosine, torch.tensor([0])).sum().backward()
    assert torch.isfinite(cosine.grad).all()


def test_cosface_subtracts_margin():
    cosine = torch.tensor([[0.8, 0.1], [0.2, 0.5]])
    out = CosFace(s=64.0, m=0.35)(cosine, torch.tensor([0, 1]))
    torch.testing.assert_close(out, 64 * torch.tensor([[0.45, 0.1], [0.2, 0.15]]))


def test_classifier_learns_separable_classes():
    torch.manual_seed(0)
    centres = F.normalize(torch.randn(5, 16))
    labels = torch.arange(5).repeat_interleave(8)
    embeddings = centres[labels] + 0.05 * torch.randn(40, 16)
    head = MarginClassifier(16, 5, CosFace(s=16.0, m=0.2))
    opt = torch.optim.SGD(head.parameters(), lr=0.5, momentum=0.9)
    first = None
    for _ in range(60):
        loss = head(embeddings, labels)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first * 0.5
    head(embeddings, labels)
    assert int(head.correct(labels)) == len(labels)
    assert head.last_logits.shape == (40, 5)
    assert float(head.last_logits.abs().max()) <= 1.0 + 1e-5  # cosine logits, before the margin


def test_build_head_from_settings():
    head = build_head(TrainSettings(head="cosface", scale=30.0, margin=0.3, embedding_size=64), num_classes=7)
    assert isinstance(head.margin, CosFace) and head.margin.s == 30.0 and head.margin.m == 0.3
    assert head.weight.shape == (7, 64)
    arc = build_head(TrainSettings(embedding_size=32), num_classes=3)
    assert isinstance(arc.margin, ArcFace) and arc.margin.m == 0.5 and arc.margin.s == 64.0


# --- backbone checkpoints --------------------------------------------------------------------


def _tiny_backbone():
    torch.manual_seed(1)
    model = build_backbone("iresnet18", width=4, embedding_size=16)
    model.train()
    model(torch.randn(2, 3, 112, 112))  # moves BN running stats away from their init
    return model


def test_backbone_roundtrip(tmp_path):
    model = _tiny_backbone()
    directory = save_backbone(str(tmp_path / "bb"), model, "iresnet18", 4, 16)
    assert sorted(os.listdir(directory)) == ["backbone.json", "backbone.safetensors"]
    meta = json.loads((tmp_path / "bb" / "backbone.json").read_text())
    assert meta == {"arch": "iresnet18", "width": 4, "embedding_size": 16, "format_version": 1}
    loaded = load_backbone(directory)
    assert not loaded.training
    x = torch.randn(2, 3, 112, 112)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))


def test_insightface_pth_loads_strict_with_arch(tmp_path):
    model = _tiny_backbone()
    path = tmp_path / "r18.pth"
    torch.save(model.state_dict(), path)
    loaded = load_backbone(str(path), arch="iresnet18")
    assert loaded.conv1.weight.shape[0] == 4 and loaded.num_features == 16
    torch.testing.assert_close(loaded.state_dict()["fc.weight"], model.state_dict()["fc.weight"])
    with pytest.raises(ValueError, match="arch="):
        load_backbone(str(path))
    with pytest.raises(ValueError, match="r18.pth"):
        load_backbone(str(path), arch="iresnet34")  # depth mismatch under strict=True


def test_pth_with_arbitrary_pickle_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    path.write_bytes(pickle.dumps({"conv1.weight": RunsShell(tmp_path / "ran")}, protocol=2))
    with pytest.raises(ValueError, match="evil.pth"):
        load_backbone(str(path), arch="iresnet18")
    assert not (tmp_path / "ran").exists()


def test_missing_and_corrupt_backbone_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_backbone(str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="gone.pth"):
        load_backbone(str(tmp_path / "gone.pth"), arch="iresnet18")
    directory = save_backbone(str(tmp_path / "bb"), _tiny_backbone(), "iresnet18", 4, 16)
    (tmp_path / "bb" / "backbone.safetensors").write_bytes(b"\x00" * 40)
    with pytest.raises(ValueError, match="backbone.safetensors"):
        load_backbone(directory)


# --- margins with Partial FC labels --------------------------------------------------------


def test_margins_leave_rows_without_a_local_target_alone():
    cosine = torch.tensor([[0.8, 0.1, -0.3], [0.2, 0.5, 0.0]])
    labels = torch.tensor([-1, 1])  # row 0's class centre lives on another worker (Partial FC)
    for margin in (ArcFace(s=10.0, m=0.5), CosFace(s=10.0, m=0.3), CombinedMargin(s=10.0, m1=1.0, m2=0.2, m3=0.1)):
        out = margin(cosine, labels)
        torch.testing.assert_close(out[0], 10 * cosine[0])
        assert out[1, 1].item() < 10 * 0.5
    assert torch.equal(ArcFace(s=2.0)(cosine, torch.tensor([-1, -1])), 2 * cosine)


def test_combined_margin_reduces_to_arcface_and_cosface():
    cosine = torch.tensor([[0.9, -0.2, 0.3], [0.1, 0.6, -0.4], [-0.5, 0.2, 0.35]])
    labels = torch.tensor([0, 1, 2])
    torch.testing.assert_close(CombinedMargin(s=64.0, m1=1.0, m2=0.5, m3=0.0)(cosine, labels), ArcFace(s=64.0, m=0.5)(cosine, labels))
    torch.testing.assert_close(CombinedMargin(s=64.0, m1=1.0, m2=0.0, m3=0.35)(cosine, labels), CosFace(s=64.0, m=0.35)(cosine, labels))
    sphere = CombinedMargin(s=1.0, m1=2.0, m2=0.0, m3=0.0)(cosine, labels)
    assert sphere[0, 0].item() == pytest.approx(math.cos(2 * math.acos(0.9)), rel=1e-5)
    with pytest.raises(ValueError, match="m1"):
        CombinedMargin(m1=0.5)


def test_build_combined_head_from_settings():
    head = build_head(TrainSettings(head="combined", combined_margins=(1.0, 0.3, 0.2), scale=32.0, embedding_size=16), num_classes=4)
    assert isinstance(head.margin, CombinedMargin) and (head.margin.m2, head.margin.m3, head.margin.s) == (0.3, 0.2, 32.0)
