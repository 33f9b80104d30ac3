"""What generation reads of the identities stage's output (:mod:`facegen.stages.identities`): which
identity block feeds each raw block, checked before any block is made, and the identity rows with
their sampled latents or features."""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import numpy as np

from facegen import blocks as blk
from facegen import storage
from facegen.config import FacegenConfig
from facegen.schema import latents_from_table
from facegen.stages.identities import SAMPLER_JSON


def identity_block_inputs(cfg: FacegenConfig, planned: list[blk.Block]) -> tuple[Callable[[blk.Block], dict[str, Any]], str] | None:
    """For a GAN backend after a sampler run, or a feature-conditioned hybrid backend: each raw
    block's work-row input (its identity block's path) and the digest of all identity blocks the raw
    blocks derive from; None when generation draws its own gaussian latents (no sampler run), or
    takes nothing from the identities stage.

    Checked here, before any block is made: a sampler that has not run (other than a GAN's
    gaussian), identities of the other space (features for a GAN, latents for a hybrid backend),
    missing identity blocks, or blocks of another block size are one-line errors."""
    wanted = cfg.generator.identity_space()
    if wanted is None:
        return None
    out = cfg.stage_dir("identities")
    if not storage.exists(f"{out}/{SAMPLER_JSON}"):
        if cfg.identities.sampler.kind != "gaussian" or wanted == "feature":
            raise FileNotFoundError(f"{out}/{SAMPLER_JSON}: identities.sampler.kind is {cfg.identities.sampler.kind} but "
                                    "the sampler has not run; run facegen identities with this config first")
        return None
    made = storage.read_json(f"{out}/{SAMPLER_JSON}").get("space", "latent")
    if made != wanted:
        reader = f"generator.backend {cfg.generator.backend}" + (" (reference.backend identities)" if wanted == "feature" else "")
        raise ValueError(f"{out}/{SAMPLER_JSON}: holds identity {made}s, but {reader} reads identity {wanted}s; "
                         "rerun facegen identities with this config")
    shas = []
    for b in planned:
        if not blk.is_done(out, b.block_id):
            raise FileNotFoundError(f"{blk.block_path(out, b.block_id)}: identity block missing; run facegen identities "
                                    "with this config first")
        record = storage.read_json(blk.stats_path(out, b.block_id))
        if record.get("identities") != b.num_identities:
            raise ValueError(f"{blk.block_path(out, b.block_id)}: holds {record.get('identities')} identities, generation "
                             f"expects {b.num_identities}; rerun facegen identities with --set run.overwrite=true")
        shas.append(record["sha256"])
    digest = hashlib.sha256("".join(shas).encode()).hexdigest()[:16]
    return (lambda b: {"identity_block": blk.block_path(out, b.block_id)}), digest


def with_latents(source: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]], identity_block: str):
    """``source`` fed identity rows that also carry each identity's sampled ``latent`` (read from
    ``identity_block`` once)."""
    table = storage.read_table(identity_block)
    index = {int(i): row for row, i in enumerate(table.column("identity_id").to_numpy())}
    latents = latents_from_table(table)

    def call(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids = np.asarray(batch["identity_id"], np.int64)
        missing = [int(i) for i in ids if int(i) not in index]
        if missing:
            raise ValueError(f"{identity_block}: no latent for identities {missing[:5]}")
        return source({**batch, "latent": latents[[index[int(i)] for i in ids]]})

    return call


def read_latents(cfg: FacegenConfig) -> tuple[np.ndarray, np.ndarray]:
    """All identity ids and latents written by the stage (for inspection and tests)."""
    out = cfg.stage_dir("identities")
    ids, latents = [], []
    for block_id in blk.done_block_ids(out):
        table = storage.read_table(blk.block_path(out, block_id))
        ids.append(table.column("identity_id").to_numpy())
        latents.append(latents_from_table(table))
    if not ids:
        raise FileNotFoundError(f"{out}: no identity blocks")
    return np.concatenate(ids), np.concatenate(latents)
