"""Training benchmarks on generated faces, measured side by side in one run.

    python bench/training.py [--quick] [--seeds 3] [--backend parametric|dcgan] [--only-conditions]
                             [--identities N] [--json bench/training_results.json]

``--backend parametric`` (default): the CPU renderer with planted wrong-identity images, cleaned
with an embedder bootstrapped on separate rendered identities. ``--backend dcgan``: the DCGAN of
gan-face-generate (64 px; DigiFace-1M weights, non-commercial research only); identities are
Gaussian latents, each identity's images are Dispersion variants as configs/gan_local.yaml makes
them (forces through an embedder bootstrapped on separate DCGAN identities), cleaning embeds with
dlib's 128-d descriptor, and the held-out set is DCGAN identities disjoint from the training ones,
varied the same way. The model and training settings are the same for both backends.

1. Ray Train loop versus the plain PyTorch loop: the same ``fit`` (model, data, threads) run by a
   1-worker ``TorchTrainer`` and by :class:`facegen.train.fit.LocalSession` in this process,
   interleaved; epoch images/s from the loop's own clock (target ratio >= 0.95).
2. Ingest alone (read, decode, augment; 0 / 1 / 2 decode threads, flip only and the DataCV
   augmentations) versus the train step alone on one decoded batch: ingest must outrun the step.
3. Identities per batch and read amplification of the stream reader on 4 simulated workers.
4. Curriculum (ordered pacing) versus shuffled on cleaned data, and cleaned versus raw data
   (shuffled; raw blocks have no difficulty score, so no curriculum): every condition
   trained with several seeds (the seed moves initialisation, data order and augmentation; the
   data set is the same), scored on held-out identities (insightface .bin protocol, 10 folds);
   accuracy mean and spread side by side.

``--only-conditions`` skips items 1-3. Needs Ray (data generation through the pipeline stages,
and item 1). Record the printed figures
in bench/RESULTS.md with the machine named.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402

from facegen.config import FacegenConfig, config_from_dict  # noqa: E402

THREADS = 2  # the CPUs of this machine: the Ray worker gets cpus_per_worker = 2, the plain loop 2 threads


def settings(root: str, quick: bool, backend: str = "parametric", identities: int | None = None) -> FacegenConfig:
    """The benchmark's data and model: the local demo's recipe at a size that fits 2 cores.

    ``dcgan`` changes only the data (generator, variation, cleaning embedder); model and training
    settings are the parametric run's.
    """
    ids, images = (24, 12) if quick else (100, 24)
    ids = identities or ids
    generator: dict = {"backend": "parametric", "images_per_identity": images, "batch_size": 4, "pool": {"num_cpus": 0.5},
                       "parametric": {"image_size": 128, "wrong_identity_rate": 0.1}}
    if backend == "dcgan":  # configs/gan_local.yaml's generator; Gaussian identities (no Langevin stage)
        generator = {"backend": "dcgan", "device": "cpu", "images_per_identity": images, "batch_size": 4,
                     "pool": {"num_cpus": 0.5}, "variation": "dispersion", "dispersion": {"sigma": 0.2, "iterations": 5}}
    clean: dict = {"min_images": 6 if quick else 10, "target_images": images, "pool": {"num_cpus": 0.5}}
    if backend == "dcgan":
        # dlib's uncentred descriptors put different DCGAN identities' images at cosine 0.83-0.92 and
        # their centres at 0.91-0.97 (measured, 40 identities), where ArcFace-like embedders put
        # different people near 0. No centre threshold separates a duplicate from a neighbour there,
        # so dedup is off; DBSCAN's threshold range moves onto dlib's scale, t' = 0.88 + 0.12 t
        # (0.88: the median cosine of different identities), or it keeps every image.
        clean["dedup"] = {"enabled": False}
        clean["dbscan"] = {"start_t": 0.952, "t_min": 0.916, "t_max": 0.988, "step": 0.005}
    return config_from_dict({
        "run": {"name": f"bench-train-{backend}", "output_dir": root, "seed": 0},
        "ray": {"num_cpus": 4},
        "identities": {"num_identities": ids, "block_size": 20},
        "generator": generator,
        "faces": {"batch_size": 96, "pool": {"num_cpus": 0.5}},
        "clean": clean,
        "shards": {"num_buckets": 3},
        "train": {"arch": "iresnet18", "width": 8, "embedding_size": 128, "head": "arcface", "scale": 32.0,
                  "margin": 0.3, "lr": 0.1, "batch_size": 64, "epochs": 2 if quick else 4, "lr_steps": [3],
                  "num_workers": 1, "cpus_per_worker": float(THREADS), "amp": "off",
                  "data": {"streams": 8, "decode_threads": 1}},
        "eval": {"batch_size": 128},
        "tracking": {"mode": "disabled"},
        "demo": {"bootstrap_identities": 24 if quick else 80, "bootstrap_images_per_identity": 12 if quick else 16,
                 "bootstrap_epochs": 2 if quick else 3, "heldout_identities": 30 if quick else 100,
                 "heldout_pairs": 200 if quick else 1000},
    })


def prepare_data(cfg: FacegenConfig) -> dict[str, str]:
    """Bootstrap embedder, held-out .bin, generated/cleaned blocks, clean and raw shard sets."""
    from facegen.demo import bootstrap_embedder, write_heldout_bin
    from facegen.stages.clean import run_clean
    from facegen.stages.generate import run_generate
    from facegen.stages.shard import run_shard

    laps = {}
    clock = time.perf_counter()
    bootstrapped = bootstrap_embedder(cfg, progress=False)
    dcgan = cfg.generator.backend == "dcgan"
    if dcgan:
        # The bootstrapped student only steers Dispersion; cleaning judges DCGAN faces by dlib, a
        # descriptor trained on real faces that no part of this run fitted.
        cfg.generator.embedder.kind, cfg.generator.embedder.path = "facegen", bootstrapped
        cfg.faces.embedder.kind, cfg.faces.embedder.path = "dlib", None
    else:
        cfg.faces.embedder.kind, cfg.faces.embedder.path = "facegen", bootstrapped
    laps["bootstrap embedder"] = time.perf_counter() - clock
    heldout = write_heldout_bin(cfg, progress=False, same_variation=dcgan)
    gen = run_generate(cfg, progress=False)
    clean = run_clean(cfg, progress=False)
    run_shard(cfg, progress=False)
    raw_shards = f"{cfg.run.output_dir}/shards-raw"
    run_shard(cfg, source_dir=cfg.stage_dir("raw"), shards_dir=raw_shards, progress=False)
    laps["data"] = time.perf_counter() - clock - laps["bootstrap embedder"]
    g, c = gen.totals, clean.totals
    print(f"data: {g.get('images')} generated images of {g.get('identities')} identities ({g.get('images_error')} "
          f"failed, {g.get('injected_wrong')} planted wrong-identity), cleaning kept {c.get('images_out')} images of "
          f"{c.get('identities_kept')} identities (removed {c.get('images_removed')}, {c.get('injected_wrong_removed')} of "
          f"them planted wrong ones); bootstrap {laps['bootstrap embedder']:.0f} s, data {laps['data']:.0f} s", flush=True)
    return {"clean": cfg.stage_dir("shards"), "raw": raw_shards, "heldout": heldout, "generate": dict(g), "cleaning": dict(c),
            "data_seconds": {k: round(v, 1) for k, v in laps.items()}}


def ray_vs_plain(cfg: FacegenConfig, shards: str, reps: int) -> dict:
    """Epoch images/s of the same fit() under Ray Train (1 worker) and in this process, interleaved."""
    from facegen.train.fit import LocalSession, fit
    from facegen.train.loop import train

    run = cfg.model_copy(deep=True)
    run.train.epochs, run.train.curriculum = 1, "shuffled"
    out: dict[str, list[float]] = {"ray": [], "plain": []}
    for rep in range(reps):
        with tempfile.TemporaryDirectory() as tmp:
            torch.set_num_threads(THREADS)
            history = fit(LocalSession(f"{tmp}/plain"), run, shards, [], f"plain-{rep}")
            out["plain"].append(history[-1]["throughput"])
            ray_cfg = run.model_copy(deep=True)
            ray_cfg.run.output_dir, ray_cfg.train.run_name = f"{tmp}/ray", f"ray-{rep}"
            out["ray"].append(train(ray_cfg, shards, eval_bins=[]).history[-1]["throughput"])
        print(f"  rep {rep}: plain {out['plain'][-1]:.1f} img/s, Ray Train {out['ray'][-1]:.1f} img/s", flush=True)
    ray_rate, plain_rate = statistics.median(out["ray"]), statistics.median(out["plain"])
    return {"ray_img_s": out["ray"], "plain_img_s": out["plain"], "ratio": ray_rate / plain_rate}


def ingest_vs_step(cfg: FacegenConfig, shards: str, quick: bool) -> dict:
    """Reader images/s (decode + augment, by threads) against the train step alone on one batch."""
    from facegen.config import TrainAugmentSettings
    from facegen.models.iresnet import build_backbone
    from facegen.train.data import CurriculumReader
    from facegen.train.fit import build_optimizer
    from facegen.train.step import train_step
    from facegen.train.heads import build_margin
    from facegen.train.partial_fc import PartialFC

    s = cfg.train
    recipe = TrainAugmentSettings(hflip_p=0.5, crop_p=0.2, low_res_p=0.2, photometric_p=0.2, erase_p=0.1)
    out: dict = {"ingest_img_s": {}}
    for augment_name, augment in (("flip", s.augment), ("datacv", recipe)):
        for threads in (0, 1, 2):
            data = s.data.model_copy(update={"decode_threads": threads})
            reader = CurriculumReader(shards, batch_size=s.batch_size, seed=0, mode="shuffled", data=data, augment=augment)
            started, images = time.perf_counter(), 0
            for batch in reader.batches(0):
                images += len(batch.labels)
            out["ingest_img_s"][f"{augment_name}, {threads} decode threads"] = images / (time.perf_counter() - started)
    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    model = build_backbone(s.arch, s.width, s.embedding_size)
    head = PartialFC(build_margin(s), s.embedding_size, reader.num_classes)
    optimizers = [build_optimizer(s, list(model.parameters())), build_optimizer(s, [head.weight])]
    batch = next(iter(reader.batches(0)))
    steps = 3 if quick else 10
    train_step(model, head, optimizers, None, batch.images, batch.labels, 0, 5.0)  # warm-up
    started = time.perf_counter()
    for step in range(steps):
        train_step(model, head, optimizers, None, batch.images, batch.labels, step, 5.0)
    out["step_img_s"] = steps * len(batch.labels) / (time.perf_counter() - started)
    return out


def mixing_and_amplification(cfg: FacegenConfig, shards: str) -> dict:
    """Distinct identities per 64-row batch, and rows read per row used by 4 workers."""
    from facegen.train.data import CurriculumReader

    s = cfg.train
    one = CurriculumReader(shards, batch_size=s.batch_size, seed=0, mode="shuffled", data=s.data)
    per_batch = [len(set(b.labels.tolist())) for b in one.batches(0)]
    shard_ids = [len(np.unique(one.shard(i)[1][one.shard(i)[1] >= 0])) for i in range(len(one.shards))]
    readers = [CurriculumReader(shards, rank=r, world_size=4, batch_size=s.batch_size, seed=0, mode="shuffled", data=s.data)
               for r in range(4)]
    for reader in readers:
        for _ in reader.batches(0):
            pass
    read = sum(r.stats.rows_read for r in readers)
    used = sum(r.stats.rows_used for r in readers)
    total = sum(int(x["rows"]) for x in one.shards)
    return {"identities_per_batch_mean": float(np.mean(per_batch)), "identities_per_batch_min": int(min(per_batch)),
            "batch": s.batch_size, "identities_per_shard_max": int(max(shard_ids)), "classes": one.num_classes,
            "rows_read_4_workers": read, "rows_used_4_workers": used, "rows_in_set": total,
            "read_per_row_in_set": read / total}


def conditions(cfg: FacegenConfig, data: dict[str, str], seeds: int) -> dict:
    """Held-out accuracy of ordered/clean, shuffled/clean and shuffled/raw training, ``seeds`` runs each."""
    from facegen.eval.verification import verify_bin
    from facegen.models.iresnet_checkpoint import load_backbone
    from facegen.train.fit import LocalSession, fit

    torch.set_num_threads(THREADS)
    # Raw blocks carry no difficulty score (cleaning computes it), so the raw set has one bucket and
    # trains unpaced: cleaning is compared on shuffled runs, the curriculum on cleaned data.
    plan = [("ordered", "clean"), ("shuffled", "clean"), ("shuffled", "raw")]
    out: dict = {}
    for seed in range(seeds):  # seed-major, so a cut-short run still has every condition
        for curriculum, source in plan:
            run = cfg.model_copy(deep=True)
            run.run.seed, run.train.curriculum = seed, curriculum
            started = time.perf_counter()
            with tempfile.TemporaryDirectory() as tmp:
                history = fit(LocalSession(tmp), run, data[source], [], f"{curriculum}-{source}-{seed}")
                session = LocalSession(tmp)
                with session.latest_checkpoint() as ckpt:
                    model = load_backbone(f"{ckpt}/backbone")
            result = verify_bin(model, data["heldout"], cfg.eval.batch_size, cfg.eval.nrof_folds)
            key = f"{curriculum} / {source}"
            row = {"seed": seed, "accuracy": result.accuracy_mean, "fold_std": result.accuracy_std,
                   "images_seen": sum(h["images"] for h in history), "seconds": time.perf_counter() - started}
            out.setdefault(key, []).append(row)
            print(f"  {key:<18} seed {seed}: held-out accuracy {100 * result.accuracy_mean:.2f}% "
                  f"({row['images_seen']} images, {row['seconds']:.0f} s)", flush=True)
    return out


def print_conditions(figures: dict, json_path: str | None = None) -> None:
    """The held-out accuracy of each condition over its seeds (mean +- sd, each run), the total
    time, and the figures as JSON at ``json_path``."""
    print(f"{'condition':<18} {'held-out accuracy % (mean +- sd over seeds)':<44} runs")
    for key, rows in figures["conditions"].items():
        accs = [100 * r["accuracy"] for r in rows]
        sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
        print(f"{key:<18} {statistics.mean(accs):6.2f} +- {sd:4.2f}  ({', '.join(f'{a:.2f}' for a in accs)})"
              f"{'':<4} {len(accs)}")
    print(f"total {figures['seconds']:.0f} s")
    if json_path:
        with open(json_path, "w") as f:
            json.dump(figures, f, indent=1)


def print_loop_figures(figures: dict) -> None:
    """Items 1-3 of the results: Ray vs plain, ingest vs step, batch mixing."""
    rv = figures["ray_vs_plain"]
    print(f"Ray Train / plain loop: {rv['ratio']:.3f}  (Ray {rv['ray_img_s']}, plain {rv['plain_img_s']} img/s)")
    step = figures["ingest"]["step_img_s"]
    print(f"train step alone: {step:.1f} img/s")
    for name, rate in figures["ingest"]["ingest_img_s"].items():
        print(f"ingest alone, {name}: {rate:.1f} img/s  ({rate / step:.1f}x the step)")
    m = figures["mixing"]
    print(f"identities per batch of {m['batch']}: mean {m['identities_per_batch_mean']:.1f}, min "
          f"{m['identities_per_batch_min']} (a shard holds at most {m['identities_per_shard_max']}); rows read by 4 "
          f"workers per row of the set: {m['read_per_row_in_set']:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a smoke run)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--reps", type=int, default=2, help="Ray / plain repetitions")
    parser.add_argument("--backend", choices=["parametric", "dcgan"], default="parametric", help="what makes the faces")
    parser.add_argument("--identities", type=int, default=None, help="training identities (default 24 quick, 100)")
    parser.add_argument("--only-conditions", action="store_true", help="skip items 1-3 (Ray vs plain, ingest, mixing)")
    parser.add_argument("--json", default=None, help="also write the figures here")
    parser.add_argument("--workdir", default=None, help="keep data here (default: a temporary folder)")
    parser.add_argument("--verbose", action="store_true", help="show Ray's own logs")
    args = parser.parse_args()
    from facegen.ray_utils import init_ray

    where = f"{platform.processor() or platform.machine()} x{os.cpu_count()}"
    print(f"training benchmarks on {where}, torch {torch.__version__}, backend {args.backend}", flush=True)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = settings(args.workdir or tmp, args.quick, args.backend, args.identities)
        init_ray(cfg.ray, verbose=args.verbose)
        data = prepare_data(cfg)
        figures: dict = {"machine": where, "torch": torch.__version__, "backend": args.backend,
                         "data": {k: data[k] for k in ("generate", "cleaning", "data_seconds")}}
        if not args.only_conditions:
            print("1. Ray Train loop vs plain PyTorch loop (iresnet18 w8, batch 64, same data, 2 threads)", flush=True)
            figures["ray_vs_plain"] = ray_vs_plain(cfg, data["clean"], 1 if args.quick else args.reps)
            print("2. ingest alone vs train step alone", flush=True)
            figures["ingest"] = ingest_vs_step(cfg, data["clean"], args.quick)
            figures["mixing"] = mixing_and_amplification(cfg, data["clean"])
        print(f"4. curriculum x cleaning, {args.seeds} seeds, {cfg.train.epochs} epochs each", flush=True)
        figures["conditions"] = conditions(cfg, data, 1 if args.quick else args.seeds)
    figures["seconds"] = time.perf_counter() - started

    print("\n== results ==")
    if not args.only_conditions:
        print_loop_figures(figures)
    print_conditions(figures, args.json)


if __name__ == "__main__":
    main()
