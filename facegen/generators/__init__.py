"""Generator backends behind one protocol, and the per-sample seed they all share.

A backend is a module listed in :data:`facegen.config.generation.GENERATORS` whose
``build(settings: GeneratorSettings, seed: int)`` returns a callable for Ray Data ``map_batches`` (a
stage's actor builds it once); ``__call__(batch)`` takes identity rows (``identity_id``,
``block_id``) and returns ``settings.images_per_identity`` rows per identity with exactly the
columns of :data:`facegen.schema.GENERATED`. A sample that fails becomes a ``status="error"`` row.

Backends are imported lazily, so using the parametric renderer never imports diffusers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from facegen.config import GeneratorSettings

#: Domain tag of per-sample seeds (distinct from every identity-level tag).
SAMPLE_TAG = 0x5A4D
#: Identity ids of real identities stay below this (``FacegenConfig`` enforces it).
MAX_IDENTITY_ID = 2**62


def build_generator(settings: GeneratorSettings, seed: int, **options: Any) -> Any:
    """The generator of ``settings.backend`` (its module's ``build``, the module imported only now)."""
    from facegen.config.generation import GENERATORS

    return GENERATORS.module(settings.backend).build(settings, seed, **options)


def check_identity_id(identity_id: int) -> int:
    """``identity_id`` as an int, or ``ValueError`` when it is outside ``[0, 2**62)``."""
    value = int(identity_id)
    if not 0 <= value < MAX_IDENTITY_ID:
        raise ValueError(f"identity_id {value} is outside [0, 2**62)")
    return value


def sample_seed(seed: int, identity_id: int, sample_idx: int) -> int:
    """The 63-bit seed of one sample, a pure function of ``(seed, identity_id, sample_idx)``.

    It is stored in the row's ``seed`` column and seeds every sample-level draw (numpy or torch),
    so one row can be regenerated from its own columns.
    """
    if int(seed) < 0:
        raise ValueError(f"run.seed must be >= 0, got {seed}")
    if int(sample_idx) < 0:
        raise ValueError(f"sample_idx must be >= 0, got {sample_idx}")
    state = np.random.SeedSequence([int(seed), check_identity_id(identity_id), int(sample_idx), SAMPLE_TAG])
    high, low = (int(v) for v in state.generate_state(2, np.uint32))
    return ((high & 0x7FFFFFFF) << 32) | low


def identity_rows(batch: dict[str, np.ndarray]) -> list[tuple[object, object]]:
    """The ``(identity_id, block_id)`` pairs of an input batch, unvalidated (bad ids become error rows)."""
    missing = [name for name in ("identity_id", "block_id") if name not in batch]
    if missing:
        raise ValueError(f"generator input batch lacks columns {missing} (has {sorted(batch)})")
    return list(zip(np.asarray(batch["identity_id"]).tolist(), np.asarray(batch["block_id"]).tolist()))


def failure_reason(identity_id: object, sample_idx: object, exc: BaseException) -> str:
    """A one-line error reason naming the sample: ``identity_id=7 sample_idx=3: ValueError: ...``."""
    message = " ".join(str(exc).split())
    return f"identity_id={identity_id} sample_idx={sample_idx}: {type(exc).__name__}: {message}"[:500]


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` says a device (or the host allocator) ran out of memory."""
    try:
        import torch

        if isinstance(exc, torch.OutOfMemoryError):
            return True
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    text = str(exc).lower()
    return "out of memory" in text or "can't allocate memory" in text


def release_cached_memory() -> None:
    """Give cached GPU memory back after an out-of-memory error, so a smaller retry can fit."""
    import gc

    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:  # pragma: no cover
        pass


def run_with_splitting(items: list, compute, on_error) -> list:
    """``compute(items)`` -> one result per item; on failure the batch is retried in parts.

    An out-of-memory error splits the batch in halves (recursively); any other error retries the
    items one at a time. An item that still fails alone becomes ``on_error(item, exc)`` (an error
    row), so the actor keeps running. A retried item is computed in a smaller batch, so its pixels
    may differ in the last bits from a run where the whole batch fit.
    """
    try:
        results = list(compute(items))
        if len(results) != len(items):
            raise ValueError(f"{len(results)} results for {len(items)} items")
        return results
    except Exception as exc:
        if len(items) == 1:
            return [on_error(items[0], exc)]
        if is_out_of_memory(exc):
            release_cached_memory()
            half = (len(items) + 1) // 2
            return run_with_splitting(items[:half], compute, on_error) + run_with_splitting(items[half:], compute, on_error)
        return [result for item in items for result in run_with_splitting([item], compute, on_error)]
