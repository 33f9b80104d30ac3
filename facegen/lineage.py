"""What each output was made from: digests of settings and inputs along raw -> clean -> shards -> train.

Every raw and clean block's stats record carries the digest of the settings that shaped it
(:func:`raw_digest`, :func:`clean_digest`); a clean block also records the sha256 of the raw block
it came from; the shard manifest records its source blocks' sha256, its settings digest and a
``digest`` of the whole set; a training run records the manifest digest it trained on
(``<run_dir>/dataset.json``). A stage redoes an output whose recorded digests differ from the
current ones, and training refuses to resume on another shard set (:func:`check_training_input`).

Settings that only schedule work (pool sizes, batch sizes, devices, resources) are left out of the
digests, so moving a run to a bigger cluster does not redo it. Fields marked as input paths
(``json_schema_extra={"input_path": ...}`` in :mod:`facegen.config`) enter a digest by what storage
says of their files (names, sizes, modification times) or by a ``<path>.sha256`` sidecar
(:func:`facegen.cache.input_digest`): a retrained model is a new input, and the driver never reads
a model's bytes to know it.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from pydantic import BaseModel

from facegen import storage
from facegen.config import FacegenConfig

#: Settings that change where and how fast work runs, never what it produces.
SCHEDULING_FIELDS = frozenset({
    "batch_size", "concurrency", "num_gpus", "num_cpus", "resources", "device", "micro_batch",
    "cpus_per_worker", "pool", "global_task", "max_tasks_in_flight",
    "mtcnn_cascade",  # the same detections, on the host or the device (float tolerance, as device itself)
    "channels_last", "compile",  # training: the same steps, faster (float tolerance)
    "workers", "worker",  # Langevin's encoder actors: the same batches on more processes
})
#: Settings whose effect enters the digests in another form: an embedder's calibration only moves the
#: cleaning thresholds, which the clean stage resolves to cosines before digesting its settings, so
#: a new calibration redoes the clean blocks whose thresholds it moves and never the raw ones.
RESOLVED_FIELDS = frozenset({"calibration"})
#: Renamed settings digest under their old name and value, so blocks made before the rename are
#: found again: ``search_device`` (auto / cpu / cuda) was ``search_on_gpu`` (a bool).
RENAMED_FIELDS: dict[str, tuple[str, Any]] = {"search_device": ("search_on_gpu", lambda device: device != "cpu")}
DATASET_FILE = "dataset.json"


class TrainingInputChanged(ValueError):
    """A training run would resume on another shard set than it started on (one line)."""


def short_digest(blob: bytes) -> str:
    """The 16 hex characters of sha256 that every facegen digest uses."""
    return hashlib.sha256(blob).hexdigest()[:16]


def _digestible(model: BaseModel) -> dict[str, Any]:
    """``model`` as plain data without scheduling fields, input paths replaced by content digests."""
    from facegen.config.walk import items

    out: dict[str, Any] = {}
    for item in items(model, SCHEDULING_FIELDS | RESOLVED_FIELDS):
        if item.sections is not None:
            digested = [_digestible(v) for v in item.sections]
            out[item.name] = digested if item.is_list else digested[0]
        elif item.name in RENAMED_FIELDS:
            old_name, old_value = RENAMED_FIELDS[item.name]
            out[old_name] = old_value(item.value)
        elif item.input_path and item.value:
            values = item.value if isinstance(item.value, list) else [item.value]
            out[item.name] = [_input_digest(str(v), item.input_path) for v in values]
        else:
            out[item.name] = json.loads(json.dumps(item.value, default=str))
    legacy = getattr(model, "LEGACY_DIGEST", None)  # fields a section had before its kinds declared their own
    return {**legacy, **out} if legacy else out


def _input_digest(path: str, kind: str) -> str:
    from facegen.cache import input_digest, looks_like_path

    if not looks_like_path(path, kind):
        return f"name:{path}"  # a hub id: its name stands for it
    try:
        return input_digest(path)
    except (FileNotFoundError, OSError, ValueError):
        return f"name:{path}"  # a path this process cannot see: its name stands for it


def settings_digest(*parts: Any) -> str:
    """Digest (16 hex) of settings sections, lists of them and plain values, scheduling fields left out."""
    plain = [_digestible(p) if isinstance(p, BaseModel)
             else [_digestible(v) if isinstance(v, BaseModel) else v for v in p] if isinstance(p, list) else p
             for p in parts]
    return short_digest(json.dumps(plain, sort_keys=True, default=str).encode())


def raw_digest(cfg: FacegenConfig) -> str:
    """What shapes a raw block: seed, block size, the chosen generator backend's settings and the
    face settings (embedder by content). Other backends' sections are left out."""
    from facegen.config.generation import GENERATORS

    g = cfg.generator
    generator = {name: value for name, value in _digestible(g).items() if name not in GENERATORS.kinds}
    for backend in (g.backend, g.hybrid.reference.backend if g.backend == "hybrid" else None):
        section = backend_section(g, backend) if backend in GENERATORS.kinds else None
        if section is not None:
            generator[backend] = section
    if "hybrid" in generator and not g.hybrid.rerender.enabled:
        generator["hybrid"].pop("rerender", None)  # off: the same digest as runs made before it existed
    return settings_digest(cfg.run.seed, cfg.identities.block_size, generator, cfg.faces)


def backend_section(generator: Any, backend: str) -> dict[str, Any] | None:
    """The digestible own section of generator ``backend`` (None for a backend without one); its
    ``kind`` is the name it is filed under, so it is left out (the digest the section had before
    backends declared their sections)."""
    section = generator.backend_settings(backend)
    if section is None:
        return None
    plain = _digestible(section)
    plain.pop("kind", None)
    return plain


def clean_digest(cfg: FacegenConfig) -> str:
    """What shapes a clean block besides its raw block: seed, cleaning settings, the embedder."""
    return settings_digest(cfg.run.seed, cfg.clean, cfg.faces)


def shards_digest(cfg: FacegenConfig) -> str:
    """What shapes the shard set besides its source blocks: the shard settings. A difficulty-ordered
    set without assembly digests as before those settings existed (no rebuild on upgrade); the
    assembly's folders enter by name (their blocks enter by sha256 as the set's sources)."""
    plain = _digestible(cfg.shards)
    if cfg.shards.order == "difficulty":
        plain.pop("order"), plain.pop("source_order")
    plain.pop("assembly")
    if cfg.shards.assembly is not None:
        plain["assembly"] = cfg.shards.assembly.model_dump(mode="json")
    return settings_digest(plain)


def check_training_input(run_dir: str, shards_dir: str, digest: str, overwrite: bool) -> bool:
    """Refuse (one line) to resume ``run_dir`` on a shard set other than the one it started on.

    With ``overwrite`` the old run is deleted and training starts afresh. Records ``digest`` in
    ``<run_dir>/dataset.json`` for the next call. Returns True when an old run was deleted.
    """
    marker = f"{run_dir}/{DATASET_FILE}"
    started_on = storage.read_json(marker).get("manifest_digest") if storage.exists(marker) else None
    deleted = False
    if overwrite and storage.exists(run_dir):
        storage.remove_tree(run_dir)
        deleted = True
    elif started_on is not None and started_on != digest:
        raise TrainingInputChanged(
            f"{run_dir}: this run trained on shard set {started_on}, but {shards_dir} now holds {digest}; "
            "set run.overwrite=true to start it afresh, or choose another train.run_name"
        )
    storage.write_json_atomic({"manifest_digest": digest, "shards_dir": shards_dir}, marker)
    return deleted
