"""A tiny SCRFD-layout ONNX face detector with constructed weights (for offline tests).

insightface's SCRFD reader expects nine outputs: face scores, box distances and keypoint offsets
for strides 8, 16 and 32, each ``[cells * 2 anchors, 1 | 4 | 10]`` in row-major cell order; it
multiplies distances by the stride and measures them from each anchor point (cell corner).
This network fires only at stride-8 cells that are entirely white (the mean of the cell, as the
input is normalised to about [-1, 1], passes a steep sigmoid) and predicts there a fixed box and
five landmarks around the anchor point: a white 8x8 cell in the network input *is* a face at a
known place, with known landmarks.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from facegen.faces.align import ARCFACE_TEMPLATE

INPUT = 160
#: The box around the anchor point (left, top, right, bottom distances, pixels of the network input).
BOX_DISTANCES = np.array([24.0, 24.0, 24.0, 32.0], np.float32)
#: The five landmarks relative to the anchor point (pixels of the network input).
LANDMARK_OFFSETS = ((ARCFACE_TEMPLATE - [56.0, 56.0]) * 0.45).astype(np.float32)


class TinySCRFD(nn.Module):
    def forward(self, x: torch.Tensor):
        brightness = x.mean(dim=1, keepdim=True)
        scores, boxes, points = [], [], []
        for stride in (8, 16, 32):
            pooled = F.avg_pool2d(brightness, stride, stride)  # [1, 1, h, w]
            cells = pooled.permute(0, 2, 3, 1).reshape(-1, 1)
            if stride == 8:
                score = torch.sigmoid(40.0 * (cells - 0.9))
            else:
                score = torch.sigmoid(cells * 0.0 - 30.0)
            ones = torch.ones_like(cells)
            box = ones * torch.from_numpy(BOX_DISTANCES / stride)
            kps = ones * torch.from_numpy(LANDMARK_OFFSETS.reshape(-1) / stride)
            for out, value in ((scores, score), (boxes, box), (points, kps)):
                out.append(value.repeat_interleave(2, dim=0))  # two anchors per cell
        return (*scores, *boxes, *points)


def build_tiny_scrfd(path: str) -> str:
    """Export :class:`TinySCRFD` (input 1x3x160x160) to ``path``; returns it."""
    names = [f"{kind}_{s}" for kind in ("score", "bbox", "kps") for s in (8, 16, 32)]
    torch.onnx.export(TinySCRFD(), torch.zeros(1, 3, INPUT, INPUT), path, input_names=["input.1"], output_names=names,
                      dynamo=False, opset_version=17)
    return path
