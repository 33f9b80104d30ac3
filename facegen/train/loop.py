"""Ray Train: :func:`facegen.train.fit.fit` on every worker of a ``TorchTrainer``, with fault tolerance.

``train`` checks the shard set and the run directory up front, then starts ``TorchTrainer`` with
``FailureConfig(max_failures=train.max_failures)``: when a worker dies, Ray restarts the worker
group and :class:`RaySession` hands the loop the latest reported checkpoint, from which it
continues mid-epoch (on this or another worker count). Every worker reports its part of each
checkpoint (its class-centre shard); Ray merges them into one directory
``<output>/train/<run name>/step-<global step>``.

A re-run with the same run name resumes; one whose shard set differs from the one it started on
(``<run>/dataset.json``, :func:`facegen.lineage.check_training_input`, and the digest each
checkpoint records) is refused with one line unless ``run.overwrite`` is set, which deletes the run
and starts afresh.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from facegen.config import FacegenConfig
from facegen.lineage import TrainingInputChanged, check_training_input
from facegen.models.iresnet_checkpoint import load_backbone, save_backbone
from facegen.shards import check_datacv_scale, load_manifest, shard_set_digest
from facegen.storage import exists, list_dirs, read_json, write_json_atomic
from facegen.train.checkpoint import STATE_FILE
from facegen.train.data import CurriculumReader
from facegen.train.fit import fit

logger = logging.getLogger(__name__)

RESULT_FILE = "result.json"


@dataclass
class TrainResult:
    """Where a training run lives and what it did."""

    run_dir: str
    backbone_dir: str
    epochs_completed: int
    history: list[dict] = field(default_factory=list)
    resumed_from_epoch: int = 0
    global_step: int = 0
    resumes: list[dict] = field(default_factory=list)
    best: dict | None = None
    shard_digest: str = ""


class RaySession:
    """:class:`facegen.train.fit.Session` inside a Ray Train worker."""

    def __init__(self) -> None:
        import ray.train
        import ray.train.torch

        context = ray.train.get_context()
        self.rank, self.world_size = context.get_world_rank(), context.get_world_size()
        self.device = ray.train.torch.get_device()

    def latest_checkpoint(self) -> contextlib.AbstractContextManager[str | None]:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        return checkpoint.as_directory() if checkpoint else contextlib.nullcontext(None)

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        import ray.train.torch

        return ray.train.torch.prepare_model(model)

    def report(self, metrics: dict, checkpoint_dir: str | None, name: str) -> None:
        import ray.train

        if checkpoint_dir is None:
            ray.train.report(metrics)
        else:
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(checkpoint_dir), checkpoint_dir_name=name)


def train_func(config: dict) -> None:
    """One Ray Train worker: :func:`fit` with a :class:`RaySession`."""
    cfg = FacegenConfig.model_validate(config["cfg"])
    fit(RaySession(), cfg, config["shards_dir"], config["eval_bins"], config["run_name"])


def _absolute(path: str) -> str:
    return path if "://" in str(path) else os.path.abspath(path)


def latest_state(run_dir: str) -> tuple[str, dict] | None:
    """``(checkpoint dir, state.json)`` of the run's newest complete checkpoint, or None."""
    newest = None
    for name in list_dirs(run_dir):
        path = f"{run_dir}/{name}/{STATE_FILE}"
        if name.startswith("step-") and exists(path):
            state = read_json(path)
            if newest is None or int(state.get("global_step", -1)) > int(newest[1].get("global_step", -1)):
                newest = (f"{run_dir}/{name}", state)
    return newest


def check_run_against_shards(run_dir: str, digest: str) -> dict | None:
    """The run's latest checkpoint state if it may continue on the shard set ``digest``, else one line.

    Complements :func:`facegen.lineage.check_training_input` for runs whose checkpoints or result
    predate ``dataset.json``: each of those records the digest it trained on.
    """
    found = latest_state(run_dir)
    recorded = found[1].get("shard_digest") if found else None
    if recorded is None and exists(f"{run_dir}/{RESULT_FILE}"):
        recorded = read_json(f"{run_dir}/{RESULT_FILE}").get("shard_digest")
    if recorded is not None and recorded != digest:
        raise TrainingInputChanged(f"{run_dir}: this run trained on shard set {recorded}, but the shards now hold {digest}; "
                                   "set run.overwrite=true to start it afresh, or choose another train.run_name")
    return found[1] if found else None


def _finished(run_dir: str, epochs: int, digest: str) -> TrainResult | None:
    """The recorded result of a run that already trained ``epochs`` epochs on this shard set, else None."""
    path = f"{run_dir}/{RESULT_FILE}"
    if not exists(path):
        return None
    done = read_json(path)
    if (int(done.get("epochs_completed", 0)) < epochs or done.get("shard_digest") != digest
            or not exists(f"{done['backbone_dir']}/backbone.json")):
        return None
    return TrainResult(run_dir, done["backbone_dir"], int(done["epochs_completed"]), list(done.get("history", [])),
                       int(done["epochs_completed"]), int(done.get("global_step", 0)), list(done.get("resumes", [])),
                       done.get("best"), digest)


def export_final_backbone(checkpoint: Any, backbone_dir: str, arch: str, width: int, embedding_size: int) -> dict[str, Any]:
    """Copy the final checkpoint's backbone to ``backbone_dir``; returns the checkpoint's state (a Ray task body)."""
    with checkpoint.as_directory() as ckpt_dir:
        model = load_backbone(f"{ckpt_dir}/backbone", arch=arch)
        state: dict[str, Any] = read_json(f"{ckpt_dir}/{STATE_FILE}")
    save_backbone(backbone_dir, model, arch, width, embedding_size)
    return state


def fit_on_workers(train_func: Any, loop_config: dict, settings: Any, storage_path: str, run_name: str) -> Any:
    """``train_func(loop_config)`` on ``settings.num_workers`` Ray Train workers (``cpus_per_worker``,
    a GPU each with ``use_gpu``, custom ``resources``), keeping ``checkpoints_to_keep`` and restarting
    the group up to ``max_failures`` times; returns the final checkpoint. Shared by ``facegen train``
    and ``facegen train-generator``."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    resources = {"CPU": settings.cpus_per_worker, **settings.resources}
    if settings.use_gpu:
        resources["GPU"] = 1
    trainer = TorchTrainer(
        train_func,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=settings.num_workers, use_gpu=settings.use_gpu, resources_per_worker=resources),
        run_config=RunConfig(name=run_name, storage_path=storage_path,
                             checkpoint_config=CheckpointConfig(num_to_keep=settings.checkpoints_to_keep),
                             failure_config=FailureConfig(max_failures=settings.max_failures)),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"{storage_path}/{run_name}: training finished without a checkpoint")
    return result.checkpoint


def train(cfg: FacegenConfig, shards_dir: str, eval_bins: list[str] | None = None) -> TrainResult:
    """Train (or resume) ``cfg.train`` on a shard set with Ray Train; exports ``<run_dir>/backbone``.

    Ray must already be initialised. A re-run with the same run name continues from the latest
    checkpoint, and returns at once when all ``cfg.train.epochs`` are done.
    """
    settings = cfg.train
    run_name = settings.run_name or cfg.run.name
    # Workers do not share the driver's working directory: every path they get is absolute.
    cfg = cfg.model_copy(deep=True)
    cfg.run.output_dir = _absolute(cfg.run.output_dir)
    shards_dir = _absolute(shards_dir)
    # First, before anything costly: a shard set above its DataCV scale is refused in one line.
    check_datacv_scale(settings.datacv_scale, load_manifest(shards_dir), shards_dir)
    bins = [_absolute(b) for b in (cfg.eval.bins if eval_bins is None else eval_bins)]
    for path in bins:
        if not exists(path):
            raise FileNotFoundError(f"{path}: verification set not found (eval.bins)")
    storage_path = cfg.stage_dir("train")
    run_dir = f"{storage_path}/{run_name}"
    backbone_dir = f"{run_dir}/backbone"

    # Before Ray Train starts: a run resumes only on the shard set it started on (run.overwrite restarts it).
    digest = shard_set_digest(shards_dir)
    check_training_input(run_dir, shards_dir, digest, cfg.run.overwrite)
    previous = check_run_against_shards(run_dir, digest)
    finished = _finished(run_dir, settings.epochs, digest)
    if finished is not None:
        logger.info("%s: all %d epochs already done", run_dir, finished.epochs_completed)
        return finished

    # Fail here, not inside a worker, when an epoch would have no full batch.
    probe = CurriculumReader(shards_dir, 0, settings.num_workers, settings.batch_size, cfg.run.seed,
                             mode=settings.curriculum, total_epochs=settings.epochs, data=settings.data)
    for epoch in range(settings.epochs):
        if probe.steps_per_epoch(epoch) == 0:
            raise ValueError(f"{shards_dir}: epoch {epoch + 1} has no full batch of train.batch_size={settings.batch_size} "
                             f"({probe.rows_per_stream} rows from each of {settings.data.streams} streams)")

    loop_config = {"cfg": cfg.model_dump(mode="json"), "shards_dir": shards_dir, "eval_bins": bins, "run_name": run_name}
    checkpoint = fit_on_workers(train_func, loop_config, settings, storage_path, run_name)
    from facegen.config import TaskSettings
    from facegen.stages.tasks import run_task

    # the backbone is read and written on a worker: the driver (on the head) holds no model
    export = TaskSettings(num_cpus=min(settings.cpus_per_worker, 1.0), resources=settings.resources)
    state: dict[str, Any] = run_task(export_final_backbone, checkpoint, backbone_dir, settings.arch, settings.width,
                                     settings.embedding_size, resources=export, field="train.resources",
                                     name="train: export backbone")
    outcome = TrainResult(run_dir, backbone_dir, int(state["epoch"]), list(state.get("history", [])),
                          int(previous["epoch"]) if previous else 0, int(state["global_step"]),
                          list(state.get("resumes", [])), state.get("best"), digest)
    write_json_atomic({"run_name": run_name, "epochs_completed": outcome.epochs_completed, "backbone_dir": backbone_dir,
                       "resumed_from_epoch": outcome.resumed_from_epoch, "global_step": outcome.global_step,
                       "history": outcome.history, "validations": list(state.get("validations", [])),
                       "resumes": outcome.resumes, "best": outcome.best,
                       "shard_digest": digest}, f"{run_dir}/{RESULT_FILE}")
    return outcome
