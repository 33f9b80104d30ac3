"""Cleaning benchmarks, side by side in one run (issue 10).

1. The cluster expert (facegen.clean.cluster, batched fast path) against scikit-learn's DBSCAN in
   HybridGen's adaptive loop (facegen.clean.cluster_reference) on the same identities: the keep
   decisions must be identical; prints both times (each warmed, best of 2 runs) and the speed ratio
   (target >= 20x, issue 21).
2. Dedup + leakage over N identity centres (512-d, clustered like real embeddings, with planted
   near-duplicates and planted copies of references) for each N in --sizes: seconds, peak memory
   (each size in its own process), recall of the above-threshold pairs against exact search on a
   sample of queries (target >= 0.99), and the time ratio of the largest to the smallest size
   (target <= 12x for 1M / 100k). The index is clean.search's default (``index: auto``: exact up
   to 50k vectors, IVF-Flat above); ``--index`` forces one.

    python bench/cleaning.py                       # both parts, 100k and 1M centres
    python bench/cleaning.py --sizes 100000        # a quicker run
    python bench/cleaning.py --skip-cluster --dedup-only --sizes 1000000   # one dedup trial
    python bench/cleaning.py --device cuda         # faiss on the GPU (needs faiss-gpu; no Ray needed)
    python bench/cleaning.py --skip-cluster --scans lists   # only the CPU list-major scan (clean.search.scan)

Imports only numpy, faiss, pyarrow, scikit-learn and facegen.clean/facegen.config (pydantic).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

DIM = 512


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def random_identity(rng: np.random.Generator, n: int) -> np.ndarray:
    """A majority person, sometimes a second person, and random outliers (as in HybridGen's data)."""
    sigma = rng.uniform(0.3, 1.2)
    centre = unit(rng.standard_normal(DIM))
    parts = [unit(centre + sigma * rng.standard_normal((n, DIM)) / np.sqrt(DIM))]
    if rng.random() < 0.3:
        other = unit(rng.standard_normal(DIM))
        parts.append(unit(other + 0.5 * rng.standard_normal((n // 4, DIM)) / np.sqrt(DIM)))
    parts.append(unit(rng.standard_normal((int(rng.integers(0, n // 5 + 1)), DIM))))
    emb = np.vstack(parts)
    return emb[rng.permutation(len(emb))].astype(np.float32)


def bench_cluster(identities: int, images: int, repeats: int = 2) -> dict:
    from facegen.clean.cluster import adaptive_dbscan_keep_many
    from facegen.clean.cluster_reference import sklearn_adaptive_dbscan_keep
    from facegen.config import DbscanSettings

    rng = np.random.default_rng(0)
    data = [random_identity(rng, images) for _ in range(identities)]
    settings = DbscanSettings()
    # both warmed on a few identities first (imports, BLAS threads), then the best of `repeats` runs each
    [sklearn_adaptive_dbscan_keep(e, settings) for e in data[:20]], adaptive_dbscan_keep_many(data[:20], settings)
    sklearn_s, fast_s = np.inf, np.inf
    for _ in range(repeats):
        started = time.perf_counter()
        reference = [sklearn_adaptive_dbscan_keep(e, settings) for e in data]
        sklearn_s = min(sklearn_s, time.perf_counter() - started)
        started = time.perf_counter()
        fast = adaptive_dbscan_keep_many(data, settings)
        fast_s = min(fast_s, time.perf_counter() - started)
    same = sum(np.array_equal(a.keep, b.keep) and a.threshold == b.threshold and a.rounds == b.rounds for a, b in zip(reference, fast))
    return {"identities": identities, "images_per_identity_about": images, "rounds_mean": float(np.mean([d.rounds for d in reference])),
            "sklearn_s": round(sklearn_s, 3), "fast_s": round(fast_s, 3), "speedup": round(sklearn_s / fast_s, 1), "best_of": repeats,
            "identical_decisions": f"{same}/{identities}"}


def clustered(rng: np.random.Generator, modes: np.ndarray, k: int) -> np.ndarray:
    """Unit vectors around random modes (cosine about 0.45 to their mode, 0.2 between neighbours,
    about 0 otherwise): the weak cluster structure of face embeddings (gender, age, ethnicity)."""
    return unit(0.5 * modes[rng.integers(0, len(modes), k)] + unit(rng.standard_normal((k, DIM))))


def write_centres(path: str, n: int, rng: np.random.Generator, references: np.ndarray, chunk: int = 100_000) -> dict:
    """N clustered centres into a .npy file, chunk by chunk: planted near-duplicates (row r + 1 of
    every 40, cosine 0.74-0.93 to row r) and planted copies of 100 references (cosine about 0.75)."""
    modes = unit(rng.standard_normal((1000, DIM)))
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, DIM))
    for s in range(0, n, chunk):
        k = min(chunk, n - s)
        x = clustered(rng, modes, k)
        dup = np.arange(0, k - 1, 40)  # row r + 1 is a near-duplicate of row r (5 % of the rows)
        x[dup + 1] = unit(x[dup] + rng.uniform(0.02, 0.04, (len(dup), 1)) * rng.standard_normal((len(dup), DIM)))
        out[s : s + k] = x
    leaked = rng.choice(np.arange(5, n, 40), 100, replace=False)  # never a planted duplicate
    out[leaked] = unit(references[:100] + 0.03 * rng.standard_normal((100, DIM)))
    out.flush()
    return {"planted_leaks": leaked}


def exact_pairs(x: np.ndarray, queries: np.ndarray, threshold: float, base: np.ndarray | None = None) -> set:
    base = x if base is None else base
    found = set()
    q = np.asarray(x[queries], np.float32)
    for s in range(0, len(base), 50_000):  # a [queries, 50k] block: about 1 GiB for 5000 queries
        sims = q @ np.asarray(base[s : s + 50_000], np.float32).T
        for i, j in zip(*np.nonzero(sims >= threshold)):
            if base is not x or queries[i] != s + j:
                found.add((int(queries[i]), int(s + j)))
    return found


def bench_global(n: int, device: str, workdir: str, index: str = "auto", dedup_only: bool = False, scan: str = "lists") -> dict:
    """One size: dedup (self-join) + leakage (vs 100k references; not with ``dedup_only``), with recall on a query sample."""
    from facegen.clean.dedup import find_duplicates
    from facegen.clean.leakage import ReferenceSet, audit
    from facegen.clean.search import ArrayChunks
    from facegen.config import DedupSettings, LeakageSettings, SearchSettings

    rng = np.random.default_rng(n)
    references = clustered(rng, unit(rng.standard_normal((1000, DIM))), 100_000).astype(np.float32)
    ref_path, path = f"{workdir}/refs.npy", f"{workdir}/centres-{n}.npy"
    np.save(ref_path, references)
    planted = write_centres(path, n, rng, references)
    del references
    centres = np.load(path, mmap_mode="r")
    search = SearchSettings(device=device, index=index, scan=scan)
    dedup_cfg, leak_cfg = DedupSettings(threshold=0.7), LeakageSettings(references=[ref_path], threshold=0.5, report_pairs=10)
    cpu_started = time.process_time()  # CPU seconds of all threads: less sensitive to a shared machine's load
    started = time.perf_counter()
    dedup = find_duplicates(ArrayChunks(centres), lambda ids: {int(i): 1 for i in ids}, dedup_cfg, search)
    dedup_s = time.perf_counter() - started
    dedup_cpu_s = time.process_time() - cpu_started
    started = time.perf_counter()
    leaks = None if dedup_only else audit(ArrayChunks(centres), ReferenceSet([ref_path]), leak_cfg, search)
    leakage_s = time.perf_counter() - started
    cpu_s = time.process_time() - cpu_started
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    # recall against exact search for 5000 sampled queries (and every planted leak)
    sample = np.sort(rng.choice(n, 5000, replace=False))
    want = {tuple(sorted(p)) for p in exact_pairs(centres, sample, dedup_cfg.threshold)}
    got = set(zip(dedup.pairs.column("query_id").to_pylist(), dedup.pairs.column("base_id").to_pylist()))
    row = {"centres": n, "scan": scan, "index": dedup.plan.kind, "lists": dedup.plan.nlist, "nprobe": dedup.plan.nprobe or None, "gpu": dedup.plan.gpu,
           "dedup_s": round(dedup_s, 1), "dedup_cpu_s": round(dedup_cpu_s, 1), "dedup_pairs": dedup.pairs.num_rows,
           "dedup_recall": round(len(want & got) / max(1, len(want)), 4), "dedup_pairs_in_sample": len(want)}
    if leaks is None:
        return row | {"total_s": round(dedup_s, 1), "cpu_s": round(cpu_s, 1), "peak_rss_gib": round(peak_gib, 2)}
    want_leaks = exact_pairs(centres, np.sort(np.concatenate([sample, planted["planted_leaks"]])), leak_cfg.threshold,
                             base=np.load(ref_path, mmap_mode="r"))
    got_leaks = set(zip(leaks.pairs.column("query_id").to_pylist(), leaks.pairs.column("base_id").to_pylist()))
    return row | {"leakage_index": leaks.plan.kind, "leakage_lists": leaks.plan.nlist,
            "leakage_s": round(leakage_s, 1), "leaked_identities": len(set(leaks.pairs.column("query_id").to_pylist())),
            "leakage_recall": round(len(want_leaks & got_leaks) / max(1, len(want_leaks)), 4), "leak_pairs_checked": len(want_leaks),
            "total_s": round(dedup_s + leakage_s, 1), "cpu_s": round(cpu_s, 1), "peak_rss_gib": round(peak_gib, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--identities", type=int, default=1000, help="identities for the cluster comparison")
    parser.add_argument("--images", type=int, default=50)
    parser.add_argument("--sizes", type=int, nargs="*", default=[100_000, 1_000_000])
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--index", default="auto", choices=["auto", "flat", "ivf", "hnsw"], help="clean.search.index")
    parser.add_argument("--scans", nargs="+", default=["lists", "faiss"], choices=["lists", "faiss"],
                        help="clean.search.scan: each size runs once per scan, side by side")
    parser.add_argument("--skip-cluster", action="store_true")
    parser.add_argument("--dedup-only", action="store_true", help="time only the dedup (no leakage audit): a quicker trial")
    parser.add_argument("--one-size", type=int, help=argparse.SUPPRESS)  # child process of one size
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one_size:
        print(json.dumps(bench_global(args.one_size, args.device, args.workdir, args.index, args.dedup_only, args.scans[0])))
        return
    if not args.skip_cluster:
        result = bench_cluster(args.identities, args.images)
        print("cluster expert vs sklearn DBSCAN (HybridGen loop):", json.dumps(result), flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="facegen-bench-") as workdir:
        for n in args.sizes:
            by_scan = {}
            for scan in args.scans:
                out = subprocess.run([sys.executable, __file__, "--one-size", str(n), "--device", args.device, "--index", args.index,
                                      "--workdir", workdir, "--scans", scan] + (["--dedup-only"] if args.dedup_only else []),
                                     check=True, capture_output=True, text=True)
                by_scan[scan] = json.loads(out.stdout.strip().splitlines()[-1])
                print("dedup + leakage:", json.dumps(by_scan[scan]), flush=True)
                os.remove(f"{workdir}/centres-{n}.npy")
            if {"lists", "faiss"} <= set(by_scan):
                print(f"{n} centres: faiss's scan / list-major scan: {by_scan['faiss']['total_s'] / by_scan['lists']['total_s']:.2f}x "
                      f"wall, {by_scan['faiss']['cpu_s'] / by_scan['lists']['cpu_s']:.2f}x CPU", flush=True)
            rows.append(by_scan[args.scans[0]])
    if len(rows) >= 2:
        print(f"time ratio {rows[-1]['centres']} / {rows[0]['centres']} centres ({args.scans[0]} scan): "
              f"{rows[-1]['total_s'] / rows[0]['total_s']:.1f}x (CPU seconds: {rows[-1]['cpu_s'] / rows[0]['cpu_s']:.1f}x)")


if __name__ == "__main__":
    main()
