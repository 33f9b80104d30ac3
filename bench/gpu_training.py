"""GPU training benchmark, plain PyTorch (no Ray, no pydantic): the figures issue 12 asks for.

    python bench/gpu_training.py --device cuda            # about 1-2 minutes on one H100
    python bench/gpu_training.py --device cuda --batches 128,256 --classes 1000000 --steps 30
    python bench/gpu_training.py --device cuda --compile  # adds torch.compile'd backbones (1-3 min more)
    python bench/gpu_training.py --device cpu --quick     # a smoke run of the same code

1. IResNet-50 (width 64, 512-d) training images/s at batch 128 and 256: a full step of the training
   loop (``facegen.train.step.train_step``, the step ``fit`` runs: forward under autocast, Partial FC ArcFace loss over
   10k classes, backward with loss scaling when fp16, clipping, two SGD steps), synthetic inputs
   already on the GPU, channels-last; AMP bf16 where the GPU has it, else fp16.
2. Partial FC at 1M classes on one GPU: the same step with 1,000,000 class centres (512-d) at
   sample rate 1.0 and 0.1, batch 128: step time and peak GPU memory.

Imports only torch and facegen modules that need nothing else (models.iresnet, train.partial_fc, train.step,
train.heads).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from facegen.models.iresnet import build_backbone  # noqa: E402
from facegen.train.heads import ArcFace  # noqa: E402
from facegen.train.partial_fc import PartialFC  # noqa: E402
from facegen.train.step import resolve_amp, train_step  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(device: torch.device, arch: str, width: int, batch: int, classes: int, sample_rate: float,
            warmup: int, steps: int, channels_last: bool, compile_backbone: bool = False) -> dict:
    """Images/s, ms/step and peak memory of full training steps on synthetic data."""
    dtype, use_scaler = resolve_amp("auto", device)  # as train.amp: auto
    torch.manual_seed(0)
    model = build_backbone(arch, width=width, embedding_size=512, fp16=dtype is not None)
    model.amp_dtype = dtype or torch.float16
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer_params = [p for p in model.parameters() if p.requires_grad]
    if compile_backbone:
        model = torch.compile(model)
    head = PartialFC(ArcFace(s=64.0, m=0.5), 512, classes, sample_rate=sample_rate, amp_dtype=dtype).to(device)
    fused = {"fused": True} if device.type == "cuda" else {}  # as fit: one optimizer kernel on a GPU
    optimizers = [torch.optim.SGD(optimizer_params, lr=0.1, momentum=0.9, weight_decay=5e-4, **fused),
                  torch.optim.SGD([head.weight], lr=0.1, momentum=0.9, weight_decay=5e-4, **fused)]
    if compile_backbone:  # as train.compile: the margin head too (no graph break at rate 1.0)
        head = torch.compile(head)
    scaler = torch.amp.GradScaler("cuda") if use_scaler else None
    x = torch.randn(batch, 3, 112, 112, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, classes, (batch,), device=device)

    def step(i: int) -> None:
        train_step(model, head, optimizers, scaler, x, y, i, clip_norm=5.0)

    for i in range(warmup):
        step(i)
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    for i in range(steps):
        step(warmup + i)
    sync(device)
    seconds = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return {"img_s": steps * batch / seconds, "ms_per_step": 1000 * seconds / steps, "peak_gib": peak,
            "dtype": str(dtype).replace("torch.", "") if dtype else "fp32"}


def run(*args, **kwargs) -> dict:
    """:func:`measure`, then the GPU memory of its model, head and optimizers handed back."""
    result = measure(*args, **kwargs)  # its tensors are freed when it returns
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
    return result


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.replace(",", " ").split())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke run on CPU): iresnet18 w8, batches 8,16, 20k classes")
    parser.add_argument("--arch", default=None, help="backbone (default iresnet50; --quick: iresnet18)")
    parser.add_argument("--width", type=int, default=None, help="backbone width (default 64; --quick: 8)")
    parser.add_argument("--batches", type=_ints, default=None, help="per-GPU batch sizes to time, e.g. 128,256")
    parser.add_argument("--classes", type=int, default=None, help="classes of the large Partial FC run (default 1000000)")
    parser.add_argument("--rates", default="1.0,0.1", help="Partial FC sample rates of the large run")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per configuration (default 30; --quick: 3)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 10; --quick: 1)")
    parser.add_argument("--no-channels-last", action="store_true")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile'd backbones and heads (adds 1-3 min of compiling)")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: torch sees no CUDA device")
    if args.compile and args.device != "cuda":
        sys.exit("--compile: for --device cuda only (the CPU inductor build here crashes)")
    began = time.perf_counter()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        name = torch.cuda.get_device_name(0)
    else:
        name = f"CPU x{os.cpu_count()}"
    channels_last = device.type == "cuda" and not args.no_channels_last
    print(f"device {name}, torch {torch.__version__}, AMP {resolve_amp('auto', device)[0] or 'off'}, channels_last {channels_last}", flush=True)
    arch, width, batches, million = ("iresnet18", 8, (8, 16), 20_000) if args.quick else ("iresnet50", 64, (128, 256), 1_000_000)
    arch, width = args.arch or arch, args.width or width
    batches, million = args.batches or batches, args.classes or million
    rates = [float(r) for r in args.rates.split(",") if r.strip()]
    steps = args.steps or (3 if args.quick else 30)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 10)

    rows = []
    for batch in batches:
        r = run(device, arch, width, batch, 10_000, 1.0, warmup, steps, channels_last)
        rows.append((f"{arch} w{width}, batch {batch}, Partial FC 10k classes", r))
        print(f"{rows[-1][0]}: {r['img_s']:.0f} img/s, {r['ms_per_step']:.1f} ms/step, peak {r['peak_gib']:.2f} GiB ({r['dtype']})", flush=True)
    if args.compile:
        for batch in batches:
            r = run(device, arch, width, batch, 10_000, 1.0, warmup, steps, channels_last, compile_backbone=True)
            rows.append((f"{arch} w{width}, batch {batch}, Partial FC 10k classes, torch.compile", r))
            print(f"{rows[-1][0]}: {r['img_s']:.0f} img/s, {r['ms_per_step']:.1f} ms/step, peak {r['peak_gib']:.2f} GiB", flush=True)
    for rate in rates:
        r = run(device, arch, width, batches[0], million, rate, warmup, steps, channels_last)
        rows.append((f"{arch} w{width}, batch {batches[0]}, Partial FC {million:,} classes, sample rate {rate}", r))
        print(f"{rows[-1][0]}: {r['img_s']:.0f} img/s, {r['ms_per_step']:.1f} ms/step, peak {r['peak_gib']:.2f} GiB ({r['dtype']})", flush=True)

    print("\n| configuration | img/s | ms/step | peak GiB |\n|---|---:|---:|---:|")
    for label, r in rows:
        print(f"| {label} | {r['img_s']:.0f} | {r['ms_per_step']:.1f} | {r['peak_gib']:.2f} |")
    if arch == "iresnet50" and width == 64:
        best = max(r["img_s"] for label, r in rows if "10k classes" in label)
        print(f"\nIResNet-50 AMP best images/s per GPU: {best:.0f} = {best / 4000:.2f}x the H100 target (4,000), "
              f"{best / 700:.1f}x the V100-class anchor (700)")
    print(f"total {time.perf_counter() - began:.0f} s (warm-up included)")


if __name__ == "__main__":
    main()
