"""``leakage.html``: the similarity histogram and the nearest synthetic/real pairs side by side.

One self-contained HTML file (images inline as data URLs): a histogram of each synthetic
identity's best cosine to any reference with the threshold marked, then the nearest pairs, each
with the synthetic identity's image and the reference image where the references carry images.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Callable

import numpy as np

from facegen import storage
from facegen.clean.leakage import HISTOGRAM_BINS, LeakageResult, ReferenceSet


def _histogram_png(result: LeakageResult) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    edges = np.linspace(-1.0, 1.0, HISTOGRAM_BINS + 1)
    fig, ax = plt.subplots(figsize=(7, 3.2), dpi=90)
    ax.bar(edges[:-1], result.histogram, width=edges[1] - edges[0], align="edge", color="#4477aa")
    ax.axvline(result.threshold, color="#cc3311", linestyle="--", label=f"threshold {result.threshold:.3f}")
    ax.set_yscale("symlog")
    ax.set_xlabel("best cosine to any reference")
    ax.set_ylabel("synthetic identities")
    ax.legend(loc="upper left")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def _img_tag(data: bytes | None, alt: str) -> str:
    if not data:
        return f"<div class='none'>{html.escape(alt)}</div>"
    mime = "image/png" if data.startswith(b"\x89PNG") else "image/jpeg"
    return f"<img alt='{html.escape(alt)}' src='data:{mime};base64,{base64.b64encode(data).decode()}'>"


def write_leakage_report(result: LeakageResult, path: str, references: ReferenceSet,
                         synthetic_image: Callable[[int], bytes | None], query_label: str = "identity") -> None:
    """Write ``leakage.html`` atomically to ``path``."""
    leaked = int(np.unique(result.pairs.column("query_id").to_numpy()).size) if result.pairs.num_rows else 0
    rows = []
    for cosine, query, ref in result.nearest:
        label, ref_image = references.describe(ref)
        flag = "leaked" if cosine >= result.threshold else ""
        rows.append(
            f"<tr class='{flag}'><td>{cosine:.4f}</td><td>{query_label} {query}<br>{_img_tag(synthetic_image(query), 'no image')}</td>"
            f"<td>{html.escape(label)}<br>{_img_tag(ref_image, 'no reference image')}</td><td>{flag}</td></tr>"
        )
    how = ", ".join(f"{k}: {v}" for k, v in result.calibration.items())
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>facegen leakage audit</title>
<style>body{{font-family:sans-serif;margin:1.5em}} td{{padding:4px 10px;vertical-align:top}} img{{width:112px}}
tr.leaked{{background:#fdd}} .none{{width:112px;height:112px;background:#eee;font-size:11px}}</style></head><body>
<h1>Identity leakage audit</h1>
<p>{int(result.histogram.sum())} synthetic {query_label}s searched against {references.total} reference embeddings;
threshold {result.threshold:.4f} ({html.escape(how)}); <b>{leaked}</b> {query_label}s at or above it (removed).</p>
{_img_tag(_histogram_png(result), 'histogram')}
<h2>Nearest pairs</h2><table><tr><th>cosine</th><th>synthetic</th><th>reference</th><th></th></tr>{''.join(rows)}</table>
</body></html>"""
    storage.write_bytes_atomic(page.encode(), path)
