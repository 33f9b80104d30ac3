"""The DataCV organisers' fixed training recipe (configs/train_datacv_r50.yaml), the settings it needs
(SE-IResNet, dropout, batch-norm weight decay, their ArcFace, their loss-scale growth) and the
challenge's dataset scale caps, checked before training starts."""

import json
import math

import pytest
import torch

from facegen.config import DATACV_SCALES, config_from_dict, load_config
from facegen.shards import ScaleCapExceeded, check_datacv_scale, load_manifest
from facegen.train.fit import LocalSession, backbone_param_groups, build_optimizer, fit, lr_at
from facegen.train.heads import ArcFace, build_margin
from train_shards import make_shard_set

# HaiyuWu/iccv2025-fr-competition: configs/arcface_r50_default.py over configs/base.py (what get_config
# merges), and the defaults of the code that reads them.
PUBLISHED_CONFIG = {
    "head": "arcface", "input_size": [112, 112], "embedding_size": 512, "model": "iresnet", "depth": "50",
    "mode": "se", "batch_size": 128, "weight_decay": 5e-4, "lr": 0.1, "momentum": 0.9, "optimizer": "sgd",
    "epochs": 26, "margin": 0.5, "fp16": True, "sample_rate": 1.0, "reduce_lr": [12, 20, 24], "warmup_epoch": 0,
    "scheduler": False, "augment": True, "rand_erase": True, "add_flip": True,
    "val_list": ["lfw", "cfp_fp", "agedb_30", "calfw", "cplfw"],
}
GPUS = 4  # README: torchrun --nproc_per_node=4 train.py --config_file ./configs/arcface_r50_default.py
PUBLISHED_CODE = {
    "arcface_s": 64.0,  # losses.ArcFace(s=64.0, margin)
    "dropout": 0.4,  # model.iresnet.IResNet(dropout=0.4), not overridden by iresnet(depth, fp16, mode)
    "clip_grad_norm": 5,  # train.py: clip_grad_norm_(self.model.parameters(), 5)
    "growth_interval": 100,  # train.py: GradScaler(growth_interval=100)
    "augmenter": (0.3, 0.3, 0.3),  # data_loader_train_lmdb: Augmenter(crop, photometric, low_res probabilities)
    "crop": ((0.2, 1.0), (0.75, 1.3333333333333333)),  # RandomResizedCrop scale, ratio
    "low_res_side": (0.2, 1.0), "photometric": (0.5, 0.5, 0.5),  # ColorJitter(0.5, 0.5, 0.5, hue=0)
    "flip_p": 0.5, "erasing": (0.5, (0.02, 0.33), (0.3, 3.3)),  # torchvision RandomErasing() defaults
}


def organisers_lr(epoch: int) -> float:
    """Their train.py: at the start of (0-based) epoch e, lr /= 10 when e + 1 is in reduce_lr."""
    lr = PUBLISHED_CONFIG["lr"]
    for e in range(epoch + 1):
        if e + 1 in PUBLISHED_CONFIG["reduce_lr"]:
            lr /= 10
    return lr


def test_train_datacv_r50_is_the_organisers_published_config_without_pacing():
    cfg = load_config("configs/train_datacv_r50.yaml")
    t = cfg.train
    assert t.arch == f"iresnet{PUBLISHED_CONFIG['depth']}_{PUBLISHED_CONFIG['mode']}" == "iresnet50_se"
    assert t.width == 64 and t.embedding_size == PUBLISHED_CONFIG["embedding_size"]
    assert t.head == PUBLISHED_CONFIG["head"] and t.margin == PUBLISHED_CONFIG["margin"]
    assert t.scale == PUBLISHED_CODE["arcface_s"] and t.arcface_monotone is False
    assert t.optimizer == PUBLISHED_CONFIG["optimizer"] and t.lr == PUBLISHED_CONFIG["lr"]
    assert t.momentum == PUBLISHED_CONFIG["momentum"] and t.weight_decay == PUBLISHED_CONFIG["weight_decay"]
    assert t.bn_weight_decay is False  # utils.separate_bn_param
    assert t.num_workers == GPUS and t.batch_size == PUBLISHED_CONFIG["batch_size"] * GPUS and t.use_gpu
    assert t.batch_size // t.num_workers == 128
    assert t.epochs == PUBLISHED_CONFIG["epochs"] and t.warmup_epochs == PUBLISHED_CONFIG["warmup_epoch"]
    # lr / 10 at their epochs 12, 20, 24: every epoch's lr is theirs (facegen counts completed epochs)
    assert [s + 1 for s in t.lr_steps] == PUBLISHED_CONFIG["reduce_lr"]
    for epoch in range(t.epochs):
        for fraction in (0.0, 0.5, 0.999):
            assert lr_at(t, epoch + fraction) == pytest.approx(organisers_lr(epoch), rel=1e-12), epoch
    assert [organisers_lr(e) for e in (0, 10, 11, 18, 19, 22, 23, 25)] == pytest.approx(
        [0.1, 0.1, 0.01, 0.01, 1e-3, 1e-3, 1e-4, 1e-4])
    assert t.amp == "fp16" and PUBLISHED_CONFIG["fp16"]
    assert t.loss_scale_growth_interval == PUBLISHED_CODE["growth_interval"]
    assert t.grad_clip_norm == PUBLISHED_CODE["clip_grad_norm"] and t.dropout == PUBLISHED_CODE["dropout"]
    assert t.partial_fc.sample_rate == PUBLISHED_CONFIG["sample_rate"]
    assert t.curriculum == "shuffled"  # their DistributedSampler shuffles: no pacing
    a = t.augment
    assert PUBLISHED_CONFIG["augment"] and (a.crop_p, a.photometric_p, a.low_res_p) == PUBLISHED_CODE["augmenter"]
    assert (a.crop_scale, a.crop_ratio) == PUBLISHED_CODE["crop"] and a.low_res_scale == PUBLISHED_CODE["low_res_side"]
    assert a.photometric == PUBLISHED_CODE["photometric"] and a.hflip_p == PUBLISHED_CODE["flip_p"]
    assert PUBLISHED_CONFIG["rand_erase"] and (a.erase_p, a.erase_scale, a.erase_ratio) == PUBLISHED_CODE["erasing"]
    assert [b.split("/")[-1].removesuffix(".bin") for b in cfg.eval.bins] == PUBLISHED_CONFIG["val_list"]
    assert t.eval_every_steps == 0  # they validate after each epoch
    assert t.data.streams % t.num_workers == 0 and t.batch_size % t.data.streams == 0
    assert t.datacv_scale == "10k"  # facegen's guard (not a hyperparameter): the scale trained for


def test_batch_norm_parameters_can_go_without_weight_decay_as_the_organisers():
    from facegen.models.iresnet import build_backbone

    model = build_backbone("iresnet18_se", width=8, embedding_size=16)
    settings = config_from_dict({"train": {"bn_weight_decay": False}}).train
    decayed, free = backbone_param_groups(settings, model)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    expected_free = {id(p) for m in norms for p in m.parameters() if p.requires_grad}
    assert {id(p) for p in free["params"]} == expected_free and free["weight_decay"] == 0.0
    assert id(model.features.weight) not in {id(p) for p in free["params"] + decayed["params"]}  # frozen, as theirs
    assert id(model.prelu.weight) in {id(p) for p in decayed["params"]}  # PReLU and the SE convs decay
    assert id(model.layer1[0].attn.fc1.weight) in {id(p) for p in decayed["params"]}
    optimizer = build_optimizer(settings, [decayed, free])
    assert [g["weight_decay"] for g in optimizer.param_groups] == [5e-4, 0.0]
    assert len(backbone_param_groups(config_from_dict({}).train, model)) == 1  # arcface_torch: all decay


def test_their_arcface_keeps_cos_theta_plus_m_past_pi():
    cos = torch.tensor([0.9, 0.0, -0.95, -0.999])
    theta = torch.acos(cos.double())
    plain = ArcFace(s=64.0, m=0.5, monotone=False).target(cos).double()
    torch.testing.assert_close(plain, torch.cos(theta + 0.5), atol=1e-5, rtol=0)
    insightface = ArcFace(s=64.0, m=0.5).target(cos).double()
    assert insightface[-1] == pytest.approx(-0.999 - math.sin(math.pi - 0.5) * 0.5, abs=1e-5)  # the fallback
    assert plain[-1] > plain[-2]  # theirs rises again past theta + m = pi
    margin = build_margin(load_config("configs/train_datacv_r50.yaml").train)
    assert isinstance(margin, ArcFace) and not margin.monotone and margin.s == 64.0 and margin.m == 0.5


def test_scale_caps_are_the_challenges_and_bound_identities_and_images():
    assert DATACV_SCALES == {"10k": (10_000, 500_000), "20k": (20_000, 1_000_000), "100k": (100_000, 5_000_000)}
    manifest = {"num_identities": 10_000, "num_rows": 500_000}
    check_datacv_scale("10k", manifest, "s")  # at the cap exactly
    check_datacv_scale(None, {"num_identities": 10**9, "num_rows": 10**12}, "s")  # no cap set
    for ids, images in ((10_001, 500_000), (10_000, 500_001)):
        with pytest.raises(ScaleCapExceeded) as err:
            check_datacv_scale("10k", {"num_identities": ids, "num_rows": images}, "/data/shards")
        assert str(err.value) == (f"train.datacv_scale: 10k allows at most 10000 identities and 500000 images, but "
                                  f"/data/shards/manifest.json has {ids} identities and {images} images")
    check_datacv_scale("20k", {"num_identities": 20_000, "num_rows": 1_000_000}, "s")
    with pytest.raises(ScaleCapExceeded, match="20k allows at most 20000 identities and 1000000 images"):
        check_datacv_scale("20k", {"num_identities": 15_000, "num_rows": 1_000_001}, "s")
    check_datacv_scale("100k", {"num_identities": 100_000, "num_rows": 5_000_000}, "s")
    with pytest.raises(ScaleCapExceeded, match="has 100001 identities"):
        check_datacv_scale("100k", {"num_identities": 100_001, "num_rows": 10}, "s")


def test_training_refuses_a_shard_set_over_its_scale_before_anything_else(tmp_path, monkeypatch):
    from facegen.config import ConfigError
    from facegen.train.loop import train

    shards = tmp_path / "shards"
    make_shard_set(shards)  # 6 identities, 42 images
    manifest = load_manifest(str(shards))
    assert (manifest["num_identities"], manifest["num_rows"]) == (6, 42)
    cfg = config_from_dict({"run": {"output_dir": str(tmp_path / "out")}, "train": {"datacv_scale": "10k"}})
    # a manifest over the cap: train() stops on its first line, before Ray, the shard digest or any reader
    manifest["num_identities"] = 10_001
    (shards / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ScaleCapExceeded, match=r"^train.datacv_scale: 10k allows at most 10000 identities and 500000 "
                       r"images, but .*/shards/manifest.json has 10001 identities and 42 images$"):
        train(cfg, str(shards), eval_bins=["/nonexistent.bin"])  # the missing bin would be the next error
    assert not (tmp_path / "out").exists()
    # fit() checks too (a plain PyTorch run), on the real counts: here against caps shrunk below them
    manifest["num_identities"] = 6
    (shards / "manifest.json").write_text(json.dumps(manifest))
    monkeypatch.setitem(DATACV_SCALES, "10k", (6, 41))
    with pytest.raises(ScaleCapExceeded, match=r"at most 6 identities and 41 images, but .* has 6 identities and 42 images$"):
        fit(LocalSession(str(tmp_path / "local")), cfg, str(shards), [], "capped")
    with pytest.raises(ConfigError, match=r"train.datacv_scale: Input should be '10k', '20k' or '100k' \(got '50k'\)"):
        config_from_dict({"train": {"datacv_scale": "50k"}})


def test_the_se_recipe_trains_end_to_end_on_cpu(tmp_path):
    from facegen.models.iresnet_checkpoint import load_backbone

    shards = tmp_path / "shards"
    make_shard_set(shards)
    train = {"arch": "iresnet18_se", "width": 8, "embedding_size": 32, "batch_size": 8, "epochs": 1, "lr_steps": [1],
             "dropout": 0.4, "bn_weight_decay": False, "arcface_monotone": False, "scale": 16.0, "amp": "off",
             "datacv_scale": "10k", "data": {"streams": 2, "decode_threads": 0}, "curriculum": "shuffled"}
    cfg = config_from_dict({"run": {"name": "se", "output_dir": str(tmp_path / "out")}, "train": train,
                            "tracking": {"mode": "disabled"}})
    session = LocalSession(str(tmp_path / "local"))
    history = fit(session, cfg, str(shards), [], "se")
    assert len(history) == 1 and math.isfinite(history[0]["loss"]) and history[0]["steps"] == 5
    latest = json.loads((tmp_path / "local" / "latest.json").read_text())["name"]
    model = load_backbone(str(tmp_path / "local" / latest / "backbone"))
    assert model.se and model.layer4[0].attn is not None
    assert json.loads((tmp_path / "local" / latest / "backbone" / "backbone.json").read_text())["arch"] == "iresnet18_se"
