"""Cleaning v1 of one block of identities: consistency expert, drop, top-up, difficulty.

Per identity (ALGORITHMS.md 1.2 and 1.4): the usable rows (status ok, finite embedding) go through
:func:`adaptive_dbscan_keep`; identities with fewer than ``min_images`` kept rows are dropped; the
rest are trimmed to the ``target_images`` most central rows or topped up to it with augmentations
of their kept images. Every output row gets ``difficulty = 1 - cos(embedding, identity centre)``,
the centre being the renormalised mean of the identity's kept (non-augmented) embeddings.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from facegen.clean.augment import top_up
from facegen.clean.cluster import ClusterDecision, adaptive_dbscan_keep
from facegen.config import CleanSettings
from facegen.curriculum import identity_centre, l2_normalize
from facegen.faces.align import decode_image, encode_image
from facegen.schema import SAMPLE_NAMES, STATUS_OK, batch_from_table, embedding_dim, rows_to_batch, sample_schema, table_from_batch

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


def _top_up_identity(
    table: pa.Table, kept: np.ndarray, first_idx: int, needed: int, rng: np.random.Generator,
    settings: CleanSettings, jpeg_quality: int,
) -> tuple[list[dict[str, Any]], int]:
    """``needed`` augmented rows of one identity, copied from their source rows (embedding,
    difficulty and meta are replaced later; ``_source_row`` names the source), and the number of
    kept images that could not be decoded."""
    sources, source_rows = [], []
    for r in kept:
        img = _try_decode(table.column("image")[int(r)].as_py())
        if img is not None:
            sources.append(img)
            source_rows.append(int(r))
    unreadable = len(kept) - len(sources)
    if not sources:
        return [], unreadable
    rows = []
    for k, (src, img) in enumerate(top_up(sources, len(sources) + needed, rng, settings.augment)):
        source = table.slice(source_rows[src], 1).to_pylist()[0]
        true_id = source["true_identity_id"]
        rows.append({
            **source, "sample_idx": first_idx + k,
            "image": encode_image(img, image_format(source["image"]), jpeg_quality),
            "true_identity_id": -1 if true_id is None else true_id, "quality": np.float32(np.nan),
            "status": STATUS_OK, "reason": "", "origin": "augmented", "_source_row": source_rows[src],
        })
    return rows, unreadable


def _summary(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {"mean": float(np.mean(values)), "min": float(np.min(values)), "max": float(np.max(values))}


def clean_block(
    table: pa.Table,
    settings: CleanSettings,
    seed: int,
    embed_fn: EmbedFn | None = None,
    *,
    jpeg_quality: int = 95,
) -> tuple[pa.Table, dict[str, Any]]:
    """Clean one block of SAMPLE rows; returns the cleaned SAMPLE table and a JSON-ready stats dict.

    Augmented rows get ``origin="augmented"``, ``sample_idx`` after the identity's largest one, the
    source's ``seed``/``source``/``true_identity_id``, ``quality`` NaN, the source image's format
    (PNG stays PNG, anything else JPEG at ``jpeg_quality``) and ``meta`` JSON
    ``{"augmented_from": <source sample_idx>, "embedding": "embedder" | "copied_from_source"}``;
    their embedding comes from ``embed_fn`` (RGB uint8 ``[N, 112, 112, 3]`` -> ``[N, D]``, D the
    table's embedding width) or,
    without one (or where it returns non-finite values), is the source's. Augmentation for an
    identity draws from ``np.random.default_rng([seed, identity_id, 0xA06])``, so a block cleans
    identically wherever and whenever it runs. The output is sorted by (identity_id, sample_idx).
    """
    missing = [name for name in SAMPLE_NAMES if name not in table.column_names]
    if missing:
        raise ValueError(f"clean_block: table lacks SAMPLE columns {missing}")
    if seed < 0:
        raise ValueError(f"clean_block: seed must be >= 0 (it seeds numpy's SeedSequence), got {seed}")
    dim = embedding_dim(table.schema)
    schema = sample_schema(dim)
    table = table.select(list(SAMPLE_NAMES)).cast(schema)
    cols = batch_from_table(table.select(["identity_id", "sample_idx", "status", "embedding"]))
    ids, sample_idx = cols["identity_id"].astype(np.int64), cols["sample_idx"].astype(np.int64)
    emb = cols["embedding"].astype(np.float64)
    status_ok = cols["status"] == STATUS_OK
    finite = np.isfinite(emb).all(axis=1) & (np.linalg.norm(np.nan_to_num(emb), axis=1) > 0)
    usable = status_ok & finite
    unit = l2_normalize(np.where(finite[:, None], emb, 0.0))
    true_ids = pc.fill_null(table.column("true_identity_id"), -1).to_numpy().astype(np.int64)
    wrong = (true_ids >= 0) & (true_ids != ids)

    stats: dict[str, Any] = {
        "identities_in": 0, "identities_kept": 0, "identities_dropped": 0,
        "images_in": int(len(ids)), "images_error": int((~status_ok).sum()),
        "images_no_embedding": int((status_ok & ~finite).sum()), "images_removed": 0,
        "images_dropped_with_identity": 0, "images_trimmed": 0, "images_augmented": 0, "images_out": 0,
        "augment_sources_unreadable": 0, "injected_wrong_in": int(wrong.sum()), "injected_wrong_removed": 0,
    }
    keep_rows: list[int] = []
    centres: dict[int, np.ndarray] = {}
    augmented: list[dict[str, Any]] = []
    decisions: list[ClusterDecision] = []
    dropped_ids: list[int] = []

    for identity in np.unique(ids):
        identity = int(identity)
        stats["identities_in"] += 1
        rows = np.flatnonzero(ids == identity)
        cand = rows[usable[rows]]
        cand = cand[np.lexsort((cand, sample_idx[cand]))]  # cluster in sample order, not file order
        decision = adaptive_dbscan_keep(unit[cand], settings.dbscan)
        if decision.rounds > 0:
            decisions.append(decision)
        kept = cand[decision.keep]
        stats["images_removed"] += len(cand) - len(kept)
        if len(kept) < settings.min_images:
            stats["identities_dropped"] += 1
            stats["images_dropped_with_identity"] += len(kept)
            dropped_ids.append(identity)
            continue
        stats["identities_kept"] += 1
        if len(kept) > settings.target_images:
            cos = unit[kept] @ identity_centre(unit[kept])
            stats["images_trimmed"] += len(kept) - settings.target_images
            kept = kept[np.lexsort((sample_idx[kept], -cos))][: settings.target_images]
        centres[identity] = identity_centre(unit[kept])
        keep_rows.extend(int(r) for r in kept)

        needed = settings.target_images - len(kept)
        if needed <= 0:
            continue
        rng = np.random.default_rng([seed, identity, AUGMENT_STREAM])
        first_idx = int(sample_idx[rows].max()) + 1
        new_rows, unreadable = _top_up_identity(table, kept, first_idx, needed, rng, settings, jpeg_quality)
        stats["augment_sources_unreadable"] += unreadable
        augmented.extend(new_rows)

    keep_idx = np.asarray(keep_rows, dtype=np.int64)
    difficulty = np.asarray([1.0 - unit[r] @ centres[int(ids[r])] for r in keep_idx], dtype=np.float32)
    out = table.take(pa.array(keep_idx, pa.int64()))
    column = schema.get_field_index("difficulty")
    out = out.set_column(column, schema.field("difficulty"), pa.array(difficulty, pa.float32()))

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

    kept_mask = np.zeros(len(ids), dtype=bool)
    kept_mask[keep_idx] = True
    stats["injected_wrong_removed"] = int((wrong & ~kept_mask).sum())
    stats["images_augmented"] = len(augmented)
    stats["images_out"] = int(out.num_rows)
    stats["dropped_identity_ids"] = dropped_ids
    stats["thresholds"] = {
        "identities": len(decisions),
        "t": _summary([d.threshold for d in decisions]),
        "rounds_mean": float(np.mean([d.rounds for d in decisions])) if decisions else None,
        "landed_in_band_fraction": float(np.mean([d.landed_in_band for d in decisions])) if decisions else None,
    }
    return out, stats
