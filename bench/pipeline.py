"""The generation stage through Ray versus the same work in one process, and the driver's memory.

    python bench/pipeline.py [--images 16000] [--pool 2] [--memory 10000,100000] [--skip-throughput]

1. Throughput: the same parametric generator (64 px, no embedder) and face stage make and write
   the same blocks twice, side by side: once in a plain single-process loop
   (``generate_block_table`` + ``commit_block`` per block), once through ``run_generate`` on a
   local Ray with a pool of ``--pool`` block actors. Prints images/s of both and the ratio.
2. Driver memory: ``run_generate`` over 10k and 100k identities (one 64 px image each, the
   cheapest generator setting) in fresh processes; prints the driver's resident memory after
   start-up and its peak during the stage (sampled every 50 ms), so growth with the identity
   count shows.

Needs Ray (a CPU machine is enough). Prints the machine's load average before and after, since
throughput on a shared machine depends on it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from facegen.config import config_from_dict  # noqa: E402


def _settings(out: str, identities: int, images_per_identity: int, block_size: int, pool: int) -> dict:
    return {
        "run": {"output_dir": out, "seed": 0, "verify": "size"},
        "ray": {"num_cpus": 2},
        "identities": {"num_identities": identities, "block_size": block_size},
        "generator": {"images_per_identity": images_per_identity, "batch_size": 10, "concurrency": pool,
                      "num_cpus": 0.5, "parametric": {"image_size": 64, "wrong_identity_rate": 0.1}},
        "faces": {"batch_size": 200, "num_cpus": 0.5},
        "tracking": {"mode": "disabled"},
    }


def plain_loop(cfg) -> float:
    """Seconds to make and write every block in this process, one after the other."""
    from facegen import blocks as blk
    from facegen.faces.stage import FaceStage
    from facegen.generators import generator_class
    from facegen.stages.generate import block_stats, generate_block_table

    started = time.perf_counter()
    source = generator_class(cfg.generator.backend)(cfg.generator, cfg.run.seed)
    faces = FaceStage(cfg.faces)
    for block in blk.plan_blocks(cfg.identities):
        table = generate_block_table(source, faces, block, cfg.generator.batch_size, cfg.faces.batch_size)
        blk.commit_block(cfg.stage_dir("raw"), block.block_id, table, block_stats(table, block))
    return time.perf_counter() - started


def through_ray(cfg) -> float:
    """Seconds of ``run_generate`` on an already started local Ray (actor start-up included)."""
    from facegen.stages.generate import run_generate

    started = time.perf_counter()
    report = run_generate(cfg, progress=False)
    assert report.blocks_written == report.blocks_total, report
    return time.perf_counter() - started


def throughput(images: int, pool: int) -> dict:
    import ray

    from facegen.ray_utils import init_ray

    per_id, block = 20, 50
    identities = images // per_id
    with tempfile.TemporaryDirectory() as tmp:
        loop_cfg = config_from_dict(_settings(f"{tmp}/loop", identities, per_id, block, pool), "bench")
        ray_cfg = config_from_dict(_settings(f"{tmp}/ray", identities, per_id, block, pool), "bench")
        init_ray(ray_cfg.ray, verbose=False)
        warm = config_from_dict(_settings(f"{tmp}/warm", 2 * pool, 2, 1, pool), "bench")
        through_ray(warm)  # worker processes and imports warm, as in a long run
        loop_s = plain_loop(loop_cfg)
        ray_s = through_ray(ray_cfg)
        ray.shutdown()
    total = identities * per_id
    return {"images": total, "loop_img_s": total / loop_s, "ray_img_s": total / ray_s, "ratio": loop_s / ray_s}


def _rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def measure_driver(identities: int) -> dict:
    """(In a fresh process) the driver's RSS after start-up and its peak during ``run_generate``."""
    from facegen.ray_utils import init_ray

    with tempfile.TemporaryDirectory() as tmp:
        cfg = config_from_dict(_settings(f"{tmp}/run", identities, 1, 50, 2), "bench")
        init_ray(cfg.ray, verbose=False)
        from facegen.stages import generate  # noqa: F401  (imports done before the baseline)

        baseline = _rss_mb()
        peak = [baseline]
        stop = threading.Event()

        def sample() -> None:
            while not stop.wait(0.05):
                peak[0] = max(peak[0], _rss_mb())

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        seconds = through_ray(cfg)
        stop.set()
        sampler.join()
    return {"identities": identities, "blocks": -(-identities // 50), "baseline_mb": baseline, "peak_mb": peak[0],
            "growth_mb": peak[0] - baseline, "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=16000)
    parser.add_argument("--pool", type=int, default=2, help="block actors in the Ray run")
    parser.add_argument("--memory", default="10000,100000", help="identity counts for the driver-memory runs ('' = none)")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--measure-driver", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure_driver:
        print(json.dumps(measure_driver(args.measure_driver)))
        return
    print(f"load average before: {os.getloadavg()}  cpus: {os.cpu_count()}")
    if not args.skip_throughput:
        t = throughput(args.images, args.pool)
        print(f"generation, {t['images']} parametric 64 px images, no embedder, blocks written:")
        print(f"  plain single-process loop : {t['loop_img_s']:8.1f} img/s")
        print(f"  Ray, {args.pool} block actors       : {t['ray_img_s']:8.1f} img/s")
        print(f"  ratio Ray / loop          : {t['ratio']:8.2f}x")
    rows = []
    for n in [int(x) for x in args.memory.split(",") if x.strip()]:
        out = subprocess.run([sys.executable, __file__, "--measure-driver", str(n)], capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    if rows:
        print("driver memory (run_generate, 1 image of 64 px per identity, 50 identities per block):")
        for r in rows:
            print(f"  {r['identities']:>7} identities ({r['blocks']:>5} blocks): after start-up {r['baseline_mb']:.0f} MB, "
                  f"peak {r['peak_mb']:.0f} MB, growth {r['growth_mb']:.0f} MB, {r['seconds']:.0f} s")
        if len(rows) > 1:
            print(f"  peak ratio {rows[-1]['identities']}/{rows[0]['identities']} identities: {rows[-1]['peak_mb'] / rows[0]['peak_mb']:.2f}x")
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
