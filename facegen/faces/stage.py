"""The faces stage: GENERATED rows in, aligned (and embedded) SAMPLE rows out.

``FaceStage`` is the callable class handed to Ray Data ``map_batches``: the embedder is loaded once
in ``__init__``; ``__call__`` aligns every row on its own (a bad row becomes ``status="error"`` with
a reason, the batch goes on) and embeds the good crops in one pass.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from facegen.config import FaceSettings
from facegen.faces.align import align_face, center_crop, decode_image, encode_image, sharpness
from facegen.faces.embed import Embedder
from facegen.schema import EMBEDDING_DIM, GENERATED, SAMPLE, STATUS_ERROR, STATUS_OK, rows_to_batch

ORIGIN_GENERATED = "generated"
_PASS_THROUGH = ("identity_id", "block_id", "sample_idx", "seed", "source", "true_identity_id", "meta")


def _row(batch: dict[str, np.ndarray], i: int) -> dict[str, Any]:
    return {name: batch[name][i] for name in batch}


def _one_line(text: str, limit: int = 500) -> str:
    return " ".join(str(text).split())[:limit]


def _with_meta_flag(meta: Any, key: str, value: str) -> str:
    data = json.loads(meta) if meta else {}
    if not isinstance(data, dict):
        raise ValueError(f"meta: expected a JSON object, got {type(data).__name__}")
    data[key] = value
    return json.dumps(data)


def _failed(row: dict[str, Any], what: str) -> dict[str, Any]:
    """The SAMPLE error row for a GENERATED row that could not be processed."""
    sample = {name: row[name] for name in _PASS_THROUGH}
    sample.update(image=b"", embedding=None, quality=np.nan, difficulty=np.nan, origin=ORIGIN_GENERATED)
    where = f"faces: identity {int(row['identity_id'])} sample {int(row['sample_idx'])}"
    sample.update(status=STATUS_ERROR, reason=_one_line(f"{where}: {what}"))
    return sample


def prepare_face(row: dict[str, Any], settings: FaceSettings) -> tuple[dict[str, Any], np.ndarray | None]:
    """One GENERATED row -> (SAMPLE row with embedding None, aligned 112x112 RGB crop or None).

    Finite landmarks are aligned to the ArcFace template; all-NaN landmarks (the generator does
    not know them) fall back to a centre crop, recorded as ``"aligned": "center_crop"`` in meta.
    Any failure raises; :class:`FaceStage` turns it into an error row.
    """
    out = {name: row[name] for name in _PASS_THROUGH}
    out.update(embedding=None, difficulty=np.nan, origin=ORIGIN_GENERATED)
    if row["status"] != STATUS_OK:
        out.update(image=b"", quality=np.nan, status=STATUS_ERROR, reason=row["reason"] or "error upstream")
        return out, None
    image = decode_image(row["image"])
    landmarks = row["landmarks"]
    landmarks = np.full(10, np.nan, np.float32) if landmarks is None else np.asarray(landmarks, np.float32)
    if landmarks.size and np.isnan(landmarks).all():
        crop = center_crop(image)
        out["meta"] = _with_meta_flag(row["meta"], "aligned", "center_crop")
    else:
        crop = align_face(image, landmarks)
    encoded = encode_image(crop, settings.image_format, settings.jpeg_quality)
    out.update(image=encoded, quality=sharpness(crop), status=STATUS_OK, reason="")
    return out, crop


class FaceStage:
    """Ray Data stage: align each generated image, embed the batch once, emit SAMPLE rows.

    With an embedder the embedding column is always float32 ``[n, 512]``, NaN rows standing for
    "no embedding" (error rows; ``schema.table_from_batch`` stores them as nulls). A column mixing
    vectors and None would become a pickled-object column in Ray Data that does not concatenate
    with the tensor column of an all-ok batch. Without an embedder the column is all None.
    """

    def __init__(self, settings: FaceSettings):
        self.settings = settings
        self.embedder: Embedder | None = None
        emb = settings.embedder
        if emb.checkpoint:
            self.embedder = Embedder(emb.checkpoint, device=emb.device, batch_size=emb.batch_size)
            if self.embedder.embedding_size != EMBEDDING_DIM:
                raise ValueError(
                    f"faces.embedder.checkpoint: {emb.checkpoint} embeds to {self.embedder.embedding_size} "
                    f"dimensions, the sample schema needs {EMBEDDING_DIM}"
                )

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing = [f.name for f in GENERATED if f.name not in batch]
        if missing:
            raise ValueError(f"faces: input batch lacks GENERATED columns {missing}")
        rows: list[dict[str, Any]] = []
        crops: list[np.ndarray] = []
        ok_rows: list[int] = []
        for i in range(len(batch["identity_id"])):
            row = _row(batch, i)
            try:
                sample, crop = prepare_face(row, self.settings)
            except Exception as exc:  # one bad sample must not kill the batch
                sample, crop = _failed(row, f"{type(exc).__name__}: {exc}"), None
            if crop is not None:
                ok_rows.append(len(rows))
                crops.append(crop)
            rows.append(sample)
        if self.embedder is None:
            return rows_to_batch(rows, SAMPLE)
        embeddings = np.full((len(rows), EMBEDDING_DIM), np.nan, np.float32)
        if crops:
            embeddings[ok_rows] = self.embedder.embed(np.stack(crops))
            for idx in ok_rows:
                if not np.isfinite(embeddings[idx]).all():
                    rows[idx] = _failed(_row(batch, idx), "embedding is not finite")
                    embeddings[idx] = np.nan
        out = rows_to_batch(rows, SAMPLE)
        out["embedding"] = embeddings
        return out
