"""Run-wide settings: outputs and seed, how to reach Ray, tracking, storage, the demo."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from facegen.config._base import _Section


class RunSettings(_Section):
    """Where outputs go and the global seed every random draw derives from."""

    name: str = "facegen-run"
    output_dir: str = "outputs/run"
    seed: int = Field(default=0, ge=0)
    overwrite: bool = False
    verify: Literal["sha256", "size"] = Field(
        default="sha256", description="how finished blocks are checked before a stage trusts them")

    @field_validator("output_dir")
    @classmethod
    def _names_a_folder(cls, value: str) -> str:
        # an empty value would put every stage's folder at the filesystem root (raw/, clean/, ...)
        path = value.strip().split("://", 1)[-1].strip("/")
        if path in ("", "."):
            raise ValueError("names no folder of its own: give a path such as outputs/run or s3://bucket/run")
        return value


class RaySettings(_Section):
    """How to reach Ray: an explicit address, the submitting cluster, or a local loopback node."""

    address: str | None = None
    num_cpus: float | None = Field(default=None, gt=0, description="CPUs for a local Ray only")
    object_store_memory_gb: float | None = Field(default=None, gt=0)
    dashboard: bool = Field(
        default=False, description="a local Ray also starts its dashboard on 127.0.0.1 (a cluster keeps its own)")


class TrackingSettings(_Section):
    """Weights & Biases; ``auto`` = online with an API key, offline otherwise."""

    mode: Literal["auto", "online", "offline", "disabled"] = "auto"
    project: str = "facegen"
    entity: str | None = None


class StorageSettings(_Section):
    """Object-store access for ``s3://`` paths; credentials come from the usual AWS variables.

    ``s3_endpoint`` (an S3-compatible server, e.g. ``http://127.0.0.1:9000``) is handed to the
    driver and every Ray worker as ``AWS_ENDPOINT_URL``, which pyarrow reads; left empty, an
    ``AWS_ENDPOINT_URL`` already in the environment (or AWS itself) is used.
    """

    s3_endpoint: str | None = None
    s3_region: str | None = None
    shared: bool = Field(
        default=False, description="a local run.output_dir is on storage every node mounts (NFS): allowed on a "
        "multi-node cluster, checked by a marker each node must see")
    cache_dir: str | None = Field(
        default=None, description="node-local cache of fetched inputs (s3:// models, .bin sets, references); "
        "default $FACEGEN_CACHE_DIR or ~/.cache/facegen/inputs")


class DemoSettings(_Section):
    """Extras of the local demo: an embedder trained first on separate identities, its calibration
    measured on further identities, a held-out .bin."""

    bootstrap_identities: int = Field(default=0, ge=0, description="0 = use faces.embedder.path")
    bootstrap_images_per_identity: int = Field(default=20, ge=2)
    bootstrap_epochs: int = Field(default=4, ge=1)
    heldout_identities: int = Field(default=0, ge=0, description="0 = no held-out .bin is written")
    heldout_pairs: int = Field(default=600, ge=20)
    calibration_identities: int = Field(
        default=0, ge=0, description="identities (as many images and varied as the run's) the bootstrap "
        "embedder's calibration is measured on, so cleaning runs on its scale; 0 = no calibration")
    calibration_pairs: int = Field(default=600, ge=200, description="pairs of the calibration set, half genuine")
