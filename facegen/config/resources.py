"""What a stage asks of the cluster: one model for Ray tasks, one for Ray Data actor pools.

Every stage that runs work on the cluster names its resources with these two models only:
``TaskSettings`` for a single Ray task (dedup + leakage, Langevin, evaluation), ``PoolSettings`` for a
Ray Data ``map_batches`` actor pool (``ActorPoolStrategy(min_size, max_size)``; Ray Data autoscales
between the two). Sections written before these models (``concurrency``, ``num_cpus``, ``num_gpus``,
``resources`` beside the section's other fields) still load: :func:`legacy_pool_fields` moves them.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, model_validator

from facegen.config._base import _Section

LEGACY_POOL_KEYS = ("concurrency", "num_cpus", "num_gpus", "resources")


class TaskSettings(_Section):
    """What one Ray task or actor asks of a node: CPUs, GPUs (fractions allowed), custom resources."""

    num_cpus: float = Field(default=0.5, ge=0.0, description="> 0 keeps the work off a head started with --num-cpus=0")
    num_gpus: float = Field(default=0.0, ge=0.0)
    resources: dict[str, float] = Field(default_factory=dict, description="custom Ray resources, e.g. {generation: 1}")

    def ray_resources(self) -> dict[str, float]:
        """``{"CPU": .., "GPU": .., custom..}`` without zero entries (what one node must offer)."""
        need = {"CPU": self.num_cpus, "GPU": self.num_gpus, **self.resources}
        return {k: float(v) for k, v in need.items() if v}


class PoolSettings(TaskSettings):
    """A Ray Data actor pool: between ``min_size`` and ``max_size`` actors (None = ``min_size``, a
    fixed pool), each with the resources above, each given ``max_tasks_in_flight`` blocks at a time."""

    min_size: int = Field(default=1, ge=1)
    max_size: int | None = Field(default=None, ge=1, description="None = min_size; Ray Data autoscales in between")
    max_tasks_in_flight: int = Field(default=2, ge=1, description="blocks queued per actor (no idle gap between blocks)")

    @model_validator(mode="after")
    def _ordered(self) -> "PoolSettings":
        if self.max_size is not None and self.max_size < self.min_size:
            raise ValueError(f"max_size ({self.max_size}) must be >= min_size ({self.min_size})")
        return self

    @property
    def largest(self) -> int:
        """The most actors the pool may have."""
        return self.max_size or self.min_size


class PooledSection(_Section):
    """A settings section with a ``pool`` (:class:`PoolSettings`) whose old spelling still loads."""

    @model_validator(mode="before")
    @classmethod
    def _legacy_pool(cls, data: Any) -> Any:
        return legacy_pool_fields(data)


def legacy_pool_fields(data: Any, key: str = "pool") -> Any:
    """A section's old pool fields (``concurrency``, ``num_cpus``, ``num_gpus``, ``resources``)
    moved into its ``pool`` mapping (``concurrency: N`` = a fixed pool of N); mixing both spellings
    is an error naming the new one."""
    if not isinstance(data, dict) or not any(k in data for k in LEGACY_POOL_KEYS):
        return data
    data = dict(data)
    pool = dict(data.get(key) or {})
    for old in LEGACY_POOL_KEYS:
        if old not in data:
            continue
        value = data.pop(old)
        new = ["min_size", "max_size"] if old == "concurrency" else [old]
        for name in new:
            if name in pool:
                raise ValueError(f"{old} is now {key}.{name}; give only {key}.{name}")
            pool[name] = value
    data[key] = pool
    return data
