"""Per-sample votes of one cleaning expert: keep / drop / abstain, a confidence and a reason.

Every expert returns an :class:`ExpertVotes` over the rows of a block (in the block's row order);
rows the expert did not judge (no embedding, an identity it was not asked about) abstain.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

KEEP, DROP, ABSTAIN = 1, 0, -1
VOTE_NAMES = {KEEP: "keep", DROP: "drop", ABSTAIN: "abstain"}
VOTE_CODES = {name: code for code, name in VOTE_NAMES.items()}


@dataclass
class ExpertVotes:
    """``vote``: int8 ``[n]`` (KEEP, DROP, ABSTAIN); ``confidence``: float32 ``[n]`` in [0, 1];
    ``reason``: object ``[n]`` of short strings; ``info``: JSON-ready facts about the run (e.g. a
    calibrated threshold) for the block's stats."""

    expert: str
    vote: np.ndarray
    confidence: np.ndarray
    reason: np.ndarray
    info: dict = field(default_factory=dict)

    @classmethod
    def abstaining(cls, expert: str, n: int, reason: str = "") -> "ExpertVotes":
        """Votes of an expert that judged nothing."""
        reasons = np.empty(n, dtype=object)
        reasons[:] = reason
        return cls(expert, np.full(n, ABSTAIN, np.int8), np.zeros(n, np.float32), reasons)

    def set(self, rows: np.ndarray, vote: int | np.ndarray, confidence: float | np.ndarray, reason: str | list[str]) -> None:
        """Record votes for ``rows``."""
        self.vote[rows] = vote
        self.confidence[rows] = np.clip(confidence, 0.0, 1.0)
        if isinstance(reason, str):
            for r in np.atleast_1d(rows):
                self.reason[r] = reason
        else:
            for r, text in zip(np.atleast_1d(rows), reason):
                self.reason[r] = text

    def counts(self) -> dict[str, int]:
        """How many rows voted each way."""
        return {name: int((self.vote == code).sum()) for code, name in VOTE_NAMES.items()}


def votes_column(experts: list[ExpertVotes], n: int) -> list[list[dict]]:
    """The ``votes`` column of the CLEAN schema: per row, one struct per expert (abstentions included)."""
    out: list[list[dict]] = [[] for _ in range(n)]
    for ev in experts:
        for r in range(n):
            out[r].append({"expert": ev.expert, "vote": VOTE_NAMES[int(ev.vote[r])],
                           "confidence": float(ev.confidence[r]), "reason": str(ev.reason[r] or "")})
    return out
