"""``facegen`` command line: every command takes ``--config FILE`` and repeated ``--set key=value``.

Commands only parse settings, connect to Ray and call the stage; user-facing failures are printed
as one line and exit with status 2.
"""

from __future__ import annotations

import sys
from dataclasses import asdict
from functools import wraps
from typing import Any, Callable, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from facegen.config import ConfigError, FacegenConfig, load_config
from facegen.config.faces import EMBEDDERS
from facegen.stages import StageError, StageInterrupted

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Synthetic face-recognition datasets on Ray.")
console = Console()

ConfigOption = typer.Option(None, "--config", "-c", help="YAML settings file")
SetOption = typer.Option(None, "--set", "-s", help="override, e.g. --set train.epochs=2 (repeatable)")
ProgressOption = typer.Option(True, "--progress/--no-progress", help="progress bars")
VerboseOption = typer.Option(False, "--verbose", "-v", help="also show Ray's own logs (off by default)")


#: What an interrupt outside a block stage says (start-up, training: finished work is kept there too).
INTERRUPTED = "interrupted; run the same command again to resume (finished work is kept)"


def _interrupt_on_sigterm() -> Any:
    """SIGTERM ends the command as Ctrl-C does: one line, Ray shut down (it otherwise meets Ray's
    handlers, which dump native stacks). Installed again after Ray starts, which replaces it.
    Returns the handler it replaced (None off the main thread, where signals cannot be handled)."""
    import signal
    import threading

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, handler)


def _stop_ray_quietly() -> None:
    """Shut a Ray this process started (or joined) down, so none of its processes outlive it."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not interrupt the shutdown
    try:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    except Exception:  # noqa: BLE001 - best effort on the way out
        pass


def _one_line_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        import signal

        previous = _interrupt_on_sigterm()
        try:
            return fn(*args, **kwargs)
        except KeyboardInterrupt as exc:
            message = str(exc) if isinstance(exc, StageInterrupted) else INTERRUPTED
            console.print(f"[bold yellow]{escape(message)}[/]", highlight=False, soft_wrap=True)
            _stop_ray_quietly()
            raise typer.Exit(130) from None
        except (ConfigError, FileNotFoundError, ValueError, StageError) as exc:
            console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)  # [a, b] is text
            raise typer.Exit(2) from None
        except OSError as exc:  # a filesystem fault met after the checks (disk full, a file removed)
            from facegen.storage import os_error_line

            console.print(f"[bold red]error:[/] {escape(os_error_line(exc))}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        finally:
            if previous is not None:  # a caller in this process (a test, a notebook) gets its own handler back
                signal.signal(signal.SIGTERM, previous)

    return wrapper


def _load(config: Optional[str], overrides: Optional[list[str]], verbose: bool = False,
          cfg: FacegenConfig | None = None, stages: tuple[str, ...] = (), progress: bool = True,
          run_embedders: bool = False, input_sections: tuple[str, ...] | None = None) -> FacegenConfig:
    """Settings, every input path they name checked (storage metadata only), then Ray (quiet unless
    ``verbose``), then the output storage and the resources of ``stages``' pools checked against the
    cluster's nodes: all before any work. ``run_embedders``: the embedders ``facegen pipeline`` would
    use are filled in (:func:`facegen.demo.with_run_embedders`)."""
    import os

    from facegen.config import source_of
    from facegen.preflight import check_input_paths, check_output_location
    from facegen.ray_utils import check_output_storage, init_ray, storage_env

    cfg = cfg or load_config(config, overrides or [])
    os.environ.update(storage_env(cfg.storage))  # the endpoint of s3:// inputs, for the checks below
    check_input_paths(cfg, config or "settings", overrides, input_sections)
    check_output_location("run.output_dir", cfg.run.output_dir, source_of("run.output_dir", config or "settings", overrides))
    init_ray(cfg.ray, cfg.storage, verbose=verbose)
    _interrupt_on_sigterm()
    check_output_storage(cfg.run.output_dir, cfg.storage.shared)
    from facegen.stages.tasks import check_stage_resources

    check_stage_resources(cfg, list(stages))
    if run_embedders:
        from facegen.demo import with_run_embedders

        # the embedders `facegen pipeline` would use, so a stage command on the same config makes
        # (and skips) the same blocks
        cfg = with_run_embedders(cfg, progress=progress)
    return cfg


def _print_pairs(title: str, rows: list[tuple[str, str]]) -> None:
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    for key, value in rows:
        table.add_row(key, value)
    console.print(table)


def _print_report(report: Any) -> None:
    data = asdict(report)
    rows = [(k, str(v)) for k, v in data.items() if k not in ("totals", "notes", "histograms")]
    rows += [(k, str(v)) for k, v in data.get("totals", {}).items()]
    rows += [("note", note) for note in data.get("notes", [])]
    _print_pairs(f"facegen {data['stage']}", rows)
    if data.get("histograms"):
        from facegen.identities.expansion import format_histograms

        console.print("similarity to the identity feature (requested vs realised):", highlight=False)
        console.print(format_histograms(data["histograms"], trim=True), highlight=False, markup=False)


@app.command()
@_one_line_errors
def identities(config: Optional[str] = ConfigOption, set_: Optional[list[str]] = SetOption, progress: bool = ProgressOption,
               verbose: bool = VerboseOption) -> None:
    """Sample every identity's latent (gaussian or Langevin) into <output_dir>/identities/."""
    from facegen.stages.identities import run_identities

    _print_report(run_identities(_load(config, set_, verbose, stages=("identities",), progress=progress, run_embedders=True),
                                 progress=progress))


@app.command()
@_one_line_errors
def directions(config: Optional[str] = ConfigOption, set_: Optional[list[str]] = SetOption, progress: bool = ProgressOption,
               verbose: bool = VerboseOption) -> None:
    """Fit DisCo's latent directions (pose, lighting) on the GAN's own samples into <output_dir>/directions/."""
    from facegen.stages.directions import run_directions

    _print_report(run_directions(_load(config, set_, verbose, stages=("directions",), progress=progress), progress=progress))


@app.command()
@_one_line_errors
def generate(config: Optional[str] = ConfigOption, set_: Optional[list[str]] = SetOption, progress: bool = ProgressOption,
             verbose: bool = VerboseOption) -> None:
    """Generate, align and embed images for every identity block not done yet."""
    from facegen.stages.generate import run_generate

    _print_report(run_generate(_load(config, set_, verbose, stages=("generate",), progress=progress, run_embedders=True),
                                 progress=progress))


@app.command()
@_one_line_errors
def ingest(
    images: Optional[str] = typer.Option(None, "--images", help="image folder DIR/<identity>/<image> (or ingest.images_dir)"),
    config: Optional[str] = ConfigOption,
    set_: Optional[list[str]] = SetOption,
    progress: bool = ProgressOption,
    verbose: bool = VerboseOption,
) -> None:
    """Detect, align and embed the faces of an image folder into raw blocks (then clean/shard/train)."""
    from facegen.stages.ingest import run_ingest

    cfg = load_config(config, set_ or [])
    if images is not None:
        cfg.ingest.images_dir = images
    if not cfg.ingest.images_dir:
        raise ValueError("ingest.images_dir: no image folder given (facegen ingest --images DIR)")
    _print_report(run_ingest(_load(config, set_, verbose, cfg=cfg, stages=("ingest",)), progress=progress))


@app.command()
@_one_line_errors
def clean(config: Optional[str] = ConfigOption, set_: Optional[list[str]] = SetOption, progress: bool = ProgressOption,
          verbose: bool = VerboseOption) -> None:
    """Clean every generated block: expert votes and fusion, dedup and leakage audit, semi-hard trim, top-up."""
    from facegen.stages.clean import run_clean

    _print_report(run_clean(_load(config, set_, verbose, stages=("clean",), progress=progress, run_embedders=True),
                                 progress=progress))


@app.command()
@_one_line_errors
def shard(config: Optional[str] = ConfigOption, set_: Optional[list[str]] = SetOption, progress: bool = ProgressOption,
          verbose: bool = VerboseOption) -> None:
    """Write curriculum-ordered (easy to hard) shards with a manifest and checksums."""
    from facegen.stages.shard import run_shard

    _print_report(run_shard(_load(config, set_, verbose, stages=("shard",)), progress=progress))


@app.command()
@_one_line_errors
def train(config: Optional[str] = ConfigOption, set_: Optional[list[str]] = SetOption, verbose: bool = VerboseOption) -> None:
    """Train IResNet + margin head with Ray Train on the shards (same run name resumes)."""
    from facegen.train.loop import train as run_train

    cfg = _load(config, set_, verbose, stages=("train",))
    result = run_train(cfg, cfg.stage_dir("shards"), eval_bins=list(cfg.eval.bins))
    last = result.history[-1] if result.history else {}
    _print_pairs("facegen train", [("run", result.run_dir), ("backbone", result.backbone_dir),
                                   ("epochs", str(result.epochs_completed))] + [(k, f"{v}") for k, v in last.items()])


@app.command("train-generator")
@_one_line_errors
def train_generator(config: Optional[str] = ConfigOption, set_: Optional[list[str]] = SetOption,
                    progress: bool = ProgressOption, verbose: bool = VerboseOption) -> None:
    """Train CemiFace's similarity-conditioned generator with Ray Train on a shard set (same run name resumes)."""
    from facegen.stages.train_generator import train_generator as run_train_generator

    cfg = _load(config, set_, verbose, stages=("train_generator",), input_sections=("train_generator.",))
    result = run_train_generator(cfg, progress=progress)
    control = result.control or {}
    rows = [("run", result.run_dir), ("model", result.model_dir), ("steps", str(result.global_step))]
    if control:
        rows += [("control spearman", f"{control['spearman']:.3f}")]
        rows += [(f"realised at m={b['m']:g}", f"{b['mean']:.3f} +- {b['std']:.3f}") for b in control["by_m"]]
    _print_pairs("facegen train-generator", rows)


@app.command("eval")
@_one_line_errors
def eval_(
    checkpoint: Optional[str] = typer.Option(None, "--checkpoint", help="embedder weights: facegen backbone directory, .pth, .onnx (dlib: optional)"),
    kind: str = typer.Option("facegen", "--kind", help=f"embedder kind: {' | '.join(EMBEDDERS.kinds)}"),
    arch: Optional[str] = typer.Option(None, "--arch", help="arcface_torch only: iresnet18/34/50/100"),
    bins: list[str] = typer.Option(..., "--bin", help="insightface .bin verification set (repeatable)"),
    batch_size: int = typer.Option(64, "--batch-size"),
    folds: int = typer.Option(10, "--folds"),
    device: str = typer.Option("auto", "--device"),
) -> None:
    """10-fold verification accuracy on LFW / CFP-FP / AgeDB-30 style ``.bin`` files.

    Submitted to a cluster (``RAY_ADDRESS`` set, as under ``ray job submit``) it runs as a Ray task on
    a worker (with a GPU for ``--device cuda``); run by hand, in this process."""
    import os

    from facegen.pipeline import run_eval

    args = (checkpoint, bins, batch_size, folds, device, kind, arch)
    if os.environ.get("RAY_ADDRESS"):
        from facegen.config import RaySettings, TaskSettings
        from facegen.ray_utils import init_ray
        from facegen.stages.tasks import run_task

        init_ray(RaySettings(), verbose=False)
        resources = TaskSettings(num_cpus=1.0, num_gpus=1.0 if device.startswith("cuda") else 0.0)
        results = run_task(run_eval, *args, resources=resources, field="--device", name="eval")
    else:
        results = run_eval(*args)
    table = Table(title=f"verification: {kind} {checkpoint or 'packaged model'}", title_justify="left")
    for column in ("set", "pairs", "accuracy", "std"):
        table.add_column(column)
    for r in results:
        if r.get("error"):
            table.add_row(r["name"], "-", "failed", "-")
        else:
            table.add_row(r["name"], str(r["pairs"]), f"{100 * r['accuracy_mean']:.2f}%", f"{100 * r['accuracy_std']:.2f}")
    console.print(table)
    failed = [r["error"] for r in results if r.get("error")]
    if failed:
        raise ValueError(f"{len(failed)} of {len(results)} set(s) could not be scored; first: {failed[0]}")


@app.command()
@_one_line_errors
def calibrate(
    bins: list[str] = typer.Option(..., "--bin", help="insightface .bin verification set (repeatable; pairs pooled)"),
    output: str = typer.Option(..., "--output", "-o", help="calibration JSON to write (for faces.embedder.calibration)"),
    checkpoint: Optional[str] = typer.Option(None, "--checkpoint", help="embedder weights (dlib: optional)"),
    kind: str = typer.Option("facegen", "--kind", help=f"embedder kind: {' | '.join(EMBEDDERS.kinds)}"),
    arch: Optional[str] = typer.Option(None, "--arch", help="arcface_torch only: iresnet18/34/50/100"),
    batch_size: int = typer.Option(64, "--batch-size"),
    folds: int = typer.Option(10, "--folds"),
    device: str = typer.Option("auto", "--device"),
) -> None:
    """Measure an embedder's similarity scale on .bin sets: genuine and impostor cosines and its
    same-person threshold, so cleaning thresholds can be given on that scale (same_person, far:RATE)."""
    from facegen.pipeline import run_calibrate
    from facegen.preflight import check_output_file

    check_output_file("--output", output)
    c = run_calibrate(bins, output, kind, checkpoint, arch, device, batch_size, folds)
    at = lambda values, p: f"{values[c['percentiles'].index(p)]:.3f}"  # noqa: E731
    _print_pairs("facegen calibrate", [
        ("file", output), ("embedder", kind), ("pairs", str(c["pairs"])), ("accuracy", f"{100 * c['accuracy']:.2f}%"),
        ("same_person (cosine)", f"{c['same_person']:.4f}"),
        ("genuine cosine p5 / p50", f"{at(c['genuine'], 5.0)} / {at(c['genuine'], 50.0)}"),
        ("impostor cosine p50 / p99 / p99.9", f"{at(c['impostor'], 50.0)} / {at(c['impostor'], 99.0)} / {at(c['impostor'], 99.9)}"),
    ])


@app.command()
@_one_line_errors
def export(
    checkpoint: str = typer.Option(..., "--checkpoint", help="backbone directory, training checkpoint (step-*) or run directory"),
    fmt: str = typer.Option("onnx", "--format", help="onnx (insightface model zoo) or arcface_torch (.pth state dict)"),
    output: Optional[str] = typer.Option(None, "--output", "-o", help="file to write (default: next to the backbone)"),
) -> None:
    """Export a trained backbone as ONNX (insightface) or an arcface_torch state dict."""
    from facegen.train.export import export_backbone

    result = export_backbone(checkpoint, fmt, output)
    _print_pairs("facegen export", [("file", result.path), ("format", result.format), ("arch", result.arch),
                                    ("embedding size", str(result.embedding_size)),
                                    ("max |export - torch|", f"{result.max_abs_diff:.2e}")])


@app.command()
@_one_line_errors
def pipeline(config: Optional[str] = ConfigOption, set_: Optional[list[str]] = SetOption, progress: bool = ProgressOption,
             verbose: bool = VerboseOption) -> None:
    """Run generate -> clean -> shard -> train -> eval; prints one summary table."""
    from facegen.pipeline import run_pipeline, summary_rows

    stages = ("identities", "generate", "clean", "shard", "train")
    summary = run_pipeline(_load(config, set_, verbose, stages=stages), progress=progress)
    _print_pairs("facegen pipeline summary", summary_rows(summary))


@app.command()
@_one_line_errors
def report(
    config: Optional[str] = ConfigOption,
    set_: Optional[list[str]] = SetOption,
    output: Optional[str] = typer.Option(None, "--output", "-o", help="where to write (default <run.output_dir>/report.html)"),
) -> None:
    """Write one self-contained HTML page about the dataset (no Ray needed)."""
    from facegen.eval.html_report import write_report
    from facegen.ray_utils import storage_env

    import os

    from facegen.preflight import check_output_file

    cfg = load_config(config, set_ or [])
    os.environ.update(storage_env(cfg.storage))
    if output:
        check_output_file("--output", output)
    console.print(f"report: {write_report(cfg, output)}", highlight=False, soft_wrap=True)


def main() -> None:
    """Entry point for ``python -m facegen``."""
    app(prog_name="facegen")


if __name__ == "__main__":
    sys.exit(main())
