"""The final pass of one block: global decisions applied, minimum size, semi-hard trim, top-up.

Input: the block's CLEAN rows from the expert pass, the identities the global steps removed
(dedup, leakage) and the rows merged in from duplicates in other blocks. Per identity (ALGORITHMS.md
1.4 and 3): fewer than ``min_images`` kept rows drops it; more than ``target_images`` are trimmed by
:mod:`facegen.clean.selection`; fewer are topped up with augmentations of the kept images. Every
kept row gets ``difficulty = 1 - cos(embedding, identity centre)``, the centre being the
renormalised mean of the identity's kept (non-augmented) embeddings.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from facegen.clean.augment import top_up
from facegen.clean.selection import band_summary, select
from facegen.config import CleanSettings
from facegen.curriculum import identity_centre
from facegen.images import decode_image, encode_image
from facegen.schema import CLEAN_NAMES, STATUS_DROPPED, STATUS_OK, batch_from_table, clean_schema, embedding_dim, rows_to_batch, table_from_batch
from facegen.vectors import l2_normalize

EmbedFn = Callable[[np.ndarray], np.ndarray]

AUGMENT_STREAM = 0xA06  # third word of the per-identity augmentation seed: [seed, identity_id, 0xA06]
EMBED_CHUNK = 256  # augmented images per embed_fn call (bounds memory on large blocks)
_PNG_MAGIC = b"\x89PNG"


def image_format(data: bytes) -> str:
    """``"png"`` for PNG bytes, ``"jpeg"`` otherwise (what augmented copies are written as)."""
    return "png" if data.startswith(_PNG_MAGIC) else "jpeg"


def _try_decode(data: bytes | None) -> np.ndarray | None:
    try:
        return decode_image(data)
    except ValueError:
        return None


def _embed(images: list[np.ndarray], embed_fn: EmbedFn, dim: int) -> np.ndarray:
    """Embed in chunks; returns L2-normalised float32 ``[N, dim]`` (non-finite rows stay NaN)."""
    out = []
    for start in range(0, len(images), EMBED_CHUNK):
        chunk = np.stack(images[start : start + EMBED_CHUNK])
        emb = np.asarray(embed_fn(chunk), dtype=np.float32)
        if emb.shape != (len(chunk), dim):
            raise ValueError(f"embed_fn returned shape {emb.shape} for {len(chunk)} images, expected ({len(chunk)}, {dim}): the block was embedded by another embedder")
        out.append(emb)
    return l2_normalize(np.concatenate(out))


def _top_up_identity(table: pa.Table, kept: np.ndarray, first_idx: int, needed: int, rng: np.random.Generator,
                     settings: CleanSettings, jpeg_quality: int) -> tuple[list[dict[str, Any]], int]:
    """``needed`` augmented rows of one identity copied from their source rows (embedding, difficulty
    and meta are set later; ``_source_row`` names the source), and the number of undecodable kept images."""
    sources, source_rows = [], []
    for r in kept:
        img = _try_decode(table.column("image")[int(r)].as_py())
        if img is not None:
            sources.append(img)
            source_rows.append(int(r))
    if not sources:
        return [], len(kept)
    rows = []
    for k, (src, img) in enumerate(top_up(sources, len(sources) + needed, rng, settings.augment)):
        source = table.slice(source_rows[src], 1).to_pylist()[0]
        true_id = source["true_identity_id"]
        rows.append({
            **source, "sample_idx": first_idx + k,
            "image": encode_image(img, image_format(source["image"]), jpeg_quality),
            "true_identity_id": -1 if true_id is None else true_id, "quality": np.float32(np.nan),
            "status": STATUS_OK, "reason": "", "origin": "augmented", "votes": [], "decided_by": "top-up",
            "_source_row": source_rows[src],
        })
    return rows, len(kept) - len(sources)


def finish_block(
    table: pa.Table,
    settings: CleanSettings,
    seed: int,
    embed_fn: EmbedFn | None = None,
    *,
    removed: dict[int, tuple[str, str]] | None = None,
    merged_in: pa.Table | None = None,
    jpeg_quality: int = 95,
) -> tuple[pa.Table, dict[str, Any]]:
    """Finish one block of CLEAN rows; returns the final CLEAN table and a JSON-ready stats dict.

    ``removed``: identity -> (step, reason) for identities the global steps take out (their kept
    rows become ``dropped``); identities absent from ``table`` are ignored. ``merged_in``: CLEAN rows
    of duplicates merged into this block's identities (already relabelled). Augmented rows get
    ``origin="augmented"``, ``sample_idx`` after the identity's largest one, the source's
    ``seed``/``source``/``true_identity_id``, ``quality`` NaN, the source image's format and ``meta``
    ``{"augmented_from": <source sample_idx>, "embedding": "embedder" | "copied_from_source"}``; their
    embedding comes from ``embed_fn`` or, without one, is the source's. Augmentation for an identity
    draws from ``np.random.default_rng([seed, identity_id, 0xA06])``. Sorted by (identity_id, sample_idx).
    """
    from facegen.clean.thresholds import resolve_clean_settings

    if seed < 0:
        raise ValueError(f"clean: seed must be >= 0 (it seeds numpy's SeedSequence), got {seed}")
    settings = resolve_clean_settings(settings)
    dim = embedding_dim(table.schema)
    schema = clean_schema(dim)
    table = table.select(list(CLEAN_NAMES)).cast(schema)
    if merged_in is not None and merged_in.num_rows:
        table = pa.concat_tables([table, merged_in.select(list(CLEAN_NAMES)).cast(schema)])
    table = table.sort_by([("identity_id", "ascending"), ("sample_idx", "ascending")])
    cols = batch_from_table(table.select(["identity_id", "sample_idx", "status", "embedding", "origin"]))
    ids, sample_idx = cols["identity_id"].astype(np.int64), cols["sample_idx"].astype(np.int64)
    unit = l2_normalize(np.nan_to_num(cols["embedding"].astype(np.float64)))
    status = cols["status"].astype(object).copy()
    reason = np.array(table.column("reason").to_pylist(), dtype=object)
    decided_by = np.array(table.column("decided_by").to_pylist(), dtype=object)
    removed = removed or {}

    stats: dict[str, Any] = {"identities_kept": 0, "identities_dropped": 0, "identities_removed_dedup": 0,
                             "identities_removed_leakage": 0, "images_dropped_with_identity": 0,
                             "images_removed_global": 0, "images_trimmed": 0, "augment_sources_unreadable": 0}
    centres: dict[int, np.ndarray] = {}
    augmented: list[dict[str, Any]] = []
    dropped_ids: list[int] = []
    before, after = [], []
    for identity in np.unique(ids):
        identity = int(identity)
        rows = np.flatnonzero(ids == identity)
        kept = rows[status[rows] == STATUS_OK]
        if identity in removed:
            step, why = removed[identity]
            status[kept], reason[kept], decided_by[kept] = STATUS_DROPPED, why, step
            stats[f"identities_removed_{step}"] = stats.get(f"identities_removed_{step}", 0) + 1
            stats["images_removed_global"] += len(kept)
            continue
        if len(kept) < settings.min_images:
            status[kept], decided_by[kept] = STATUS_DROPPED, "min_images"
            reason[kept] = f"identity kept {len(kept)} < min_images {settings.min_images}"
            stats["identities_dropped"] += 1
            stats["images_dropped_with_identity"] += len(kept)
            dropped_ids.append(identity)
            continue
        stats["identities_kept"] += 1
        cos = unit[kept] @ identity_centre(unit[kept])
        before.append(cos)
        if len(kept) > settings.target_images:
            chosen = select(cos, sample_idx[kept], settings.target_images, settings.selection)
            trimmed = kept[~chosen]
            status[trimmed], decided_by[trimmed] = STATUS_DROPPED, "selection"
            reason[trimmed] = f"trimmed to target_images {settings.target_images} ({settings.selection.mode} selection)"
            stats["images_trimmed"] += len(trimmed)
            kept, cos = kept[chosen], cos[chosen]
        after.append(cos)
        centres[identity] = identity_centre(unit[kept])
        needed = settings.target_images - len(kept)
        if needed > 0:
            rng = np.random.default_rng([seed, identity, AUGMENT_STREAM])
            new_rows, unreadable = _top_up_identity(table, kept, int(sample_idx[rows].max()) + 1, needed, rng, settings, jpeg_quality)
            stats["augment_sources_unreadable"] += unreadable
            augmented.extend(new_rows)

    ok = status == STATUS_OK
    difficulty = np.full(len(ids), np.nan, np.float32)
    for r in np.flatnonzero(ok):
        difficulty[r] = 1.0 - unit[r] @ centres[int(ids[r])]
    out = table
    for name, values, kind in (("status", status, pa.string()), ("reason", reason, pa.string()),
                               ("decided_by", decided_by, pa.string()), ("difficulty", difficulty, pa.float32())):
        out = out.set_column(out.schema.get_field_index(name), schema.field(name), pa.array(list(values) if kind == pa.string() else values, kind))

    if augmented:
        if embed_fn is not None:  # embed what was stored (after JPEG), which is what training sees
            aug_emb = _embed([decode_image(row["image"]) for row in augmented], embed_fn, dim)
        else:
            aug_emb = np.full((len(augmented), dim), np.nan)
        for row, e in zip(augmented, aug_emb):
            r = row.pop("_source_row")
            how = "embedder" if np.isfinite(e).all() else "copied_from_source"
            e = e if how == "embedder" else unit[r]
            row["embedding"] = np.asarray(e, np.float32)
            row["difficulty"] = np.float32(1.0 - float(e @ centres[row["identity_id"]]))
            row["meta"] = json.dumps({"augmented_from": int(sample_idx[r]), "embedding": how})
        out = pa.concat_tables([out, table_from_batch(rows_to_batch(augmented, schema), schema)])
    out = out.sort_by([("identity_id", "ascending"), ("sample_idx", "ascending")])

    true_ids = pc.fill_null(out.column("true_identity_id"), -1).to_numpy()
    out_ids = out.column("identity_id").to_numpy()
    generated = np.array(out.column("origin").to_pylist()) != "augmented"
    out_ok = np.array(out.column("status").to_pylist()) == STATUS_OK
    stats["injected_wrong_kept"] = int((generated & out_ok & (true_ids >= 0) & (true_ids != out_ids)).sum())
    stats["images_augmented"] = len(augmented)
    stats["images_out"] = int(out_ok.sum())
    stats["dropped_identity_ids"] = dropped_ids
    stats["similarity_to_centre"] = {
        "before_selection": band_summary(np.concatenate(before) if before else np.zeros(0), settings.selection),
        "after_selection": band_summary(np.concatenate(after) if after else np.zeros(0), settings.selection),
    }
    return out, stats
