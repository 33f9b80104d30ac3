"""CemiFace's similarity control, measured on CPU: does an image drawn at m have cosine about m?

    python bench/cemiface_control.py [--out outputs/bench/cemiface] [--steps 3000] [--quick]

1. Data: the DCGAN (gan-face-generate, a real face generator) draws ``--identities`` identities; each
   gets ``--per-identity`` images whose latent is the identity's plus noise of a spread drawn per
   image from [0, 1.2] (so their similarity to the identity spans near 1 down to near 0). dlib's
   descriptor embeds every fixed ArcFace crop; the descriptors are centred on the training mean (dlib's
   raw cosines all sit near 0.9: the mean is most of their norm) and L2-normalised: that is C_id and
   the cosine that defines m.
2. Training: facegen's CemiFace UNet (32 px) with facegen's pair stream and loss
   (:mod:`facegen.train.generator_data`, :func:`facegen.models.cemiface.cemiface_loss`), MSE
   alone (dlib is no torch network), AdamW, on all but ``--holdout`` identities.
3. Control: for each held-out identity (its first image as the inquiry) and each m in {0.0, 0.3,
   0.6, 0.9}, ``--per-m`` images with DDIM 20 steps; each is embedded by the same centred dlib and
   its cosine to C_id is the realised similarity. Reported: Spearman of requested m against realised
   similarity (target >= 0.5), mean and std per m, and the 95th percentile of different-identity
   pairs of real held-out images (target: the mean at m = 0.9 above it). The same for as many
   training identities (in-sample: whether the model learnt the conditioning at all, before whether
   it generalises). A plot of the curve. The trained model is kept in ``<out>/model`` and reused
   (``--retrain`` to train again).

No second embedder that agrees with dlib exists on this machine, so the judge is the conditioning
embedder itself (the issue asks for another "where possible").
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from facegen.config import EmbedderSettings, load_config  # noqa: E402
from facegen.faces.align import align_face  # noqa: E402
from facegen.faces.embed import build_embedder  # noqa: E402
from facegen.generators.crop import to_uint8_images  # noqa: E402
from facegen.generators.gan import build_gan  # noqa: E402
from facegen.models.cemiface import (  # noqa: E402
    ddim_sample,
    load_generator,
    noise_scheduler,
    save_generator,
    to_aligned_crops,
)
from facegen.train.generator_data import PairSampler, PairTable  # noqa: E402
from facegen.models.cemiface import cemiface_loss
from facegen.train.generator_fit import build_model, spearman  # noqa: E402

CONTROL_M = [0.0, 0.3, 0.6, 0.9]


def make_data(n_ids: int, per_id: int, size: int, seed: int = 0) -> dict:
    import cv2

    gan = build_gan(load_config(None, ["generator.backend=dcgan", "generator.device=cpu"]).generator)
    landmarks = gan.crop.landmarks()
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_ids, gan.latent_dim))
    spreads = rng.uniform(0.0, 1.2, (n_ids, per_id))
    spreads[:, 0] = 0.0  # each identity's first image is the identity itself (the inquiry of the control)
    z = (centres[:, None, :] + spreads[..., None] * rng.standard_normal((n_ids, per_id, gan.latent_dim))).reshape(-1, gan.latent_dim)
    crops = []
    with torch.no_grad():
        for start in range(0, len(z), 128):
            images = to_uint8_images(gan.render(torch.from_numpy(z[start : start + 128].astype(np.float32))))
            crops += [align_face(im, landmarks) for im in images]
    crops = np.stack(crops)
    dlib = build_embedder(EmbedderSettings(kind="dlib"))
    raw = np.concatenate([dlib.embed(crops[i : i + 256]) for i in range(0, len(crops), 256)]).astype(np.float64)
    small = np.stack([cv2.resize(c, (size, size), interpolation=cv2.INTER_AREA) for c in crops])
    return {"crops": small, "raw": raw, "labels": np.repeat(np.arange(n_ids), per_id), "spreads": spreads.reshape(-1)}


class CentredDlib:
    """dlib's descriptor, centred on a fixed mean and L2-normalised (the bench's C_id embedder)."""

    def __init__(self, mean: np.ndarray):
        self.dlib, self.mean = build_embedder(EmbedderSettings(kind="dlib")), mean

    def embed(self, crops: np.ndarray) -> np.ndarray:
        d = self.dlib.embed(crops).astype(np.float64) - self.mean
        return d / np.linalg.norm(d, axis=1, keepdims=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="outputs/bench/cemiface")
    parser.add_argument("--identities", type=int, default=400)
    parser.add_argument("--per-identity", type=int, default=10)
    parser.add_argument("--holdout", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--per-m", type=int, default=4)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--retrain", action="store_true", help="train again even if <out>/model exists")
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny sizes")
    args = parser.parse_args()
    if args.quick:
        args.identities, args.per_identity, args.holdout, args.steps, args.per_m = 24, 4, 4, 20, 1
    os.makedirs(args.out, exist_ok=True)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    size = 32
    started = time.time()
    cache = f"{args.out}/data-{args.identities}x{args.per_identity}.npz"
    if os.path.exists(cache):
        with np.load(cache) as f:
            data = {k: f[k] for k in f.files}
    else:
        data = make_data(args.identities, args.per_identity, size)
        np.savez(cache, **data)
    data_seconds = time.time() - started
    labels = data["labels"]
    held = np.arange(args.identities - args.holdout, args.identities)
    train = ~np.isin(labels, held)
    mean = data["raw"][train].mean(axis=0)
    feats = data["raw"] - mean
    feats = (feats / np.linalg.norm(feats, axis=1, keepdims=True)).astype(np.float32)
    table = PairTable(data["crops"], feats, labels.astype(np.int64),
                      {"holdout_labels": held.tolist(), "feature_dim": feats.shape[1], "key": {}})
    cfg = load_config(None, [
        "train_generator.embedder.kind=dlib", "train_generator.similarity_weight=0", f"train_generator.net.image_size={size}",
        "train_generator.net.block_out_channels=[32,64,64]", "train_generator.net.layers_per_block=1",
        "train_generator.net.attention_head_dim=4", "train_generator.net.norm_num_groups=16",
        "train_generator.net.cross_attention_dim=64", "train_generator.net.similarity_dim=32"])
    sampler = PairSampler(table, args.batch, 0, 0.02, 1000)
    _, _, m_train = sampler.pairs(0, 0)
    scheduler = noise_scheduler(1000)
    model_dir = f"{args.out}/model-{args.steps}"
    t0, losses = time.time(), []
    if os.path.exists(f"{model_dir}/cemiface.json") and not args.retrain:
        model, _, info = load_generator(model_dir)
        losses, train_seconds = info["losses"], info["train_seconds"]
    else:
        torch.manual_seed(0)
        model = build_model(cfg, feats.shape[1])
        optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-2)
        model.train()
        for step in range(args.steps):
            epoch, in_epoch = divmod(step, sampler.steps_per_epoch)
            loss, _ = cemiface_loss(model, scheduler, sampler.batch(epoch, in_epoch), 0.0, None, 1000)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            losses.append(float(loss.detach()))
            if (step + 1) % 250 == 0:
                print(f"step {step + 1}/{args.steps} mse {np.mean(losses[-250:]):.4f} ({time.time() - t0:.0f} s)", flush=True)
        train_seconds = time.time() - t0
        save_generator(model_dir, model, dict(scheduler.config), {"losses": losses, "train_seconds": train_seconds,
                                                                  "lr": args.lr, "steps": args.steps})
    model.eval()

    judge = CentredDlib(mean)

    def control(identities: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
        inquiries = np.array([np.flatnonzero(labels == h)[0] for h in identities])
        plan = [(i, m, k) for i in range(len(identities)) for m in CONTROL_M for k in range(args.per_m)]
        seeds = [seed + 1000 * i + 10 * k + CONTROL_M.index(m) for i, m, k in plan]
        images = []
        for start in range(0, len(plan), 64):
            part = plan[start : start + 64]
            drawn = ddim_sample(model, dict(scheduler.config), feats[inquiries[[i for i, _, _ in part]]],
                                [m for _, m, _ in part], seeds[start : start + 64], 20)
            images.append(to_aligned_crops(drawn))
        realised = np.einsum("nd,nd->n", judge.embed(np.concatenate(images)),
                             feats[inquiries[[i for i, _, _ in plan]]].astype(np.float64))
        return np.array([m for _, m, _ in plan]), realised

    requested, realised = control(held, 0)
    seen_requested, seen_realised = control(np.arange(args.holdout), 10**6)  # training identities
    # different-identity pairs among the held-out identities' real images, same centred embedder
    real = feats[~train].astype(np.float64)
    real_labels = labels[~train]
    sims = real @ real.T
    iu = np.triu_indices(len(real), 1)
    different = sims[iu][real_labels[iu[0]] != real_labels[iu[1]]]
    p95 = float(np.quantile(different, 0.95))

    def by(req: np.ndarray, got: np.ndarray) -> list[dict]:
        return [{"m": m, "mean": round(float(got[req == m].mean()), 4), "std": round(float(got[req == m].std()), 4)}
                for m in CONTROL_M]

    by_m = by(requested, realised)
    report = {
        "machine": "CPU, 2 cores", "identities": args.identities, "per_identity": args.per_identity, "holdout": args.holdout,
        "steps": args.steps, "batch": args.batch, "image_size": size,
        "train_m_quantiles": [round(float(q), 3) for q in np.quantile(m_train, [0.05, 0.25, 0.5, 0.75, 0.95])],
        "final_mse": round(float(np.mean(losses[-100:])), 4),
        "spearman": round(spearman(requested, realised), 4), "by_m": by_m,
        "training_identities": {"spearman": round(spearman(seen_requested, seen_realised), 4),
                                "by_m": by(seen_requested, seen_realised)},
        "different_identity_p95": round(p95, 4), "top_m_above_p95": bool(by_m[-1]["mean"] > p95),
        "data_seconds": round(data_seconds, 1), "train_seconds": round(train_seconds, 1),
        "images_per_s_train": round(args.steps * args.batch / train_seconds, 1),
    }
    print(json.dumps(report, indent=2), flush=True)
    with open(f"{args.out}/report.json", "w") as f:
        json.dump(report, f, indent=2)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(4.5, 4))
        ax.scatter(requested + np.random.default_rng(0).uniform(-0.02, 0.02, len(requested)), realised, s=8, alpha=0.5)
        ax.plot(CONTROL_M, [b["mean"] for b in by_m], "o-", color="C1", label="mean realised (held out)")
        ax.plot(CONTROL_M, [b["mean"] for b in report["training_identities"]["by_m"]], "s--", color="C2",
                label="mean realised (training ids)")
        ax.plot([-0.05, 1], [-0.05, 1], ":", color="grey", label="realised = m")
        ax.axhline(p95, color="C3", ls="--", label="95th pct. different identities")
        ax.set_xlabel("requested m")
        ax.set_ylabel("realised cosine (centred dlib)")
        ax.set_title(f"CemiFace control, Spearman {report['spearman']:.2f}")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(f"{args.out}/control.png", dpi=120)
    except ImportError:
        pass


if __name__ == "__main__":
    main()
