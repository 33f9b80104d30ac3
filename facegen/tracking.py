"""Weights & Biases tracking: one small wrapper, offline by default when there is no API key.

``start_run`` returns a :class:`Tracker` (``log``, ``summary``, ``finish``). The run id is derived
from ``(run name, job_type)`` so a resumed training appends to the same W&B run. With
``tracking.mode: disabled`` the tracker does nothing and wandb is never imported.
Offline runs land in ``<output_dir>/wandb/offline-run-<time>-<id>/`` (``wandb sync`` uploads them).
"""

from __future__ import annotations

import hashlib
import os
import re
from typing import Any

from facegen.config import FacegenConfig
from facegen.storage import is_remote, upload_tree


class Tracker:
    """A W&B run (or nothing, when ``run`` is None): ``log`` per step, ``summary`` once, ``finish``."""

    def __init__(self, run: Any = None, upload: tuple[str, str] | None = None):
        self.run = run
        self.upload = upload  # (local folder, destination URI): an output on object storage

    @property
    def enabled(self) -> bool:
        """Whether metrics go anywhere."""
        return self.run is not None

    def log(self, metrics: dict, step: int | None = None) -> None:
        """Record one row of metrics (``step`` = epoch or global step; must not decrease)."""
        if self.run is not None:
            self.run.log(dict(metrics), step=step)

    def log_image(self, key: str, image: Any, step: int | None = None, caption: str = "") -> None:
        """Record one image (uint8 ``[H, W, 3]``), e.g. a sample grid."""
        if self.run is not None:
            import wandb

            self.run.log({key: wandb.Image(image, caption=caption or None)}, step=step)

    def summary(self, values: dict) -> None:
        """Set run-level summary values (final accuracies, counts)."""
        if self.run is not None:
            self.run.summary.update(dict(values))

    def finish(self) -> None:
        """Close the run and wait until its records are on disk; safe to call twice."""
        if self.run is not None:
            import wandb

            self.run.finish()
            self.run = None
            # finish() can return before wandb's core process has written the run file (seen with
            # offline runs in 0.31); teardown waits for it, which matters in short-lived Ray workers.
            if wandb.run is None:
                wandb.teardown()
            if self.upload is not None:
                upload_tree(*self.upload)


def run_id(name: str, job_type: str) -> str:
    """Stable W&B run id for ``(name, job_type)``: readable prefix + short hash of both."""
    digest = hashlib.sha256(f"{name}\0{job_type}".encode()).hexdigest()[:10]
    slug = re.sub(r"[^A-Za-z0-9_-]+", "-", f"{name}-{job_type}").strip("-")[:48]
    return f"{slug}-{digest}"


def resolve_mode(mode: str) -> str:
    """``auto`` -> ``online`` when ``WANDB_API_KEY`` is set, else ``offline``; others unchanged."""
    if mode == "auto":
        return "online" if os.environ.get("WANDB_API_KEY") else "offline"
    return mode


def start_run(cfg: FacegenConfig, job_type: str, run_dir: str | None = None, name: str | None = None) -> Tracker:
    """Start (or resume) the W&B run of ``(name or run.name, job_type)`` with the config logged once."""
    mode = resolve_mode(cfg.tracking.mode)
    if mode == "disabled":
        return Tracker(None)
    import wandb

    name = name or cfg.run.name
    root = run_dir or cfg.run.output_dir
    upload = None
    if is_remote(root):  # wandb writes local files only: stage them on this node, upload them on finish
        from facegen.cache import cache_root

        remote = root
        root = str(cache_root().parent / "wandb-staging" / run_id(name, job_type))
        upload = (f"{root}/wandb", f"{remote.rstrip('/')}/wandb")
    root = os.path.abspath(root.removeprefix("file://"))
    os.makedirs(root, exist_ok=True)
    run = wandb.init(
        project=cfg.tracking.project,
        entity=cfg.tracking.entity,
        name=name,
        group=cfg.run.name,  # every stage of a run and its training share one W&B group
        job_type=job_type,
        id=run_id(name, job_type),
        resume="allow",
        dir=root,
        mode=mode,
        config=cfg.model_dump(mode="json"),
        settings=wandb.Settings(silent=True, console="off", x_disable_stats=True, save_code=False),
    )
    return Tracker(run, upload)


class StageTracker:
    """Per-block statistics of a data stage (generate, clean, shard) as W&B rows, totals as summary.

    Numeric fields of a block's stats record become columns; ``error_reasons`` / ``removed_by``
    counters become ``errors/<kind>`` / ``removed/<reason>`` columns; a ``difficulty_histogram``
    (``counts`` over ``bin_edges``) becomes a W&B histogram.
    """

    SKIP = frozenset({"bytes", "sha256", "config_digest", "source_sha256", "node_id", "started", "finished"})

    def __init__(self, tracker: Tracker):
        self.tracker = tracker

    def log_block(self, record: dict) -> None:
        """One W&B row for one finished block."""
        if not self.tracker.enabled:
            return
        row: dict[str, Any] = {}
        for key, value in record.items():
            if key in self.SKIP:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                if key in ("error_reasons", "removed_by") and isinstance(value, dict):
                    prefix = "errors" if key == "error_reasons" else "removed"
                    row.update({f"{prefix}/{k}": int(v) for k, v in value.items()})
                elif key == "difficulty_histogram" and isinstance(value, dict) and value.get("counts"):
                    import wandb

                    row["difficulty"] = wandb.Histogram(np_histogram=(value["counts"], value["bin_edges"]))
                continue
            row[key] = value
        self.tracker.log(row)

    def log_histograms(self, histograms: dict[str, dict], prefix: str) -> None:
        """Run-level histograms (``{"edges", "counts"}`` each) as W&B histograms ``<prefix>/<name>``,
        and their sample counts in the summary."""
        if not self.tracker.enabled or not histograms:
            return
        import wandb

        self.tracker.log({f"{prefix}/{name}": wandb.Histogram(np_histogram=(h["counts"], h["edges"]))
                          for name, h in histograms.items()})
        self.tracker.summary({f"{prefix}/{name}_count": int(sum(h["counts"])) for name, h in histograms.items()})

    def finish(self) -> None:
        """Close the run without a summary (a stage that stopped early)."""
        self.tracker.finish()

    def finish_stage(self, report: Any) -> None:
        """The stage's totals and block counts as the run summary; closes the run."""
        if self.tracker.enabled:
            values = dict(getattr(report, "totals", {}) or {})
            for key in ("blocks_total", "blocks_skipped", "blocks_written", "blocks_redone", "seconds"):
                values[key] = getattr(report, key, None)
            self.tracker.summary(values)
        self.tracker.finish()


def start_stage_tracker(cfg: FacegenConfig, stage: str) -> StageTracker:
    """The W&B run of a data stage (job type ``stage``) in the run's project and group."""
    return StageTracker(start_run(cfg, stage))
