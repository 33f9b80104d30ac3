"""Margin-based softmax heads: ArcFace, CosFace and the classifier that applies them.

As in insightface ``arcface_torch/losses.py`` a margin is a tiny module mapping cosine logits
``cos(theta_j)`` (between normalised embeddings and normalised class centres) plus labels to scaled
logits for cross-entropy. ``MarginClassifier`` owns the class-centre matrix; a Partial FC classifier
can later replace it behind the same ``forward(embeddings, labels) -> loss`` call.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from facegen.config import TrainSettings

_COS_EPS = 1e-7  # keeps sqrt(1 - cos^2) differentiable at cos = +-1


def _with_target(logits: torch.Tensor, labels: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``logits`` with the label column of each row replaced by ``target`` (out of place)."""
    return logits.scatter(1, labels.view(-1, 1), target.view(-1, 1).to(logits.dtype))


class ArcFace(nn.Module):
    """Additive angular margin: the target logit becomes ``s * cos(theta + m)``.

    Past ``theta + m > pi`` the cosine would rise again, so there (``cos(theta) <= cos(pi - m)``)
    the target falls back to ``cos(theta) - m * sin(m)``, the same monotone continuation as insightface.
    """

    def __init__(self, s: float = 64.0, m: float = 0.5):
        super().__init__()
        self.s = s
        self.m = m
        self.cos_m = math.cos(m)
        self.sin_m = math.sin(m)
        self.threshold = math.cos(math.pi - m)
        self.mm = math.sin(math.pi - m) * m

    def forward(self, cosine: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Cosine logits ``[B, C]`` and labels ``[B]`` -> scaled logits ``[B, C]``."""
        cos_t = cosine.gather(1, labels.view(-1, 1)).view(-1).clamp(-1 + _COS_EPS, 1 - _COS_EPS)
        sin_t = torch.sqrt(1.0 - cos_t * cos_t)
        cos_t_m = cos_t * self.cos_m - sin_t * self.sin_m
        target = torch.where(cos_t > self.threshold, cos_t_m, cos_t - self.mm)
        return _with_target(cosine, labels, target) * self.s

    def extra_repr(self) -> str:
        return f"s={self.s}, m={self.m}"


class CosFace(nn.Module):
    """Additive cosine margin: the target logit becomes ``s * (cos(theta) - m)``."""

    def __init__(self, s: float = 64.0, m: float = 0.35):
        super().__init__()
        self.s = s
        self.m = m

    def forward(self, cosine: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Cosine logits ``[B, C]`` and labels ``[B]`` -> scaled logits ``[B, C]``."""
        target = cosine.gather(1, labels.view(-1, 1)).view(-1) - self.m
        return _with_target(cosine, labels, target) * self.s

    def extra_repr(self) -> str:
        return f"s={self.s}, m={self.m}"


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
        return F.linear(F.normalize(embeddings.float()), F.normalize(self.weight.float()))

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


def build_head(settings: TrainSettings, num_classes: int) -> MarginClassifier:
    """The classifier of ``settings.head`` (arcface | cosface) with ``settings.scale/margin``."""
    if settings.head == "arcface":
        margin: nn.Module = ArcFace(s=settings.scale, m=settings.margin)
    elif settings.head == "cosface":
        margin = CosFace(s=settings.scale, m=settings.margin)
    else:
        raise ValueError(f"train.head: unknown margin head {settings.head!r}")
    return MarginClassifier(settings.embedding_size, num_classes, margin)
