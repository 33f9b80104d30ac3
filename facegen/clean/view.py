"""What every cleaning expert reads: one block of SAMPLE rows, grouped by identity."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from facegen.images import decode_image
from facegen.schema import SAMPLE_NAMES, STATUS_OK, batch_from_table, embedding_dim, sample_schema
from facegen.vectors import l2_normalize


@dataclass
class BlockView:
    """``identity``/``sample_idx``: per row; ``usable``: status ok with a finite, non-zero embedding;
    ``unit``: L2-normalised embeddings (float64, zero rows where not usable); ``groups``: identity ->
    its usable rows in sample order; ``true_identity``: ground truth where the generator knew it (-1)."""

    table: pa.Table
    identity: np.ndarray
    sample_idx: np.ndarray
    status_ok: np.ndarray
    usable: np.ndarray
    unit: np.ndarray
    true_identity: np.ndarray
    groups: dict[int, np.ndarray]

    @property
    def num_rows(self) -> int:
        """Rows in the block."""
        return len(self.identity)

    def image(self, row: int) -> np.ndarray | None:
        """The decoded RGB image of a row, or None when it cannot be decoded."""
        try:
            return decode_image(self.table.column("image")[int(row)].as_py())
        except ValueError:
            return None

    def image_bytes(self, row: int) -> bytes:
        """The stored (encoded) image of a row."""
        return self.table.column("image")[int(row)].as_py() or b""


def block_view(table: pa.Table) -> BlockView:
    """Validate a SAMPLE table and group its usable rows by identity (rows stay in file order)."""
    missing = [name for name in SAMPLE_NAMES if name not in table.column_names]
    if missing:
        raise ValueError(f"clean: table lacks SAMPLE columns {missing}")
    table = table.select(list(SAMPLE_NAMES)).cast(sample_schema(embedding_dim(table.schema)))
    cols = batch_from_table(table.select(["identity_id", "sample_idx", "status", "embedding"]))
    identity = cols["identity_id"].astype(np.int64)
    sample_idx = cols["sample_idx"].astype(np.int64)
    emb = cols["embedding"].astype(np.float64)
    status_ok = cols["status"] == STATUS_OK
    finite = np.isfinite(emb).all(axis=1) & (np.linalg.norm(np.nan_to_num(emb), axis=1) > 0)
    usable = status_ok & finite
    unit = l2_normalize(np.where(finite[:, None], emb, 0.0))
    true_identity = pc.fill_null(table.column("true_identity_id"), -1).to_numpy().astype(np.int64)
    groups = {}
    for ident in np.unique(identity):
        rows = np.flatnonzero((identity == ident) & usable)
        groups[int(ident)] = rows[np.lexsort((rows, sample_idx[rows]))]
    return BlockView(table, identity, sample_idx, status_ok, usable, unit, true_identity, groups)
