"""StyleGAN2-256 generation rate (images/s) at the best batch size, fp16 vs fp32, plain torch.

    python bench/stylegan2_gpu.py --device cuda [--batches 8 16 32 64 128] [--channel-base 16384]

Random weights of the FFHQ-256 shape of stylegan2-ada-pytorch's ``paper256`` config (channel base
16384, max 512 maps, 8 mapping layers, fp16 in the 4 highest resolutions, conv clamp 256; pass
``--channel-base 32768`` for the config-F width of rosinality's FFHQ-256). Each batch size is timed
``G(z, truncation_psi=0.7, noise_mode="const")`` after a warm-up, with CUDA synchronised; "fp16" runs
the fp16 blocks as the checkpoint declares them, "fp32" forces float32 everywhere. Imports only
torch and facegen.models (no Ray, no pydantic). A batch that runs out of memory ends that precision's
sweep.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from facegen.models.stylegan2 import StyleGAN2Config, StyleGAN2Generator  # noqa: E402


def build(channel_base: int, device: torch.device) -> StyleGAN2Generator:
    torch.manual_seed(0)
    cfg = StyleGAN2Config.from_channel_base(256, channel_base=channel_base, channel_max=512, num_fp16_res=4,
                                            conv_clamp=256.0, z_dim=512, w_dim=512, mapping_layers=8)
    return StyleGAN2Generator(cfg).to(device).eval().requires_grad_(False)


def rate(G: StyleGAN2Generator, batch: int, fp32: bool, device: torch.device, seconds: float) -> float:
    z = torch.randn(batch, G.z_dim, device=device)

    def run() -> None:
        with torch.inference_mode():
            G(z, truncation_psi=0.7, noise_mode="const", force_fp32=fp32)

    run()
    run()
    if device.type == "cuda":
        torch.cuda.synchronize()
    count, started = 0, time.perf_counter()
    while True:
        run()
        count += 1
        if device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - started
        if elapsed >= seconds and count >= 3:
            return count * batch / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--batches", type=int, nargs="+", default=[8, 16, 32, 64, 128])
    parser.add_argument("--channel-base", type=int, default=16384)
    parser.add_argument("--seconds", type=float, default=2.0, help="timed seconds per batch size")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    G = build(args.channel_base, device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    params = sum(p.numel() for p in G.parameters()) / 1e6
    print(f"StyleGAN2 256px, channel base {args.channel_base} ({params:.1f}M parameters), torch {torch.__version__}, {name}")
    with torch.inference_mode():
        z = torch.randn(8, G.z_dim, device=device, generator=torch.Generator(device).manual_seed(1))
        half = G(z, truncation_psi=0.7, noise_mode="const")
        full = G(z, truncation_psi=0.7, noise_mode="const", force_fp32=True)
    print(f"fp16 vs fp32 images (random weights): max |diff| {float((half - full).abs().max()):.4f}, "
          f"mean |diff| {float((half - full).abs().mean()):.5f}, image std {float(full.std()):.3f}")
    best = {}
    for precision in ("fp16", "fp32"):
        for batch in args.batches:
            try:
                value = rate(G, batch, precision == "fp32", device, args.seconds)
            except torch.cuda.OutOfMemoryError:
                print(f"{precision} batch {batch}: out of memory")
                torch.cuda.empty_cache()
                break
            print(f"{precision} batch {batch:>4}: {value:9.1f} img/s", flush=True)
            if value > best.get(precision, (0, 0))[1]:
                best[precision] = (batch, value)
    for precision, (batch, value) in best.items():
        print(f"best {precision}: {value:.1f} img/s at batch {batch}")
    if "fp16" in best and "fp32" in best:
        print(f"fp16 / fp32: {best['fp16'][1] / best['fp32'][1]:.2f}x")


if __name__ == "__main__":
    main()
