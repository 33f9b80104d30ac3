"""Latent-space Langevin on the real DCGAN (CPU): seconds per iteration from 1k to 10k particles,
and whether a cap on the adaptive step binds.

    python bench/langevin_latent.py [--sizes 1000 10000] [--threads N] [--embedder DIR]
    python bench/langevin_latent.py --step-cap [--particles 300] [--iterations 20] [--d0-quantile Q] [--embedder DIR]
    python bench/langevin_latent.py --workers N [--particles 300] [--iterations 3] [--threads 1] [--embedder DIR]

The DCGAN of gan-face-generate (100-d z, 64 px; weights for non-commercial research only) with
configs/gan_local.yaml's sampler settings (d0 1.4 rad, k_l 0.01, eta0 0.01, tau 0.3, batch 32,
k = 16 exact neighbours rebuilt every 5 iterations); forces through G, the fixed ArcFace crop and
an IResNet embedder: ``--embedder`` (a facegen backbone folder, e.g. gan_local's bootstrap
embedder), else gan_local's training shape (IResNet-18, width 16, 512-d) with seeded random
weights. The cost of a step does not depend on the weights as long as every particle has a
neighbour inside d0 (particles without force skip the generator's backward pass); the figures
print how many pairs are inside d0.

Scaling: per size, one iteration with a neighbour rebuild and two without are timed; seconds per
iteration is the faster plain step plus a fifth of the rebuild (``knn_every`` = 5), as
bench/identity_sampling.py does, in wall-clock and in this process's CPU seconds (the second is
steadier on a machine shared with other work). Each step is split into its phases: G + embedder
forward (``embed``), forward + backward (``pullback``), the neighbour search, and the rest (pair
forces, the step, the move: the parts that see all particles at once). The largest / smallest
ratio is printed against near-linear (10x per 10x; the target is at most 12x).

``--step-cap`` runs the same particles twice, without a cap on the adaptive step (the paper's
rule) and with ``dt_max`` = 1.0 (facegen's default), and prints per iteration the
step, whether the cap bound, the smallest latent distance over the neighbour pairs (what the step
uses) and over all pairs (the paper's), the smallest pair angle and the pairs inside d0.

``--workers N`` runs the same particles (same noise) for ``--iterations`` steps twice in one local
Ray, the two runs' steps alternating (a load change on a shared machine hits both): G and the
embedder in this process (``workers: 1``) and on N encoder actors of one CPU each
(:class:`facegen.stages.langevin_workers.ActorLatentSpace`, one torch thread each as Ray gives an
actor of one CPU); prints seconds per iteration side by side (the first step, with the neighbour
rebuild, and the mean of the plain ones), the time in the passes through G and the embedder, the
speedup, and whether the final particles are bitwise equal.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from facegen.config import LangevinSettings, load_config  # noqa: E402
from facegen.generators.gan import build_gan  # noqa: E402
from facegen.identities.encoder import ForceEmbedder, IdentityEncoder  # noqa: E402
from facegen.identities.langevin import LangevinSampler, LangevinState, LatentSpace  # noqa: E402

CONFIG = os.path.join(ROOT, "configs", "gan_local.yaml")


def random_embedder(directory: str) -> str:
    """gan_local's training shape (IResNet-18, width 16, 512-d) with seeded random weights."""
    from facegen.models.iresnet import build_backbone
    from facegen.models.iresnet_checkpoint import save_backbone

    torch.manual_seed(0)
    return save_backbone(directory, build_backbone("iresnet18", width=16, embedding_size=512).eval(), "iresnet18", 16, 512)


class TimedSpace:
    """A latent space that adds up the seconds spent in G + the embedder: ``embed`` (forward) and ``pullback``
    (forward + backward)."""

    kind = "latent"

    def __init__(self, space: LatentSpace):
        self.space, self.latent_mean = space, space.latent_mean
        self.seconds = {"embed": 0.0, "pullback": 0.0, "neighbours": 0.0}

    def embed(self, particles: np.ndarray) -> np.ndarray:
        t0 = time.perf_counter()
        out = self.space.embed(particles)
        self.seconds["embed"] += time.perf_counter() - t0
        return out

    def pullback(self, particles: np.ndarray, grad: np.ndarray, chunk: int) -> np.ndarray:
        t0 = time.perf_counter()
        out = self.space.pullback(particles, grad, chunk)
        self.seconds["pullback"] += time.perf_counter() - t0
        return out


class TimedSampler(LangevinSampler):
    """The sampler, with the seconds of its neighbour rebuilds added to its space's counters."""

    def rebuild_neighbours(self, embeddings: np.ndarray) -> None:
        t0 = time.perf_counter()
        super().rebuild_neighbours(embeddings)
        self.space.seconds["neighbours"] += time.perf_counter() - t0


def build(embedder: str | None, scratch: str, **overrides) -> tuple[object, LangevinSampler, LangevinSettings]:
    """The DCGAN, gan_local's Langevin settings (with ``overrides``) and a latent-space sampler."""
    path = embedder or random_embedder(scratch)
    cfg = load_config(CONFIG, [f"generator.embedder.path={path}", "generator.device=cpu"])
    gan = build_gan(cfg.generator)
    settings = cfg.identities.sampler.langevin.model_copy(update=overrides)
    encoder = IdentityEncoder(gan, ForceEmbedder(cfg.generator.embedder, "cpu"), settings.batch_size)
    space = TimedSpace(LatentSpace(encoder, gan.latent_mean.cpu().numpy()))
    return gan, TimedSampler(settings, space), settings


def time_size(gan, sampler: LangevinSampler, n: int) -> dict:
    """One step with a neighbour rebuild and two without, on ``n`` gaussian latents."""
    state = LangevinState(gan.gaussian_latents(0, np.arange(n)), 0, np.random.default_rng(1))
    wall, cpu, phases = [], [], []
    for rebuild in (True, False, False):
        sampler.space.seconds = dict.fromkeys(sampler.space.seconds, 0.0)
        w0, c0 = time.perf_counter(), time.process_time()
        stats = sampler.step(state, rebuild=rebuild)
        wall.append(time.perf_counter() - w0)
        cpu.append(time.process_time() - c0)
        phases.append({k: round(v, 2) for k, v in sampler.space.seconds.items()})
        phases[-1]["rest"] = round(wall[-1] - sum(sampler.space.seconds.values()), 2)
        first = stats if rebuild else first
    every = sampler.s.knn_every

    def per_iteration(times: list[float]) -> float:
        step = min(times[1:])
        return step + max(times[0] - step, 0.0) / every

    return {"n": n, "steps_s": [round(w, 2) for w in wall], "phases_s": phases,
            "step_with_rebuild_s": round(wall[0], 2), "step_s": round(min(wall[1:]), 2),
            "rebuild_s": round(wall[0] - min(wall[1:]), 2), "per_iteration_s": round(per_iteration(wall), 2),
            "per_iteration_cpu_s": round(per_iteration(cpu), 2),
            "pairs": first["pairs"], "pairs_within_d0": first["pairs_within_d0"], "dt": round(first["dt"], 3),
            "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}


def scaling(sizes: list[int], embedder: str | None) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        gan, sampler, s = build(embedder, scratch)
        print(f"latent-space Langevin, DCGAN ({gan.latent_dim}-d z) + {'embedder ' + embedder if embedder else 'random IResNet-18 w16'}; "
              f"d0 {s.d0}, k {s.neighbours}, rebuild every {s.knn_every}, batch {s.batch_size}; "
              f"torch threads {torch.get_num_threads()}", flush=True)
        results = []
        for n in sizes:
            results.append(time_size(gan, sampler, n))
            print(json.dumps(results[-1]), flush=True)
    print(f"{'particles':>10} {'s/iteration':>12} {'CPU s/it.':>10} {'step s':>8} {'rebuild s':>10} {'pairs < d0':>11} {'peak GiB':>9}")
    for r in results:
        print(f"{r['n']:>10} {r['per_iteration_s']:>12.2f} {r['per_iteration_cpu_s']:>10.2f} {r['step_s']:>8.2f} "
              f"{r['rebuild_s']:>10.2f} {r['pairs_within_d0']:>11} {r['peak_rss_gib']:>9.2f}")
    print("phases of the faster plain step (s): G + embedder forward, forward + backward, the rest; neighbour search of the rebuild step")
    for r in results:
        plain = min(r["phases_s"][1:], key=lambda ph: ph["embed"] + ph["pullback"] + ph["rest"])
        print(f"{r['n']:>10} embed {plain['embed']:>8.2f} pullback {plain['pullback']:>8.2f} rest {plain['rest']:>6.2f} "
              f"neighbours {r['phases_s'][0]['neighbours']:>6.2f}")
    if len(results) > 1:
        small, large = results[0], results[-1]
        times = large["n"] / small["n"]
        print(f"{large['n']} / {small['n']} seconds per iteration: {large['per_iteration_s'] / small['per_iteration_s']:.2f}x wall, "
              f"{large['per_iteration_cpu_s'] / small['per_iteration_cpu_s']:.2f}x CPU, for {times:.0f}x the particles "
              f"(near-linear = {times:.0f}x; target <= {1.2 * times:.0f}x)")


def global_min_distance(points: np.ndarray) -> float:
    """The smallest ``|p_i - p_j|`` over all pairs (the paper's; quadratic, fine at a few hundred)."""
    t = torch.from_numpy(points)
    d = torch.cdist(t, t)
    d.fill_diagonal_(float("inf"))
    return float(d.min())


def run_capped(gan, sampler: LangevinSampler, n: int, iterations: int) -> dict:
    start = gan.gaussian_latents(0, np.arange(n))
    before = sampler.measure(start)
    state = LangevinState(start.copy(), 0, np.random.default_rng(1))
    rows = []
    t0 = time.perf_counter()
    while state.iteration < iterations:
        overall = global_min_distance(state.particles)
        stats = sampler.step(state, rebuild=state.iteration % sampler.s.knn_every == 0)
        rows.append({"it": stats["iteration"], "dt": round(stats["dt"], 3), "capped": stats["dt_capped"],
                     "min_dist_pairs": round(stats["min_distance"], 3), "min_dist_all": round(overall, 3),
                     "force_max": round(stats["force_max"], 4), "min_angle": round(stats["min_angle"], 4),
                     "within_d0": stats["pairs_within_d0"]})
        print(json.dumps(rows[-1]), flush=True)
    after = sampler.measure(state.particles)
    return {"dt_max": sampler.s.dt_max, "iterations": rows, "seconds": round(time.perf_counter() - t0, 1),
            "capped_iterations": sum(r["capped"] for r in rows), "dt_mean": round(float(np.mean([r["dt"] for r in rows])), 3),
            "start": before, "end": after,
            "mean_latent_norm_start": round(float(np.linalg.norm(start, axis=1).mean()), 3),
            "mean_latent_norm_end": round(float(np.linalg.norm(state.particles, axis=1).mean()), 3),
            "mean_move": round(float(np.linalg.norm(state.particles - start, axis=1).mean()), 3)}


def d0_at_quantile(gan, sampler: LangevinSampler, n: int, quantile: float) -> float:
    """The ``quantile`` of all pair angles of the gaussian start: a radius that this share of pairs violates."""
    e = sampler.space.embed(gan.gaussian_latents(0, np.arange(n)))
    return float(np.quantile(np.arccos(np.clip((e @ e.T)[np.triu_indices(n, 1)], -1, 1)), quantile))


def step_cap(n: int, iterations: int, embedder: str | None, quantile: float | None) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        runs = {}
        overrides = {}
        if quantile is not None:
            gan, sampler, _ = build(embedder, scratch)
            overrides["d0"] = round(d0_at_quantile(gan, sampler, n, quantile), 4)
        for cap in (None, 1.0):
            gan, sampler, s = build(embedder, scratch, dt_max=cap, **overrides)
            print(f"--- {n} particles, {iterations} iterations, d0 {s.d0}, dt_max {cap}", flush=True)
            runs[cap] = run_capped(gan, sampler, n, iterations)
    print(f"{'':>28} {'no cap':>10} {'dt_max 1.0':>10}")
    a, b = runs[None], runs[1.0]
    lines = [("iterations where dt > 1.0", sum(r["dt"] > 1.0 for r in a["iterations"]), b["capped_iterations"]),
             ("mean dt", a["dt_mean"], b["dt_mean"]),
             ("min pair angle, start", round(a["start"]["min_angle"], 4), round(b["start"]["min_angle"], 4)),
             ("min pair angle, end", round(a["end"]["min_angle"], 4), round(b["end"]["min_angle"], 4)),
             ("mean pair angle, end", round(a["end"]["mean_angle"], 4), round(b["end"]["mean_angle"], 4)),
             ("pairs < d0, start", a["start"]["pairs_within_d0"], b["start"]["pairs_within_d0"]),
             ("pairs < d0, end", a["end"]["pairs_within_d0"], b["end"]["pairs_within_d0"]),
             ("mean latent norm, end", a["mean_latent_norm_end"], b["mean_latent_norm_end"]),
             ("mean latent move", a["mean_move"], b["mean_move"]),
             ("seconds", a["seconds"], b["seconds"])]
    for name, x, y in lines:
        print(f"{name:>28} {x:>10} {y:>10}")
    print(f"start mean latent norm {a['mean_latent_norm_start']}")


class WorkersRun:
    """Steps of one run from ``start`` (a neighbour rebuild first) with G and the embedder in ``space``,
    timed one at a time so that two runs can alternate (a load change on a shared machine then hits both)."""

    def __init__(self, space, settings: LangevinSettings, start: np.ndarray):
        self.sampler = TimedSampler(settings, TimedSpace(space))
        self.state = LangevinState(start.copy(), 0, np.random.default_rng(1))
        self.steps, self.passes = [], []

    def step(self, name: str) -> None:
        space = self.sampler.space
        space.seconds = dict.fromkeys(space.seconds, 0.0)
        t0 = time.perf_counter()
        self.sampler.step(self.state, rebuild=self.state.iteration == 0)
        self.steps.append(time.perf_counter() - t0)
        self.passes.append(space.seconds["embed"] + space.seconds["pullback"])
        print(json.dumps({"run": name, "iteration": self.state.iteration, "s": round(self.steps[-1], 2),
                          "g_embedder_s": round(self.passes[-1], 2), "load": round(os.getloadavg()[0], 1)}), flush=True)

    def figures(self) -> dict:
        return {"first_s": self.steps[0], "plain_s": float(np.mean(self.steps[1:] or self.steps)),
                "passes_s": float(np.mean(self.passes[1:] or self.passes))}


def workers(n: int, iterations: int, count: int, embedder: str | None) -> None:
    from facegen.config import TaskSettings
    from facegen.ray_utils import start_local_ray
    from facegen.stages.langevin_workers import ActorLatentSpace

    with tempfile.TemporaryDirectory() as scratch:
        path = embedder or random_embedder(scratch)
        cfg = load_config(CONFIG, [f"generator.embedder.path={path}", "generator.device=cpu"])
        s = cfg.identities.sampler.langevin
        start_local_ray(num_cpus=max(count, 2), include_dashboard=False, log_to_driver=False)
        gan = build_gan(cfg.generator)
        start = gan.gaussian_latents(0, np.arange(n))
        print(f"latent-space Langevin, DCGAN + {'embedder ' + embedder if embedder else 'random IResNet-18 w16'}; {n} particles, "
              f"{iterations} iterations, batch {s.batch_size}; this process: torch threads {torch.get_num_threads()}; "
              f"os.cpu_count {os.cpu_count()}, load average {os.getloadavg()[0]:.1f}", flush=True)
        local = LatentSpace(IdentityEncoder(gan, ForceEmbedder(cfg.generator.embedder, "cpu"), s.batch_size),
                            gan.latent_mean.cpu().numpy())
        t0 = time.perf_counter()
        actors = ActorLatentSpace(cfg.generator, s.batch_size, count, TaskSettings(num_cpus=1.0))
        started = time.perf_counter() - t0
        one, many = WorkersRun(local, s, start), WorkersRun(actors, s, start)
        try:
            for _ in range(iterations):  # alternating: workers 1's step, then workers N's
                one.step("workers 1")
                many.step(f"workers {count}")
        finally:
            actors.close()
    a, b = one.figures(), many.figures()
    print(f"{'':>36} {'workers 1':>10} {f'workers {count}':>10} {'speedup':>8}")
    for name, key in (("s / first step (neighbour rebuild)", "first_s"), ("s / plain step, mean", "plain_s"),
                      ("of which G + embedder passes s", "passes_s")):
        print(f"{name:>36} {a[key]:>10.2f} {b[key]:>10.2f} {a[key] / b[key]:>7.2f}x")
    difference = np.abs(one.state.particles - many.state.particles).max()
    print(f"actors started in {started:.1f} s (once per run); final particles bitwise equal: "
          f"{bool(np.array_equal(one.state.particles, many.state.particles))}, largest difference {float(difference):.3g}; "
          f"load average now {os.getloadavg()[0]:.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--threads", type=int, help="torch threads (default torch's own; 1 is steadier on a shared machine)")
    parser.add_argument("--embedder", help="a facegen backbone folder (default: gan_local's shape, random weights)")
    parser.add_argument("--step-cap", action="store_true", help="compare no cap with dt_max 1.0 instead")
    parser.add_argument("--workers", type=int, help="compare G and the embedder in this process with on this many encoder actors")
    parser.add_argument("--particles", type=int, default=300)
    parser.add_argument("--iterations", type=int, help="default 20 (--step-cap), 3 (--workers)")
    parser.add_argument("--d0-quantile", type=float, help="--step-cap: d0 at this quantile of the gaussian start's pair angles (default gan_local's 1.4)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.workers:
        workers(args.particles, args.iterations or 3, args.workers, args.embedder)
    elif args.step_cap:
        step_cap(args.particles, args.iterations or 20, args.embedder, args.d0_quantile)
    else:
        scaling(args.sizes, args.embedder)


if __name__ == "__main__":
    main()
