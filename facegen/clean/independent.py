"""Independent expert: a second face-recognition model judges each sample against its identity.

The kept decisions of the cluster expert rest on the primary embedder; a model trained differently
(dlib's ResNet, another ArcFace) makes different mistakes. Each usable sample is embedded with it;
the identity centre is a trimmed mean (the mean of the samples at or above the median cosine to the
plain mean, so outliers pull it less); a sample is dropped when its cosine to the centre falls
below the block's threshold: the ``percentile``-th percentile of all those cosines, recorded in the
block's stats. Confidence grows with the distance from the threshold in units of the spread.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from facegen.clean.view import BlockView
from facegen.clean.votes import DROP, KEEP, ExpertVotes
from typing import Literal

from pydantic import Field

from facegen.config.clean import ExpertSettings
from facegen.config.faces import EmbedderSettings
from facegen.vectors import l2_normalize

EmbedFn = Callable[[np.ndarray], np.ndarray]
EMBED_CHUNK = 128


class IndependentSettings(ExpertSettings):
    """A second FR model flags samples far from their identity centre (threshold calibrated per block)."""

    kind: Literal["independent"] = "independent"
    embedder: EmbedderSettings = EmbedderSettings()
    percentile: float = Field(default=10.0, gt=0.0, lt=100.0, description="of within-identity cos to centre")


SETTINGS = IndependentSettings


def load_embedder(settings: EmbedderSettings) -> EmbedFn:
    """The second model's embed function (any ``kind`` of :func:`facegen.faces.embed.build_embedder`)."""
    from facegen.faces.embed import build_embedder

    if not settings.enabled:
        raise ValueError("clean.experts (independent): embedder.path: the independent expert needs a second FR model (or kind: dlib)")
    return build_embedder(settings).embed


def trimmed_centre(unit: np.ndarray) -> np.ndarray:
    """Mean of the rows at or above the median cosine to the plain mean, renormalised."""
    centre = l2_normalize(unit.mean(axis=0))
    cos = unit @ centre
    return l2_normalize(unit[cos >= np.median(cos)].mean(axis=0))


class IndependentExpert:
    """Votes from a second FR model's similarity to a trimmed identity centre."""

    def __init__(self, embed_fn: EmbedFn, settings: IndependentSettings):
        self.embed_fn, self.settings = embed_fn, settings
        self.name = settings.expert_name

    @classmethod
    def from_settings(cls, settings: IndependentSettings) -> "IndependentExpert":
        """Build the second model from ``settings.embedder``."""
        return cls(load_embedder(settings.embedder), settings)

    def _embed(self, view: BlockView, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Unit embeddings of the rows whose image decodes, and those rows."""
        images, ok = [], []
        for r in rows:
            img = view.image(r)
            if img is not None and img.shape == (112, 112, 3):
                images.append(img)
                ok.append(r)
        if not ok:
            return np.zeros((0, 1)), np.zeros(0, np.int64)
        out = [np.asarray(self.embed_fn(np.stack(images[s : s + EMBED_CHUNK])), np.float64) for s in range(0, len(images), EMBED_CHUNK)]
        return l2_normalize(np.concatenate(out)), np.asarray(ok, np.int64)

    def vote(self, view: BlockView, identities: list[int]) -> ExpertVotes:
        """Votes on the usable rows of ``identities`` (other rows abstain)."""
        votes = ExpertVotes.abstaining(self.name, view.num_rows)
        rows = np.concatenate([view.groups[i] for i in identities]) if identities else np.zeros(0, np.int64)
        emb, rows = self._embed(view, rows)
        cos = np.full(view.num_rows, np.nan)
        for ident in identities:
            mine = np.flatnonzero(view.identity[rows] == ident)
            if len(mine) >= 2:
                cos[rows[mine]] = emb[mine] @ trimmed_centre(emb[mine])
        judged = np.flatnonzero(np.isfinite(cos))
        if judged.size == 0:
            votes.info = {"threshold": None, "judged": 0}
            return votes
        threshold = float(np.percentile(cos[judged], self.settings.percentile))
        spread = float(np.std(cos[judged])) or 1.0
        confidence = np.abs(cos[judged] - threshold) / (2 * spread)
        low = cos[judged] < threshold
        votes.set(judged[~low], KEEP, confidence[~low], [f"independent: cos {c:.3f} >= {threshold:.3f}" for c in cos[judged[~low]]])
        votes.set(judged[low], DROP, confidence[low], [f"independent: cos {c:.3f} < {threshold:.3f}" for c in cos[judged[low]]])
        votes.info = {"threshold": threshold, "percentile": self.settings.percentile, "judged": int(judged.size),
                      "cos_mean": float(cos[judged].mean())}
        return votes


def build(settings: IndependentSettings, **context: object) -> IndependentExpert:
    """The expert of ``settings`` (the stage's context is not needed)."""
    return IndependentExpert.from_settings(settings)
