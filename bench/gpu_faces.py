"""The faces stage's two GPU parts, side by side in one run: MTCNN detection and IResNet embedding.

    python bench/gpu_faces.py --device cuda [--images 64] [--embed-batch 256]
    python bench/gpu_faces.py --device cpu --images 8 --embed-batch 16 --repeat 1   # the CPU smoke test

1. MTCNN (``facegen.models.mtcnn``, the ``mtcnn`` package's weights) on N 512x512 RGB images,
   its two cascades side by side (numpy: OpenCV resizes and numpy NMS on the host; torch:
   ``facegen.models.mtcnn_torch``, every step on the device), their detections compared; one
   ``detect_batch`` call for all N, and the torch cascade one image per call. The
   images are real photos when scikit-image is installed (its astronaut, plain and mirrored, and
   the astronaut's face pasted at two scales into a grey frame), so the cascade does the work a
   real dataset asks of it; faces found per image are printed as a check.
2. IResNet-50 (``facegen.models.iresnet``) on aligned 112x112 crops: embeddings/s at fp32 and
   under fp16 autocast, with the horizontal flip (two passes) as the faces stage runs it. The
   weights are seeded random: the cost is the network's, whatever its weights.

Needs torch, numpy, opencv, lz4 and the ``mtcnn`` wheel installed ``--no-deps`` (only its weight
files are read); not Ray, pydantic or pyarrow.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.timing import best_rate  # noqa: E402


def photos_512(n: int) -> list[np.ndarray]:
    """``n`` 512x512 RGB images with one face each (real photos when scikit-image is present)."""
    import cv2

    try:
        import skimage.data

        astronaut = skimage.data.astronaut()
    except ImportError:  # the cascade still runs its full pyramid on any image
        astronaut = np.random.default_rng(0).integers(0, 255, (512, 512, 3), np.uint8)
    face = astronaut[30:250, 140:330]
    frames = []
    for size in (180, 260):
        frame = np.full((512, 512, 3), 110, np.uint8)
        resized = cv2.resize(face, (size * face.shape[1] // face.shape[0], size), interpolation=cv2.INTER_AREA)
        y, x = (512 - resized.shape[0]) // 2, (512 - resized.shape[1]) // 2
        frame[y : y + resized.shape[0], x : x + resized.shape[1]] = resized
        frames.append(frame)
    pool = [astronaut, astronaut[:, ::-1], *frames]
    return [np.ascontiguousarray(pool[i % len(pool)]) for i in range(n)]


def bench_mtcnn(images: list[np.ndarray], device: str, repeat: int) -> None:
    """Both cascades (``mtcnn_cascade``: numpy = OpenCV + numpy glue on the host, torch = all on the
    device) on the same images: their detections compared, then images/s side by side."""
    from facegen.models.mtcnn import MTCNN

    detectors = {cascade: MTCNN(device=device, min_face=20, cascade=cascade) for cascade in ("numpy", "torch")}
    found = {cascade: detector.detect_batch(images) for cascade, detector in detectors.items()}
    same = sum(len(a[1]) == len(b[1]) for a, b in zip(found["numpy"], found["torch"]))
    paired = [(a, b) for a, b in zip(found["numpy"], found["torch"]) if len(a[1]) == len(b[1]) and len(a[1])]
    box = max((float(np.abs(a[0] - b[0]).max()) for a, b in paired), default=0.0)
    mark = max((float(np.abs(a[2] - b[2]).max()) for a, b in paired), default=0.0)
    faces = [len(f[1]) for f in found["numpy"]]
    print(f"MTCNN 512 px, min_face 20: faces per image {sorted(set(faces))} (mean {np.mean(faces):.2f}); "
          f"torch cascade vs numpy: same face count on {same}/{len(images)} images, boxes within {box:.3f} px, "
          f"landmarks within {mark:.3f} px")
    rates = {}
    for cascade, detector in detectors.items():
        rates[cascade] = best_rate(lambda d=detector: d.detect_batch(images), len(images), repeat, cuda=device == "cuda")
        print(f"| MTCNN, {cascade} cascade (one detect_batch of {len(images)}) | {rates[cascade]:.1f} img/s |")
    single = best_rate(lambda: [detectors["torch"].detect_batch([im]) for im in images], len(images), repeat, cuda=device == "cuda")
    print(f"| MTCNN, torch cascade, one image per call | {single:.1f} img/s |")
    print(f"| ratio torch / numpy cascade | {rates['torch'] / rates['numpy']:.2f}x |")


def bench_iresnet(device: str, batch: int, repeat: int) -> None:
    import torch

    from facegen.models.iresnet import iresnet50

    torch.manual_seed(0)
    net = iresnet50().to(device).eval()
    crops = torch.randint(0, 255, (batch, 3, 112, 112), dtype=torch.uint8, device=device)

    @torch.inference_mode()
    def embed(fp16: bool) -> torch.Tensor:
        x = (crops.float() - 127.5) / 127.5
        with torch.autocast(device_type=torch.device(device).type, dtype=torch.float16, enabled=fp16):
            out = net(x) + net(torch.flip(x, dims=[3]))
        return torch.nn.functional.normalize(out.float(), dim=1)

    rates = {fp16: best_rate(lambda fp16=fp16: embed(fp16), batch, repeat, cuda=device == "cuda") for fp16 in (False, True)}
    print(f"| IResNet-50 + flip, batch {batch}, fp32 | {rates[False]:.0f} crops/s |")
    print(f"| IResNet-50 + flip, batch {batch}, fp16 autocast | {rates[True]:.0f} crops/s |")
    print(f"| ratio fp16 / fp32 | {rates[True] / rates[False]:.2f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--embed-batch", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    import torch

    if args.device == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("error: --device cuda: no CUDA device visible to torch")
        torch.backends.cudnn.benchmark = True
        print(f"device: {torch.cuda.get_device_name()} · torch {torch.__version__}")
    bench_mtcnn(photos_512(args.images), args.device, args.repeat)
    bench_iresnet(args.device, args.embed_batch, args.repeat)


if __name__ == "__main__":
    main()
