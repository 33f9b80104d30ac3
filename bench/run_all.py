"""Component benchmarks, measured side by side in one run; prints a table of rates and ratios.

    python bench/run_all.py [--quick] [--device cpu|cuda]

Ray is not involved (its wheel is too large for the GPU machines here): each benchmark drives the
component a Ray stage wraps. Record results in bench/RESULTS.md with the machine named.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.timing import best_rate  # noqa: E402
from facegen.config import GeneratorSettings, ParametricSettings  # noqa: E402


def bench_parametric(quick: bool) -> list[tuple[str, float, str]]:
    from facegen.generators.parametric import ParametricGenerator

    ids = 4 if quick else 16
    rows = []
    for size in (128, 256):
        settings = GeneratorSettings(images_per_identity=8, parametric=ParametricSettings(image_size=size))
        gen = ParametricGenerator(settings, seed=0)
        batch = {"identity_id": np.arange(ids, dtype=np.int64), "block_id": np.zeros(ids, np.int64)}
        rows.append((f"parametric render {size}px", best_rate(lambda: gen(batch), ids * 8, repeat=3), "img/s"))
    rows.append(("  ratio 128px / 256px", rows[0][1] / rows[1][1], "x"))
    return rows


def bench_embed(quick: bool, device: str) -> list[tuple[str, float, str]]:
    import tempfile

    from facegen.faces.embedders.iresnet import IResNetEmbedder
    from facegen.models.iresnet_checkpoint import save_backbone
    from facegen.models.iresnet import build_backbone

    n = 32 if quick else 128
    images = np.random.default_rng(0).integers(0, 255, (n, 112, 112, 3), dtype=np.uint8)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for arch, width in (("iresnet18", 16), ("iresnet50", 64)):
            path = f"{tmp}/{arch}-{width}"
            save_backbone(path, build_backbone(arch, width=width), arch=arch, width=width, embedding_size=512)
            embedder = IResNetEmbedder(path, device=device, batch_size=32)
            for flip in (False, True):
                rate = best_rate(lambda: embedder.embed(images, flip=flip), n, repeat=2)
                rows.append((f"embed {arch} w{width} flip={flip}", rate, "img/s"))
    rows.append(("  ratio flip off / on (r50)", rows[2][1] / rows[3][1], "x"))
    return rows


def bench_train_step(quick: bool, device: str) -> list[tuple[str, float, str]]:
    import torch

    from facegen.config import TrainSettings
    from facegen.train.heads import build_head
    from facegen.models.iresnet import build_backbone

    batch = 16 if quick else 64
    rows = []
    for width in (16, 64):
        model = build_backbone("iresnet18", width=width).to(device)
        head = build_head(TrainSettings(), num_classes=1000).to(device)
        opt = torch.optim.SGD(list(model.parameters()) + list(head.parameters()), lr=0.1, momentum=0.9)
        x = torch.randn(batch, 3, 112, 112, device=device)
        y = torch.randint(0, 1000, (batch,), device=device)

        def step():
            loss = head(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if device == "cuda":
                torch.cuda.synchronize()

        rows.append((f"train step iresnet18 w{width} b{batch}", best_rate(step, batch, repeat=2), "img/s"))
    rows.append(("  ratio width 16 / 64", rows[0][1] / rows[1][1], "x"))
    return rows


def bench_neighbours(quick: bool) -> list[tuple[str, float, str]]:
    import faiss

    n, q, d, k = (20000, 2000, 512, 10) if quick else (100000, 5000, 512, 10)
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((n // 20, d)).astype(np.float32)
    base = (centres[rng.integers(0, len(centres), n)] + 0.3 * rng.standard_normal((n, d))).astype(np.float32)
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    queries = base[rng.choice(n, q, replace=False)]

    def with_faiss():
        index = faiss.IndexFlatIP(d)
        index.add(base)
        index.search(queries, k)

    def with_numpy():
        for start in range(0, q, 500):
            sims = queries[start : start + 500] @ base.T
            np.argpartition(-sims, k, axis=1)[:, :k]

    a, b = best_rate(with_faiss, q, repeat=1), best_rate(with_numpy, q, repeat=1)
    return [(f"top-{k} faiss IndexFlatIP {n}x{d}", a, "query/s"), (f"top-{k} numpy matmul {n}x{d}", b, "query/s"),
            ("  ratio faiss / numpy", a / b, "x")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes (CI smoke run)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = parser.parse_args()
    import torch

    where = torch.cuda.get_device_name(0) if args.device == "cuda" else f"{platform.processor() or platform.machine()} x{os.cpu_count()}"
    print(f"facegen benchmarks on {where}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    rows = bench_parametric(args.quick) + bench_embed(args.quick, args.device)
    rows += bench_train_step(args.quick, args.device) + bench_neighbours(args.quick)
    width = max(len(r[0]) for r in rows)
    for name, value, unit in rows:
        print(f"{name:<{width}}  {value:>10.2f} {unit}")


if __name__ == "__main__":
    main()
