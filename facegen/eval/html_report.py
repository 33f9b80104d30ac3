"""``facegen report``: one self-contained HTML page per dataset, readable in any browser offline.

The page shows an identity grid (images inlined as data URIs), genuine/impostor similarity
histograms of the raw and the clean blocks, what cleaning removed and why (counts and examples),
generation errors by kind, the difficulty distribution with the curriculum bucket edges, the
training curves (loss, accuracy, validation against the step) and the verification results.
Charts are inline SVG, styles inline, no external resource. It reads the stats records of every block but the rows of a few blocks only, so it stays quick
on large datasets.
"""

from __future__ import annotations

import base64
import html
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from facegen import blocks as blk
from facegen import storage
from facegen.config import FacegenConfig

REPORT_FILE = "report.html"
_STYLE = """
body{font:14px/1.45 system-ui,sans-serif;margin:24px auto;max-width:1100px;color:#222}
h1{font-size:22px}h2{font-size:17px;margin-top:28px;border-bottom:1px solid #ddd}
table{border-collapse:collapse}td,th{padding:3px 10px;border-bottom:1px solid #eee;text-align:left}
.grid{display:grid;gap:4px}.grid figure{margin:0;text-align:center;font-size:10px}
.grid img{width:72px;height:72px;border:3px solid transparent;display:block}
img.wrong{border-color:#d22}img.augmented{border-color:#e90}.muted{color:#777}
"""
_CHECK = """
window.addEventListener('load',function(){var all=document.images,ok=0;
for(var i=0;i<all.length;i++){if(all[i].complete&&all[i].naturalWidth>0){ok++;}}
var s=document.getElementById('render-check');s.textContent=ok+' of '+all.length+' images rendered';
s.setAttribute('data-rendered',ok);s.setAttribute('data-images',all.length);});
"""


def _buckets(manifest: dict) -> range:
    """Every curriculum bucket: by source, each group's run of difficulty buckets."""
    groups = len(manifest.get("curriculum", {}).get("groups", [])) or 1
    return range(groups * int(manifest["num_buckets"]))


def _bucket_name(manifest: dict, bucket: int) -> str:
    groups = manifest.get("curriculum", {}).get("groups", [])
    if not groups:
        return f"bucket {bucket}"
    group = groups[bucket // int(manifest["num_buckets"])]
    return f"bucket {bucket} ({group['name']}, difficulty {bucket % int(manifest['num_buckets'])})"

def _e(value: Any) -> str:
    return html.escape(str(value))


def _table(rows: list[tuple[Any, ...]], header: tuple[str, ...] | None = None, cls: str = "") -> str:
    head = "<tr>" + "".join(f"<th>{_e(h)}</th>" for h in header) + "</tr>" if header else ""
    body = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="{cls}">{head}{body}</table>'


def svg_histogram(series: list[tuple[str, np.ndarray, str]], edges: np.ndarray, markers: list[float] | None = None,
                  width: int = 640, height: int = 180, label: str = "") -> str:
    """Overlaid histograms (``(name, counts, colour)`` on shared ``edges``) as an inline SVG.

    Each series is scaled to its own maximum (densities compare, sample sizes do not matter);
    ``markers`` draw vertical lines (e.g. bucket edges).
    """
    edges = np.asarray(edges, np.float64)
    lo, hi = float(edges[0]), float(edges[-1])
    x = lambda v: 40 + (float(v) - lo) / max(hi - lo, 1e-12) * (width - 50)  # noqa: E731
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height + 40}" role="img" '
             f'aria-label="{_e(label)}">']
    for name, counts, colour in series:
        counts = np.asarray(counts, np.float64)
        top = counts.max() if counts.size and counts.max() > 0 else 1.0
        for k, c in enumerate(counts):
            h = (height - 10) * c / top
            parts.append(f'<rect x="{x(edges[k]):.1f}" y="{height - h:.1f}" width="{max(x(edges[k + 1]) - x(edges[k]), 0.5):.1f}" '
                         f'height="{h:.1f}" fill="{colour}" fill-opacity="0.55"><title>{_e(name)}: {int(c)}</title></rect>')
    for m in markers or []:
        parts.append(f'<line x1="{x(m):.1f}" x2="{x(m):.1f}" y1="0" y2="{height}" stroke="#333" stroke-dasharray="3,3"/>')
    parts.append(f'<line x1="40" x2="{width - 10}" y1="{height}" y2="{height}" stroke="#999"/>')
    for tick in np.linspace(lo, hi, 5):
        parts.append(f'<text x="{x(tick):.1f}" y="{height + 14}" font-size="10" text-anchor="middle">{tick:.2f}</text>')
    for i, (name, _, colour) in enumerate(series):
        parts.append(f'<text x="{50 + 190 * i}" y="{height + 32}" font-size="11" fill="{colour}">&#9632; {_e(name)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _data_uri(image: bytes) -> str:
    kind = "png" if image.startswith(b"\x89PNG") else "jpeg"
    return f"data:image/{kind};base64,{base64.b64encode(image).decode()}"


def _read_rows(stage_dir: str, block_ids: list[int], columns: list[str]) -> pa.Table | None:
    tables = [storage.read_table(blk.block_path(stage_dir, b), columns=columns) for b in block_ids]
    return pa.concat_tables(tables) if tables else None


def identity_grid(table: pa.Table, identities: int, per_identity: int) -> str:
    """Rows of ``per_identity`` images for the first ``identities`` identities of ``table``."""
    ids = table.column("identity_id").to_numpy()
    chosen = np.unique(ids)[:identities]
    true_ids = pc.fill_null(table.column("true_identity_id"), -1).to_numpy()
    origin = table.column("origin").to_pylist()
    images = table.column("image")
    cells = []
    for ident in chosen:
        rows = np.flatnonzero(ids == ident)[:per_identity]
        for r in rows:
            cls = "wrong" if true_ids[r] not in (-1, ident) else ("augmented" if origin[r] == "augmented" else "")
            cells.append(f'<figure><img class="{cls}" alt="identity {ident}" src="{_data_uri(images[int(r)].as_py())}"/></figure>')
        cells.extend("<figure></figure>" for _ in range(per_identity - len(rows)))
        cells.append(f'<figure class="muted">id {int(ident)}</figure>')
    return (f'<div class="grid" id="identity-grid" style="grid-template-columns:repeat({per_identity + 1},76px)">'
            + "".join(cells) + "</div>")


def _similarity_svg(table: pa.Table | None, title: str) -> str:
    from facegen.eval.report import similarity_stats

    if table is None or table.num_rows < 2 or table.column("embedding").null_count == table.num_rows:
        return f'<p class="muted">{_e(title)}: no embeddings</p>'
    table = table.filter(pc.is_valid(table.column("embedding")))
    stats = similarity_stats(table, max_pairs=5000)
    edges = np.linspace(-1, 1, 81)
    summary = stats.summary()
    return (f"<h3>{_e(title)}</h3>" + svg_histogram(
        [("impostor pairs", np.histogram(stats.inter, edges)[0], "#2a6fdb"),
         ("genuine pairs", np.histogram(stats.intra, edges)[0], "#d2452a")], edges, label=title)
        + f'<p class="similarity-summary" data-intra-mean="{summary["intra_mean"]:.4f}" data-inter-mean="{summary["inter_mean"]:.4f}">'
        f'mean cosine: genuine {summary["intra_mean"]:.3f}, impostor {summary["inter_mean"]:.3f}; impostor pairs above '
        f'the 5th percentile of genuine ones: {100 * summary["inter_above_intra_p5"]:.1f}%</p>')


def _removed_examples(clean_dir: str, block_ids: list[int], limit: int = 24) -> tuple[str, int]:
    """Thumbnails of images that cleaning dropped, each captioned with its recorded reason (read
    from the clean blocks, block after block until ``limit`` are shown); and how many were dropped
    in the blocks read."""
    cells, count = [], 0
    for block_id in block_ids:
        rows = storage.read_table(blk.block_path(clean_dir, block_id),
                                  columns=["identity_id", "sample_idx", "image", "status", "reason", "decided_by", "true_identity_id"])
        rows = rows.filter(pc.equal(rows.column("status"), "dropped"))
        count += rows.num_rows
        for row in rows.slice(0, max(0, limit - len(cells))).to_pylist():
            truth = row["true_identity_id"]
            wrong = '<br><b class="wrong-truth">wrong identity</b>' if truth not in (None, -1, row["identity_id"]) else ""
            why = row["reason"] or row["decided_by"] or "dropped"
            image = f'<img alt="removed" src="{_data_uri(row["image"])}"/>' if row["image"] else '<img alt="no image"/>'
            cells.append(f'<figure title="{_e(why)}">{image}id {row["identity_id"]}#{row["sample_idx"]}<br>'
                         f'<span class="why">{_e(why[:60])}</span>{wrong}</figure>')
        if len(cells) >= limit:
            break
    return '<div class="grid" id="removed-grid" style="grid-template-columns:repeat(8,120px)">' + "".join(cells) + "</div>", count


def svg_lines(series: list[tuple[str, np.ndarray, np.ndarray, str]], width: int = 640, height: int = 180,
              label: str = "", y_range: tuple[float, float] | None = None) -> str:
    """Line charts (``(name, x, y, colour)``) on shared axes as an inline SVG, a dot on each point."""
    xs = np.concatenate([np.asarray(x, np.float64) for _, x, _, _ in series]) if series else np.zeros(1)
    ys = np.concatenate([np.asarray(y, np.float64) for _, _, y, _ in series]) if series else np.zeros(1)
    x_lo, x_hi = float(xs.min()), float(xs.max())
    y_lo, y_hi = y_range or (float(min(ys.min(), 0.0)), float(ys.max()))
    sx = lambda v: 40 + (float(v) - x_lo) / max(x_hi - x_lo, 1e-12) * (width - 50)  # noqa: E731
    sy = lambda v: height - 5 - (float(v) - y_lo) / max(y_hi - y_lo, 1e-12) * (height - 15)  # noqa: E731
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height + 40}" role="img" aria-label="{_e(label)}">',
             f'<line x1="40" x2="{width - 10}" y1="{height}" y2="{height}" stroke="#999"/>',
             f'<line x1="40" x2="40" y1="0" y2="{height}" stroke="#999"/>']
    for tick in np.linspace(y_lo, y_hi, 3):
        parts.append(f'<text x="36" y="{sy(tick) + 4:.1f}" font-size="10" text-anchor="end">{tick:.2f}</text>')
    for tick in np.linspace(x_lo, x_hi, 5):
        parts.append(f'<text x="{sx(tick):.1f}" y="{height + 14}" font-size="10" text-anchor="middle">{tick:.0f}</text>')
    for i, (name, x, y, colour) in enumerate(series):
        points = " ".join(f"{sx(a):.1f},{sy(b):.1f}" for a, b in zip(x, y))
        parts.append(f'<polyline class="curve" data-name="{_e(name)}" points="{points}" fill="none" stroke="{colour}" stroke-width="2"/>')
        parts += [f'<circle cx="{sx(a):.1f}" cy="{sy(b):.1f}" r="3" fill="{colour}"><title>{_e(name)} step {a:.0f}: {b:.4f}</title></circle>'
                  for a, b in zip(x, y)]
        parts.append(f'<text x="{50 + 190 * i}" y="{height + 32}" font-size="11" fill="{colour}">&#9632; {_e(name)}</text>')
    parts.append("</svg>")
    return "".join(parts)


_COLOURS = ("#d2452a", "#2a6fdb", "#5a3", "#a3a", "#e90", "#333")


def training_curves(cfg: FacegenConfig) -> str:
    """Loss, training accuracy and validation accuracy against the step, for every training run
    under ``<output_dir>/train`` that has finished (its ``result.json``)."""
    train_dir = cfg.stage_dir("train")
    charts = []
    for run in sorted(storage.list_dirs(train_dir)) if storage.exists(train_dir) else []:
        path = f"{train_dir}/{run}/result.json"
        if not storage.exists(path):
            continue
        result = storage.read_json(path)
        history = [h for h in result.get("history", []) if "step" in h]
        points = sorted(history + list(result.get("validations", [])), key=lambda h: h["step"])
        if not history:
            continue
        steps = np.array([h["step"] for h in history], np.float64)
        loss = svg_lines([("loss", steps, np.array([h["loss"] for h in history]), _COLOURS[0])], label=f"{run} loss")
        accuracy = [("train accuracy", steps, np.array([h["train_accuracy"] for h in history]), _COLOURS[1])]
        names = sorted({k for h in points for k in h if k.startswith("val/") and not k.endswith("_std") and not k.startswith("val/best")})
        for i, name in enumerate(names):
            shown = [h for h in points if name in h]
            accuracy.append((f"validation {name[4:]}", np.array([h["step"] for h in shown], np.float64),
                             np.array([h[name] for h in shown]), _COLOURS[2 + i % 4]))
        charts.append(f'<h3>{_e(run)}</h3><div class="training-curves" data-run="{_e(run)}">' + loss
                      + svg_lines(accuracy, label=f"{run} accuracy", y_range=(0.0, 1.0)) + "</div>")
    return "".join(charts) or '<p class="muted">no finished training run yet</p>'


def _verification(cfg: FacegenConfig) -> list[tuple[Any, ...]]:
    summary_path = f"{cfg.run.output_dir.rstrip('/')}/summary.json"
    if storage.exists(summary_path):
        rows = storage.read_json(summary_path).get("verification") or []
        return [(r["name"], r["pairs"], f"{100 * r['accuracy_mean']:.2f}%", f"{100 * r['accuracy_std']:.2f}") for r in rows]
    return []


def disco_directions(cfg: FacegenConfig) -> str:
    """The run's fitted DisCo directions (``facegen directions``): one row of samples along each,
    with where its labels came from (landmarks, crop pixels, an ONNX classifier, labels.csv), its
    spread, fit and check; empty when none were fitted."""
    folder = cfg.stage_dir("directions")
    if not storage.exists(f"{folder}/directions.json"):
        return ""
    summary = storage.read_json(f"{folder}/directions.json")
    rows = [(name, r.get("labels_from", "-"), f"{r['spread']:.3f}", f"{r['score']:.3f}",
             f"{r['check']['spearman']:+.2f}" if r["check"] else "-",
             " ".join(f"{m:+.3f}" for m in r["check"]["means"]) if r["check"] else "no estimator")
            for name, r in summary["directions"].items()]
    steps = ", ".join(f"{s:+.2f}" for s in summary["steps"])
    figure = f'<img alt="samples along each direction" src="{_data_uri(storage.read_bytes(f"{folder}/directions.png"))}"/>'
    return ("<h2>DisCo directions</h2>" + f'<p class="muted">{summary["detected"]} of {summary["samples"]} samples '
            f"labelled; rows: {', '.join(summary['directions'])}; columns: steps of {steps} spreads</p>" + figure
            + _table(rows, ("direction", "labels from", "spread", "fit", "check Spearman", "attribute along the steps"),
                     cls="directions"))


def build_report(cfg: FacegenConfig, identities: int = 8, per_identity: int = 8, sample_blocks: int = 2) -> str:
    """The HTML page of the dataset of ``cfg`` (whatever stages have run so far)."""
    raw_dir, clean_dir, shards_dir = cfg.stage_dir("raw"), cfg.stage_dir("clean"), cfg.stage_dir("shards")
    raw_stats, clean_stats = blk.read_stats(raw_dir), blk.read_stats(clean_dir)
    if not raw_stats and not clean_stats:
        raise FileNotFoundError(f"{cfg.run.output_dir}: no finished blocks to report on (run `facegen generate` first)")
    from facegen.stages.clean import CLEAN_COUNTERS
    from facegen.stages.generate import GENERATE_COUNTERS

    raw_totals, clean_totals = blk.sum_stats(raw_stats, GENERATE_COUNTERS), blk.sum_stats(clean_stats, CLEAN_COUNTERS)
    sections = [f"<h1>facegen dataset: {_e(cfg.run.name)}</h1>",
                f'<p class="muted">{_e(cfg.run.output_dir)} &middot; settings digest {_e(cfg.digest())} &middot; '
                f'<span id="render-check">images not checked</span></p>']
    sections.append("<h2>Totals</h2>" + _table([("raw blocks", len(raw_stats)), ("clean blocks", len(clean_stats))]
                                                + [(f"generated: {k}", v) for k, v in raw_totals.items()]
                                                + [(f"cleaning: {k}", v) for k, v in clean_totals.items()], cls="totals"))
    sections.append(disco_directions(cfg))
    source_dir, source_ids = (clean_dir, [int(r["block_id"]) for r in clean_stats]) if clean_stats else (raw_dir, [int(r["block_id"]) for r in raw_stats])
    grid_rows = _read_rows(source_dir, source_ids[:1], ["identity_id", "sample_idx", "image", "true_identity_id", "origin", "status"])
    grid_rows = grid_rows.filter(pc.equal(grid_rows.column("status"), "ok"))
    sections.append(f"<h2>Identity grid</h2><p class=\"muted\">from {_e(source_dir)}; red frame = another identity "
                    "(ground truth), orange = augmented by top-up</p>" + identity_grid(grid_rows, identities, per_identity))

    sample_ids = [int(r["block_id"]) for r in raw_stats][:sample_blocks]
    columns = ["identity_id", "embedding", "status"]
    ok = lambda t: None if t is None else t.filter(pc.equal(t.column("status"), "ok"))  # noqa: E731
    sections.append("<h2>Similarity histograms</h2>" + _similarity_svg(ok(_read_rows(raw_dir, sample_ids, columns)), "raw blocks")
                    + _similarity_svg(ok(_read_rows(clean_dir, [b for b in sample_ids if b in source_ids and clean_stats], columns)),
                                      "clean blocks"))

    errors: dict[str, int] = {}
    for record in raw_stats:
        for kind, n in (record.get("error_reasons") or {}).items():
            errors[kind] = errors.get(kind, 0) + int(n)
    sections.append("<h2>Generation errors by kind</h2>" + (_table(sorted(errors.items(), key=lambda kv: -kv[1]), ("kind", "images"))
                                                            if errors else '<p class="muted">none</p>'))
    if clean_stats:
        reasons = [("outliers removed by the consistency expert", clean_totals["images_removed"]),
                   ("kept images dropped with their identity (fewer than clean.min_images)", clean_totals["images_dropped_with_identity"]),
                   ("trimmed to clean.target_images", clean_totals["images_trimmed"]),
                   ("identities dropped", clean_totals["identities_dropped"]),
                   ("injected wrong-identity images removed",
                    f"{clean_totals['injected_wrong_removed']} of {clean_totals['injected_wrong_in']}")]
        for record in clean_stats:
            for why, n in (record.get("removed_by") or {}).items():
                reasons.append((f"removed by {why}", n))
        examples, count = _removed_examples(clean_dir, source_ids)
        sections.append("<h2>What cleaning removed, and why</h2>" + _table(reasons, ("what", "images"), cls="removed")
                        + f'<p class="muted">examples with the reason each was dropped ({count} dropped in the blocks '
                        'shown; red = another identity by ground truth):</p>' + examples)

    if storage.exists(f"{shards_dir}/manifest.json"):
        manifest = storage.read_json(f"{shards_dir}/manifest.json")
        counts = np.zeros(40, np.int64)
        edges = np.linspace(0.0, 2.0, 41)
        for record in clean_stats:
            hist = record.get("difficulty_histogram") or {}
            if len(hist.get("counts", [])) == 40:
                counts += np.asarray(hist["counts"], np.int64)
        top = float(max(manifest["bucket_edges"][-1], 1e-3))
        span = edges <= min(2.0, top + 0.05) + 1e-9
        shown_edges = edges[span] if span.sum() > 2 else edges
        sections.append("<h2>Difficulty distribution</h2>" + svg_histogram(
            [("samples (1 - cos to identity centre)", counts[: len(shown_edges) - 1], "#5a3")], shown_edges,
            markers=manifest["bucket_edges"][1:-1], label="difficulty")
            + _table([(_bucket_name(manifest, b), sum(s["rows"] for s in manifest["shards"] if s["bucket"] == b))
                      for b in _buckets(manifest)], ("curriculum bucket", "rows"), cls="buckets"))
    sections.append("<h2>Training</h2>" + training_curves(cfg))
    verification = _verification(cfg)
    sections.append("<h2>Verification</h2>" + (_table(verification, ("set", "pairs", "accuracy", "std"), cls="verification")
                                               if verification else '<p class="muted">no verification results yet</p>'))
    return (f"<!doctype html><html><head><meta charset=\"utf-8\"><title>facegen report: {_e(cfg.run.name)}</title>"
            f"<style>{_STYLE}</style></head><body>{''.join(sections)}<script>{_CHECK}</script></body></html>")


def write_report(cfg: FacegenConfig, path: str | None = None) -> str:
    """Write :func:`build_report` to ``path`` (default ``<run.output_dir>/report.html``); returns it."""
    path = path or f"{cfg.run.output_dir.rstrip('/')}/{REPORT_FILE}"
    storage.write_bytes_atomic(build_report(cfg).encode(), path)
    return path

