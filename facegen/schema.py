"""The one place that defines the columns passed between stages.

Two row shapes travel through a run:

``GENERATED`` (generator -> faces, in memory inside one Ray Data pipeline)
    identity_id:int64, block_id:int64, sample_idx:int32, seed:int64, source:string,
    image:binary (PNG, any size), landmarks:fixed_size_list<float32>[10] (x0,y0..x4,y4 in image
    pixels; NaN when the generator does not know them), true_identity_id:int64 (ground truth when
    the generator knows it, -1 otherwise), meta:string (JSON: prompt, attributes, ...),
    status:string ("ok" | "error"), reason:string.

Inside one block worker a generator may hand its images to the face stage undecoded: an optional
in-memory column ``pixels`` (uint8 RGB arrays, object-typed; :data:`PIXELS`) next to an empty
``image``. It is never written to storage.

``SAMPLE`` (faces -> raw shards -> clean -> curriculum shards -> training)
    the same identity columns, image:binary (112x112 aligned, JPEG or PNG), embedding:
    fixed_size_list<float32>[D] (L2-normalised; null before an embedder exists), quality:float32
    (detector score x sharpness), difficulty:float32 (1 - cos to the identity centre; NaN until
    cleaning), status, reason, origin:string ("generated" | "augmented" | "ingested").

The embedding width ``D`` belongs to the embedder, not to the schema: 512 for ArcFace IResNets,
128 for dlib's ResNet. Each SAMPLE table carries its own width, so the schema is built per table
with :func:`sample_schema` (``D`` = :data:`DEFAULT_EMBEDDING_DIM` when nothing was embedded) and
read back with :func:`embedding_dim`. All tables of one run share one width; block stats and the
shard manifest record which embedder produced it.

Both shapes end with the similarity columns of identity-conditioned expansion (float32; NaN in
batches, null in Arrow, where they do not apply): band_low, band_high (the requested cosine
band), requested_similarity (the cosine of the conditioning feature to the identity feature) and
realised_similarity (the cosine of the generated image's embedding to it). Backends that do not
expand may leave them out of their rows; ``rows_to_batch`` and ``table_from_batch`` fill them
with NaN.

``CLEAN`` (clean stage -> curriculum shards, :func:`clean_schema`): ``SAMPLE`` plus the cleaning decision of every sample,
    kept or not: votes:list<struct<expert, vote ("keep" | "drop" | "abstain"), confidence:float32,
    reason>> (one entry per expert that ran), decided_by:string (the fusion rule or later step that
    settled the row). status is "ok" (kept), "dropped" (reason says why) or "error" (from upstream).

``ASSEMBLY`` (shard stage, an assembled set's ``assembly.parquet``): identity_id:int64 (the label of the
    shard rows), group:string, source_identity_id:int64 (its id in its input), images:int64.

``IDENTITY`` (identities stage -> generation; ``<output_dir>/identities/block-XXXXXX.parquet``)
    identity_id:int64, latent:list<float32> (a GAN latent or an identity feature; its length is the
    sampler space's dimension), sampler:string ("gaussian" | "langevin-latent" | "langevin-feature" |
    "vec2face-gaussian" | "vec2face-pca"); ``identities/sampler.json`` says which space.

Batches are ``dict[str, np.ndarray]`` (Ray Data's numpy format): list columns are 2-D arrays,
binary columns are object arrays of ``bytes``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

#: Width of the (all-null) embedding column of tables that no embedder has seen.
DEFAULT_EMBEDDING_DIM = 512
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

#: Per-row record of CemiFace-style similarity control (ALGORITHMS.md 3), NaN when not used.
SIMILARITY_FIELDS = [
    pa.field("band_low", pa.float32()),
    pa.field("band_high", pa.float32()),
    pa.field("requested_similarity", pa.float32()),
    pa.field("realised_similarity", pa.float32()),
]
SIMILARITY_COLUMNS = tuple(f.name for f in SIMILARITY_FIELDS)
#: Columns a row or batch may leave out, and the value they get.
OPTIONAL_DEFAULTS: dict[str, Any] = {name: np.float32(np.nan) for name in SIMILARITY_COLUMNS}
#: The in-memory column of decoded GENERATED images (see the module docstring).
PIXELS = "pixels"


def object_column(values: list[Any]) -> np.ndarray:
    """A 1-D object array holding ``values`` as they are (numpy would stack equal-shape arrays)."""
    out = np.empty(len(values), dtype=object)
    for i, value in enumerate(values):
        out[i] = value
    return out

GENERATED = pa.schema(
    _IDENTITY_FIELDS
    + [
        pa.field("landmarks", pa.list_(pa.float32(), LANDMARK_DIM)),
        pa.field("true_identity_id", pa.int64()),
        pa.field("meta", pa.string()),
        pa.field("status", pa.string()),
        pa.field("reason", pa.string()),
    ]
    + SIMILARITY_FIELDS
)



def sample_schema(embedding_dim: int = DEFAULT_EMBEDDING_DIM) -> pa.Schema:
    """The SAMPLE schema with an embedding column ``embedding_dim`` floats wide."""
    if int(embedding_dim) < 1:
        raise ValueError(f"embedding width must be >= 1, got {embedding_dim}")
    return pa.schema(
        _IDENTITY_FIELDS
        + [
            pa.field("true_identity_id", pa.int64()),
            pa.field("meta", pa.string()),
            pa.field("embedding", pa.list_(pa.float32(), int(embedding_dim))),
            pa.field("quality", pa.float32()),
            pa.field("difficulty", pa.float32()),
            pa.field("status", pa.string()),
            pa.field("reason", pa.string()),
            pa.field("origin", pa.string()),
        ]
        + SIMILARITY_FIELDS
    )


#: Column names of every SAMPLE table, in order (whatever its embedding width).
SAMPLE_NAMES: tuple[str, ...] = tuple(sample_schema().names)


def embedding_dim(schema: pa.Schema) -> int:
    """The embedding width of a SAMPLE schema (or of a table's ``.schema``)."""
    field = schema.field("embedding")
    if not pa.types.is_fixed_size_list(field.type):
        raise ValueError(f"embedding column: expected a fixed-size list, got {field.type}")
    return int(field.type.list_size)


def batch_embedding_dim(batch: dict[str, Any]) -> int:
    """The embedding width of a numpy SAMPLE batch: the matrix width, or the default when all null."""
    values = np.asarray(batch["embedding"]) if not isinstance(batch["embedding"], np.ndarray) else batch["embedding"]
    if values.dtype != object and values.ndim == 2:
        return int(values.shape[1])
    widths = {len(v) for v in values if v is not None and np.ndim(v) == 1}
    if len(widths) > 1:
        raise ValueError(f"embedding column: rows of different widths {sorted(widths)}")
    return widths.pop() if widths else DEFAULT_EMBEDDING_DIM


VOTE = pa.struct([
    pa.field("expert", pa.string()),
    pa.field("vote", pa.string()),
    pa.field("confidence", pa.float32()),
    pa.field("reason", pa.string()),
])

def clean_schema(embedding_dim: int = DEFAULT_EMBEDDING_DIM) -> pa.Schema:
    """The CLEAN schema: :func:`sample_schema` plus ``votes`` and ``decided_by``."""
    return pa.schema(list(sample_schema(embedding_dim)) + [pa.field("votes", pa.list_(VOTE)), pa.field("decided_by", pa.string())])


#: Column names of every CLEAN table, in order.
CLEAN_NAMES: tuple[str, ...] = tuple(clean_schema().names)


#: ``<shards>/assembly.parquet`` of an assembled shard set (:mod:`facegen.assembly`): one row per
#: label (``identity_id`` of its shard rows) with its group ("generated" | "ingested"), its id in that
#: input's clean blocks and its usable images there.
ASSEMBLY = pa.schema([
    pa.field("identity_id", pa.int64(), nullable=False),
    pa.field("group", pa.string()),
    pa.field("source_identity_id", pa.int64()),
    pa.field("images", pa.int64()),
])


IDENTITY = pa.schema(
    [
        pa.field("identity_id", pa.int64(), nullable=False),
        pa.field("latent", pa.list_(pa.float32())),
        pa.field("sampler", pa.string()),
    ]
)


def identity_table(identity_ids: np.ndarray, latents: np.ndarray, sampler: str) -> pa.Table:
    """An IDENTITY table: one row per identity with its latent vector."""
    latents = np.ascontiguousarray(latents, np.float32)
    if latents.ndim != 2 or len(latents) != len(identity_ids):
        raise ValueError(f"identity latents: expected shape ({len(identity_ids)}, d), got {latents.shape}")
    offsets = pa.array(np.arange(0, latents.size + 1, max(latents.shape[1], 1), dtype=np.int32)[: len(latents) + 1])
    latent = pa.ListArray.from_arrays(offsets, pa.array(latents.reshape(-1)))
    ids = pa.array(np.asarray(identity_ids, np.int64))
    return pa.Table.from_arrays([ids, latent, pa.array([sampler] * len(ids), pa.string())], schema=IDENTITY)


def vectors_from_column(column: pa.Array | pa.ChunkedArray, what: str) -> np.ndarray:
    """A list column of equal-length numeric lists as float32 ``[n, d]``, without a Python object
    per value; null rows or rows of different lengths are a ``ValueError`` naming ``what``."""
    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if len(column) == 0:
        return np.zeros((0, 0), np.float32)
    if column.null_count:
        raise ValueError(f"{what}: null rows are not allowed")
    lengths = set(pc.list_value_length(column).to_numpy(zero_copy_only=False).tolist())
    if len(lengths) > 1:
        raise ValueError(f"{what} have different lengths {sorted(lengths)}")
    return pc.list_flatten(column).to_numpy(zero_copy_only=False).astype(np.float32).reshape(len(column), lengths.pop())


def latents_from_table(table: pa.Table) -> np.ndarray:
    """The ``latent`` column of an IDENTITY table as float32 ``[n, d]`` (all rows the same length)."""
    return vectors_from_column(table.column("latent"), "identity latents")


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
    if field.name in OPTIONAL_DEFAULTS:  # NaN in numpy <-> null in Arrow (null == null in Table.equals)
        arr = np.asarray(values, dtype=np.float32).reshape(-1)
        return pa.array(arr, field.type, mask=np.isnan(arr))
    if pa.types.is_binary(field.type):
        return pa.array([None if v is None else bytes(v) for v in values], field.type)
    if pa.types.is_list(field.type):  # e.g. votes: a list of dicts per row
        return pa.array(list(values), field.type)
    return pa.array(np.asarray(values).tolist() if isinstance(values, np.ndarray) else list(values), field.type)


def table_from_batch(batch: dict[str, Any], schema: pa.Schema) -> pa.Table:
    """Build an Arrow table of exactly ``schema`` from a numpy batch; missing columns are an error
    (except the optional ones of :data:`OPTIONAL_DEFAULTS`, which are filled)."""
    missing = [f.name for f in schema if f.name not in batch and f.name not in OPTIONAL_DEFAULTS]
    if missing:
        raise ValueError(f"batch lacks columns {missing} of schema")
    rows = len(next(iter(batch.values()))) if batch else 0
    arrays = [
        _column_array(f, batch[f.name] if f.name in batch else np.full(rows, OPTIONAL_DEFAULTS[f.name]))
        for f in schema
    ]
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
        default = OPTIONAL_DEFAULTS.get(f.name)
        values = [r[f.name] if default is None else r.get(f.name, default) for r in rows]
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
