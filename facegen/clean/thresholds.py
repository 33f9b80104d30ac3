"""Every similarity threshold of cleaning resolved to a cosine on the embedder's own scale, once.

The clean stage resolves its settings before any block is read (:func:`resolve_clean_settings`),
so the experts, dedup, the leakage audit and selection only ever see cosines, and the settings
digest of the clean blocks holds the cosines they were cleaned with. Entry points that can be
called without the stage (``vote_block``, ``run_global``, ``finish_block``) resolve again, which is
a no-op on resolved settings and gives uncalibrated defaults otherwise.
"""

from __future__ import annotations

from facegen.config import CleanSettings
from facegen.faces.calibration import Calibration, resolve_threshold

#: ``auto`` without a calibration: the cosines facegen's defaults were chosen for (ArcFace's scale).
UNCALIBRATED = {"dedup": 0.7, "leakage": 0.4}


def _auto(value: float | str, calibration: Calibration | None, trusted: Calibration | None, field: str, fallback: float) -> float:
    if value == "auto":  # a default follows only a calibration it can trust; a spec the user wrote, any
        return trusted.same_person if trusted is not None else fallback
    return resolve_threshold(value, calibration, field)


def resolve_clean_settings(clean: CleanSettings, calibration: Calibration | None = None) -> CleanSettings:
    """``clean`` with every threshold a cosine (see the module docstring); a calibrated cluster
    expert without a calibration, or with one measured below ``dbscan.min_calibration_accuracy``,
    becomes HybridGen's ``band`` mode. ValueError names the field of a spec that cannot be resolved."""
    trusted = calibration if calibration is not None and (
        calibration.accuracy is None or calibration.accuracy >= clean.dbscan.min_calibration_accuracy) else None
    update = {}
    dbscan = clean.dbscan.model_copy(update={
        name: resolve_threshold(getattr(clean.dbscan, name), calibration, f"clean.dbscan.{name}") for name in ("start_t", "t_min", "t_max")})
    if dbscan.t_min > dbscan.t_max:
        raise ValueError(f"clean.dbscan: t_min {clean.dbscan.t_min} resolves above t_max {clean.dbscan.t_max}")
    if dbscan.mode == "calibrated":
        if isinstance(dbscan.threshold, str) and trusted is None:
            dbscan = dbscan.model_copy(update={"mode": "band"})
        else:
            dbscan = dbscan.model_copy(update={"threshold": resolve_threshold(dbscan.threshold, calibration, "clean.dbscan.threshold")})
    update["dbscan"] = dbscan
    measure = clean.dedup.measure
    if measure == "auto":
        on_scale = isinstance(clean.dedup.threshold, str) and (clean.dedup.threshold != "auto" or trusted is not None)
        measure = "mean_pair" if on_scale else "centre"
    update["dedup"] = clean.dedup.model_copy(update={
        "threshold": _auto(clean.dedup.threshold, calibration, trusted, "clean.dedup.threshold", UNCALIBRATED["dedup"]),
        "measure": measure})
    update["leakage"] = clean.leakage.model_copy(
        update={"threshold": _auto(clean.leakage.threshold, calibration, trusted, "clean.leakage.threshold", UNCALIBRATED["leakage"])})
    band = tuple(resolve_threshold(v, calibration, f"clean.selection.band[{i}]") for i, v in enumerate(clean.selection.band))
    if band[0] > band[1]:
        raise ValueError(f"clean.selection.band: {list(clean.selection.band)} resolves to [{band[0]:.3f}, {band[1]:.3f}], "
                         "low above high")
    update["selection"] = clean.selection.model_copy(
        update={"band": band, "target": resolve_threshold(clean.selection.target, calibration, "clean.selection.target")})
    return clean.model_copy(update=update)


def describe_thresholds(resolved: CleanSettings, calibration: Calibration | None) -> str:
    """One line saying on which scale cleaning ran: the cluster expert's mode and threshold and the
    calibration behind them (the user's reason to trust, or re-measure, what was removed)."""
    scale = "no calibration (cosines as written)"
    if calibration is not None:
        accuracy = "" if calibration.accuracy is None else f", {100 * calibration.accuracy:.1f}% pair accuracy"
        scale = f"calibration {calibration.source}{accuracy}"
    if resolved.dbscan.mode == "calibrated":
        expert = f"cluster expert calibrated at cosine {resolved.dbscan.threshold:.3f}"
    else:
        expert = f"cluster expert in HybridGen's band mode (start {resolved.dbscan.start_t:.2f})"
    dedup = f"dedup {resolved.dedup.threshold:.3f} ({resolved.dedup.measure.replace('_', ' ')})"
    return f"{expert}, {dedup}, leakage {resolved.leakage.threshold:.3f}; {scale}"
