"""The one place that defines the columns passed between stages.

Two row shapes travel through a run:

``GENERATED`` (generator -> faces, in memory inside one Ray Data pipeline)
    identity_id:int64, block_id:int64, sample_idx:int32, seed:int64, source:string,
    image:binary (PNG, any size), landmarks:fixed_size_list<float32>[10] (x0,y0..x4,y4 in image
    pixels; NaN when the generator does not know them), true_identity_id:int64 (ground truth when
    the generator knows it, -1 otherwise), meta:string (JSON: prompt, attributes, ...),
    status:string ("ok" | "error"), reason:string.

``SAMPLE`` (faces -> raw shards -> clean -> curriculum shards -> training)
    the same identity columns, image:binary (112x112 aligned, JPEG or PNG), embedding:
    fixed_size_list<float32>[512] (L2-normalised; null before an embedder exists), quality:float32,
    difficulty:float32 (1 - cos to the identity centre; NaN until cleaning), status, reason,
    origin:string ("generated" | "augmented").

``CLEAN`` (clean stage -> curriculum shards): ``SAMPLE`` plus the cleaning decision of every sample,
    kept or not: votes:list<struct<expert, vote ("keep" | "drop" | "abstain"), confidence:float32,
    reason>> (one entry per expert that ran), decided_by:string (the fusion rule or later step that
    settled the row). status is "ok" (kept), "dropped" (reason says why) or "error" (from upstream).

Batches are ``dict[str, np.ndarray]`` (Ray Data's numpy format): list columns are 2-D arrays,
binary columns are object arrays of ``bytes``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

EMBEDDING_DIM = 512
LANDMARK_DIM = 10
ALIGNED_SIZE = 112

STATUS_OK = "ok"
STATUS_ERROR = "error"
STATUS_DROPPED = "dropped"  # clean blocks: a usable sample that cleaning decided not to keep (reason says why)

_IDENTITY_FIELDS = [
    pa.field("identity_id", pa.int64(), nullable=False),
    pa.field("block_id", pa.int64(), nullable=False),
    pa.field("sample_idx", pa.int32(), nullable=False),
    pa.field("seed", pa.int64(), nullable=False),
    pa.field("source", pa.string()),
    pa.field("image", pa.binary()),
]

GENERATED = pa.schema(
    _IDENTITY_FIELDS
    + [
        pa.field("landmarks", pa.list_(pa.float32(), LANDMARK_DIM)),
        pa.field("true_identity_id", pa.int64()),
        pa.field("meta", pa.string()),
        pa.field("status", pa.string()),
        pa.field("reason", pa.string()),
    ]
)

SAMPLE = pa.schema(
    _IDENTITY_FIELDS
    + [
        pa.field("true_identity_id", pa.int64()),
        pa.field("meta", pa.string()),
        pa.field("embedding", pa.list_(pa.float32(), EMBEDDING_DIM)),
        pa.field("quality", pa.float32()),
        pa.field("difficulty", pa.float32()),
        pa.field("status", pa.string()),
        pa.field("reason", pa.string()),
        pa.field("origin", pa.string()),
    ]
)


VOTE = pa.struct([
    pa.field("expert", pa.string()),
    pa.field("vote", pa.string()),
    pa.field("confidence", pa.float32()),
    pa.field("reason", pa.string()),
])

CLEAN = pa.schema(list(SAMPLE) + [pa.field("votes", pa.list_(VOTE)), pa.field("decided_by", pa.string())])


def _column_array(field: pa.Field, values: Any) -> pa.Array:
    if pa.types.is_fixed_size_list(field.type):
        if values is None:
            return pa.nulls(0, field.type)
        arr = np.asarray(values)
        if arr.dtype == object:  # rows that may be None (e.g. no embedding)
            return pa.array([None if v is None else np.asarray(v, np.float32) for v in arr], field.type)
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        size = field.type.list_size
        if arr.ndim == 1 and np.isnan(arr).all():  # Ray Data turns an all-None column into NaN scalars
            return pa.nulls(len(arr), field.type)
        if arr.ndim != 2 or arr.shape[1] != size:
            raise ValueError(f"column {field.name}: expected shape (n, {size}), got {arr.shape}")
        missing = np.isnan(arr).all(axis=1)  # an all-NaN row is a null (e.g. no embedding for an error row)
        values = pa.array(arr.reshape(-1))
        if not missing.any():
            return pa.FixedSizeListArray.from_arrays(values, size)
        return pa.FixedSizeListArray.from_arrays(values, size, mask=pa.array(missing))
    if pa.types.is_binary(field.type):
        return pa.array([None if v is None else bytes(v) for v in values], field.type)
    if pa.types.is_list(field.type):  # e.g. votes: a list of dicts per row
        return pa.array(list(values), field.type)
    return pa.array(np.asarray(values).tolist() if isinstance(values, np.ndarray) else list(values), field.type)


def table_from_batch(batch: dict[str, Any], schema: pa.Schema) -> pa.Table:
    """Build an Arrow table of exactly ``schema`` from a numpy batch; missing columns are an error."""
    missing = [f.name for f in schema if f.name not in batch]
    if missing:
        raise ValueError(f"batch lacks columns {missing} of schema")
    arrays = [_column_array(f, batch[f.name]) for f in schema]
    return pa.Table.from_arrays(arrays, schema=schema)


def batch_from_table(table: pa.Table) -> dict[str, np.ndarray]:
    """Arrow table -> numpy batch (fixed-size lists become 2-D float32; nulls become NaN rows)."""
    out: dict[str, np.ndarray] = {}
    for name in table.column_names:
        col = table.column(name).combine_chunks()
        if pa.types.is_fixed_size_list(col.type):
            size = col.type.list_size
            if col.null_count == 0:
                out[name] = col.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, size)
            else:
                rows = col.to_pylist()
                out[name] = np.array([[np.nan] * size if r is None else r for r in rows], np.float32).reshape(-1, size)
        elif pa.types.is_binary(col.type) or pa.types.is_string(col.type):
            out[name] = np.array(col.to_pylist(), dtype=object)
        else:
            out[name] = col.to_numpy(zero_copy_only=False)
    return out


def error_row(identity_id: int, block_id: int, sample_idx: int, seed: int, source: str, reason: str) -> dict[str, Any]:
    """A GENERATED row for a sample that failed: the job keeps going and the reason is recorded."""
    return {
        "identity_id": int(identity_id),
        "block_id": int(block_id),
        "sample_idx": int(sample_idx),
        "seed": int(seed),
        "source": source,
        "image": b"",
        "landmarks": np.full(LANDMARK_DIM, np.nan, np.float32),
        "true_identity_id": -1,
        "meta": "{}",
        "status": STATUS_ERROR,
        "reason": reason[:500],
    }


def rows_to_batch(rows: list[dict[str, Any]], schema: pa.Schema) -> dict[str, np.ndarray]:
    """A list of row dicts -> numpy batch with the columns of ``schema`` (in order)."""
    batch: dict[str, np.ndarray] = {}
    for f in schema:
        values = [r[f.name] for r in rows]
        if pa.types.is_fixed_size_list(f.type):
            size = f.type.list_size
            if any(v is None for v in values):
                batch[f.name] = np.array(values + [None], dtype=object)[:-1]
            else:
                batch[f.name] = np.asarray(values, np.float32).reshape(len(rows), size)
        elif pa.types.is_binary(f.type) or pa.types.is_string(f.type) or pa.types.is_list(f.type):
            arr = np.empty(len(values), dtype=object)
            arr[:] = values
            batch[f.name] = arr
        else:
            batch[f.name] = np.asarray(values, dtype=f.type.to_pandas_dtype())
    return batch
