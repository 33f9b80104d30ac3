"""Cleaning on the embedder's own scale (issue 20): the cluster expert on a clean and a planted set of
real DCGAN faces, with dlib and with a facegen embedder, HybridGen's band mode against the
calibrated mode, side by side in one run.

    python bench/cleaning_scale.py [--identities 60] [--images 12] [--sigma 0.2] [--out outputs/bench/cleaning_scale]

* Faces: the DCGAN of ``gan-face-generate`` (DigiFace-1M weights, non-commercial research only).
  An identity is a gaussian latent; its images are the latent plus gaussian noise of ``--sigma``.
  The clean set has nothing wrong in it; the planted set is the same with one image of every
  identity replaced by an image of another identity (ground truth: the latent it came from).
* Embedders: dlib's 128-d descriptor (faces aligned on dlib's own detections of the image upscaled
  3x, the DCGAN's fixed crop where it finds none) and a facegen IResNet-18 (width 16, 128-d)
  trained here with ArcFace on ``--train-identities`` other DCGAN identities (fixed crops).
* Calibrations: each embedder measured (``facegen.faces.calibration.measure_calibration``) on a
  verification set of further identities (genuine pairs: two images of one identity; impostor
  pairs: two identities); dlib also with its published rule (distance 0.6).
* Decisions: ``facegen.clean.block.vote_block`` (the cluster expert; fusion as the stage's default).

Targets (issue 20): on the clean set the calibrated mode removes under 5 % of the images; on the
planted set it still catches >= 95 % of the planted images.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

from dcgan_identity import Judge, cached, fixed_crops, render  # noqa: E402

from facegen.clean.block import vote_block  # noqa: E402
from facegen.clean.thresholds import resolve_clean_settings  # noqa: E402
from facegen.config import CleanSettings, load_config  # noqa: E402
from facegen.faces.calibration import PUBLISHED, measure_calibration  # noqa: E402
from facegen.faces.embed import build_embedder, to_model_input  # noqa: E402
from facegen.generators.gan import build_gan  # noqa: E402
from facegen.images import encode_image  # noqa: E402
from facegen.schema import rows_to_batch, sample_schema, table_from_batch  # noqa: E402


def identity_latents(seed: int, identities: int, images: int, sigma: float, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """``[identities * images, dim]`` latents (identity latent + noise) and their identity index."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((identities, dim)).astype(np.float32)
    labels = np.repeat(np.arange(identities), images)
    return centres[labels] + sigma * rng.standard_normal((len(labels), dim)).astype(np.float32), labels


def train_facegen_embedder(gan, out: str, identities: int, images: int, sigma: float, epochs: int) -> tuple[str, float]:
    """An IResNet-18 (width 16, 128-d) trained with ArcFace on DCGAN identities; (folder, seconds)."""
    from facegen.models.iresnet import build_backbone
    from facegen.models.iresnet_checkpoint import save_backbone
    from facegen.train.heads import ArcFace, MarginClassifier

    folder = f"{out}/facegen_embedder"
    if os.path.exists(f"{folder}/backbone.json"):
        return folder, 0.0
    started = time.time()
    z, labels = identity_latents(101, identities, images, sigma, gan.latent_dim)
    x_all = to_model_input(fixed_crops(gan, render(gan, z)), torch.device("cpu"))
    y_all = torch.from_numpy(labels)
    torch.manual_seed(0)
    model = build_backbone("iresnet18", width=16, embedding_size=128)
    head = MarginClassifier(128, identities, ArcFace(s=32.0, m=0.3))
    params = list(model.parameters()) + list(head.parameters())
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=5e-4)
    steps = epochs * ((len(labels) + 63) // 64)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=steps)
    rng = np.random.default_rng(0)
    model.train()
    for epoch in range(epochs):
        order, losses = rng.permutation(len(labels)), []
        for start in range(0, len(labels), 64):
            idx = torch.from_numpy(order[start : start + 64])
            x = x_all[idx]
            flip = torch.from_numpy(rng.random(len(idx)) < 0.5)
            x = torch.where(flip[:, None, None, None], x.flip(3), x)
            loss = head(model(x), y_all[idx])  # the margin head returns its cross-entropy
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
        print(f"  facegen embedder epoch {epoch + 1}/{epochs}: loss {np.mean(losses):.3f}", flush=True)
    save_backbone(folder, model.eval(), "iresnet18", 16, 128)
    return folder, time.time() - started


def sample_table(embeddings: np.ndarray, labels: np.ndarray, shown: np.ndarray, images: np.ndarray) -> "pa.Table":
    """A SAMPLE block: identity ``labels``, ground truth ``shown``, the images and their embeddings."""
    schema = sample_schema(embeddings.shape[1])
    rows = [{"identity_id": int(i), "block_id": 0, "sample_idx": k, "seed": k, "source": "dcgan",
             "image": encode_image(images[k], "png"), "true_identity_id": int(s), "meta": "{}", "embedding": embeddings[k],
             "quality": np.float32(1.0), "difficulty": np.float32(np.nan), "status": "ok", "reason": "", "origin": "generated"}
            for k, (i, s) in enumerate(zip(labels, shown))]
    return table_from_batch(rows_to_batch(rows, schema), schema)


def cleaned(table, settings: CleanSettings) -> np.ndarray:
    """Kept mask of the rows of ``table`` (in its order) after the expert pass."""
    clean, _, _ = vote_block(table, 0, settings)
    kept = {(i, k) for i, k, s in zip(clean.column("identity_id").to_pylist(), clean.column("sample_idx").to_pylist(),
                                       clean.column("status").to_pylist()) if s == "ok"}
    return np.array([(i, k) in kept for i, k in zip(table.column("identity_id").to_pylist(), table.column("sample_idx").to_pylist())])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--identities", type=int, default=60)
    parser.add_argument("--images", type=int, default=12)
    parser.add_argument("--sigma", type=float, default=0.2, help="latent noise of an identity's images")
    parser.add_argument("--calibration-identities", type=int, default=60)
    parser.add_argument("--train-identities", type=int, default=300)
    parser.add_argument("--train-images", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--out", default="outputs/bench/cleaning_scale")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    started = time.time()
    torch.set_num_threads(os.cpu_count() or 1)
    gan = build_gan(load_config(None, ["generator.backend=dcgan", "generator.device=cpu"]).generator)
    judge = Judge(gan.crop.landmarks())
    facegen_dir, train_seconds = train_facegen_embedder(gan, args.out, args.train_identities, args.train_images, args.sigma, args.epochs)
    student = build_embedder(load_config(None, [f"faces.embedder.path={facegen_dir}", "faces.embedder.device=cpu"]).faces.embedder)
    dlib = build_embedder(load_config(None, ["faces.embedder.kind=dlib"]).faces.embedder)

    # the evaluated set and, planted, one image per identity swapped for another identity's
    z, labels = identity_latents(7, args.identities, args.images, args.sigma, gan.latent_dim)
    rng = np.random.default_rng(8)
    shown = labels.copy()
    planted_rows = np.array([i * args.images + int(rng.integers(args.images)) for i in range(args.identities)])
    shown[planted_rows] = (labels[planted_rows] + 1 + rng.integers(args.identities - 1, size=len(planted_rows))) % args.identities
    # an identity's planted image is the other identity's image of the same slot: drawn from its latent
    z_planted = z.copy()
    z_planted[planted_rows] = z[shown[planted_rows] * args.images + planted_rows % args.images]
    # the calibration set: further identities, 4 images each; pairs 2 genuine + 2 impostor per identity
    zc, lc = identity_latents(9, args.calibration_identities, 4, args.sigma, gan.latent_dim)

    t0 = time.time()
    images = {name: render(gan, latents) for name, latents in (("clean", z), ("planted", z_planted), ("calibration", zc))}

    def embed_all() -> dict[str, np.ndarray]:
        out = {f"dlib/{name}": dlib.embed(judge.crops(im), flip=True) for name, im in images.items()}
        return out | {f"facegen/{name}": student.embed(fixed_crops(gan, im), flip=True) for name, im in images.items()}

    # cached per --out (the sets are deterministic): a rerun measures the decisions only
    flat = cached(f"{args.out}/embeddings-{args.identities}x{args.images}-{args.calibration_identities}.npz", embed_all)
    embedded = {kind: {name: flat[f"{kind}/{name}"] for name in images} for kind in ("dlib", "facegen")}
    embed_seconds = time.time() - t0
    pairs, same = [], []
    n_cal = args.calibration_identities
    for i in range(n_cal):
        a = i * 4
        pairs += [(a, a + 1), (a + 2, a + 3), (a, ((i + 1) % n_cal) * 4 + 1), (a + 2, ((i + 7) % n_cal) * 4 + 3)]
        same += [True, True, False, False]
    pairs = np.array(pairs)
    calibrations = {}
    for kind, sets in embedded.items():
        e = sets["calibration"]
        interleaved = np.stack([e[pairs[:, 0]], e[pairs[:, 1]]], axis=1).reshape(-1, e.shape[1])
        calibrations[(kind, "measured")] = measure_calibration(interleaved, np.array(same), kind, "DCGAN calibration set")
    calibrations[("dlib", "published")] = PUBLISHED["dlib"]

    rows = []
    truth_wrong = shown != labels
    for (kind, source), calibration in calibrations.items():
        for mode in ("band", "calibrated"):
            # min_calibration_accuracy 0: the calibrated rows are the calibrated mode, whatever the set's accuracy
            dbscan = {"mode": mode, "min_calibration_accuracy": 0.0}
            settings = resolve_clean_settings(CleanSettings(min_images=2, target_images=args.images, dbscan=dbscan), calibration)
            kept_clean = cleaned(sample_table(embedded[kind]["clean"], labels, labels, images["clean"]), settings)
            kept_planted = cleaned(sample_table(embedded[kind]["planted"], labels, shown, images["planted"]), settings)
            rows.append({
                "embedder": kind, "calibration": source, "mode": mode,
                "t": round(float(settings.dbscan.threshold), 4) if mode == "calibrated" else "adaptive",
                "clean_removed_pct": round(100 * float((~kept_clean).mean()), 2),
                "planted_recall_pct": round(100 * float((~kept_planted[truth_wrong]).mean()), 2),
                "planted_set_good_removed_pct": round(100 * float((~kept_planted[~truth_wrong]).mean()), 2),
            })
            print(json.dumps(rows[-1]), flush=True)
    report = {
        "set": {"identities": args.identities, "images": args.images, "sigma": args.sigma, "planted_per_identity": 1},
        "calibrations": {f"{k}/{s}": {"same_person": c.same_person, "pairs": c.pairs, "accuracy": c.accuracy}
                         for (k, s), c in calibrations.items()},
        "dlib_detection_rate": round(judge.detected / max(judge.total, 1), 4),
        "rows": rows, "embed_seconds": round(embed_seconds, 1), "facegen_train_seconds": round(train_seconds, 1),
        "seconds": round(time.time() - started, 1),
    }
    with open(f"{args.out}/report.json", "w") as f:
        json.dump(report, f, indent=2)
    print(f"calibrations: {json.dumps(report['calibrations'])}")
    print(f"{'embedder':<8} {'calibration':<10} {'mode':<11} {'t':>9} {'clean removed %':>16} {'planted recall %':>17} {'good removed (planted) %':>25}")
    for r in rows:
        print(f"{r['embedder']:<8} {r['calibration']:<10} {r['mode']:<11} {str(r['t']):>9} {r['clean_removed_pct']:>16} "
              f"{r['planted_recall_pct']:>17} {r['planted_set_good_removed_pct']:>25}")
    print(f"whole run {report['seconds']} s")


if __name__ == "__main__":
    main()
