"""Margin-based softmax heads: ArcFace, CosFace, the combined margin, and a full-softmax classifier.

As in insightface ``arcface_torch/losses.py`` a margin is a tiny module mapping cosine logits
``cos(theta_j)`` (between normalised embeddings and normalised class centres) plus labels to scaled
logits for cross-entropy. A label of ``-1`` marks a row whose class centre is not among the
columns (Partial FC: the centre lives on another worker); such rows are only scaled.

``MarginClassifier`` is the single-process full softmax over every class, the reference that
:class:`facegen.train.partial_fc.PartialFC` (what training uses) equals at sample rate 1.0.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:  # settings are duck-typed so that GPU benchmarks run without pydantic
    from facegen.config import TrainSettings

_COS_EPS = 1e-7  # keeps sqrt(1 - cos^2) and acos differentiable at cos = +-1


class Margin(nn.Module):
    """Base: ``forward(cosine, labels)`` replaces each labelled row's target logit and scales by ``s``."""

    s: float

    def target(self, cos_t: torch.Tensor) -> torch.Tensor:
        """The margin-adjusted target cosine for target cosines ``cos_t`` ``[K]``."""
        raise NotImplementedError

    def forward(self, cosine: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Cosine logits ``[B, C]`` and labels ``[B]`` (``-1`` = no target column here) -> ``[B, C]``.

        Written with masks, not row selections, so every shape is static: ``torch.compile`` traces
        it without a graph break (a row without a target writes its own cosine back).
        """
        here = labels >= 0
        cols = labels.clamp(min=0)[:, None]
        cos_t = cosine.gather(1, cols).squeeze(1)
        new = torch.where(here, self.target(cos_t).to(cosine.dtype), cos_t)
        return cosine.scatter(1, cols, new[:, None]) * self.s


class ArcFace(Margin):
    """Additive angular margin: the target logit becomes ``s * cos(theta + m)``.

    Past ``theta + m > pi`` the cosine would rise again, so there (``cos(theta) <= cos(pi - m)``)
    the target falls back to ``cos(theta) - m * sin(m)``, the same monotone continuation as insightface;
    ``monotone=False`` keeps ``cos(theta + m)`` everywhere, as the DataCV organisers' ArcFace.
    """

    def __init__(self, s: float = 64.0, m: float = 0.5, monotone: bool = True):
        super().__init__()
        self.s = s
        self.m = m
        self.monotone = monotone
        self.cos_m = math.cos(m)
        self.sin_m = math.sin(m)
        self.threshold = math.cos(math.pi - m)
        self.mm = math.sin(math.pi - m) * m

    def target(self, cos_t: torch.Tensor) -> torch.Tensor:
        cos_t = cos_t.clamp(-1 + _COS_EPS, 1 - _COS_EPS)
        sin_t = torch.sqrt(1.0 - cos_t * cos_t)
        shifted = cos_t * self.cos_m - sin_t * self.sin_m  # cos(theta + m)
        return torch.where(cos_t > self.threshold, shifted, cos_t - self.mm) if self.monotone else shifted

    def extra_repr(self) -> str:
        return f"s={self.s}, m={self.m}" + ("" if self.monotone else ", monotone=False")


class CosFace(Margin):
    """Additive cosine margin: the target logit becomes ``s * (cos(theta) - m)``."""

    def __init__(self, s: float = 64.0, m: float = 0.35):
        super().__init__()
        self.s = s
        self.m = m

    def target(self, cos_t: torch.Tensor) -> torch.Tensor:
        return cos_t - self.m

    def extra_repr(self) -> str:
        return f"s={self.s}, m={self.m}"


class CombinedMargin(Margin):
    """insightface's combined margin: the target logit becomes ``s * (cos(m1 * theta + m2) - m3)``.

    ``(1, m, 0)`` is ArcFace, ``(1, 0, m)`` CosFace, ``(m1, 0, 0)`` SphereFace's multiplicative
    margin; the angle is clamped at pi so the target never rises as theta grows.
    """

    def __init__(self, s: float = 64.0, m1: float = 1.0, m2: float = 0.5, m3: float = 0.0):
        super().__init__()
        if m1 < 1.0 or m2 < 0.0 or m3 < 0.0:
            raise ValueError(f"CombinedMargin: need m1 >= 1, m2 >= 0, m3 >= 0 (got {m1}, {m2}, {m3})")
        self.s, self.m1, self.m2, self.m3 = s, m1, m2, m3

    def target(self, cos_t: torch.Tensor) -> torch.Tensor:
        theta = torch.acos(cos_t.clamp(-1 + _COS_EPS, 1 - _COS_EPS))
        return torch.cos((self.m1 * theta + self.m2).clamp(max=math.pi)) - self.m3

    def extra_repr(self) -> str:
        return f"s={self.s}, m1={self.m1}, m2={self.m2}, m3={self.m3}"


class MarginClassifier(nn.Module):
    """Normalised class centres + a margin: ``forward(embeddings, labels)`` returns the CE loss.

    ``last_logits`` holds the (detached) cosine logits of the latest forward, for train accuracy
    without a second matmul.
    """

    def __init__(self, embedding_size: int, num_classes: int, margin: nn.Module):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"MarginClassifier: num_classes must be >= 1 (got {num_classes})")
        self.embedding_size = embedding_size
        self.num_classes = num_classes
        self.margin = margin
        # Small normal init as in arcface_torch's Partial FC, so early cosines are near zero.
        self.weight = nn.Parameter(torch.normal(0.0, 0.01, (num_classes, embedding_size)))
        self.last_logits: torch.Tensor | None = None

    def cosine(self, embeddings: torch.Tensor) -> torch.Tensor:
        """``cos(theta)`` between each embedding and each class centre, ``[B, num_classes]``."""
        return F.linear(F.normalize(embeddings.float()), F.normalize(self.weight.float())).clamp(-1, 1)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of the margin logits."""
        cosine = self.cosine(embeddings)
        self.last_logits = cosine.detach()
        return F.cross_entropy(self.margin(cosine, labels), labels)

    @torch.no_grad()
    def correct(self, labels: torch.Tensor) -> torch.Tensor:
        """How many rows of the latest forward have ``labels`` as their top cosine (0-d tensor).

        Stays on the device (no host sync per step); divide by the batch size for accuracy.
        """
        if self.last_logits is None:
            raise RuntimeError("MarginClassifier.correct: call forward first")
        return (self.last_logits.argmax(dim=1) == labels).sum()


def build_margin(settings: "TrainSettings") -> Margin:
    """The margin of ``settings.head`` (arcface | cosface | combined) with ``settings.scale/margin``."""
    if settings.head == "arcface":
        return ArcFace(s=settings.scale, m=settings.margin, monotone=settings.arcface_monotone)
    if settings.head == "cosface":
        return CosFace(s=settings.scale, m=settings.margin)
    if settings.head == "combined":
        m1, m2, m3 = settings.combined_margins
        return CombinedMargin(s=settings.scale, m1=m1, m2=m2, m3=m3)
    raise ValueError(f"train.head: unknown margin head {settings.head!r}")


def build_head(settings: "TrainSettings", num_classes: int) -> MarginClassifier:
    """The single-process full-softmax classifier of ``settings`` (reference and small runs)."""
    return MarginClassifier(settings.embedding_size, num_classes, build_margin(settings))
