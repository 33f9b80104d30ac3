"""Run-level figures of a clean run, from the blocks' stats records (for the report and W&B)."""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np

from facegen.clean.selection import SIMILARITY_BINS


def _merge_band(parts: list[dict[str, Any]]) -> dict[str, Any]:
    parts = [p for p in parts if p and p.get("count")]
    count = sum(p["count"] for p in parts)
    if not count:
        return {"count": 0, "mean": None, "in_band": None, "above_band": None, "below_band": None, "histogram": [0] * SIMILARITY_BINS}
    weighted = {k: sum(p[k] * p["count"] for p in parts) / count for k in ("mean", "in_band", "above_band", "below_band")}
    histogram = np.sum([p["histogram"] for p in parts], axis=0).astype(int).tolist()
    return {"count": count, **weighted, "histogram": histogram}


def _merge_figures(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """One expert's per-block figures over all blocks: counts summed, measurements as min / mean / max."""
    out: dict[str, Any] = {}
    for key in sorted({k for p in parts for k in p} - {"votes"}):
        values = [p[key] for p in parts if isinstance(p.get(key), (int, float)) and not isinstance(p.get(key), bool)]
        if not values:
            continue
        if all(isinstance(v, int) for v in values):
            out[key] = int(sum(values))
        else:
            out[key] = {"blocks": len(values), "min": float(min(values)), "mean": float(np.mean(values)), "max": float(max(values))}
    return out


def clean_summary(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Similarity-to-centre distribution before/after selection, expert votes, each expert's own
    figures (e.g. the independent expert's thresholds, the VLM's answers) and fusion, over all blocks."""
    votes: dict[str, Counter] = {}
    info: dict[str, list[dict[str, Any]]] = {}
    rules: Counter = Counter()
    for r in records:
        for name, data in (r.get("experts") or {}).items():
            votes.setdefault(name, Counter()).update(data.get("votes", {}))
            info.setdefault(name, []).append(data)
        rules.update(r.get("fusion_rules_fired") or {})
    sims = [r.get("similarity_to_centre") or {} for r in records]
    return {
        "similarity_to_centre": {
            "bin_edges": np.linspace(0.0, 1.0, SIMILARITY_BINS + 1).round(3).tolist(),
            "before_selection": _merge_band([s.get("before_selection") for s in sims]),
            "after_selection": _merge_band([s.get("after_selection") for s in sims]),
        },
        "expert_votes": {name: dict(c) for name, c in votes.items()},
        "experts": {name: _merge_figures(parts) for name, parts in info.items()},
        "fusion_rules_fired": dict(rules),
    }


def log_to_wandb(tracker: Any, totals: dict[str, int], summary: dict[str, Any]) -> None:
    """Counters, the before/after similarity histograms and the band fractions of one clean run."""
    if not tracker.enabled:
        return
    import wandb

    edges = np.asarray(summary["similarity_to_centre"]["bin_edges"])
    metrics: dict[str, Any] = {f"clean/{k}": v for k, v in totals.items()}
    for when in ("before_selection", "after_selection"):
        band = summary["similarity_to_centre"][when]
        metrics[f"clean/cos_to_centre_{when}"] = wandb.Histogram(np_histogram=(np.asarray(band["histogram"]), edges))
        for k in ("mean", "in_band", "above_band", "below_band"):
            if band[k] is not None:
                metrics[f"clean/cos_to_centre_{when}/{k}"] = band[k]
    tracker.log(metrics)
    tracker.summary({k: v for k, v in metrics.items() if not isinstance(v, wandb.Histogram)})
