"""Looking at a dataset: identity grids and intra/inter-identity similarity histograms.

Used by ``notebooks/explore_dataset.ipynb`` and reports; works on any stage directory of block
files (raw or clean) with the SAMPLE schema.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from facegen import blocks as blk
from facegen import storage
from facegen.images import decode_image
from facegen.vectors import l2_normalize


def load_samples(stage_dir: str, columns: list[str] | None = None, max_blocks: int | None = None) -> pa.Table:
    """The ok rows of the finished blocks of ``stage_dir`` (optionally only some columns)."""
    block_ids = blk.done_block_ids(stage_dir)[:max_blocks]
    if not block_ids:
        raise FileNotFoundError(f"{stage_dir}: no finished blocks")
    wanted = None if columns is None else sorted(set(columns) | {"status"})
    tables = [storage.read_table(blk.block_path(stage_dir, b), columns=wanted) for b in block_ids]
    table = pa.concat_tables(tables)
    return table.filter(pc.equal(table.column("status"), "ok"))


@dataclass
class SimilarityStats:
    """Cosine similarities of genuine (same identity) and impostor (different identity) pairs."""

    intra: np.ndarray
    inter: np.ndarray

    def summary(self) -> dict[str, float]:
        """Means, and the fraction of impostor pairs above the 5th percentile of genuine ones."""
        low = float(np.percentile(self.intra, 5)) if self.intra.size else float("nan")
        return {
            "intra_mean": float(self.intra.mean()) if self.intra.size else float("nan"),
            "inter_mean": float(self.inter.mean()) if self.inter.size else float("nan"),
            "intra_p5": low,
            "inter_above_intra_p5": float((self.inter > low).mean()) if self.inter.size else float("nan"),
        }


def similarity_stats(table: pa.Table, max_pairs: int = 20000, seed: int = 0) -> SimilarityStats:
    """Sample genuine and impostor pairs (equal numbers at most ``max_pairs``) and their cosines."""
    embeddings = np.asarray(table.column("embedding").to_pylist(), np.float32)
    if embeddings.ndim != 2 or len(embeddings) < 2:
        raise ValueError("similarity_stats: needs at least two rows with embeddings")
    embeddings = l2_normalize(embeddings)
    ids = table.column("identity_id").to_numpy()
    rng = np.random.default_rng(seed)
    a, b = rng.integers(0, len(ids), (2, max_pairs * 4))
    inter = (a != b) & (ids[a] != ids[b])
    order = np.argsort(ids, kind="stable")
    sorted_ids = ids[order]
    starts = np.searchsorted(sorted_ids, ids[a], side="left")
    counts = np.searchsorted(sorted_ids, ids[a], side="right") - starts
    partner = order[starts + (rng.random(len(a)) * counts).astype(np.int64)]
    intra = partner != a
    cos = lambda i, j: np.einsum("nd,nd->n", embeddings[i], embeddings[j])  # noqa: E731
    return SimilarityStats(intra=cos(a[intra][:max_pairs], partner[intra][:max_pairs]), inter=cos(a[inter][:max_pairs], b[inter][:max_pairs]))


def plot_similarity_histograms(stats: SimilarityStats, title: str = "cosine similarity"):
    """Overlaid histograms of genuine and impostor similarities; returns the matplotlib figure."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    bins = np.linspace(-1, 1, 81)
    ax.hist(stats.inter, bins=bins, alpha=0.6, density=True, label=f"inter-identity (n={stats.inter.size})")
    ax.hist(stats.intra, bins=bins, alpha=0.6, density=True, label=f"intra-identity (n={stats.intra.size})")
    ax.set_xlabel("cosine similarity")
    ax.set_ylabel("density")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    return fig


def plot_identity_grid(table: pa.Table, identities: int = 8, per_identity: int = 8, seed: int = 0):
    """One row per identity (random ``identities``), ``per_identity`` images each; augmented images
    are framed in orange and samples whose ground truth is another identity in red."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    ids = table.column("identity_id").to_numpy()
    unique = np.unique(ids)
    chosen = np.sort(np.random.default_rng(seed).choice(unique, min(identities, len(unique)), replace=False))
    has_truth = "true_identity_id" in table.column_names
    origin = table.column("origin").to_pylist() if "origin" in table.column_names else None
    fig, axes = plt.subplots(len(chosen), per_identity, figsize=(per_identity * 1.1, len(chosen) * 1.2), squeeze=False)
    for r, ident in enumerate(chosen):
        rows = np.flatnonzero(ids == ident)[:per_identity]
        for c in range(per_identity):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c >= len(rows):
                ax.axis("off")
                continue
            row = int(rows[c])
            ax.imshow(decode_image(table.column("image")[row].as_py()))
            colour = None
            if has_truth and table.column("true_identity_id")[row].as_py() not in (None, -1, int(ident)):
                colour = "red"
            elif origin is not None and origin[row] == "augmented":
                colour = "orange"
            if colour:
                for spine in ax.spines.values():
                    spine.set_edgecolor(colour)
                    spine.set_linewidth(2.5)
        axes[r, 0].set_ylabel(str(ident), fontsize=7)
    fig.suptitle("identities (rows); red = wrong identity, orange = augmented", fontsize=9)
    fig.tight_layout()
    return fig
