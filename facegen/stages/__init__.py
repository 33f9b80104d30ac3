"""Ray-facing orchestration of each stage over block files (the stage logic lives in its module)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class StageReport:
    """What a stage did: blocks planned/skipped/written and summed counters."""

    stage: str
    output_dir: str
    blocks_total: int
    blocks_skipped: int
    blocks_written: int
    seconds: float
    totals: dict[str, int] = field(default_factory=dict)
    histograms: dict[str, dict] = field(default_factory=dict)  # e.g. similarity to the identity feature
