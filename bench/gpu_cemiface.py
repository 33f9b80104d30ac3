"""GPU throughput of CemiFace's generator: a training step at 112 px and DDIM-20 drawing, one run.

    python bench/gpu_cemiface.py --device cuda [--batch 80] [--draw-batch 50] [--steps 20]
    python bench/gpu_cemiface.py --device cpu --smoke      # CPU smoke run, tiny sizes

The UNet is ``configs/cemiface.yaml``'s (112 px, channels 128/256/256/512, 2 layers per block,
cross-attention 512 wide on 4 C_att tokens) with random weights (timing does not depend on them).
A training step is CemiFace's whole loss (:func:`facegen.models.cemiface.cemiface_loss`): noise
prediction, x0_hat, an IResNet-50 embedding of it for the similarity-matching term (frozen, random
weights), backward, AdamW; bf16 autocast on GPUs that have it. Drawing is DDIM 20 steps at m = 0 in
fp16 (what ``generator.hybrid.cemiface`` does on a GPU). Needs torch, numpy and diffusers only.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from types import SimpleNamespace

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.timing import best_rate  # noqa: E402
from facegen.models.cemiface import CemiFaceUNet, cemiface_loss, ddim_sample, noise_scheduler  # noqa: E402
from facegen.models.iresnet import iresnet50  # noqa: E402

PAPER_NET = {"image_size": 112, "id_dim": 512, "similarity_dim": 128, "context_tokens": 4, "cross_attention_dim": 512,
             "block_out_channels": (128, 256, 256, 512), "layers_per_block": 2, "attention_head_dim": 8,
             "norm_num_groups": 32}
SMOKE_NET = {**PAPER_NET, "image_size": 32, "block_out_channels": (32, 64), "cross_attention_dim": 64,
             "similarity_dim": 16, "norm_num_groups": 16, "layers_per_block": 1}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch", type=int, default=80, help="training images per step (the paper: 80 per GPU)")
    parser.add_argument("--draw-batch", type=int, default=50, help="images per DDIM run (one identity x 50)")
    parser.add_argument("--steps", type=int, default=20, help="DDIM steps")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--smoke", action="store_true", help="tiny UNet and batches (CPU)")
    args = parser.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    net = SMOKE_NET if args.smoke else PAPER_NET
    batch, draw = (4, 2) if args.smoke else (args.batch, args.draw_batch)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    model = CemiFaceUNet(**net).to(device)
    embedder = iresnet50(width=16 if args.smoke else 64).to(device).eval().requires_grad_(False)
    embedder.fp16 = False
    scheduler = noise_scheduler(1000)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=cuda)
    amp = torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else None
    size = net["image_size"]
    g = torch.Generator(device="cpu").manual_seed(0)
    data = SimpleNamespace(
        images=(torch.rand(batch, 3, size, size, generator=g) * 2 - 1).to(device),
        noise=torch.randn(batch, 3, size, size, generator=g).to(device),
        timesteps=torch.randint(0, 1000, (batch,), generator=g).to(device),
        id_features=torch.nn.functional.normalize(torch.randn(batch, net["id_dim"], generator=g), dim=1).to(device),
        similarity=(torch.randint(-50, 51, (batch,), generator=g) * 0.02).to(device))

    def train_step() -> None:
        for _ in range(3):
            with torch.autocast(device.type, dtype=amp or torch.float16, enabled=amp is not None):
                loss, _ = cemiface_loss(model, scheduler, data, 0.05, embedder, 1000)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()

    train_rate = best_rate(train_step, 3 * batch, args.repeat, cuda)
    model.eval()
    features = np.random.default_rng(0).normal(size=(draw, net["id_dim"])).astype(np.float32)
    features /= np.linalg.norm(features, axis=1, keepdims=True)
    half = torch.float16 if cuda else None
    draw_rate = best_rate(lambda: ddim_sample(model, dict(scheduler.config), features, [0.0] * draw, list(range(draw)),
                                              args.steps, half), draw, args.repeat, cuda)
    report = {
        "device": torch.cuda.get_device_name(device) if cuda else "cpu", "torch": torch.__version__,
        "image_size": size, "parameters_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
        "train_batch": batch, "train_images_per_s": round(train_rate, 1), "train_amp": str(amp),
        "ddim_steps": args.steps, "draw_batch": draw, "draw_images_per_s": round(draw_rate, 2),
        "peak_memory_GiB": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if cuda else None,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
