"""``facegen pipeline``: generate -> clean -> shard -> train -> validate, each stage resumable.

Each step reads the previous step's files, so an interrupted pipeline re-run skips whatever is
already done. The run ends with one summary (printed as a table and saved as ``summary.json``).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

from facegen import storage
from facegen.config import FacegenConfig


@dataclass
class PipelineSummary:
    """Everything the final table shows; saved to ``<output_dir>/summary.json``."""

    config_digest: str
    identities: dict[str, Any] = field(default_factory=dict)
    directions: dict[str, Any] = field(default_factory=dict)
    generate: dict[str, Any] = field(default_factory=dict)
    clean: dict[str, Any] = field(default_factory=dict)
    shard: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)
    verification: list[dict[str, Any]] = field(default_factory=list)
    outputs: dict[str, str] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


def run_eval(
    checkpoint: str | None, bins: list[str], batch_size: int = 64, nrof_folds: int = 10, device: str = "auto",
    kind: str = "facegen", arch: str | None = None,
) -> list[dict[str, Any]]:
    """10-fold verification accuracy of an embedder (any ``faces.embedder.kind``) on ``.bin`` sets
    (local paths or URIs: fetched to this node first)."""
    from facegen.cache import fetch
    from facegen.eval.verification import verify_bins

    embedder = embedder_from_options(kind, checkpoint, arch, device, batch_size, "facegen eval")
    bins = [fetch(b, "--bin") for b in bins]
    results = verify_bins(embedder, bins, batch_size=batch_size, nrof_folds=nrof_folds)
    return [asdict(r) for r in results]


def embedder_from_options(kind: str, checkpoint: str | None, arch: str | None, device: str, batch_size: int, source: str):
    """The embedder a command's ``--kind / --checkpoint / --arch / --device`` name (the checkpoint
    fetched to this node first), validated as ``faces.embedder`` settings."""
    from facegen.cache import fetch
    from facegen.config import config_from_dict
    from facegen.faces.embed import build_embedder

    if checkpoint:
        checkpoint = fetch(checkpoint, "--checkpoint")
    fields = {"kind": kind, "path": checkpoint, "arch": arch, "device": device, "batch_size": batch_size}
    return build_embedder(config_from_dict({"faces": {"embedder": fields}}, source).faces.embedder)


def run_calibrate(bins: list[str], output: str, kind: str = "facegen", checkpoint: str | None = None, arch: str | None = None,
                  device: str = "auto", batch_size: int = 64, nrof_folds: int = 10) -> dict[str, Any]:
    """Measure an embedder's similarity scale on ``.bin`` sets (their pairs pooled) and write it to
    ``output`` as JSON for ``faces.embedder.calibration``; returns what was written."""
    from facegen.cache import fetch
    from facegen.faces.calibration import calibrate_embedder

    embedder = embedder_from_options(kind, checkpoint, arch, device, batch_size, "facegen calibrate")
    calibration = calibrate_embedder(embedder, [fetch(path, "--bin") for path in bins], kind, batch_size, nrof_folds,
                                     source=", ".join(bins))
    storage.write_json_atomic(calibration.model_dump(), output)
    return calibration.model_dump()


def _eval_task(checkpoint: str, bins: list[str], batch_size: int, nrof_folds: int) -> list[dict[str, Any]]:
    import os

    return [{**r, "worker_pid": os.getpid()} for r in run_eval(checkpoint, bins, batch_size, nrof_folds)]


def run_eval_on_cluster(cfg: FacegenConfig, checkpoint: str, bins: list[str]) -> list[dict[str, Any]]:
    """:func:`run_eval` as a Ray task with one training worker's resources (a GPU on a cluster),
    so the final evaluation never runs in the driver on the CPU-only head node."""
    import os

    from facegen.config import TaskSettings
    from facegen.stages.tasks import run_task

    absolute = [b if "://" in b else os.path.abspath(b) for b in [checkpoint, *bins]]
    resources = TaskSettings(num_cpus=cfg.train.cpus_per_worker, num_gpus=1 if cfg.train.use_gpu else 0,
                             resources=cfg.train.resources)
    return run_task(_eval_task, absolute[0], absolute[1:], cfg.eval.batch_size, cfg.eval.nrof_folds,
                    resources=resources, field="train.resources", name="eval")


def _report_task(cfg_json: str, path: str) -> str:
    from facegen.eval.html_report import write_report

    return write_report(FacegenConfig.model_validate_json(cfg_json), path)


def run_pipeline(cfg: FacegenConfig, progress: bool = True) -> PipelineSummary:
    """Run every stage of ``cfg`` in order on the connected Ray cluster."""
    from facegen.demo import with_run_embedders, write_heldout_bin
    from facegen.config.generation import gan_backends
    from facegen.stages.clean import run_clean
    from facegen.stages.generate import run_generate
    from facegen.stages.identities import run_identities
    from facegen.stages.shard import run_shard
    from facegen.train.loop import train

    summary = PipelineSummary(config_digest=cfg.digest())
    cfg = cfg.model_copy(deep=True)
    clock = time.time()

    def lap(name: str) -> None:
        nonlocal clock
        summary.seconds[name] = round(time.time() - clock, 1)
        clock = time.time()

    if cfg.generator.variation == "disco" and cfg.generator.disco.fit:  # first: the calibration side run varies by them
        from facegen.stages.directions import run_directions

        summary.directions = asdict(run_directions(cfg, progress=progress))
        lap("directions")
    bootstraps = bool(cfg.demo.bootstrap_identities and not cfg.faces.embedder.enabled)
    cfg = with_run_embedders(cfg, progress=progress)
    if bootstraps:
        lap("bootstrap_embedder")
    if not cfg.faces.embedder.enabled:
        raise ValueError("faces.embedder.path: the pipeline needs an embedder (or demo.bootstrap_identities > 0)")
    gan = cfg.generator.backend in gan_backends()
    bins = list(cfg.eval.bins)
    if cfg.demo.heldout_identities:
        bins.insert(0, write_heldout_bin(cfg, progress=progress))
        lap("heldout_bin")

    if gan or cfg.identities.sampler.kind != "gaussian":
        summary.identities = asdict(run_identities(cfg, progress=progress))
        lap("identities")
    summary.generate = asdict(run_generate(cfg, progress=progress))
    lap("generate")
    summary.clean = asdict(run_clean(cfg, progress=progress))
    lap("clean")
    summary.shard = asdict(run_shard(cfg, progress=progress))
    lap("shard")
    result = train(cfg, cfg.stage_dir("shards"), eval_bins=bins)
    summary.train = {
        "run_dir": result.run_dir,
        "backbone_dir": result.backbone_dir,
        "epochs_completed": result.epochs_completed,
        "resumed_from_epoch": result.resumed_from_epoch,
        "last_epoch": result.history[-1] if result.history else {},
    }
    lap("train")
    if bins:
        summary.verification = run_eval_on_cluster(cfg, result.backbone_dir, bins)
        lap("eval")
    summary.outputs = {
        "identity latents": cfg.stage_dir("identities") if summary.identities else "",
        "disco directions": cfg.stage_dir("directions") if summary.directions else "",
        "raw blocks": cfg.stage_dir("raw"),
        "clean blocks": cfg.stage_dir("clean"),
        "curriculum shards": cfg.stage_dir("shards"),
        "training run": result.run_dir,
        "backbone": result.backbone_dir,
        "embedder": f"{cfg.faces.embedder.kind}: {cfg.faces.embedder.path or 'packaged model'}",
        "verification sets": ", ".join(bins),
        "wandb": cfg.stage_dir("wandb"),
        "summary": f"{cfg.run.output_dir.rstrip('/')}/summary.json",
        "report": f"{cfg.run.output_dir.rstrip('/')}/report.html",
    }
    storage.write_json_atomic(asdict(summary), summary.outputs["summary"])
    from facegen.config import TaskSettings
    from facegen.stages.tasks import run_task

    # last: it shows the verification results; read and drawn on a worker, not on the head
    run_task(_report_task, cfg.model_dump_json(), summary.outputs["report"], resources=TaskSettings(num_cpus=0.25),
             field="report", name="report")
    return summary


def summary_rows(summary: PipelineSummary) -> list[tuple[str, str]]:
    """The final table as (what, value) rows."""
    g, c = summary.generate.get("totals", {}), summary.clean.get("totals", {})
    caught = f"{c.get('injected_wrong_removed', 0)} of {c.get('injected_wrong_in', 0)}"
    rows = [(f"directions: {k}", str(v)) for k, v in summary.directions.get("totals", {}).items()]
    rows += [(f"identity sampling: {k}", str(v)) for k, v in summary.identities.get("totals", {}).items()]
    rows += [
        ("identities generated", str(g.get("identities", 0))),
        ("images generated (ok / error)", f"{g.get('images', 0)} ({g.get('images_ok', 0)} / {g.get('images_error', 0)})"),
        ("injected wrong-identity images", str(g.get("injected_wrong", 0))),
        ("identities dropped by cleaning", str(c.get("identities_dropped", 0))),
        ("identities removed by dedup / leakage", f"{c.get('identities_removed_dedup', 0)} / {c.get('identities_removed_leakage', 0)}"),
        ("images removed by cleaning", str(c.get("images_removed", 0))),
        ("  of which injected wrong images caught", caught),
        ("images added by top-up augmentation", str(c.get("images_augmented", 0))),
        ("identities / images kept", f"{c.get('identities_kept', 0)} / {c.get('images_out', 0)}"),
        ("curriculum shards (rows)", f"{summary.shard.get('totals', {}).get('shards', 0)} ({summary.shard.get('totals', {}).get('rows', 0)})"),
        ("training epochs", str(summary.train.get("epochs_completed", 0))),
    ]
    for v in summary.verification:
        if v.get("error"):
            rows.append((f"verification accuracy: {v['name']}", f"failed: {v['error']}"))
        else:
            rows.append((f"verification accuracy: {v['name']}", f"{100 * v['accuracy_mean']:.2f}% +- {100 * v['accuracy_std']:.2f} ({v['pairs']} pairs, chance 50%)"))
    for stage in (summary.generate, summary.clean, summary.shard):
        rows.extend(("note", note) for note in stage.get("notes", []))  # blocks found bad and redone
    rows.extend((f"output: {k}", str(v)) for k, v in summary.outputs.items() if v)
    rows.append(("wall time per step (s)", ", ".join(f"{k} {v}" for k, v in summary.seconds.items())))
    return rows
