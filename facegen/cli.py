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
from rich.table import Table

from facegen.config import ConfigError, FacegenConfig, load_config

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Synthetic face-recognition datasets on Ray.")
console = Console()

ConfigOption = typer.Option(None, "--config", "-c", help="YAML settings file")
SetOption = typer.Option(None, "--set", "-s", help="override, e.g. --set train.epochs=2 (repeatable)")
ProgressOption = typer.Option(True, "--progress/--no-progress", help="progress bars")


def _one_line_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (ConfigError, FileNotFoundError, ValueError) as exc:
            console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper


def _load(config: Optional[str], overrides: Optional[list[str]]) -> FacegenConfig:
    cfg = load_config(config, overrides or [])
    from facegen.ray_utils import init_ray

    init_ray(cfg.ray)
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
    rows = [(k, str(v)) for k, v in data.items() if k != "totals"]
    rows += [(k, str(v)) for k, v in data.get("totals", {}).items()]
    _print_pairs(f"facegen {data['stage']}", rows)


@app.command()
@_one_line_errors
def identities(config: Optional[str] = ConfigOption, set_: Optional[list[str]] = SetOption, progress: bool = ProgressOption) -> None:
    """Sample every identity's latent (gaussian or Langevin) into <output_dir>/identities/."""
    from facegen.stages.identities import run_identities

    _print_report(run_identities(_load(config, set_), progress=progress))


@app.command()
@_one_line_errors
def generate(config: Optional[str] = ConfigOption, set_: Optional[list[str]] = SetOption, progress: bool = ProgressOption) -> None:
    """Generate, align and embed images for every identity block not done yet."""
    from facegen.stages.generate import run_generate

    _print_report(run_generate(_load(config, set_), progress=progress))


@app.command()
@_one_line_errors
def clean(config: Optional[str] = ConfigOption, set_: Optional[list[str]] = SetOption, progress: bool = ProgressOption) -> None:
    """Clean every generated block (consistency clusters, minimum size, top-up)."""
    from facegen.stages.clean import run_clean

    _print_report(run_clean(_load(config, set_), progress=progress))


@app.command()
@_one_line_errors
def shard(config: Optional[str] = ConfigOption, set_: Optional[list[str]] = SetOption, progress: bool = ProgressOption) -> None:
    """Write curriculum-ordered (easy to hard) shards with a manifest and checksums."""
    from facegen.stages.shard import run_shard

    _print_report(run_shard(_load(config, set_), progress=progress))


@app.command()
@_one_line_errors
def train(config: Optional[str] = ConfigOption, set_: Optional[list[str]] = SetOption) -> None:
    """Train IResNet + margin head with Ray Train on the shards (same run name resumes)."""
    from facegen.train.loop import train as run_train

    cfg = _load(config, set_)
    result = run_train(cfg, cfg.stage_dir("shards"), eval_bins=list(cfg.eval.bins))
    last = result.history[-1] if result.history else {}
    _print_pairs("facegen train", [("run", result.run_dir), ("backbone", result.backbone_dir),
                                   ("epochs", str(result.epochs_completed))] + [(k, f"{v}") for k, v in last.items()])


@app.command("eval")
@_one_line_errors
def eval_(
    checkpoint: str = typer.Option(..., "--checkpoint", help="embedder weights: facegen backbone directory, .pth, .onnx"),
    kind: str = typer.Option("facegen", "--kind", help="embedder kind: facegen | arcface_torch | onnx | dlib"),
    arch: Optional[str] = typer.Option(None, "--arch", help="arcface_torch only: iresnet18/34/50/100"),
    bins: list[str] = typer.Option(..., "--bin", help="insightface .bin verification set (repeatable)"),
    batch_size: int = typer.Option(64, "--batch-size"),
    folds: int = typer.Option(10, "--folds"),
    device: str = typer.Option("auto", "--device"),
) -> None:
    """10-fold verification accuracy on LFW / CFP-FP / AgeDB-30 style ``.bin`` files."""
    from facegen.pipeline import run_eval

    table = Table(title=f"verification: {checkpoint}", title_justify="left")
    for column in ("set", "pairs", "accuracy", "std"):
        table.add_column(column)
    for r in run_eval(checkpoint, bins, batch_size, folds, device, kind=kind, arch=arch):
        table.add_row(r["name"], str(r["pairs"]), f"{100 * r['accuracy_mean']:.2f}%", f"{100 * r['accuracy_std']:.2f}")
    console.print(table)


@app.command()
@_one_line_errors
def pipeline(config: Optional[str] = ConfigOption, set_: Optional[list[str]] = SetOption, progress: bool = ProgressOption) -> None:
    """Run generate -> clean -> shard -> train -> eval; prints one summary table."""
    from facegen.pipeline import run_pipeline, summary_rows

    summary = run_pipeline(_load(config, set_), progress=progress)
    _print_pairs("facegen pipeline summary", summary_rows(summary))


def main() -> None:
    """Entry point for ``python -m facegen``."""
    app(prog_name="facegen")


if __name__ == "__main__":
    sys.exit(main())
