"""Curriculum by source (HybridGen's merge) vs by difficulty vs shuffled, on the CPU twin.

    nice -n 19 python bench/curriculum_source.py [--seeds 3] [--json out.json] [--workdir DIR]

Two cleaned sets of the parametric renderer stand for HybridGen's inputs: an "ingested" one (40
identities, 14 images, 20% planted wrong-identity images, so cleaning leaves some identities under
``min_images`` = 10) and a "generated" one of 30 new identities (5% planted); cross-identity dedup
is off (the bootstrap embedder is too weak for it). ``facegen shard``
assembles them into 40 identities (every ingested identity kept with >= 10 images, generated ones
replacing the rest), once ordered by source (new first, easy to hard inside each group) and once
by difficulty. Three conditions, the same model and data, ``--seeds`` runs each (the seed moves
initialisation, data order and augmentation): by source with ``train.curriculum: ordered`` pacing,
by difficulty with the same pacing, and the difficulty set shuffled every epoch (no pacing).
Held-out accuracy on unseen rendered identities (insightface .bin protocol, 10 folds). The model and
training settings are bench/training.py's quick ones (IResNet-18 width 8, 4 epochs).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import training  # noqa: E402  (bench/training.py: settings, sys.path and environment)

import torch  # noqa: E402

INGESTED, GENERATED, TARGET, MIN_IMAGES, IMAGES = 40, 30, 40, 10, 14


def prepare(root: str) -> tuple[dict, dict]:
    """Bootstrap embedder, held-out .bin, both cleaned sets and the two assembled shard sets."""
    from facegen.demo import bootstrap_embedder, write_heldout_bin
    from facegen.stages.clean import run_clean
    from facegen.stages.generate import run_generate
    from facegen.stages.shard import run_shard

    cfg = training.settings(f"{root}/ingested", quick=True, identities=INGESTED)
    cfg.generator.images_per_identity, cfg.generator.parametric.wrong_identity_rate = IMAGES, 0.2
    cfg.clean.min_images, cfg.clean.target_images = MIN_IMAGES, IMAGES
    # a bootstrap embedder this small puts every identity's centre near every other's: dedup would
    # merge most identities away (measured: 39 of 40), which is not what this compares
    cfg.clean.dedup.enabled = False
    cfg.train.epochs, cfg.train.lr_steps = 4, [3]
    cfg.faces.embedder.kind, cfg.faces.embedder.path = "facegen", bootstrap_embedder(cfg, progress=False)
    heldout = write_heldout_bin(cfg, progress=False)
    new = cfg.model_copy(deep=True)
    new.run.output_dir, new.identities.first_id, new.identities.num_identities = f"{root}/generated", 5000, GENERATED
    new.generator.parametric.wrong_identity_rate = 0.05
    counts = {}
    for name, run in (("ingested", cfg), ("generated", new)):
        run_generate(run, progress=False)
        counts[name] = run_clean(run, progress=False).totals
    sets = {}
    for order in ("source", "difficulty"):
        side = cfg.model_copy(deep=True)
        side.shards.order = order
        side.shards.assembly = {"ingested": cfg.stage_dir("clean"), "generated": new.stage_dir("clean"),
                                "num_identities": TARGET, "min_images": MIN_IMAGES}
        sets[order] = f"{root}/shards-{order}"
        report = run_shard(side, shards_dir=sets[order], progress=False)
        counts[f"shards by {order}"] = report.totals
    return cfg, {"sets": sets, "heldout": heldout, "counts": counts}


def conditions(cfg, data: dict, seeds: int) -> dict:
    """Held-out accuracy of by-source / by-difficulty (ordered pacing) and shuffled, ``seeds`` runs each."""
    from facegen.eval.verification import verify_bin
    from facegen.models.iresnet_checkpoint import load_backbone
    from facegen.train.fit import LocalSession, fit

    torch.set_num_threads(training.THREADS)
    plan = [("by source", "source", "ordered"), ("by difficulty", "difficulty", "ordered"), ("shuffled", "difficulty", "shuffled")]
    out: dict = {}
    for seed in range(seeds):  # seed-major, so a cut-short run still has every condition
        for key, order, curriculum in plan:
            run = cfg.model_copy(deep=True)
            run.run.seed, run.train.curriculum = seed, curriculum
            started = time.perf_counter()
            with tempfile.TemporaryDirectory() as tmp:
                history = fit(LocalSession(tmp), run, data["sets"][order], [], f"{order}-{curriculum}-{seed}")
                with LocalSession(tmp).latest_checkpoint() as ckpt:
                    model = load_backbone(f"{ckpt}/backbone")
            result = verify_bin(model, data["heldout"], cfg.eval.batch_size, cfg.eval.nrof_folds)
            row = {"seed": seed, "accuracy": result.accuracy_mean, "images_seen": sum(h["images"] for h in history),
                   "seconds": time.perf_counter() - started}
            out.setdefault(key, []).append(row)
            print(f"  {key:<14} seed {seed}: held-out accuracy {100 * result.accuracy_mean:.2f}% "
                  f"({row['images_seen']} images, {row['seconds']:.0f} s)", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--json", default=None, help="also write the figures here")
    parser.add_argument("--workdir", default=None, help="keep data here (default: a temporary folder)")
    args = parser.parse_args()
    from facegen.ray_utils import init_ray

    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        root = args.workdir or tmp
        init_ray(training.settings(root, quick=True).ray)
        cfg, data = prepare(root)
        print(json.dumps(data["counts"], indent=1), flush=True)
        figures = {"torch": torch.__version__, "counts": data["counts"], "conditions": conditions(cfg, data, args.seeds)}
    figures["seconds"] = time.perf_counter() - started
    print("\n== results ==")
    training.print_conditions(figures, args.json)


if __name__ == "__main__":
    main()
