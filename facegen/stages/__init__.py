"""Ray-facing orchestration of each stage over block files (the stage logic lives in its module)."""

from __future__ import annotations

from dataclasses import dataclass, field


class StageError(RuntimeError):
    """A stage could not finish some of its work; the message is one line naming what failed."""


class StageInterrupted(KeyboardInterrupt):
    """A stage stopped by Ctrl-C or SIGTERM; the message is one line: how many blocks are done and
    that the same command resumes (finished blocks are kept, unfinished ones leave nothing)."""


@dataclass
class StageReport:
    """What a stage did: blocks planned/skipped/written and summed counters.

    ``blocks_redone`` counts finished blocks found truncated, corrupt or stale (their inputs or
    settings changed) and made again; ``notes`` says which and why.
    """

    stage: str
    output_dir: str
    blocks_total: int
    blocks_skipped: int
    blocks_written: int
    seconds: float
    totals: dict[str, int] = field(default_factory=dict)
    blocks_redone: int = 0
    notes: list[str] = field(default_factory=list)
    histograms: dict[str, dict] = field(default_factory=dict)  # e.g. similarity to the identity feature
