"""CemiFace's generator on CPU: tiny UNet, tiny IResNet embedder, a real shard set.

The model is the real class saved with ``save_pretrained`` and read back with ``from_pretrained``;
training runs the real loop (:func:`fit_generator`) with a plain-PyTorch session.
"""

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from facegen.config import load_config  # noqa: E402
from facegen.models.cemiface import (  # noqa: E402
    CemiFaceUNet,
    check_similarities,
    ddim_sample,
    load_generator,
    noise_scheduler,
    save_generator,
)
from facegen.train.fit import LocalSession  # noqa: E402
from facegen.train.generator_data import PairSampler, PairTable, prepare_pairs, quantise  # noqa: E402
from facegen.models.cemiface import cemiface_loss
from facegen.train.generator_fit import build_model, fit_generator  # noqa: E402
from train_shards import make_shard_set  # noqa: E402

TINY_NET = {"image_size": 16, "block_out_channels": [16, 32], "layers_per_block": 1, "attention_head_dim": 4,
            "norm_num_groups": 8, "cross_attention_dim": 16, "context_tokens": 2, "similarity_dim": 8}


def tiny_cfg(tmp, embedder: str, **train):
    sets = {f"train_generator.net.{k}": v for k, v in TINY_NET.items()}
    sets.update({"run.output_dir": str(tmp / "out"), "tracking.mode": "disabled",
                 "train_generator.embedder.path": embedder, "train_generator.batch_size": 8,
                 "train_generator.holdout_identities": 2, "train_generator.control_images": 1,
                 "train_generator.ddim_steps": 2, "train_generator.lr": 1e-3, **{f"train_generator.{k}": v for k, v in train.items()}})
    return load_config(None, [f"{k}={v}" for k, v in sets.items()])


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from facegen.models.iresnet import iresnet18
    from facegen.models.iresnet_checkpoint import save_backbone

    root = tmp_path_factory.mktemp("cemiface")
    torch.manual_seed(0)
    embedder = save_backbone(str(root / "embedder"), iresnet18(width=8, num_features=16).eval(), "iresnet18", 8, 16)
    make_shard_set(root / "shards", per_class=6, blocks=2, ids_per_block=3)
    cfg = tiny_cfg(root, embedder)
    index = prepare_pairs(str(root / "shards"), cfg.train_generator, 0, str(root / "data"))
    return root, embedder, index


def tiny_model(id_dim=16):
    torch.manual_seed(0)
    return CemiFaceUNet(image_size=16, id_dim=id_dim, similarity_dim=8, context_tokens=2, cross_attention_dim=16,
                        block_out_channels=(16, 32), layers_per_block=1, attention_head_dim=4, norm_num_groups=8)


def test_the_conditioning_reaches_the_prediction_and_every_parameter_learns():
    model = tiny_model()
    x, t = torch.randn(3, 3, 16, 16), torch.tensor([10, 500, 900])
    f, m = torch.nn.functional.normalize(torch.randn(3, 16), dim=1), torch.tensor([0.0, 0.3, 0.9])
    base = model(x, t, f, m)
    assert (model(x, t, f, m + 0.5) - base).abs().max() > 1e-4  # m changes the prediction
    assert (model(x, t, f.roll(1, 0), m) - base).abs().max() > 1e-4  # so does C_id
    assert (model(x, t + 50, f, m) - base).abs().max() > 1e-4  # and the timestep (adaptive group norm)
    base.square().mean().backward()
    unused = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert unused == []


def test_save_and_load_round_trip_exactly(tmp_path):
    model = tiny_model().eval()
    scheduler = dict(noise_scheduler(1000).config)
    save_generator(str(tmp_path / "gen"), model, scheduler, {"embedder": {"kind": "facegen", "dim": 16}})
    loaded, sched, info = load_generator(str(tmp_path / "gen"))
    assert info["embedder"]["dim"] == 16 and sched["num_train_timesteps"] == 1000
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    assert sorted(os.listdir(tmp_path / "gen" / "unet")) == ["config.json", "diffusion_pytorch_model.safetensors"]
    with pytest.raises(FileNotFoundError, match="not a CemiFace generator folder"):
        load_generator(str(tmp_path))


def test_pairs_share_an_identity_and_m_is_their_quantised_cosine(data):
    root, _, index = data
    table = PairTable.load(str(root / "data"))
    assert index["rows"] == 36 and index["identities"] == 6 and len(index["holdout_labels"]) == 2
    assert table.images.shape == (36, 16, 16, 3) and table.features.shape == (36, 16)
    sampler = PairSampler(table, 8, 0, 0.02, 1000)
    targets, inquiries, m = sampler.pairs(0, 1)
    assert (table.labels[targets] == table.labels[inquiries]).all()
    assert not table.holdout[targets].any() and not table.holdout[inquiries].any()
    cos = np.einsum("nd,nd->n", table.features[targets], table.features[inquiries])
    np.testing.assert_allclose(m, quantise(cos, 0.02))
    assert np.allclose(np.round(m / 0.02) * 0.02, m, atol=1e-6)
    # two workers' slices are the one-worker batch
    whole = sampler.batch(0, 1)
    halves = [sampler.batch(0, 1, r, 2) for r in range(2)]
    for name in ("images", "id_features", "similarity", "timesteps", "noise"):
        assert torch.equal(torch.cat([getattr(h, name) for h in halves]), getattr(whole, name)), name


def test_the_loss_falls_over_a_few_dozen_steps(data):
    root, embedder, _ = data
    cfg = tiny_cfg(root, embedder, similarity_weight=0.05)
    table = PairTable.load(str(root / "data"))
    sampler = PairSampler(table, 8, 0, 0.02, 1000)
    model, scheduler = build_model(cfg, 16), noise_scheduler(1000)
    from facegen.train.generator_fit import _differentiable_embedder

    loss_embedder = _differentiable_embedder(cfg, torch.device("cpu"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    fixed = sampler.batch(0, 0)
    losses = []
    for step in range(40):
        loss, parts = cemiface_loss(model, scheduler, fixed, 0.05, loss_embedder, 1000)
        assert set(parts) == {"mse", "l_rec", "l_sim"}
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5])


def test_a_resumed_run_reaches_the_uninterrupted_runs_weights(data, tmp_path):
    root, embedder, _ = data
    straight = LocalSession(str(tmp_path / "straight"))
    cfg = tiny_cfg(root, embedder, max_steps=6, checkpoint_every_steps=3, similarity_weight=0.05)
    state = fit_generator(straight, cfg, str(root / "data"), "straight")
    assert state["global_step"] == 6 and len(state["history"]) == 2
    control = state["control"]
    assert control["identities"] == 2 and [b["m"] for b in control["by_m"]] == [0.0, 0.3, 0.6, 0.9]
    assert -1.0 <= control["spearman"] <= 1.0 and all(np.isfinite(b["mean"]) for b in control["by_m"])

    split = LocalSession(str(tmp_path / "split"))
    fit_generator(split, tiny_cfg(root, embedder, max_steps=3, checkpoint_every_steps=3, similarity_weight=0.05),
                  str(root / "data"), "split")
    resumed = fit_generator(split, cfg, str(root / "data"), "split")
    assert resumed["resumes"] == [{"global_step": 3, "world_size": 1}]
    a, _, _ = load_generator(str(tmp_path / "straight" / "step-000000006" / "model"))
    b, _, _ = load_generator(str(tmp_path / "split" / "step-000000006" / "model"))
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name
    assert os.path.getsize(tmp_path / "split" / "step-000000006" / "samples.png") > 0


def _two_workers(rank, tmp, root, embedder):
    cfg = tiny_cfg(Path(root), embedder, max_steps=3, checkpoint_every_steps=3, similarity_weight=0.05)
    fit_generator(LocalSession(f"{tmp}/moved"), cfg, f"{root}/data", "moved")


def test_a_run_continues_on_another_worker_count(data, tmp_path):
    """Two workers make the one-worker run's batches and updates (up to summation order), and their
    checkpoint continues on one worker. AdamW magnifies rounding in near-zero gradients (its first
    steps are about lr * sign(g)), so later weights are compared at the checkpoint, not after it."""
    from gloo_workers import spawn_gloo

    root, embedder, _ = data
    spawn_gloo(_two_workers, str(tmp_path), str(root), embedder)  # steps 1-3 on two workers
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the workers' thread count: the same kernels, the same rounding
    try:
        cfg = tiny_cfg(root, embedder, max_steps=6, checkpoint_every_steps=3, similarity_weight=0.05)
        fit_generator(LocalSession(str(tmp_path / "one")), cfg, str(root / "data"), "one")
        moved = fit_generator(LocalSession(str(tmp_path / "moved")), cfg, str(root / "data"), "moved")  # 4-6 on one
    finally:
        torch.set_num_threads(threads)
    assert moved["resumes"] == [{"global_step": 3, "world_size": 1}] and moved["global_step"] == 6
    a, _, _ = load_generator(str(tmp_path / "moved" / "step-000000003" / "model"))
    b, _, _ = load_generator(str(tmp_path / "one" / "step-000000003" / "model"))
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=0, msg=name)  # lr 1e-3: within 1 % of one step
    first = torch.load(tmp_path / "moved" / "step-000000003" / "optimizer.pt", weights_only=True)["state"]
    second = torch.load(tmp_path / "one" / "step-000000003" / "optimizer.pt", weights_only=True)["state"]
    for key in second:
        for moment in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(first[key][moment], second[key][moment], atol=1e-6, rtol=1e-3)


def test_drawing_is_deterministic_per_sample_and_independent_of_the_batch():
    model = tiny_model().eval()
    sched = dict(noise_scheduler(1000).config)
    f = np.random.default_rng(0).normal(size=(3, 16)).astype(np.float32)
    together = ddim_sample(model, sched, f, [0.0, 0.5, 0.9], [11, 12, 13], steps=3)
    alone = ddim_sample(model, sched, f[1:2], [0.5], [12], steps=3)
    torch.testing.assert_close(together[1:2], alone, atol=1e-5, rtol=0)
    again = ddim_sample(model, sched, f, [0.0, 0.5, 0.9], [11, 12, 13], steps=3)
    assert torch.equal(together, again)
    assert not torch.equal(together[0], ddim_sample(model, sched, f[:1], [0.0], [99], steps=3)[0])


@pytest.mark.parametrize("bad", [1.5, float("nan"), -1.01])
def test_a_bad_target_similarity_fails_in_one_line(bad):
    with pytest.raises(ValueError, match=r"similarity: target similarity .* is outside \[-1, 1\]") as info:
        check_similarities([0.0, bad])
    assert "\n" not in str(info.value)
    with pytest.raises(Exception, match="outside"):
        load_config(None, [f"generator.hybrid.cemiface.similarity=[{bad}]"])


def test_the_similarity_loss_needs_a_torch_embedder():
    with pytest.raises(Exception, match=r"must be differentiable \(facegen, arcface_torch; got dlib\)"):
        load_config(None, ["train_generator.embedder.kind=dlib"])
    assert load_config(None, ["train_generator.embedder.kind=dlib", "train_generator.similarity_weight=0"])


def _hybrid(tmp_path, photos, model, **cemiface):
    from facegen.config import (
        CemiFaceSettings,
        DetectorSettings,
        EmbedderSettings,
        GeneratorSettings,
        HybridSettings,
        ReferenceSettings,
    )
    from facegen.generators.hybrid import HybridGenerator

    hybrid = HybridSettings(
        reference=ReferenceSettings(backend="photos", photos_dir=str(photos), max_attempts=2),
        detector=DetectorSettings(kind="dlib", min_size=40), embedder=EmbedderSettings(kind="dlib"), expander="cemiface",
        cemiface=CemiFaceSettings(model=str(model), ddim_steps=2, micro_batch=2, **cemiface))
    return HybridGenerator(GeneratorSettings(backend="hybrid", images_per_identity=3, hybrid=hybrid), seed=0)


def test_the_hybrid_backend_draws_each_sample_at_its_m_the_same_in_any_batch(tmp_path):
    import cv2
    import insightface

    from facegen.generators import sample_seed
    from facegen.schema import STATUS_ERROR, STATUS_OK

    hanks = cv2.imread(os.path.join(os.path.dirname(insightface.__file__), "data", "images", "Tom_Hanks_54745.png"))
    (tmp_path / "faces").mkdir()
    (tmp_path / "walls").mkdir()
    cv2.imwrite(str(tmp_path / "faces" / "hanks.png"), cv2.resize(hanks, (200, 200), interpolation=cv2.INTER_CUBIC))
    cv2.imwrite(str(tmp_path / "walls" / "wall.png"), np.full((128, 128, 3), 90, np.uint8))  # no face
    save_generator(str(tmp_path / "gen"), tiny_model(id_dim=128).eval(), dict(noise_scheduler(1000).config),
                   {"embedder": {"kind": "dlib", "dim": 128}})
    generator = _hybrid(tmp_path, tmp_path / "faces", tmp_path / "gen", similarity=[0.0, 0.5])
    alone = generator({"identity_id": np.array([2]), "block_id": np.array([0])})
    mixed = generator({"identity_id": np.array([0, 2]), "block_id": np.array([0, 0])})
    assert alone["status"].tolist() == [STATUS_OK] * 3 and alone["source"][0] == "hybrid:photos+cemiface"
    assert alone["requested_similarity"].tolist() == [0.0, 0.5, 0.0]  # the list, cycled per sample
    assert np.isfinite(alone["realised_similarity"]).all()
    keep = mixed["identity_id"] == 2
    assert alone["image"].tolist() == mixed["image"][keep].tolist()
    row = generator.regenerate(2, 1)
    assert row["image"] == alone["image"][1] and row["seed"] == sample_seed(0, 2, 1)
    banded = _hybrid(tmp_path, tmp_path / "faces", tmp_path / "gen", similarity_band=(0.2, 0.4))
    drawn = banded({"identity_id": np.array([2]), "block_id": np.array([0])})["requested_similarity"]
    assert ((drawn >= 0.2) & (drawn <= 0.4)).all() and len(set(drawn.tolist())) == 3

    faceless = _hybrid(tmp_path, tmp_path / "walls", tmp_path / "gen")({"identity_id": np.array([5]), "block_id": np.array([0])})
    assert faceless["status"].tolist() == [STATUS_ERROR] * 3
    assert "no usable reference face in 2 attempts" in faceless["reason"][0] and "\n" not in faceless["reason"][0]
    save_generator(str(tmp_path / "other"), tiny_model(id_dim=16).eval(), dict(noise_scheduler(1000).config),
                   {"embedder": {"kind": "facegen", "dim": 16}})
    with pytest.raises(ValueError, match="trained on facegen features of width 16, but generator.hybrid.embedder gives dlib"):
        _hybrid(tmp_path, tmp_path / "faces", tmp_path / "other")
