"""MTCNN (Zhang et al. 2016, "Joint Face Detection and Alignment using Multi-task Cascaded
Convolutional Networks") in torch, with the P/R/O-Net weights that ship in the ``mtcnn`` PyPI package.

The cascade: P-Net, fully convolutional, proposes 12x12 windows (stride 2) on an image pyramid
(scale factor 0.709 from ``12 / min_face``); R-Net rescores and regresses their 24x24 crops; O-Net
rescores 48x48 crops and regresses the box and five landmarks. After each stage: score threshold,
non-maximum suppression, box regression, boxes made square. Images of one size go through P-Net
as one batch per pyramid level and the crops of all images through R-Net and O-Net as one batch.

Weights: ``mtcnn/assets/weights/{pnet,rnet,onet}.lz4`` are joblib pickles (lz4-compressed) of a
list of arrays in Keras layout (conv kernels ``[kh, kw, in, out]``, dense ``[in, out]``, PReLU
slopes, and a ``Permute((2, 1, 3))`` before R/O-Net's flatten: the dense input is ordered width,
height, channel). They are read by :func:`read_joblib_arrays`, a restricted unpickler that builds
nothing but numeric numpy arrays; the ``mtcnn`` package itself is never imported (it imports
TensorFlow). Inputs are RGB, ``(x - 127.5) / 128``.
"""

from __future__ import annotations

import importlib.util
import io
import os
import pickle
from dataclasses import dataclass

import cv2
import lz4.frame
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

PYRAMID_FACTOR = 0.709
#: How the glue between the networks runs: numpy = OpenCV resizes and numpy NMS on the host (below);
#: torch = every step batched on the networks' device (facegen.models.mtcnn_torch); auto = torch on a GPU.
CASCADES = ("auto", "numpy", "torch")
CELL, STRIDE = 12, 2


class PNet(nn.Module):
    """Proposal net: 12x12 windows -> (face probability map, box regression map)."""

    def __init__(self):
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 10, 3), nn.PReLU(10)
        self.conv2, self.prelu2 = nn.Conv2d(10, 16, 3), nn.PReLU(16)
        self.conv3, self.prelu3 = nn.Conv2d(16, 32, 3), nn.PReLU(32)
        self.box = nn.Conv2d(32, 4, 1)
        self.cls = nn.Conv2d(32, 2, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = F.max_pool2d(self.prelu1(self.conv1(x)), 2, 2, ceil_mode=True)
        x = self.prelu3(self.conv3(self.prelu2(self.conv2(x))))
        return F.softmax(self.cls(x), dim=1)[:, 1], self.box(x)


def _flatten_keras(x: torch.Tensor) -> torch.Tensor:
    # Keras flattened after Permute((2, 1, 3)) of NHWC: order width, height, channel.
    return x.permute(0, 3, 2, 1).reshape(x.shape[0], -1)


class RNet(nn.Module):
    """Refinement net: 24x24 crops -> (face probability, box regression)."""

    def __init__(self):
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 28, 3), nn.PReLU(28)
        self.conv2, self.prelu2 = nn.Conv2d(28, 48, 3), nn.PReLU(48)
        self.conv3, self.prelu3 = nn.Conv2d(48, 64, 2), nn.PReLU(64)
        self.fc4, self.prelu4 = nn.Linear(576, 128), nn.PReLU(128)
        self.box = nn.Linear(128, 4)
        self.cls = nn.Linear(128, 2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = F.max_pool2d(self.prelu1(self.conv1(x)), 3, 2, ceil_mode=True)
        x = F.max_pool2d(self.prelu2(self.conv2(x)), 3, 2)
        x = self.prelu4(self.fc4(_flatten_keras(self.prelu3(self.conv3(x)))))
        return F.softmax(self.cls(x), dim=1)[:, 1], self.box(x)


class ONet(nn.Module):
    """Output net: 48x48 crops -> (face probability, box regression, 5 landmarks as x1..x5, y1..y5)."""

    def __init__(self):
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 32, 3), nn.PReLU(32)
        self.conv2, self.prelu2 = nn.Conv2d(32, 64, 3), nn.PReLU(64)
        self.conv3, self.prelu3 = nn.Conv2d(64, 64, 3), nn.PReLU(64)
        self.conv4, self.prelu4 = nn.Conv2d(64, 128, 2), nn.PReLU(128)
        self.fc5, self.prelu5 = nn.Linear(1152, 256), nn.PReLU(256)
        self.box = nn.Linear(256, 4)
        self.landmarks = nn.Linear(256, 10)
        self.cls = nn.Linear(256, 2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = F.max_pool2d(self.prelu1(self.conv1(x)), 3, 2, ceil_mode=True)
        x = F.max_pool2d(self.prelu2(self.conv2(x)), 3, 2)
        x = F.max_pool2d(self.prelu3(self.conv3(x)), 2, 2, ceil_mode=True)
        x = self.prelu5(self.fc5(_flatten_keras(self.prelu4(self.conv4(x)))))
        return F.softmax(self.cls(x), dim=1)[:, 1], self.box(x), self.landmarks(x)


# --- weights --------------------------------------------------------------------------------


class _ArrayHeader:
    """Stands in for joblib's NumpyArrayWrapper: only its metadata is kept."""

    def __setstate__(self, state: dict) -> None:
        self.state = state


class _SafeArrayUnpickler(pickle._Unpickler):  # the pure-Python unpickler lets BUILD be extended
    _ALLOWED = {("joblib.numpy_pickle", "NumpyArrayWrapper"): _ArrayHeader, ("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a weights file")
        return self._ALLOWED[(module, name)]

    def load_build(self) -> None:
        super().load_build()
        if isinstance(self.stack[-1], _ArrayHeader):
            header = self.stack.pop()
            self.stack.append(self._read_array(header.state))

    def _read_array(self, state: dict) -> np.ndarray:
        dtype, shape = state["dtype"], tuple(int(s) for s in state["shape"])
        if not isinstance(dtype, np.dtype) or dtype.hasobject or dtype.kind not in "fiub":
            raise pickle.UnpicklingError(f"array dtype {dtype!r} is not a plain numeric type")
        if state.get("numpy_array_alignment_bytes") is not None:
            self.read(self.read(1)[0])  # joblib pads array data to an alignment boundary
        count = int(np.prod(shape, dtype=np.int64))
        data = self.read(count * dtype.itemsize)
        if len(data) != count * dtype.itemsize:
            raise pickle.UnpicklingError("array data is truncated")
        array = np.frombuffer(data, dtype=dtype, count=count).copy()
        return array.reshape(shape[::-1]).T if state.get("order") == "F" else array.reshape(shape)

    dispatch = dict(pickle._Unpickler.dispatch)
    dispatch[pickle.BUILD[0]] = load_build


def read_joblib_arrays(path: str) -> list[np.ndarray]:
    """The list of numeric arrays in a joblib (lz4 or raw) pickle, read without running any code."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:4] == b"\x04\x22\x4d\x18":  # lz4 frame magic
        data = lz4.frame.decompress(data)
    try:
        arrays = _SafeArrayUnpickler(io.BytesIO(data)).load()
    except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{path}: not a joblib file of numeric arrays ({exc})") from None
    if not isinstance(arrays, list) or not all(isinstance(a, np.ndarray) for a in arrays):
        raise ValueError(f"{path}: expected a list of arrays")
    return arrays


def mtcnn_weights_dir() -> str:
    """``<site-packages>/mtcnn/assets/weights`` of the installed ``mtcnn`` package (not imported)."""
    spec = importlib.util.find_spec("mtcnn")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("faces.detector: the mtcnn package (its weights) is not installed: pip install mtcnn")
    return os.path.join(list(spec.submodule_search_locations)[0], "assets", "weights")


def _load_keras(net: nn.Module, arrays: list[np.ndarray], name: str) -> nn.Module:
    """Copy Keras-layout arrays into ``net``'s parameters, in definition order."""
    params = list(net.parameters())
    # Keras lists each output head as (kernel, bias) in the order box, [landmarks,] class: as defined here.
    if len(arrays) != len(params):
        raise ValueError(f"{name}: {len(arrays)} arrays for {len(params)} parameters")
    with torch.no_grad():
        for param, array in zip(params, arrays):
            array = np.asarray(array, np.float32)
            if array.ndim == 4:
                array = array.transpose(3, 2, 0, 1)  # [kh, kw, in, out] -> [out, in, kh, kw]
            elif array.ndim == 2:
                array = array.T  # dense [in, out] -> [out, in]
            else:
                array = array.reshape(-1)  # biases, PReLU slopes [1, 1, C] or [C]
            if tuple(array.shape) != tuple(param.shape):
                raise ValueError(f"{name}: weight of shape {array.shape} does not fit {tuple(param.shape)}")
            param.copy_(torch.from_numpy(np.ascontiguousarray(array)))
    return net.eval()


def load_mtcnn(weights_dir: str | None = None, device: str | torch.device = "cpu") -> tuple[PNet, RNet, ONet]:
    """The three networks with the ``mtcnn`` package's weights, in eval mode on ``device``."""
    folder = weights_dir or mtcnn_weights_dir()
    nets = []
    for net, name in ((PNet(), "pnet"), (RNet(), "rnet"), (ONet(), "onet")):
        path = os.path.join(folder, f"{name}.lz4")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"faces.detector: {path}: MTCNN weights not found")
        nets.append(_load_keras(net, read_joblib_arrays(path), path).to(device))
    return tuple(nets)  # type: ignore[return-value]


# --- the cascade ----------------------------------------------------------------------------


@dataclass
class Candidates:
    """Boxes of one stage for a batch of images: ``image`` index, ``boxes`` [n, 4] x1 y1 x2 y2, ``scores``."""

    image: np.ndarray
    boxes: np.ndarray
    scores: np.ndarray
    landmarks: np.ndarray | None = None

    def take(self, keep: np.ndarray) -> "Candidates":
        """The candidates selected by ``keep`` (a mask or indices)."""
        lm = None if self.landmarks is None else self.landmarks[keep]
        return Candidates(self.image[keep], self.boxes[keep], self.scores[keep], lm)


def nms(boxes: np.ndarray, scores: np.ndarray, threshold: float, mode: str = "union") -> np.ndarray:
    """Greedy non-maximum suppression; overlap is IoU (``union``) or intersection / smaller area (``min``)."""
    order = np.argsort(-scores, kind="stable")
    area = np.maximum(boxes[:, 2] - boxes[:, 0], 0) * np.maximum(boxes[:, 3] - boxes[:, 1], 0)
    keep = []
    while order.size:
        i, rest = order[0], order[1:]
        keep.append(i)
        w = np.maximum(0.0, np.minimum(boxes[i, 2], boxes[rest, 2]) - np.maximum(boxes[i, 0], boxes[rest, 0]))
        h = np.maximum(0.0, np.minimum(boxes[i, 3], boxes[rest, 3]) - np.maximum(boxes[i, 1], boxes[rest, 1]))
        inter = w * h
        denom = np.minimum(area[i], area[rest]) if mode == "min" else area[i] + area[rest] - inter
        order = rest[inter / np.maximum(denom, 1e-9) <= threshold]
    return np.asarray(keep, np.int64)


def nms_per_image(c: Candidates, threshold: float, mode: str = "union") -> Candidates:
    """:func:`nms` within each image's candidates (``landmarks`` ride along: offsets or points)."""
    keep = [np.flatnonzero(c.image == i)[nms(c.boxes[c.image == i], c.scores[c.image == i], threshold, mode)] for i in np.unique(c.image)]
    return c.take(np.sort(np.concatenate(keep))) if keep else c


def regress(boxes: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Shift each box edge by its offset times the box width/height."""
    size = np.stack([boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]] * 2, axis=1)
    return boxes + offsets * size


def square(boxes: np.ndarray) -> np.ndarray:
    """Boxes made square around their centres (side = the longer side)."""
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2
    half = np.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])[:, None] / 2
    return np.concatenate([centre - half, centre + half], axis=1)


def normalise(images: np.ndarray, device: torch.device) -> torch.Tensor:
    """uint8 NHWC RGB -> float NCHW ``(x - 127.5) / 128``."""
    x = torch.from_numpy(np.ascontiguousarray(images)).to(device).permute(0, 3, 1, 2).float()
    return (x - 127.5) / 128.0


def crop_boxes(images: list[np.ndarray], c: Candidates, size: int) -> np.ndarray:
    """``[n, size, size, 3]`` crops of the candidate boxes; parts outside the image are black."""
    out = np.zeros((len(c.scores), size, size, 3), np.uint8)
    for k, (i, box) in enumerate(zip(c.image, c.boxes)):
        img = images[int(i)]
        h, w = img.shape[:2]
        x1, y1, x2, y2 = (int(round(v)) for v in box)
        bw, bh = max(x2 - x1, 1), max(y2 - y1, 1)
        canvas = np.zeros((bh, bw, 3), np.uint8)
        sx1, sy1, sx2, sy2 = max(x1, 0), max(y1, 0), min(x2, w), min(y2, h)
        if sx2 > sx1 and sy2 > sy1:
            canvas[sy1 - y1 : sy2 - y1, sx1 - x1 : sx2 - x1] = img[sy1:sy2, sx1:sx2]
        interp = cv2.INTER_AREA if bw > size else cv2.INTER_LINEAR
        out[k] = cv2.resize(canvas, (size, size), interpolation=interp)
    return out


def pyramid_scales(height: int, width: int, min_face: int, factor: float = PYRAMID_FACTOR) -> list[float]:
    """Scales at which a ``min_face`` face fills P-Net's 12 px window, down to a 12 px image."""
    scale, side, scales = CELL / min_face, min(height, width), []
    while side * scale >= CELL:
        scales.append(scale)
        scale *= factor
    return scales


class MTCNN:
    """The three-stage cascade on batches of RGB uint8 images; see :meth:`detect_batch`."""

    def __init__(
        self,
        device: str | torch.device = "cpu",
        min_face: int = 20,
        thresholds: tuple[float, float, float] = (0.6, 0.7, 0.8),
        weights_dir: str | None = None,
        max_batch: int = 256,
        max_pyramid_pixels: int = 32_000_000,
        cascade: str = "auto",
    ):
        self.device = torch.device(device)
        self.pnet, self.rnet, self.onet = load_mtcnn(weights_dir, self.device)
        self.min_face, self.thresholds, self.max_batch = int(min_face), tuple(thresholds), int(max_batch)
        self.max_pyramid_pixels = int(max_pyramid_pixels)  # bounds P-Net's memory for large batches of large images
        if cascade not in CASCADES:
            raise ValueError(f"faces.detector.mtcnn_cascade: {cascade!r} is not one of {', '.join(CASCADES)}")
        # auto: the host glue on a CPU (its OpenCV resizes are the faster there), all on the device on a GPU
        self.cascade = ("torch" if self.device.type != "cpu" else "numpy") if cascade == "auto" else cascade
        self.on_device = None
        if self.cascade == "torch":
            from facegen.models.mtcnn_torch import TorchCascade

            self.on_device = TorchCascade(self.pnet, self.rnet, self.onet, self.device, self.min_face, self.thresholds, self.max_batch)

    @torch.inference_mode()
    def _run(self, net: nn.Module, crops: np.ndarray) -> list[np.ndarray]:
        outs = []
        for start in range(0, len(crops), self.max_batch):
            result = net(normalise(crops[start : start + self.max_batch], self.device))
            outs.append([r.float().cpu().numpy() for r in result])
        return [np.concatenate(parts) for parts in zip(*outs)]

    @torch.inference_mode()
    def _propose(self, images: list[np.ndarray], indices: list[int]) -> Candidates:
        """P-Net over the pyramid of same-sized images ``indices``."""
        h, w = images[indices[0]].shape[:2]
        found = []
        for scale in pyramid_scales(h, w, self.min_face):
            size = (int(np.ceil(w * scale)), int(np.ceil(h * scale)))
            batch = np.stack([cv2.resize(images[i], size, interpolation=cv2.INTER_AREA) for i in indices])
            prob, offsets = self.pnet(normalise(batch, self.device))
            prob, offsets = prob.float().cpu().numpy(), offsets.float().cpu().numpy()
            n, ys, xs = np.nonzero(prob > self.thresholds[0])
            if not len(n):
                continue
            windows = np.stack([xs * STRIDE, ys * STRIDE, xs * STRIDE + CELL, ys * STRIDE + CELL], axis=1) / scale
            c = Candidates(np.asarray(indices)[n], windows, prob[n, ys, xs], offsets[n, :, ys, xs])
            found.append(nms_per_image(c, 0.5))
        if not found:
            return Candidates(np.zeros(0, np.int64), np.zeros((0, 4)), np.zeros(0), np.zeros((0, 4)))
        c = Candidates(*(np.concatenate(parts) for parts in zip(*((f.image, f.boxes, f.scores, f.landmarks) for f in found))))
        c = nms_per_image(c, 0.7)
        return Candidates(c.image, square(regress(c.boxes, c.landmarks)), c.scores)

    def detect_batch(self, images: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Per image: ``(boxes [n, 4] x1 y1 x2 y2, scores [n], landmarks [n, 5, 2])``, best first.

        The landmarks are O-Net's: left eye, right eye, nose, left and right mouth corner (as seen
        in the image), the ArcFace order.
        """
        if self.on_device is not None:
            return self._detect_on_device(images)
        parts = [self._propose(images, chunk) for chunk in self._same_size_chunks(images)]
        c = Candidates(*(np.concatenate(p) for p in zip(*((q.image, q.boxes, q.scores) for q in parts))))
        if len(c.scores):
            prob, offsets = self._run(self.rnet, crop_boxes(images, c, 24))
            keep = prob > self.thresholds[1]
            c = nms_per_image(Candidates(c.image[keep], c.boxes[keep], prob[keep], offsets[keep]), 0.7)
            c = Candidates(c.image, square(regress(c.boxes, c.landmarks)), c.scores)
        if len(c.scores):
            prob, offsets, marks = self._run(self.onet, crop_boxes(images, c, 48))
            keep = prob > self.thresholds[2]
            c, offsets, marks = c.take(keep), offsets[keep], marks[keep]
            size = np.stack([c.boxes[:, 2] - c.boxes[:, 0], c.boxes[:, 3] - c.boxes[:, 1]], axis=1)
            points = np.stack([marks[:, :5], marks[:, 5:]], axis=2) * size[:, None, :] + c.boxes[:, None, :2]
            c = nms_per_image(Candidates(c.image, regress(c.boxes, offsets), prob[keep], points), 0.7, "min")
        results = []
        for i in range(len(images)):
            rows = np.flatnonzero(c.image == i) if len(c.scores) else np.zeros(0, np.int64)
            rows = rows[np.argsort(-c.scores[rows], kind="stable")]
            marks = c.landmarks[rows] if c.landmarks is not None and len(rows) else np.zeros((0, 5, 2))
            results.append((c.boxes[rows].astype(np.float32), c.scores[rows].astype(np.float32), marks.astype(np.float32)))
        return results

    def _same_size_chunks(self, images: list[np.ndarray], pixels_per_image: float = 0.0) -> list[list[int]]:
        """Indices of same-sized images in chunks bounded by ``max_pyramid_pixels``: P-Net's first level
        holds about ``n * h * w * (12 / min_face)^2`` pixels, and each image may need ``pixels_per_image``
        times ``h * w`` more (the device cascade's float64 summed-area tables)."""
        by_shape: dict[tuple[int, int], list[int]] = {}
        for i, image in enumerate(images):
            by_shape.setdefault(image.shape[:2], []).append(i)
        chunks = []
        for (h, w), idx in by_shape.items():
            per_call = max(1, int(self.max_pyramid_pixels / (h * w * max((CELL / self.min_face) ** 2, pixels_per_image))))
            chunks += [idx[k : k + per_call] for k in range(0, len(idx), per_call)]
        return chunks

    def _detect_on_device(self, images: list[np.ndarray]) -> list:
        results: list = [None] * len(images)
        for chunk in self._same_size_chunks(images, pixels_per_image=3.0):
            for i, found in zip(chunk, self.on_device.detect_same_size(np.stack([images[i] for i in chunk]))):
                results[i] = found
        return results
