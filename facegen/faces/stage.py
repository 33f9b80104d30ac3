"""The faces stage: GENERATED rows in, detected, aligned and embedded SAMPLE rows out.

``FaceStage`` is the callable class handed to Ray Data ``map_batches``: the detector and the
embedder are loaded once in ``__init__``. In ``__call__`` every row finds its face on its own:

- the generator's landmarks when they are finite (the parametric renderer knows them);
- otherwise the detector's (``faces.detector``), run on such images of the batch together (up to
  :data:`DETECT_PIXELS` decoded pixels per call), keeping one face per image (:func:`facegen.faces.detect.choose_face`): "no face", "face too
  small" and "more than one large face" become ``status="error"`` rows with that reason;
- with detector ``none`` and no landmarks, a centre crop (recorded as ``"aligned": "center_crop"``).

The face is warped to the 112x112 ArcFace crop (stored) and, when the embedder reads another
geometry (dlib's 150 px chip), to that crop too, from the same landmarks; the good crops of the batch
are embedded in one pass. ``quality`` = detector score x sharpness of the crop (score 1 for the
generator's landmarks); ``meta["face"]`` keeps the detector, score, sharpness, box and faces found.
A bad row becomes an error row with a reason; the batch goes on.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from facegen.config import FaceSettings
from facegen.faces.align import ARCFACE_CROP, center_crop, sharpness
from facegen.faces.detect import Detection, FaceRejected, build_detector, choose_face
from facegen.faces.embed import build_embedder
from facegen.images import decode_image, encode_image
from facegen.schema import (
    DEFAULT_EMBEDDING_DIM,
    GENERATED,
    OPTIONAL_DEFAULTS,
    PIXELS,
    SIMILARITY_COLUMNS,
    STATUS_ERROR,
    STATUS_OK,
    rows_to_batch,
    sample_schema,
)

ORIGIN_GENERATED = "generated"
#: Decoded pixels detected in one go (about 200 MB of RGB): large photos are detected in several calls.
DETECT_PIXELS = 64_000_000
_PASS_THROUGH = ("identity_id", "block_id", "sample_idx", "seed", "source", "true_identity_id", "meta") + SIMILARITY_COLUMNS


def _row(batch: dict[str, np.ndarray], i: int) -> dict[str, Any]:
    return OPTIONAL_DEFAULTS | {name: batch[name][i] for name in batch}


def _one_line(text: str, limit: int = 500) -> str:
    return " ".join(str(text).split())[:limit]


def _with_meta(meta: Any, key: str, value: Any) -> str:
    data = json.loads(meta) if meta else {}
    if not isinstance(data, dict):
        raise ValueError(f"meta: expected a JSON object, got {type(data).__name__}")
    data[key] = value
    return json.dumps(data)


def _where(row: dict[str, Any]) -> str:
    return f"faces: identity {int(row['identity_id'])} sample {int(row['sample_idx'])}"


def _failed(row: dict[str, Any], what: str, origin: str = ORIGIN_GENERATED) -> dict[str, Any]:
    """The SAMPLE error row for a GENERATED row that could not be processed."""
    sample = {name: row[name] for name in _PASS_THROUGH}
    sample.update(image=b"", embedding=None, quality=np.nan, difficulty=np.nan, origin=origin)
    sample.update(status=STATUS_ERROR, reason=_one_line(f"{_where(row)}: {what}"))
    return sample


def finite_landmarks(value: Any) -> np.ndarray | None:
    """The row's landmarks as ``[5, 2]`` when all are finite, ``None`` when all are NaN (unknown).

    Partly-NaN landmarks are an error: the generator claimed to know them.
    """
    if value is None:
        return None
    points = np.asarray(value, np.float32).reshape(-1)
    if points.size and np.isnan(points).all():
        return None
    if points.shape != (10,) or not np.isfinite(points).all():
        raise ValueError(f"landmarks: contain NaN or infinite values, or are not 10 numbers (got {points.size})")
    return points.reshape(5, 2)


class FaceStage:
    """Ray Data stage: find, align and embed one face per generated image; emit SAMPLE rows.

    With an embedder the embedding column is always float32 ``[n, dim]`` (the embedder's width),
    NaN rows standing for "no embedding" (error rows; ``schema.table_from_batch`` stores them as
    nulls). A column mixing vectors and None would become a pickled-object column in Ray Data that
    does not concatenate with the tensor column of an all-ok batch. Without an embedder the column
    is all None.
    """

    def __init__(self, settings: FaceSettings, origin: str = ORIGIN_GENERATED):
        self.settings, self.origin = settings, origin
        self.embedder = build_embedder(settings.embedder) if settings.embedder.enabled else None
        self.detector = build_detector(settings.detector)
        self.dim = self.embedder.dim if self.embedder is not None else DEFAULT_EMBEDDING_DIM
        self.schema = sample_schema(self.dim)

    def _sample(self, row: dict[str, Any], image: np.ndarray, landmarks: np.ndarray | None, face: dict | None):
        """The ok SAMPLE row, its 112 crop and the embedder's crop."""
        out = {name: row[name] for name in _PASS_THROUGH}
        out.update(embedding=None, difficulty=np.nan, origin=self.origin, status=STATUS_OK, reason="")
        if landmarks is None:
            crop = center_crop(image)
            out["meta"] = _with_meta(row["meta"], "aligned", "center_crop")
        else:
            crop = ARCFACE_CROP.cut(image, landmarks)
        sharp = sharpness(crop)
        score = 1.0 if face is None else face["score"]
        if face is not None:
            out["meta"] = _with_meta(out["meta"], "face", {**face, "sharpness": round(sharp, 4)})
        out.update(image=encode_image(crop, self.settings.image_format, self.settings.jpeg_quality), quality=score * sharp)
        model_crop = crop
        if self.embedder is not None and self.embedder.crop is not ARCFACE_CROP:
            model_crop = self.embedder.crop.from_aligned(crop[None])[0] if landmarks is None else self.embedder.crop.cut(image, landmarks)
        return out, model_crop

    def _face_record(self, kept: Detection, found: int) -> dict[str, Any]:
        return {"detector": self.detector.kind, "score": round(float(kept.score), 4),
                "box": [round(float(v), 1) for v in kept.box], "faces_found": found}

    def _detect(self, batch: dict[str, np.ndarray], to_detect: list[tuple[int, np.ndarray]], rows: list, crops: dict) -> None:
        """Detect the faces of ``to_detect`` (row index, image) together and fill their rows."""
        try:
            found = self.detector.detect_batch([image for _, image in to_detect])
        except Exception:  # a batch-level failure: retry one image at a time, so only the bad one fails
            found = []
            for _, image in to_detect:
                try:
                    found.append(self.detector.detect(image))
                except Exception as exc:  # noqa: BLE001
                    found.append(exc)
        for (i, image), faces in zip(to_detect, found):
            row = _row(batch, i)
            try:
                if isinstance(faces, Exception):
                    raise faces
                kept = choose_face(faces, image.shape, self.settings.detector)
                rows[i], crops[i] = self._sample(row, image, kept.landmarks, self._face_record(kept, len(faces)))
            except FaceRejected as exc:  # "no face (...)", "face too small (...)", ...
                rows[i] = _failed(row, str(exc), self.origin)
            except Exception as exc:  # noqa: BLE001
                rows[i] = _failed(row, f"{type(exc).__name__}: {exc}", self.origin)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing = [f.name for f in GENERATED if f.name not in batch and f.name not in OPTIONAL_DEFAULTS]
        if missing:
            raise ValueError(f"faces: input batch lacks GENERATED columns {missing}")
        n = len(batch["identity_id"])
        rows: list[dict[str, Any] | None] = [None] * n
        crops: dict[int, np.ndarray] = {}
        to_detect: list[tuple[int, np.ndarray]] = []
        pending_pixels = 0
        for i in range(n):
            row = _row(batch, i)
            if row["status"] != STATUS_OK:
                rows[i] = _failed(row, "", self.origin)
                rows[i]["reason"] = row["reason"] or "error upstream"
                continue
            try:
                pixels = row.get(PIXELS)  # decoded by a generator in this process: no round trip through PNG
                image = pixels if pixels is not None else decode_image(row["image"])
                landmarks = finite_landmarks(row["landmarks"])
                if landmarks is None and self.detector is not None:
                    to_detect.append((i, image))
                    pending_pixels += image.shape[0] * image.shape[1]
                    if pending_pixels >= DETECT_PIXELS:  # bound the decoded images held at once
                        self._detect(batch, to_detect, rows, crops)
                        to_detect, pending_pixels = [], 0
                    continue
                rows[i], crops[i] = self._sample(row, image, landmarks, None)
            except Exception as exc:  # one bad sample must not kill the batch
                rows[i] = _failed(row, f"{type(exc).__name__}: {exc}", self.origin)
        if to_detect:
            self._detect(batch, to_detect, rows, crops)
        return self._embed(batch, rows, crops)

    def _embed(self, batch: dict[str, np.ndarray], rows: list[dict[str, Any]], crops: dict[int, np.ndarray]) -> dict[str, np.ndarray]:
        if self.embedder is None:
            return rows_to_batch(rows, self.schema)
        embeddings = np.full((len(rows), self.dim), np.nan, np.float32)
        ok_rows = sorted(crops)
        if ok_rows:
            embeddings[ok_rows] = self.embedder.embed_crops(np.stack([crops[i] for i in ok_rows]))
            for idx in ok_rows:
                if not np.isfinite(embeddings[idx]).all():
                    rows[idx] = _failed(_row(batch, idx), "embedding is not finite", self.origin)
                    embeddings[idx] = np.nan
        out = rows_to_batch(rows, self.schema)
        out["embedding"] = embeddings
        return out
