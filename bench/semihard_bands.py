"""Semi-hard bands on the DCGAN: realised similarity of a band run versus plain noise, side by side.

    python bench/semihard_bands.py [--identities 24] [--images 8] [--band 0.55 0.8] [--sigmas 0.3 0.5 0.7]

Two generate runs of the hybrid backend on CPU (local Ray, the real stage code), identical but for
``expansion``: references drawn by the DCGAN of ``gan-face-generate`` (accepted by MTCNN), the
identity feature from dlib's 128-d ResNet, expansion in the DCGAN's latent space
(``expander: gan``) by

* ``band``: each sample's latent rotated to a cosine drawn from ``--band`` (CemiFace), and
* ``noise``: Gaussian noise of the HSFace sigmas and shares, re-scaled to the latent's norm.

Each run's stats carry the histograms of the requested similarity (cosine of the perturbed latent
to the reference's) and of the realised one (cosine of the expanded image's dlib embedding to the
reference's); they are printed side by side.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # before Ray is imported: a local Ray stays on loopback
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_config(root: str, mode: str, args):
    from facegen.config import config_from_dict

    expansion = {"mode": mode, "band": list(args.band), "sigmas": list(args.sigmas), "shares": list(args.shares),
                 "histogram_bins": 40}
    return config_from_dict({
        "run": {"name": f"semihard-{mode}", "output_dir": f"{root}/{mode}", "seed": args.seed},
        "ray": {"num_cpus": 4},
        "identities": {"num_identities": args.identities, "block_size": args.identities},
        "generator": {
            "backend": "hybrid", "images_per_identity": args.images, "batch_size": 4, "pool": {"num_cpus": 1.0},
            "hybrid": {
                "reference": {"backend": "dcgan", "max_attempts": 4},
                "detector": {"kind": "mtcnn", "min_size": 20, "mtcnn_min_face": 12},
                "embedder": {"kind": "dlib"},
                "expander": "gan",
                "expansion": expansion,
            },
        },
        "faces": {"pool": {"num_cpus": 0.5}, "image_format": "png"},
        "tracking": {"mode": "disabled"},
    }, "semihard_bands")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--identities", type=int, default=24)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--band", type=float, nargs=2, default=(0.55, 0.8))
    parser.add_argument("--sigmas", type=float, nargs="+", default=(0.3, 0.5, 0.7))
    parser.add_argument("--shares", type=float, nargs="+", default=(0.4, 0.4, 0.2))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from facegen.identities.expansion import format_histograms
    from facegen.ray_utils import init_ray
    from facegen.stages.generate import run_generate

    histograms, summary = {}, []
    with tempfile.TemporaryDirectory() as root:
        for mode in ("band", "noise"):
            cfg = run_config(root, mode, args)
            init_ray(cfg.ray)
            report = run_generate(cfg, progress=False)
            for name, hist in report.histograms.items():
                histograms[f"{mode} {name}"] = hist
            realised = _realised(cfg)
            summary.append((mode, report.totals, realised))
    import ray

    ray.shutdown()
    print(f"DCGAN references, expansion in latent space, dlib similarity; {args.identities} identities x "
          f"{args.images} images; band {args.band[0]}-{args.band[1]} vs noise sigmas {list(args.sigmas)} "
          f"at {list(args.shares)}")
    order = ["band requested", "band realised", "noise requested", "noise realised"]
    print(format_histograms({name: histograms[name] for name in order if name in histograms}, width=22, trim=True))
    for mode, totals, realised in summary:
        inside = np.mean((realised >= args.band[0]) & (realised <= args.band[1])) if len(realised) else float("nan")
        print(f"{mode:>5}: {totals['images_ok']}/{totals['images']} images ok; realised similarity "
              f"mean {np.mean(realised):.3f}, median {np.median(realised):.3f}, "
              f"in [{args.band[0]}, {args.band[1]}]: {inside:.0%}")


def _realised(cfg) -> np.ndarray:
    from facegen import blocks as blk
    from facegen import storage

    raw = cfg.stage_dir("raw")
    values = [storage.read_table(blk.block_path(raw, b), columns=["realised_similarity"]).column(0).to_numpy(zero_copy_only=False)
              for b in blk.done_block_ids(raw)]
    values = np.concatenate(values) if values else np.zeros(0)
    return values[np.isfinite(values)]


if __name__ == "__main__":
    main()
