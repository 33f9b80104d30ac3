"""MTCNN's cascade with every step on the device: pyramid, crops, non-maximum suppression.

:class:`facegen.models.mtcnn.MTCNN` runs the three networks on the device but its glue on the host
(OpenCV resizes, numpy NMS, one crop at a time), so on a GPU the host bounds it. Here the same
cascade runs as batched tensor operations, on the images of a batch together:

- **Resizes** reproduce OpenCV's: ``INTER_AREA`` (pyramid levels, crops larger than the network's
  input) is the exact area average over each output pixel's footprint, read from a float64
  summed-area table by bilinear interpolation (the table is bilinear within each pixel, so this is
  exact, and outside the image it adds nothing, which is OpenCV's black canvas); ``INTER_LINEAR``
  (smaller crops) samples the canvas as OpenCV does, edge pixels repeated. Results are rounded to
  integers as OpenCV's uint8 output is. OpenCV computes bilinear weights in 11-bit fixed point, so
  an upscaled crop may differ from it by one grey level.
- **NMS** is exact greedy suppression, per image: in each image's score order a box is kept when no
  kept box before it overlaps it above the threshold; that rule is iterated on the whole overlap
  matrix until nothing changes (the first undecided box is settled every round), all images at once.

The result is the host cascade's (same faces; boxes and landmarks within float tolerance where no
score sits on a threshold), at the speed of the device; ``tests/test_mtcnn_torch.py`` and
``bench/faces.py`` compare them on real photos.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from facegen.models.mtcnn import CELL, STRIDE, pyramid_scales

#: Overlap-matrix cells per NMS call (bounds memory: images x boxes x boxes).
NMS_CELLS = 1 << 25


def summed_area(images: torch.Tensor) -> torch.Tensor:
    """``[B, H, W, 3]`` uint8 -> ``[B, 3, H + 1, W + 1]`` float64 summed-area tables (zero first row and column)."""
    table = images.permute(0, 3, 1, 2).to(torch.float64).cumsum(2).cumsum(3)
    return F.pad(table, (1, 0, 1, 0))


def _grid(start: torch.Tensor, step: torch.Tensor, count: int, limit: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions ``start + k * step`` (k = 0..count) clamped to ``[0, limit]``, as (lower table index, fraction)."""
    k = torch.arange(count + 1, dtype=torch.float64, device=start.device)
    pos = (start[..., None] + step[..., None] * k).clamp(0, limit)
    low = pos.floor().clamp(max=limit - 1)
    return low.long(), pos - low


def area_resize(table: torch.Tensor, out_h: int, out_w: int) -> torch.Tensor:
    """Whole images resized as OpenCV's ``INTER_AREA`` (downscaling): ``[B, 3, out_h, out_w]`` float64, rounded."""
    h, w = table.shape[2] - 1, table.shape[3] - 1
    zero = torch.zeros((), dtype=torch.float64, device=table.device)
    xl, xf = _grid(zero, zero + w / out_w, out_w, w)
    yl, yf = _grid(zero, zero + h / out_h, out_h, h)
    cols = table.index_select(3, xl) * (1 - xf) + table.index_select(3, xl + 1) * xf
    grid = cols.index_select(2, yl) * (1 - yf)[:, None] + cols.index_select(2, yl + 1) * yf[:, None]
    area = grid[:, :, 1:, 1:] - grid[:, :, :-1, 1:] - grid[:, :, 1:, :-1] + grid[:, :, :-1, :-1]
    return (area / ((w / out_w) * (h / out_h))).round_().clamp_(0, 255)


def _area_crops(table: torch.Tensor, image: torch.Tensor, box: torch.Tensor, size: int) -> torch.Tensor:
    """Crops of integer boxes ``[n, 4]`` resized down to ``size`` as ``INTER_AREA`` on a black canvas."""
    _, channels, h1, w1 = table.shape
    bw, bh = (box[:, 2] - box[:, 0]).clamp(min=1), (box[:, 3] - box[:, 1]).clamp(min=1)
    xl, xf = _grid(box[:, 0], bw / size, size, w1 - 1)  # [n, size + 1]
    yl, yf = _grid(box[:, 1], bh / size, size, h1 - 1)
    base = (image * channels)[:, None, None, None] + torch.arange(channels, device=table.device)[None, :, None, None]
    flat = table.reshape(-1)

    def at(rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:  # table[image, c, rows[i], cols[j]]
        return flat[(base * h1 + rows[:, None, :, None]) * w1 + cols[:, None, None, :]]

    wy0, wy1 = (1 - yf)[:, None, :, None], yf[:, None, :, None]
    wx0, wx1 = (1 - xf)[:, None, None, :], xf[:, None, None, :]
    grid = wy0 * (wx0 * at(yl, xl) + wx1 * at(yl, xl + 1)) + wy1 * (wx0 * at(yl + 1, xl) + wx1 * at(yl + 1, xl + 1))
    area = grid[:, :, 1:, 1:] - grid[:, :, :-1, 1:] - grid[:, :, 1:, :-1] + grid[:, :, :-1, :-1]
    return (area / ((bw / size) * (bh / size))[:, None, None, None]).round_().clamp_(0, 255)


def _linear_crops(images: torch.Tensor, image: torch.Tensor, box: torch.Tensor, size: int) -> torch.Tensor:
    """Crops of integer boxes resized as OpenCV's ``INTER_LINEAR`` on a black canvas (edge pixels repeated)."""
    _, h, w, _ = images.shape
    bw, bh = (box[:, 2] - box[:, 0]).clamp(min=1), (box[:, 3] - box[:, 1]).clamp(min=1)

    def taps(extent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        src = (torch.arange(size, dtype=torch.float64, device=box.device) + 0.5) * (extent / size)[:, None] - 0.5
        low = src.floor()
        frac = torch.where(low < 0, 0.0, src - low)
        low = low.clamp(min=0)
        last = (extent - 1)[:, None]
        frac = torch.where(low >= last, 0.0, frac)
        low = torch.minimum(low, last)
        return low.long(), torch.minimum(low + 1, last).long(), frac

    x0, x1, fx = taps(bw)
    y0, y1, fy = taps(bh)
    ox, oy = box[:, 0].long()[:, None], box[:, 1].long()[:, None]

    def pixel(rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:  # canvas[rows[i], cols[j]], black outside the image
        r, c = (rows + oy)[:, :, None], (cols + ox)[:, None, :]
        inside = (r >= 0) & (r < h) & (c >= 0) & (c < w)
        values = images[image[:, None, None], r.clamp(0, h - 1), c.clamp(0, w - 1)].to(torch.float64)
        return values * inside[..., None]

    wy, wx = fy[:, :, None, None], fx[:, None, :, None]
    out = (1 - wy) * ((1 - wx) * pixel(y0, x0) + wx * pixel(y0, x1)) + wy * ((1 - wx) * pixel(y1, x0) + wx * pixel(y1, x1))
    return out.permute(0, 3, 1, 2).round_().clamp_(0, 255)


def crop_boxes(images: torch.Tensor, table: torch.Tensor, image: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """``[n, 3, size, size]`` crops (0-255, float64) of the boxes rounded to integers, as
    :func:`facegen.models.mtcnn.crop_boxes` makes them: ``INTER_AREA`` when the box is wider than
    ``size``, else ``INTER_LINEAR``."""
    box = boxes.round()
    out = torch.empty((len(box), 3, size, size), dtype=torch.float64, device=boxes.device)
    area = (box[:, 2] - box[:, 0]).clamp(min=1) > size
    for mask, crops in ((area, lambda m: _area_crops(table, image[m], box[m], size)),
                        (~area, lambda m: _linear_crops(images, image[m], box[m], size))):
        index = torch.nonzero(mask).flatten()
        for start in range(0, len(index), 512):  # bounds the gathered grids' memory
            part = index[start : start + 512]
            out[part] = crops(part)
    return out


def batched_nms(boxes: torch.Tensor, scores: torch.Tensor, group: torch.Tensor, threshold: float, mode: str = "union") -> torch.Tensor:
    """Indices (ascending) kept by greedy NMS within each ``group``, as
    :func:`facegen.models.mtcnn.nms` keeps them (ties in score broken by position)."""
    n = len(scores)
    if n == 0:
        return torch.zeros(0, dtype=torch.long, device=boxes.device)
    order = torch.sort(scores, descending=True, stable=True).indices
    order = order[torch.sort(group[order], stable=True).indices]
    sorted_group = group[order]
    starts = torch.ones(n, dtype=torch.bool, device=boxes.device)
    starts[1:] = sorted_group[1:] != sorted_group[:-1]
    first = torch.nonzero(starts).flatten()
    counts = torch.diff(torch.cat([first, first.new_tensor([n])]))
    rank = torch.arange(n, device=boxes.device) - torch.repeat_interleave(first, counts)
    ordinal = torch.repeat_interleave(torch.arange(len(first), device=boxes.device), counts)  # group number, 0..G-1
    kept = torch.zeros(n, dtype=torch.bool, device=boxes.device)
    width = int(counts.max())
    per_call = max(1, NMS_CELLS // (width * width))
    for lo in range(0, len(first), per_call):
        span = slice(int(first[lo]), int(first[lo + per_call]) if lo + per_call < len(first) else n)
        kept[span] = _nms_dense(boxes[order[span]], rank[span], ordinal[span] - lo, width, threshold, mode)
    return torch.sort(order[kept]).values


def _nms_dense(boxes: torch.Tensor, rank: torch.Tensor, slot: torch.Tensor, width: int, threshold: float, mode: str) -> torch.Tensor:
    """Greedy NMS of score-sorted boxes placed in a padded ``[groups, width]`` layout."""
    groups = int(slot.max()) + 1
    padded = torch.zeros((groups, width, 4), dtype=boxes.dtype, device=boxes.device)
    valid = torch.zeros((groups, width), dtype=torch.bool, device=boxes.device)
    padded[slot, rank], valid[slot, rank] = boxes, True
    x1, y1, x2, y2 = padded.unbind(-1)
    area = (x2 - x1).clamp(min=0) * (y2 - y1).clamp(min=0)
    w = (torch.minimum(x2[:, :, None], x2[:, None, :]) - torch.maximum(x1[:, :, None], x1[:, None, :])).clamp(min=0)
    h = (torch.minimum(y2[:, :, None], y2[:, None, :]) - torch.maximum(y1[:, :, None], y1[:, None, :])).clamp(min=0)
    inter = w * h
    denom = torch.minimum(area[:, :, None], area[:, None, :]) if mode == "min" else area[:, :, None] + area[:, None, :] - inter
    # suppresses[g, j, i]: box j comes before box i and overlaps it above the threshold
    suppresses = (inter / denom.clamp(min=1e-9) > threshold) & torch.ones(width, width, dtype=torch.bool, device=boxes.device).triu(1)
    keep = valid.clone()
    while True:
        settled = valid & ~(suppresses & keep[:, :, None]).any(dim=1)
        if torch.equal(settled, keep):
            break
        keep = settled
    return keep[slot, rank]


@dataclass
class _Boxes:
    """Candidates of a batch: ``image`` index, ``boxes`` float64 [n, 4], ``scores`` float32, ``extra`` (offsets or points)."""

    image: torch.Tensor
    boxes: torch.Tensor
    scores: torch.Tensor
    extra: torch.Tensor

    def take(self, index: torch.Tensor) -> "_Boxes":
        return _Boxes(self.image[index], self.boxes[index], self.scores[index], self.extra[index])

    def nms(self, threshold: float, mode: str = "union") -> "_Boxes":
        return self.take(batched_nms(self.boxes, self.scores, self.image, threshold, mode))


def _regress(boxes: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    size = torch.stack([boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]] * 2, dim=1)
    return boxes + offsets.to(torch.float64) * size


def _square(boxes: torch.Tensor) -> torch.Tensor:
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2
    half = torch.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])[:, None] / 2
    return torch.cat([centre - half, centre + half], dim=1)


class TorchCascade:
    """The three networks of a :class:`facegen.models.mtcnn.MTCNN` run with every step on their device."""

    def __init__(self, pnet: nn.Module, rnet: nn.Module, onet: nn.Module, device: torch.device, min_face: int,
                 thresholds: tuple[float, float, float], max_batch: int = 256):
        self.pnet, self.rnet, self.onet, self.device = pnet, rnet, onet, device
        self.min_face, self.thresholds, self.max_batch = min_face, thresholds, max_batch

    def _net(self, net: nn.Module, pixels: torch.Tensor) -> list[torch.Tensor]:
        outs = [net(((pixels[s : s + self.max_batch].float()) - 127.5) / 128.0) for s in range(0, len(pixels), self.max_batch)]
        return [torch.cat(parts) for parts in zip(*outs)]

    @torch.inference_mode()
    def detect_same_size(self, images: np.ndarray) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """:meth:`facegen.models.mtcnn.MTCNN.detect_batch` for images of one size, ``[B, H, W, 3]`` uint8."""
        batch = torch.from_numpy(np.ascontiguousarray(images)).to(self.device)
        table = summed_area(batch)
        b, h, w = batch.shape[:3]
        found = []
        for scale in pyramid_scales(h, w, self.min_face):
            level = area_resize(table, int(np.ceil(h * scale)), int(np.ceil(w * scale)))
            prob, offsets = self.pnet(((level.float()) - 127.5) / 128.0)
            n, ys, xs = torch.nonzero(prob > self.thresholds[0], as_tuple=True)
            if len(n):
                windows = torch.stack([xs * STRIDE, ys * STRIDE, xs * STRIDE + CELL, ys * STRIDE + CELL], dim=1).to(torch.float64) / scale
                found.append(_Boxes(n, windows, prob[n, ys, xs], offsets[n, :, ys, xs]).nms(0.5))
        empty = [(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros((0, 5, 2), np.float32))] * b
        if not found:
            return empty
        c = _Boxes(*(torch.cat(parts) for parts in zip(*((f.image, f.boxes, f.scores, f.extra) for f in found)))).nms(0.7)
        c = _Boxes(c.image, _square(_regress(c.boxes, c.extra)), c.scores, c.extra)
        prob, offsets = self._net(self.rnet, crop_boxes(batch, table, c.image, c.boxes, 24))
        keep = torch.nonzero(prob > self.thresholds[1]).flatten()
        c = _Boxes(c.image[keep], c.boxes[keep], prob[keep], offsets[keep]).nms(0.7)
        c = _Boxes(c.image, _square(_regress(c.boxes, c.extra)), c.scores, c.extra)
        if not len(c.scores):
            return empty
        prob, offsets, marks = self._net(self.onet, crop_boxes(batch, table, c.image, c.boxes, 48))
        keep = torch.nonzero(prob > self.thresholds[2]).flatten()
        boxes, offsets, marks = c.boxes[keep], offsets[keep], marks[keep].to(torch.float64)
        size = torch.stack([boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]], dim=1)
        points = torch.stack([marks[:, :5], marks[:, 5:]], dim=2) * size[:, None, :] + boxes[:, None, :2]
        c = _Boxes(c.image[keep], _regress(boxes, offsets), prob[keep], points).nms(0.7, "min")
        image, boxes, scores, points = (t.cpu().numpy() for t in (c.image, c.boxes, c.scores, c.extra))
        results = []
        for i in range(b):
            rows = np.flatnonzero(image == i)
            rows = rows[np.argsort(-scores[rows], kind="stable")]
            results.append((boxes[rows].astype(np.float32), scores[rows].astype(np.float32), points[rows].astype(np.float32)))
        return results
