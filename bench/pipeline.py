"""The generation stage through Ray versus the same work in one process, and the driver's memory.

    python bench/pipeline.py [--images 16000] [--pool 2] [--rounds 2] [--memory 10000,100000] [--skip-throughput]

1. Throughput: the same parametric generator (64 px, no embedder) and face stage make and write
   the same blocks twice, side by side: once in a plain single-process loop (the generate stage's
   ``BlockGenerator.make`` per block), once through ``run_generate``: Ray Data with a pool of
   ``--pool`` actors of that class. Prints images/s of both and the ratio.
2. Driver memory: ``run_generate`` over 10k and 100k identities (one 64 px image each, the
   cheapest generator setting) in fresh processes; prints the driver's resident memory after
   start-up and its peak during the stage (sampled every 50 ms), so growth with the identity
   count shows.

Needs Ray (a CPU machine is enough). Prints the machine's load average before and after, since
throughput on a shared machine depends on it. Ray's workers run at the loop's priority here
(``RAY_worker_niceness=0``; Ray's default is nice 15).
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
# Ray starts its workers at nice 15 (its worker_niceness setting); on a shared machine that alone
# gives them a fraction of the share the plain loop (nice 0) gets. Both sides compete equally here.
os.environ.setdefault("RAY_worker_niceness", "0")

from facegen.config import config_from_dict  # noqa: E402


def _settings(out: str, identities: int, images_per_identity: int, block_size: int, pool: int) -> dict:
    return {
        "run": {"output_dir": out, "seed": 0, "verify": "size"},
        "ray": {"num_cpus": 2},
        "identities": {"num_identities": identities, "block_size": block_size},
        "generator": {"images_per_identity": images_per_identity, "batch_size": 10,
                      "pool": {"min_size": pool, "num_cpus": 1.0},  # an actor holds the generator and the face stage
                      "parametric": {"image_size": 64, "wrong_identity_rate": 0.1}},
        "faces": {"batch_size": 200},
        "tracking": {"mode": "disabled"},
    }


def plain_loop(cfg) -> tuple[float, float]:
    """Wall and CPU seconds to make and write every block in this process, one after the other,
    with the generate stage's own block worker class (the one the Ray Data actors hold)."""
    from facegen import blocks as blk
    from facegen.faces.embed import describe_embedder
    from facegen.lineage import raw_digest
    from facegen.stages.generate import BlockGenerator

    started, cpu_started = time.perf_counter(), time.process_time()
    worker = BlockGenerator(cfg.model_dump_json(), cfg.stage_dir("raw"), raw_digest(cfg), describe_embedder(cfg.faces.embedder))
    for block in blk.plan_blocks(cfg.identities):
        worker.make({"block_id": block.block_id, "first_id": block.first_id, "end_id": block.end_id})
    return time.perf_counter() - started, time.process_time() - cpu_started


def through_ray(cfg) -> tuple[float, float]:
    """Wall seconds of ``run_generate`` on an already started local Ray (actor start-up included),
    and the CPU seconds the actors spent on the blocks (from the blocks' stats records)."""
    from facegen import blocks as blk
    from facegen.stages.generate import run_generate

    started = time.perf_counter()
    report = run_generate(cfg, progress=False)
    assert report.blocks_written == report.blocks_total, report
    wall = time.perf_counter() - started
    return wall, sum(r.get("cpu_seconds", 0.0) for r in blk.read_stats(cfg.stage_dir("raw")))


def throughput(images: int, pool: int, rounds: int) -> dict:
    """Best-of-``rounds`` images/s of the loop and of Ray, the two alternating (a shared machine's
    load comes and goes; the best round of each is the one least disturbed)."""
    import ray

    from facegen.ray_utils import init_ray

    per_id, block = 20, 50
    identities = images // per_id
    loop_times, ray_times, loop_cpu, ray_cpu = [], [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        init_ray(config_from_dict(_settings(tmp, 1, 1, 1, pool), "bench").ray, verbose=False)
        through_ray(config_from_dict(_settings(f"{tmp}/warm", 2 * pool, 2, 1, pool), "bench"))  # Ray's own start-up
        for r in range(rounds):
            wall, cpu = plain_loop(config_from_dict(_settings(f"{tmp}/loop{r}", identities, per_id, block, pool), "bench"))
            loop_times.append(wall)
            loop_cpu.append(cpu)
            wall, cpu = through_ray(config_from_dict(_settings(f"{tmp}/ray{r}", identities, per_id, block, pool), "bench"))
            ray_times.append(wall)
            ray_cpu.append(cpu)
        ray.shutdown()
    total = identities * per_id
    return {"images": total, "loop_img_s": total / min(loop_times), "ray_img_s": total / min(ray_times),
            "ratio": min(loop_times) / min(ray_times), "loop_rounds": [round(total / t, 1) for t in loop_times],
            "ray_rounds": [round(total / t, 1) for t in ray_times],
            "loop_cpu_ms": 1000 * min(loop_cpu) / total, "ray_cpu_ms": 1000 * min(ray_cpu) / total}


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
        seconds, _ = through_ray(cfg)
        stop.set()
        sampler.join()
    return {"identities": identities, "blocks": -(-identities // 50), "baseline_mb": baseline, "peak_mb": peak[0],
            "growth_mb": peak[0] - baseline, "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=16000)
    parser.add_argument("--pool", type=int, default=2, help="block actors in the Ray run")
    parser.add_argument("--rounds", type=int, default=2, help="alternating loop/Ray rounds (best of each is compared)")
    parser.add_argument("--memory", default="10000,100000", help="identity counts for the driver-memory runs ('' = none)")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--measure-driver", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure_driver:
        print(json.dumps(measure_driver(args.measure_driver)))
        return
    autogroup = open("/proc/sys/kernel/sched_autogroup_enabled").read().strip() if os.path.exists("/proc/sys/kernel/sched_autogroup_enabled") else "n/a"
    print(f"load average before: {os.getloadavg()}  cpus: {os.cpu_count()}  sched_autogroup: {autogroup}")
    if not args.skip_throughput:
        t = throughput(args.images, args.pool, args.rounds)
        print(f"generation, {t['images']} parametric 64 px images, no embedder, blocks written (best of {args.rounds} rounds):")
        print(f"  plain single-process loop : {t['loop_img_s']:8.1f} img/s   rounds {t['loop_rounds']}")
        print(f"  Ray, {args.pool} block actors       : {t['ray_img_s']:8.1f} img/s   rounds {t['ray_rounds']}")
        print(f"  ratio Ray / loop          : {t['ratio']:8.2f}x")
        print(f"  CPU per image: loop {t['loop_cpu_ms']:.2f} ms, Ray block actors {t['ray_cpu_ms']:.2f} ms "
              f"(ceiling with {args.pool} free cores: {args.pool * t['loop_cpu_ms'] / t['ray_cpu_ms']:.2f}x)")
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
