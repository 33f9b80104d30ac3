"""Identity sampling and variation on the real DCGAN (CPU), judged by dlib's independent embedder.

    python bench/dcgan_identity.py [--out outputs/bench/dcgan_identity] [--quick]

1. Distils a facegen IResNet-18 (width 16, 128-d) from dlib's face descriptors on the DCGAN's own
   images (cosine loss to the centred descriptors), and reports how well it agrees with dlib on
   held-out images: mean cosine to dlib's centred descriptor, correlation of its pairwise cosine with
   minus dlib's pairwise distance, and agreement of the same-person decision (dlib: raw descriptor
   distance < 0.6; the student: the cosine threshold that calls the same share of training pairs
   the same person).
2. Fits DisCo directions in the DCGAN's latent space: linear regressions of yaw, pitch, smile (mouth
   width over eye distance), brightness and lighting asymmetry, measured with dlib's detector and
   landmarks, on z (InterFaceGAN-style); each spread is the standard deviation of latents along it.
3. Langevin vs Gaussian identities (latent space, forces through G and the distilled student, d0 =
   the student's same-person angle + 0.1 rad, k_l = 0.01): the number of identity pairs dlib calls
   the same person, side by side.
4. Variations of the same identities: plain latent noise (sigma 0.2), Dispersion, DisCo, and plain
   noise of the same latent spread as Dispersion: how often dlib says a variant is still its
   reference's person, and how much the variants vary (mean dlib distance among them).

dlib (the faces package's embedder and detector) judges every image: the detector finds the face
on the image upscaled to 192 px and its landmarks align it; where it finds none the DCGAN's fixed
crop is used. Intermediate results are cached in ``--out`` (delete it to recompute).
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

from facegen.config import DispersionSettings, EmbedderSettings, LangevinSettings, detector_settings, load_config  # noqa: E402
from facegen.faces.align import align_face  # noqa: E402
from facegen.faces.detect import build_detector  # noqa: E402
from facegen.faces.embed import build_embedder, to_model_input  # noqa: E402
from facegen.generators.crop import to_uint8_images  # noqa: E402
from facegen.generators.gan import build_gan  # noqa: E402

DLIB_SAME = 0.6
UPSCALE = 3


class Judge:
    """dlib's detector and raw 128-d descriptor (the faces package's), on DCGAN images."""

    def __init__(self, fixed_landmarks: np.ndarray):
        self.detector = build_detector(detector_settings(kind="dlib", dlib_model="hog", dlib_upsample=1))
        self.embedder = build_embedder(EmbedderSettings(kind="dlib"))
        self.fixed = fixed_landmarks
        self.detected = self.total = 0

    def crops(self, images: np.ndarray) -> np.ndarray:
        """112 px ArcFace crops aligned on dlib's landmarks (the fixed crop where dlib finds no face)."""
        import cv2

        out = []
        for image in images:
            big = cv2.resize(image, None, fx=UPSCALE, fy=UPSCALE, interpolation=cv2.INTER_CUBIC)
            faces = self.detector.detect(big)
            self.total += 1
            if faces:
                self.detected += 1
                out.append(align_face(big, faces[0].landmarks))
            else:
                out.append(align_face(image, self.fixed))
        return np.stack(out)

    def describe(self, images: np.ndarray) -> np.ndarray:
        """Raw dlib descriptors (dlib's same-person rule: distance < 0.6)."""
        chips = self.embedder.crop.from_aligned(self.crops(images))
        return np.asarray([list(v) for v in self.embedder.model.compute_face_descriptor(list(chips))], np.float64)


def render(gan, latents: np.ndarray) -> np.ndarray:
    out = []
    with torch.no_grad():
        for start in range(0, len(latents), 64):
            out.append(to_uint8_images(gan.render(torch.from_numpy(np.ascontiguousarray(latents[start : start + 64], np.float32)))))
    return np.concatenate(out)


def fixed_crops(gan, images: np.ndarray) -> np.ndarray:
    landmarks = gan.crop.landmarks()
    return np.stack([align_face(im, landmarks) for im in images])


def cached(path: str, compute):
    if os.path.exists(path):
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    result = compute()
    np.savez(path, **result)
    return result


def distill(gan, judge: Judge, out: str, n_train: int, n_test: int, epochs: int) -> tuple[str, dict]:
    from facegen.models.iresnet import build_backbone
    from facegen.models.iresnet_checkpoint import load_backbone, save_backbone

    def data():
        z = np.random.default_rng(11).standard_normal((n_train + n_test, gan.latent_dim)).astype(np.float32)
        images = render(gan, z)
        return {"crops": fixed_crops(gan, images), "dlib": judge.describe(images)}

    t0 = time.time()
    d = cached(f"{out}/distill_data.npz", data)
    data_seconds = time.time() - t0
    crops, teacher = d["crops"], d["dlib"]
    # dlib's descriptors share one large common component (the mean is 94 % of their norm on these
    # faces): distilling raw directions teaches the mean face. The student learns the centred ones.
    centred = teacher - teacher[:n_train].mean(axis=0)
    target = torch.from_numpy(centred / np.linalg.norm(centred, axis=1, keepdims=True)).float()
    student_dir = f"{out}/student"
    t0 = time.time()
    if not os.path.exists(f"{student_dir}/backbone.json"):
        torch.manual_seed(0)
        model = build_backbone("iresnet18", width=16, embedding_size=128)
        opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=5e-4)
        steps = epochs * ((n_train + 63) // 64)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
        x_all = to_model_input(crops[:n_train], torch.device("cpu"))
        rng = np.random.default_rng(0)
        model.train()
        for epoch in range(epochs):
            order = rng.permutation(n_train)
            losses = []
            for start in range(0, n_train, 64):
                idx = order[start : start + 64]
                x = x_all[idx]
                flip = torch.from_numpy(rng.random(len(idx)) < 0.5)
                x = torch.where(flip[:, None, None, None], x.flip(3), x)  # dlib's descriptor is nearly flip-invariant
                pred = torch.nn.functional.normalize(model(x), dim=1)
                loss = (1 - (pred * target[idx]).sum(dim=1)).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
                losses.append(float(loss.detach()))
            print(f"  distill epoch {epoch + 1}/{epochs}: loss {np.mean(losses):.4f}", flush=True)
        save_backbone(student_dir, model.eval(), "iresnet18", 16, 128)
    train_seconds = time.time() - t0
    student = load_backbone(student_dir)
    with torch.no_grad():
        emb = torch.nn.functional.normalize(student(to_model_input(crops, torch.device("cpu"))), dim=1).numpy()
    test = slice(n_train, n_train + n_test)
    t_unit = target.numpy()
    cos_to_dlib = float((emb[test] * t_unit[test]).sum(axis=1).mean())
    iu = np.triu_indices(n_test, 1)
    s_student = (emb[test] @ emb[test].T)[iu]
    raw = teacher[test]
    d_dlib = np.linalg.norm(raw[:, None] - raw[None], axis=2)[iu]
    same_dlib = d_dlib < DLIB_SAME
    # the student's threshold: the cosine that calls the same share of training pairs the same person
    tr = slice(0, min(n_train, 600))
    iu_tr = np.triu_indices(len(range(*tr.indices(n_train))), 1)
    raw_tr = teacher[tr]
    rate = float((np.linalg.norm(raw_tr[:, None] - raw_tr[None], axis=2)[iu_tr] < DLIB_SAME).mean())
    threshold = float(np.quantile((emb[tr] @ emb[tr].T)[iu_tr], 1 - rate))
    same_student = s_student > threshold
    agreement = {
        "train_images": n_train, "test_images": n_test, "epochs": epochs,
        "mean_cos_student_to_centred_dlib_test": round(cos_to_dlib, 4),
        "correlation_student_similarity_vs_minus_dlib_distance_test": round(float(np.corrcoef(s_student, -d_dlib)[0, 1]), 4),
        "same_person_rate_dlib_test": round(float(same_dlib.mean()), 4),
        "same_person_decision_agreement_test": round(float((same_dlib == same_student).mean()), 4),
        "same_person_recall_of_dlib_pairs_test": round(float(same_student[same_dlib].mean()) if same_dlib.any() else float("nan"), 4),
        "student_cos_threshold": round(threshold, 4),
        "data_seconds": round(data_seconds, 1), "train_seconds": round(train_seconds, 1),
    }
    return student_dir, agreement


def fit_directions(gan, judge: Judge, out: str, n: int) -> dict:
    """Linear latent directions of measurable covariates (dlib landmarks, pixels), with spreads."""

    def data():
        z = np.random.default_rng(21).standard_normal((n, gan.latent_dim)).astype(np.float32)
        images = render(gan, z)
        import cv2

        rows, keep = [], []
        for i, image in enumerate(images):
            big = cv2.resize(image, None, fx=UPSCALE, fy=UPSCALE, interpolation=cv2.INTER_CUBIC)
            faces = judge.detector.detect(big)
            if not faces:
                continue
            p = faces[0].landmarks  # left eye, right eye, nose, left mouth, right mouth
            eyes_mid, mouth_mid = (p[0] + p[1]) / 2, (p[3] + p[4]) / 2
            eye_dist = np.linalg.norm(p[1] - p[0])
            yaw = (p[2, 0] - eyes_mid[0]) / eye_dist
            pitch = (p[2, 1] - eyes_mid[1]) / max(mouth_mid[1] - eyes_mid[1], 1e-6)
            smile = np.linalg.norm(p[4] - p[3]) / eye_dist
            grey = image.mean(axis=2)
            rows.append([yaw, pitch, smile, grey.mean() / 255, (grey[:, 32:].mean() - grey[:, :32].mean()) / 255])
            keep.append(i)
        return {"z": z[keep], "covariates": np.array(rows, np.float64)}

    d = cached(f"{out}/directions_data.npz", data)
    z, cov = d["z"].astype(np.float64), d["covariates"]
    names = ["yaw", "pitch", "smile", "brightness", "light_asymmetry"]
    directions, spreads, r2 = [], [], []
    for j in range(cov.shape[1]):
        y = (cov[:, j] - cov[:, j].mean()) / cov[:, j].std()
        coef, *_ = np.linalg.lstsq(np.c_[z, np.ones(len(z))], y, rcond=None)
        v = coef[:-1] / np.linalg.norm(coef[:-1])
        pred = np.c_[z, np.ones(len(z))] @ coef
        r2.append(float(1 - ((y - pred) ** 2).mean() / y.var()))
        directions.append(v)
        spreads.append(float((z @ v).std()))
    np.savez(f"{out}/dcgan_directions.npz", directions=np.array(directions, np.float32), spreads=np.array(spreads, np.float32))
    return {"path": f"{out}/dcgan_directions.npz", "names": names, "r2_in_sample": [round(v, 3) for v in r2],
            "spreads": [round(v, 3) for v in spreads], "faces_used": int(len(z))}


def dlib_same_pairs(desc: np.ndarray) -> tuple[int, int, float]:
    iu = np.triu_indices(len(desc), 1)
    d = np.linalg.norm(desc[:, None] - desc[None], axis=2)[iu]
    return int((d < DLIB_SAME).sum()), int(len(d)), float(d.mean())


def langevin_vs_gaussian(cfg_overrides: list[str], gan, judge: Judge, student_dir: str, n: int, iterations: int, d0: float) -> dict:
    from facegen.identities.encoder import ForceEmbedder, IdentityEncoder
    from facegen.identities.langevin import LangevinSampler, LangevinState, LatentSpace

    cfg = load_config(None, cfg_overrides + [f"generator.embedder.path={student_dir}"])
    encoder = IdentityEncoder(gan, ForceEmbedder(cfg.generator.embedder), 64)
    start = gan.gaussian_latents(0, np.arange(n))
    # k_l 0.01, not the paper's 0.1: the DCGAN's prior is N(0, I) (|z| about 10) and interaction forces
    # through G are O(1), so a pull of 0.1 |z| per unit time shrinks every z toward the mean face
    settings = LangevinSettings(space="latent", iterations=iterations, d0=d0, k_l=0.01, neighbours=min(32, n - 1), search_device="cpu")
    sampler = LangevinSampler(settings, LatentSpace(encoder, gan.latent_mean.cpu().numpy()))
    t0 = time.time()
    before = sampler.measure(start)
    state = LangevinState(start.copy(), 0, np.random.default_rng(3))
    sampler.run(state, iterations)
    after = sampler.measure(state.particles)
    seconds = time.time() - t0
    g_pairs, total, g_mean = dlib_same_pairs(judge.describe(render(gan, start)))
    l_pairs, _, l_mean = dlib_same_pairs(judge.describe(render(gan, state.particles)))
    return {"identities": n, "pairs": total, "iterations": iterations, "d0_student_rad": d0,
            "dlib_same_person_pairs_gaussian": g_pairs, "dlib_same_person_pairs_langevin": l_pairs,
            "dlib_mean_distance_gaussian": round(g_mean, 4), "dlib_mean_distance_langevin": round(l_mean, 4),
            "student_pairs_within_d0_gaussian": before["pairs_within_d0"], "student_pairs_within_d0_langevin": after["pairs_within_d0"],
            "mean_latent_norm_gaussian": round(float(np.linalg.norm(start, axis=1).mean()), 3),
            "mean_latent_norm_langevin": round(float(np.linalg.norm(state.particles, axis=1).mean()), 3),
            "langevin_seconds": round(seconds, 1)}


def variations(gan, judge: Judge, student_dir: str, directions_path: str, identities: int, per_identity: int, iterations: int) -> dict:
    from facegen.config import DiscoSettings, ForceEmbedderSettings
    from facegen.identities.encoder import ForceEmbedder, IdentityEncoder
    from facegen.identities.variation import covariate_offsets, disperse, load_directions, noise_variants

    encoder = IdentityEncoder(gan, ForceEmbedder(ForceEmbedderSettings(path=student_dir)), 64)
    units, spreads = load_directions(DiscoSettings(directions=directions_path), gan.latent_dim)
    settings = DispersionSettings(iterations=iterations)
    mean = np.zeros(gan.latent_dim, np.float32)
    refs = gan.gaussian_latents(1, np.arange(1000, 1000 + identities))
    sets: dict[str, list[np.ndarray]] = {"noise": [], "dispersion": [], "disco": [], "noise_matched": []}
    t0 = time.time()
    for k, ref in enumerate(refs):
        seeds = [k * 1000 + a for a in range(per_identity)]
        start = noise_variants(ref, seeds, settings.sigma)
        sets["noise"].append(start)
        dispersed, _ = disperse(ref, start, encoder, mean, settings, np.random.default_rng(k))
        sets["dispersion"].append(dispersed)
        rng = np.random.default_rng(10_000 + k)
        disco_start = start + covariate_offsets(units, spreads, per_identity, 0.5, rng)
        sets["disco"].append(disperse(ref, disco_start, encoder, mean, settings, rng)[0])
    spread = float(np.mean([np.linalg.norm(v - r, axis=1).mean() for v, r in zip(sets["dispersion"], refs)]))
    sigma_matched = spread / np.sqrt(gan.latent_dim)
    sets["noise_matched"] = [noise_variants(r, [k * 1000 + 500 + a for a in range(per_identity)], sigma_matched) for k, r in enumerate(refs)]
    seconds = time.time() - t0
    ref_desc = judge.describe(render(gan, refs))
    result = {"identities": identities, "variants_per_identity": per_identity, "dispersion_iterations": iterations,
              "sigma_noise": settings.sigma, "sigma_noise_matched": round(sigma_matched, 4), "variation_seconds": round(seconds, 1)}
    for name, variants in sets.items():
        same, within, latent = [], [], []
        for k, v in enumerate(variants):
            desc = judge.describe(render(gan, v))
            same.append(np.linalg.norm(desc - ref_desc[k], axis=1) < DLIB_SAME)
            iu = np.triu_indices(len(desc), 1)
            within.append(np.linalg.norm(desc[:, None] - desc[None], axis=2)[iu].mean())
            latent.append(np.linalg.norm(v - refs[k], axis=1).mean())
        result[name] = {"same_identity_rate_dlib": round(float(np.mean(same)), 4),
                        "mean_dlib_distance_among_variants": round(float(np.mean(within)), 4),
                        "mean_latent_distance_to_reference": round(float(np.mean(latent)), 3)}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="outputs/bench/dcgan_identity")
    parser.add_argument("--quick", action="store_true", help="small sizes (smoke run)")
    parser.add_argument("--epochs", type=int, default=12, help="distillation epochs")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    q = args.quick
    overrides = ["generator.backend=dcgan", "generator.device=cpu"]
    gan = build_gan(load_config(None, overrides).generator)
    judge = Judge(gan.crop.landmarks())
    started = time.time()
    report: dict = {"machine": "CPU, 2 cores, shared", "torch_threads": torch.get_num_threads()}
    student_dir, report["distillation"] = distill(gan, judge, args.out, 200 if q else 2000, 60 if q else 400, 2 if q else args.epochs)
    print(json.dumps(report["distillation"]), flush=True)
    report["directions"] = fit_directions(gan, judge, args.out, 200 if q else 1500)
    print(json.dumps(report["directions"]), flush=True)
    d0 = float(np.arccos(report["distillation"]["student_cos_threshold"])) + 0.1
    report["langevin"] = langevin_vs_gaussian(overrides, gan, judge, student_dir, 24 if q else 120, 3 if q else 20, d0)
    print(json.dumps(report["langevin"]), flush=True)
    report["variation"] = variations(gan, judge, student_dir, report["directions"]["path"], 3 if q else 24, 4 if q else 8, 2 if q else 20)
    print(json.dumps(report["variation"]), flush=True)
    report["dlib_detection_rate"] = round(judge.detected / max(judge.total, 1), 4)
    report["seconds"] = round(time.time() - started, 1)
    with open(f"{args.out}/report.json", "w") as f:
        json.dump(report, f, indent=2)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
