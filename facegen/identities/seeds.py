"""The deterministic identity seed stream: ``ray.data.range`` split into blocks of consecutive ids.

Rows are ``{identity_id: int64, block_id: int64}``. Every later random draw derives from
``(run.seed, identity_id)``, so the same ids give the same dataset on any cluster size.
"""

from __future__ import annotations

import numpy as np

from facegen.blocks import Block


def identity_rng(seed: int, identity_id: int, *tags: int) -> np.random.Generator:
    """The random generator of one identity (``tags`` separate independent uses)."""
    return np.random.default_rng([int(seed), int(identity_id), *map(int, tags)])


class _OffsetToBlocks:
    """``range`` row index -> identity row of the pending blocks (kept picklable for Ray)."""

    def __init__(self, blocks: list[Block], block_size: int):
        self.starts = np.array([b.first_id for b in blocks], np.int64)
        self.counts = np.array([b.num_identities for b in blocks], np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.counts)])
        self.block_size = block_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        index = batch["id"].astype(np.int64)
        which = np.searchsorted(self.offsets, index, side="right") - 1
        identity_id = self.starts[which] + (index - self.offsets[which])
        return {"identity_id": identity_id, "block_id": identity_id // self.block_size}


def identity_dataset(blocks: list[Block], block_size: int, rows_per_read_block: int | None = None):
    """A Ray Dataset of the identities of ``blocks`` in ascending id order."""
    import ray

    total = int(sum(b.num_identities for b in blocks))
    if total == 0:
        raise ValueError("identity_dataset: no identities to generate")
    parallelism = max(1, min(len(blocks), 200))
    if rows_per_read_block:
        parallelism = max(1, total // rows_per_read_block)
    ds = ray.data.range(total, override_num_blocks=parallelism)
    return ds.map_batches(_OffsetToBlocks(blocks, block_size), batch_format="numpy", batch_size=None)
