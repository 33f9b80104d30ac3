"""Generation throughput: the bare generator in a loop vs Ray Data on it vs facegen's generate stage.

    python bench/generation.py [--backends parametric,diffusion,hybrid] [--identities 24] [--images 4]

One run, same settings and the same identity batches on both sides, tiny models on CPU (built
from configs and loaded through the real ``from_pretrained`` code, as the tests do):

* ``parametric``: the CPU face renderer at 128 px;
* ``diffusion``: a tiny SD 1.x pipeline, 64 px, 4 steps;
* ``hybrid``: photo references (insightface's wheel) checked by dlib's detector, dlib's 128-d
  identity feature, tiny Arc2Face expansion at 64 px, 4 steps, band [0.55, 0.8], realised
  similarity measured.

The loop runs in this process with one torch thread; the pool runs ``--actors`` actors of one CPU
each (Ray sets their ``OMP_NUM_THREADS`` to 1). Both clocks start when the generator has finished
loading (in the actor, for the pool: actor start-up and model loading are excluded on both sides)
and stop when the last batch is done, so the pool's figure includes Ray Data's per-batch work
between calls. Loop and pool alternate for ``--rounds`` and the medians are compared, so load from
other processes favours neither. ``ratio per core`` = pool rate / (actors x loop rate).

The third column is the whole generate stage (``run_generate``: facegen's Ray Data block runner
with ``--actors`` block workers of one CPU, the faces stage with the generator's landmarks or no
detector, no embedder, every block committed to a temporary folder), clocked from the first block's
start to the last block's end (the blocks' stats records). ``stage / bare`` = stage rate /
(actors x loop rate), the same process count on both sides: target >= 0.9.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # before Ray is imported: keep a local Ray on loopback
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import numpy as np  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def settings_for(backend: str, workdir: str, per_identity: int, batch: int):
    """GeneratorSettings of a tiny ``backend`` (models written under ``workdir``)."""
    from facegen.config import (
        Arc2FaceSettings, DetectorSettings, DiffusionSettings, EmbedderSettings, ExpansionSettings,
        GeneratorSettings, HybridSettings, ParametricSettings, ReferenceSettings,
    )

    from facegen.config import PoolSettings

    common = dict(backend=backend, images_per_identity=per_identity, batch_size=batch, pool=PoolSettings(num_cpus=1.0))
    if backend == "parametric":
        return GeneratorSettings(parametric=ParametricSettings(image_size=128, wrong_identity_rate=0.0), **common)
    from facegen.testing.tiny_diffusers import build_tiny_arc2face, build_tiny_sd

    if backend == "diffusion":
        sd = build_tiny_sd(f"{workdir}/sd")
        return GeneratorSettings(diffusion=DiffusionSettings(model=sd, num_inference_steps=4, height=64, width=64,
                                                             local_files_only=True, micro_batch=per_identity), **common)
    import cv2
    import insightface

    photos = f"{workdir}/photos"
    os.makedirs(photos, exist_ok=True)
    hanks = cv2.imread(os.path.join(os.path.dirname(insightface.__file__), "data", "images", "Tom_Hanks_54745.png"))
    frame = np.full((256, 256, 3), 40, np.uint8)
    frame[48:208, 48:208] = cv2.resize(hanks, (160, 160), interpolation=cv2.INTER_CUBIC)
    cv2.imwrite(f"{photos}/hanks.png", frame)
    a2f = build_tiny_arc2face(f"{workdir}/a2f")
    return GeneratorSettings(hybrid=HybridSettings(
        reference=ReferenceSettings(backend="photos", photos_dir=photos, max_attempts=1),
        detector=DetectorSettings(kind="dlib"), embedder=EmbedderSettings(kind="dlib"),
        arc2face=Arc2FaceSettings(unet=a2f["models"], encoder=a2f["models"], base_model=a2f["base"], num_inference_steps=4,
                                  height=64, width=64, local_files_only=True, micro_batch=per_identity),
        expansion=ExpansionSettings(mode="band"),
    ), **common)


def batches(identities: int, batch: int) -> list[dict[str, np.ndarray]]:
    ids = np.arange(identities, dtype=np.int64)
    return [{"identity_id": ids[i : i + batch], "block_id": np.zeros(len(ids[i : i + batch]), np.int64)}
            for i in range(0, identities, batch)]


class Timed:
    """A generator class with clocks: when it finished loading, and when each batch was done."""

    def __init__(self, backend: str, settings, seed: int):
        from facegen.generators import build_generator

        self.inner = build_generator(settings.model_copy(update={"backend": backend}), seed)
        self.ready = time.time()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = self.inner(batch)
        n = len(out["identity_id"])
        return out | {"t_ready": np.full(n, self.ready), "t_done": np.full(n, time.time())}


def rate(outputs) -> tuple[float, int]:
    """(images/s from the end of loading to the last batch, images) of the output batches."""
    ready, done, total = [], [], 0
    for out in outputs:
        total += len(out["identity_id"])
        ready.append(out["t_ready"].min())
        done.append(out["t_done"].max())
    return total / (max(done) - min(ready)), total


def loop_rate(backend: str, settings, identities: int) -> tuple[float, int]:
    import torch

    torch.set_num_threads(1)
    generator = Timed(backend, settings, 0)
    return rate([generator(b) for b in batches(identities, settings.batch_size)])


def pool_rate(backend: str, settings, identities: int, actors: int) -> tuple[float, int]:
    import ray
    from ray.data import ActorPoolStrategy

    rows = [{"identity_id": i, "block_id": 0} for i in range(identities)]
    ds = ray.data.from_items(rows, override_num_blocks=max(1, identities // settings.batch_size))
    ds = ds.map_batches(Timed, fn_constructor_kwargs={"backend": backend, "settings": settings, "seed": 0},
                        batch_size=settings.batch_size, batch_format="numpy", compute=ActorPoolStrategy(size=actors),
                        num_cpus=1.0)
    return rate(ds.iter_batches(batch_size=None, batch_format="numpy"))


def stage_rate(backend: str, settings, identities: int, actors: int, workdir: str, round_: int) -> tuple[float, int]:
    """Images/s of ``run_generate`` from its first block's start to its last block's end."""
    from facegen import blocks as blk
    from facegen.config import FacegenConfig, PoolSettings
    from facegen.stages.generate import run_generate

    generator = settings.model_copy(update={"pool": PoolSettings(min_size=actors, num_cpus=1.0)})
    cfg = FacegenConfig.model_validate({
        "run": {"output_dir": f"{workdir}/stage-{backend}-{round_}", "verify": "size"},
        "identities": {"num_identities": identities, "block_size": max(1, identities // (2 * actors))},
        "faces": {"detector": {"kind": "none"}, "batch_size": 64}, "tracking": {"mode": "disabled"},
    })
    cfg.generator = generator
    run_generate(cfg, progress=False)
    records = blk.read_stats(cfg.stage_dir("raw"))
    seconds = max(r["finished"] for r in records) - min(r["started"] for r in records)
    images = sum(r["images"] for r in records)
    return images / seconds, images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backends", default="parametric,diffusion,hybrid")
    parser.add_argument("--identities", type=int, default=24)
    parser.add_argument("--images", type=int, default=4, help="images per identity")
    parser.add_argument("--batch", default="parametric=16,diffusion=2,hybrid=2",
                        help="identities per map_batches call, per backend (the same in the pool and the loop)")
    parser.add_argument("--actors", type=int, default=1, help="pool actors (one CPU each)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating loop/pool measurements (medians)")
    args = parser.parse_args()

    import ray
    import torch

    batch_of = {name: int(value) for name, value in (item.split("=") for item in args.batch.split(","))}
    print(f"facegen generation benchmark: {platform.machine()} x{os.cpu_count()}, torch {torch.__version__}, "
          f"ray {ray.__version__}; {args.identities} identities x {args.images} images, "
          f"pool {args.actors} actor(s) x 1 CPU vs loop on 1 thread")
    ray.init(address="local", num_cpus=args.actors + 1, include_dashboard=False, log_to_driver=False,
             object_store_memory=1 << 30, logging_level="ERROR")
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    results = []
    try:
        with tempfile.TemporaryDirectory() as workdir:
            for backend in args.backends.split(","):
                settings = settings_for(backend, workdir, args.images, batch_of[backend])
                # loop and pool alternate for --rounds; medians, so a busy moment on a shared
                # machine favours neither side
                loops, pools, stages = [], [], []
                for r in range(args.rounds):
                    rate_loop, n_loop = loop_rate(backend, settings, args.identities)
                    rate_pool, n_pool = pool_rate(backend, settings, args.identities, args.actors)
                    rate_stage, n_stage = stage_rate(backend, settings, args.identities, args.actors, workdir, r)
                    assert n_loop == n_pool == n_stage == args.identities * args.images, (n_loop, n_pool, n_stage)
                    loops.append(rate_loop)
                    pools.append(rate_pool)
                    stages.append(rate_stage)
                loop, pool, stage = float(np.median(loops)), float(np.median(pools)), float(np.median(stages))
                results.append((backend, batch_of[backend], loop, pool, pool / (args.actors * loop), stage,
                                stage / (args.actors * loop)))
    finally:
        ray.shutdown()
    print(f"{'backend':<11} {'ids/batch':>9} {'loop img/s':>11} {'pool img/s':>11} {'ratio per core':>15} "
          f"{'stage img/s':>12} {'stage / bare':>13}")
    for backend, batch, loop, pool, ratio, stage, stage_ratio in results:
        print(f"{backend:<11} {batch:>9} {loop:>11.2f} {pool:>11.2f} {ratio:>15.2f} {stage:>12.2f} {stage_ratio:>13.2f}")


if __name__ == "__main__":
    main()
