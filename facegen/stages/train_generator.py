"""``facegen train-generator``: CemiFace's generator trained with Ray Train on a shard set.

1. Up front (driver, no model): the shard set exists, the embedder is given, the run may continue
   on these shards (``run.overwrite`` restarts it), the resources fit a node.
2. On a worker (a Ray task): the shard set is embedded and resized once
   (:func:`facegen.train.generator_data.prepare_pairs`), into ``<run>/data``; reused when it is
   already there for the same shards, embedder and size.
3. Ray Train: :func:`facegen.train.generator_fit.fit_generator` on ``num_workers`` workers with
   ``FailureConfig(max_failures)``; checkpoints ``<run>/step-<n>`` hold the model, the optimizer,
   the similarity-control figure and a sample grid.
4. On a worker: the last checkpoint's model is copied to ``<run>/model`` (what
   ``generator.hybrid.cemiface.model`` names) and ``<run>/result.json`` written.

The run lives in ``<run.output_dir>/generator/<train_generator.run_name or run.name>``; the same
command again resumes it, and returns at once when it is done.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from facegen.config import FacegenConfig, TaskSettings
from facegen.lineage import check_training_input
from facegen.shards import load_manifest, shard_set_digest
from facegen.storage import exists, read_json, upload_tree, write_json_atomic
from facegen.train.generator_fit import MODEL_DIR, STATE_FILE

RESULT_FILE = "result.json"


@dataclass
class GeneratorTrainResult:
    """Where a generator run lives and what it reached."""

    run_dir: str
    model_dir: str
    global_step: int
    control: dict | None = None
    history: list[dict] = field(default_factory=list)
    resumes: list[dict] = field(default_factory=list)


def _absolute(path: str) -> str:
    return path if "://" in str(path) else os.path.abspath(path)


def train_func(config: dict) -> None:
    """One Ray Train worker."""
    from facegen.train.generator_fit import fit_generator
    from facegen.train.loop import RaySession

    cfg = FacegenConfig.model_validate(config["cfg"])
    fit_generator(RaySession(), cfg, config["data_dir"], config["run_name"])


def export_model(checkpoint: Any, model_dir: str) -> dict[str, Any]:
    """Copy a checkpoint's generator folder to ``model_dir``; returns its state (a Ray task body)."""
    with checkpoint.as_directory() as ckpt:
        upload_tree(f"{ckpt}/{MODEL_DIR}", model_dir)
        return read_json(f"{ckpt}/{STATE_FILE}")


def _planned_steps(cfg: FacegenConfig, train_rows: int) -> int:
    s = cfg.train_generator
    total = s.epochs * (train_rows // s.batch_size)
    return min(total, s.max_steps) if s.max_steps else total


def train_generator(cfg: FacegenConfig, progress: bool = True) -> GeneratorTrainResult:
    """Train (or resume) ``cfg.train_generator``; Ray must already be initialised."""
    from facegen.stages.tasks import check_resources_fit, run_tracked

    s = cfg.train_generator
    if not s.embedder.enabled:
        raise ValueError("train_generator.embedder.path: the generator needs an embedder for C_id and m")
    run_name = s.run_name or cfg.run.name
    cfg = cfg.model_copy(deep=True)  # workers do not share the driver's working directory
    cfg.run.output_dir = _absolute(cfg.run.output_dir)
    shards = _absolute(s.shards or cfg.stage_dir("shards"))
    load_manifest(shards)
    resources = TaskSettings(num_cpus=s.cpus_per_worker, num_gpus=1.0 if s.use_gpu else 0.0, resources=s.resources)
    check_resources_fit(resources.ray_resources(), "train_generator")
    storage_path = cfg.stage_dir("generator")
    run_dir, model_dir, data_dir = f"{storage_path}/{run_name}", f"{storage_path}/{run_name}/{MODEL_DIR}", f"{storage_path}/{run_name}/data"
    check_training_input(run_dir, shards, shard_set_digest(shards), cfg.run.overwrite)

    from facegen.train.generator_data import prepare_pairs

    prepare = TaskSettings(num_cpus=s.prepare_cpus, num_gpus=1.0 if s.use_gpu else 0.0, resources=s.resources)
    index = run_tracked(prepare_pairs, shards, s, cfg.run.seed, data_dir, resources=prepare,
                        field="train_generator.prepare_cpus", name="train-generator: embed shards", progress=progress,
                        unit="shard")
    if index["train_rows"] < s.batch_size:
        raise ValueError(f"train_generator.batch_size: {s.batch_size} is more than the {index['train_rows']} training rows "
                         f"of {shards}")
    target = _planned_steps(cfg, index["train_rows"])
    if exists(f"{run_dir}/{RESULT_FILE}"):
        done = read_json(f"{run_dir}/{RESULT_FILE}")
        if done.get("global_step") == target and done.get("data_key") == index["key"] and exists(f"{model_dir}/cemiface.json"):
            return GeneratorTrainResult(run_dir, model_dir, target, done.get("control"), done.get("history", []),
                                        done.get("resumes", []))
    from facegen.train.loop import fit_on_workers

    loop_config = {"cfg": cfg.model_dump(mode="json"), "data_dir": data_dir, "run_name": run_name}
    checkpoint = fit_on_workers(train_func, loop_config, s, storage_path, run_name)
    from facegen.stages.tasks import run_task

    export = TaskSettings(num_cpus=min(s.cpus_per_worker, 1.0), resources=s.resources)
    state = run_task(export_model, checkpoint, model_dir, resources=export, field="train_generator.resources",
                     name="train-generator: export model")
    outcome = GeneratorTrainResult(run_dir, model_dir, int(state["global_step"]), state.get("control"),
                                   list(state.get("history", [])), list(state.get("resumes", [])))
    write_json_atomic({"run_name": run_name, "model_dir": model_dir, "global_step": outcome.global_step,
                       "control": outcome.control, "history": outcome.history, "resumes": outcome.resumes,
                       "data_key": index["key"], "skipped": index.get("skipped", {})}, f"{run_dir}/{RESULT_FILE}")
    return outcome
