"""Generation stage: identity seeds -> generator pool -> face pool -> one raw Parquet file per block.

The Ray Data DAG is ``range -> map_batches(Generator, actor pool) -> map_batches(FaceStage, actor
pool)``; the driver streams results in order and commits each block (data file, then stats
record) as soon as all its rows have arrived. Only blocks without a done-marker are planned, so a
re-run after a crash continues exactly where the last committed block ended.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from typing import Any

import numpy as np
import pyarrow as pa

from facegen import blocks as blk
from facegen import storage
from facegen.config import FacegenConfig
from facegen.schema import STATUS_OK, batch_embedding_dim, sample_schema, table_from_batch
from facegen.stages import StageReport


def reason_kind(reason: str | None) -> str:
    """An error reason without the sample it names and its details: what the stats count."""
    text = re.sub(r"^faces: identity \d+ sample \d+: ", "", reason or "")
    text = re.sub(r"^identity_id=\d+ sample_idx=\d+: ", "", text)
    return text.split(" (")[0][:120]


class BlockWriter:
    """Collects streamed SAMPLE batches and commits each block once all of its rows arrived.

    A block expects ``num_identities * images_per_identity`` rows, or ``expected_rows[block_id]``
    when given (an ingested folder has its own count per identity). ``embedder`` (the embedder's
    record, see :mod:`facegen.faces.embed`) goes into every block's stats.
    """

    def __init__(
        self, stage_dir: str, pending: list[blk.Block], images_per_identity: int,
        expected_rows: dict[int, int] | None = None, embedder: dict[str, Any] | None = None,
    ):
        self.stage_dir = stage_dir
        self.expected = expected_rows or {b.block_id: b.num_identities * images_per_identity for b in pending}
        self.embedder = embedder
        self.identities = {b.block_id: b.num_identities for b in pending}
        self.parts: dict[int, list[pa.Table]] = {b.block_id: [] for b in pending}
        self.received: Counter[int] = Counter()
        self.started = time.time()
        self.written: list[dict[str, Any]] = []

    def add(self, batch: dict[str, np.ndarray]) -> int:
        """Add one batch; returns the number of rows it held."""
        table = table_from_batch(batch, sample_schema(batch_embedding_dim(batch)))
        block_ids = table.column("block_id").to_numpy()
        for block_id in np.unique(block_ids):
            block_id = int(block_id)
            if block_id not in self.parts:
                raise RuntimeError(f"block {block_id}: rows arrived for a block that was not planned")
            part = table.filter(pa.array(block_ids == block_id))
            self.parts[block_id].append(part)
            self.received[block_id] += part.num_rows
            if self.received[block_id] > self.expected[block_id]:
                raise RuntimeError(f"block {block_id}: more rows than planned ({self.received[block_id]})")
            if self.received[block_id] == self.expected[block_id]:
                self._commit(block_id)
        return table.num_rows

    def _commit(self, block_id: int) -> None:
        table = pa.concat_tables(self.parts.pop(block_id)).sort_by([("identity_id", "ascending"), ("sample_idx", "ascending")])
        status = table.column("status").to_pylist()
        reasons = Counter(reason_kind(r) for s, r in zip(status, table.column("reason").to_pylist()) if s != STATUS_OK)
        true_ids = table.column("true_identity_id").to_numpy()
        ids = table.column("identity_id").to_numpy()
        stats = {
            "identities": self.identities[block_id],
            "images": table.num_rows,
            "images_ok": sum(s == STATUS_OK for s in status),
            "images_error": sum(s != STATUS_OK for s in status),
            "injected_wrong": int(((true_ids >= 0) & (true_ids != ids)).sum()),
            "error_reasons": dict(reasons.most_common(5)),
            "embedder": self.embedder,
            "seconds_since_start": round(time.time() - self.started, 2),
        }
        self.written.append(blk.commit_block(self.stage_dir, block_id, table, stats))

    def unfinished(self) -> dict[int, tuple[int, int]]:
        """Blocks still missing rows: ``{block_id: (received, expected)}``."""
        return {b: (self.received[b], self.expected[b]) for b in self.parts}


def map_with_actor_pool(ds, stage_class: type, constructor_kwargs: dict[str, Any], pool: Any):
    """``ds.map_batches(stage_class)`` on an actor pool sized and placed by ``pool`` settings
    (``batch_size``, ``concurrency``, ``num_gpus``, ``num_cpus``, ``resources``)."""
    from ray.data import ActorPoolStrategy

    return ds.map_batches(
        stage_class,
        fn_constructor_kwargs=constructor_kwargs,
        batch_size=pool.batch_size,
        batch_format="numpy",
        compute=ActorPoolStrategy(size=pool.concurrency),
        num_gpus=pool.num_gpus,
        num_cpus=pool.num_cpus,
        resources=pool.resources or None,
    )


def build_sample_dataset(cfg: FacegenConfig, pending: list[blk.Block]):
    """The lazy Ray Dataset of SAMPLE rows for ``pending`` blocks (not executed here)."""
    from facegen.faces.stage import FaceStage
    from facegen.generators import generator_class
    from facegen.identities.seeds import identity_dataset
    from facegen.stages.identities import identity_latent_dataset

    ds = identity_latent_dataset(cfg, pending)  # the identities stage's latents, when it ran
    if ds is None:
        ds = identity_dataset(pending, cfg.identities.block_size)
    ds = map_with_actor_pool(ds, generator_class(cfg.generator.backend), {"settings": cfg.generator, "seed": cfg.run.seed}, cfg.generator)
    return map_with_actor_pool(ds, FaceStage, {"settings": cfg.faces}, cfg.faces)


def run_generate(cfg: FacegenConfig, output_dir: str | None = None, progress: bool = True) -> StageReport:
    """Generate every block of ``cfg.identities`` that is not done yet into ``output_dir``."""
    import ray
    from tqdm.auto import tqdm

    out = output_dir or cfg.stage_dir("raw")
    started = time.time()
    planned = blk.plan_blocks(cfg.identities)
    storage.remove_temp_files(out)
    if cfg.run.overwrite:
        blk.reset_blocks(out, [b.block_id for b in planned])
    pending = [b for b in planned if not blk.is_done(out, b.block_id)]
    report = StageReport("generate", out, len(planned), len(planned) - len(pending), 0, 0.0)
    if pending:
        from facegen.faces.embed import describe_embedder

        per_id = cfg.generator.images_per_identity
        writer = BlockWriter(out, pending, per_id, embedder=describe_embedder(cfg.faces.embedder))
        ds = build_sample_dataset(cfg, pending)
        context = ray.data.DataContext.get_current()
        keep_order, context.execution_options.preserve_order = context.execution_options.preserve_order, True
        total = sum(b.num_identities for b in pending) * per_id
        bar = tqdm(total=total, unit="img", desc=f"generate ({len(pending)} blocks)", disable=not progress)
        try:
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                bar.update(writer.add(batch))
        finally:
            context.execution_options.preserve_order = keep_order
            bar.close()
        missing = writer.unfinished()
        if missing:
            raise RuntimeError(f"generate: blocks ended incomplete {missing} (received, expected)")
        report.blocks_written = len(writer.written)
    records = blk.read_stats(out)
    report.totals = blk.sum_stats(records, ["identities", "images", "images_ok", "images_error", "injected_wrong"])
    report.seconds = round(time.time() - started, 2)
    return report
