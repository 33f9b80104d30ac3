"""Fusion of expert votes into one decision per sample, as explicit rules from the config.

Rules are tried in order; a rule matches a sample when every expert named in ``when`` voted as
given; then ``then`` decides: ``keep``, ``drop``, or an expert's own vote (if that expert
abstained, the next rule is tried). Where no rule decides, ``default`` does. Because the rules are
data, a costly expert (the VLM) is asked only about the samples whose decision would actually
reach it: :func:`rows_needing` answers that from the votes already known.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from facegen.clean.votes import ABSTAIN, DROP, KEEP, VOTE_CODES, ExpertVotes
from facegen.config import FusionRule, FusionSettings

_FIXED = {"keep": KEEP, "drop": DROP}


def describe(rule: FusionRule, index: int) -> str:
    """``rule 1 (cluster=drop, independent=drop) -> drop``."""
    when = ", ".join(f"{k}={v}" for k, v in rule.when.items()) or "any"
    return f"rule {index + 1} ({when}) -> {rule.then}"


@dataclass
class Fused:
    """``keep``: bool ``[n]``; ``rule``: int ``[n]`` index of the deciding rule (-1 = default)."""

    keep: np.ndarray
    rule: np.ndarray

    def decided_by(self, settings: FusionSettings) -> list[str]:
        """A readable description of what decided each row."""
        names = [describe(r, i) for i, r in enumerate(settings.rules)]
        default = f"default -> {settings.default}"
        return [names[i] if i >= 0 else default for i in self.rule]


def _matches(rule: FusionRule, votes: Mapping[str, ExpertVotes], n: int) -> np.ndarray:
    ok = np.ones(n, dtype=bool)
    for expert, wanted in rule.when.items():
        ev = votes.get(expert)
        vote = ev.vote if ev is not None else np.full(n, ABSTAIN, np.int8)
        ok &= vote == VOTE_CODES[wanted]
    return ok


def fuse(votes: Mapping[str, ExpertVotes], settings: FusionSettings, n: int) -> Fused:
    """Decide every row; experts missing from ``votes`` count as abstaining everywhere."""
    keep = np.full(n, settings.default == "keep")
    rule_of = np.full(n, -1, dtype=np.int64)
    open_rows = np.ones(n, dtype=bool)
    for index, rule in enumerate(settings.rules):
        hit = open_rows & _matches(rule, votes, n)
        if rule.then in _FIXED:
            decided = hit
            keep[decided] = rule.then == "keep"
        else:
            ev = votes.get(rule.then)
            if ev is None:
                continue
            decided = hit & (ev.vote != ABSTAIN)
            keep[decided] = ev.vote[decided] == KEEP
        rule_of[decided] = index
        open_rows &= ~decided
    return Fused(keep, rule_of)


def rows_needing(expert: str, known: Mapping[str, ExpertVotes], settings: FusionSettings, n: int, pending: set[str]) -> np.ndarray:
    """Rows whose decision could depend on ``expert``'s vote, given the ``known`` votes.

    ``pending`` names the experts not run yet (``expert`` among them): a rule that names a pending
    expert in ``when`` or ``then`` before the row is decided makes the row need it (conservative
    for the other pending experts).
    """
    need = np.zeros(n, dtype=bool)
    open_rows = np.ones(n, dtype=bool)
    for rule in settings.rules:
        if not open_rows.any():
            break
        if any(name in pending for name in rule.when):
            need |= open_rows
            break
        hit = open_rows & _matches(rule, known, n)
        if rule.then in _FIXED:
            open_rows &= ~hit
        elif rule.then == expert:
            need |= hit
            open_rows &= ~hit
        elif rule.then not in pending:
            ev = known.get(rule.then)
            if ev is not None:
                open_rows &= ~(hit & (ev.vote != ABSTAIN))
        # another pending expert in ``then`` may abstain: its rows stay open
    return need
