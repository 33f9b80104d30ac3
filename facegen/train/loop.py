"""Ray Train loop: IResNet + margin head on curriculum shards, verification and a checkpoint per epoch.

``train_func`` runs on every Ray Train worker and reads top to bottom like arcface_torch
``train_v2.py``: settings, data, backbone, head, optimizer, (resume), then per epoch: train,
verify on the ``.bin`` sets (rank 0), report metrics with a checkpoint.

Resume: Ray Train V2 keeps a checkpoint-manager snapshot in ``<storage_path>/<run name>``; a new
``TorchTrainer`` with the same ``RunConfig(name, storage_path)`` reloads it, and
``ray.train.get_checkpoint()`` returns the latest reported checkpoint, from which the loop continues
after the last completed epoch (any worker count: the data order depends only on seed and epoch).
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from facegen.config import FacegenConfig, TrainSettings
from facegen.lineage import check_training_input, shard_set_digest
from facegen.storage import exists, read_json, write_json_atomic
from facegen.models.iresnet_checkpoint import load_backbone, save_backbone, unwrap
from facegen.train.checkpoint import load_training_state, save_training_state
from facegen.train.data import CurriculumReader, prefetch
from facegen.train.heads import build_head
from facegen.models.iresnet import build_backbone

logger = logging.getLogger(__name__)

GRAD_CLIP_NORM = 5.0  # arcface_torch clips the backbone's gradient norm at 5
RESULT_FILE = "result.json"


@dataclass
class TrainResult:
    """Where a training run lives and what it did."""

    run_dir: str
    backbone_dir: str
    epochs_completed: int
    history: list[dict] = field(default_factory=list)
    resumed_from_epoch: int = 0


def lr_at(settings: TrainSettings, epoch: float) -> float:
    """Learning rate at (fractional) ``epoch``: linear warmup, then /10 at each of ``lr_steps``."""
    if settings.warmup_epochs and epoch < settings.warmup_epochs:
        return settings.lr * (epoch + 1e-3) / settings.warmup_epochs
    return settings.lr * 0.1 ** sum(1 for step in settings.lr_steps if epoch >= step)


def build_optimizer(settings: TrainSettings, modules: list[torch.nn.Module]) -> torch.optim.Optimizer:
    """SGD with momentum (the DataCV recipe) or AdamW, over every trainable parameter of ``modules``."""
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    if settings.optimizer == "sgd":
        return torch.optim.SGD(params, lr=settings.lr, momentum=settings.momentum, weight_decay=settings.weight_decay)
    return torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)


def _bin_name(path: str) -> str:
    base = os.path.basename(str(path).rstrip("/"))
    return base[: -len(".bin")] if base.endswith(".bin") else base


def _sum_over_workers(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def _verify(model: torch.nn.Module, bins: dict, cfg: FacegenConfig, device: torch.device) -> dict[str, float]:
    """``val/<set>`` accuracy (and ``_std``) of each loaded ``.bin`` set, flip-sum embeddings, K folds."""
    from facegen.eval.verification import embed_images, evaluate

    model.eval()
    out = {}
    for name, (images_uint8, issame) in bins.items():
        embeddings = embed_images(model, images_uint8, cfg.eval.batch_size, device)
        out[f"val/{name}"], out[f"val/{name}_std"] = evaluate(embeddings, issame, min(cfg.eval.nrof_folds, len(issame)))
    return out


def train_func(config: dict) -> None:
    """One Ray Train worker: train ``cfg.train`` on the shards, reporting a checkpoint every epoch."""
    import ray.train
    import ray.train.torch

    from facegen.tracking import start_run

    cfg = FacegenConfig.model_validate(config["cfg"])
    settings = cfg.train
    run_name = config["run_name"]
    ctx = ray.train.get_context()
    rank, world_size = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    use_amp = settings.fp16 and device.type == "cuda"
    torch.manual_seed(cfg.run.seed)

    reader = CurriculumReader(
        config["shards_dir"], rank, world_size, settings.batch_size, cfg.run.seed,
        mode=settings.curriculum, total_epochs=settings.epochs, decode_threads=settings.dataloader_workers,
    )
    backbone = build_backbone(settings.arch, settings.width, settings.embedding_size, fp16=use_amp)
    head = build_head(settings, reader.num_classes)

    start_epoch, history = 0, []
    checkpoint = ray.train.get_checkpoint()
    with checkpoint.as_directory() if checkpoint else contextlib.nullcontext() as ckpt_dir:
        if ckpt_dir:
            backbone.load_state_dict(load_backbone(f"{ckpt_dir}/backbone", arch=settings.arch).state_dict())
        backbone = ray.train.torch.prepare_model(backbone)
        head = ray.train.torch.prepare_model(head)
        optimizer = build_optimizer(settings, [backbone, head])
        if ckpt_dir:
            start_epoch, extra = load_training_state(f"{ckpt_dir}/state", head, optimizer)
            history = list(extra.get("history", []))[:start_epoch]
    scaler = torch.amp.GradScaler("cuda") if use_amp else None

    bins = {}
    if rank == 0 and config["eval_bins"]:
        from facegen.eval.verification import load_bin

        bins = {_bin_name(p): load_bin(p) for p in config["eval_bins"]}
    tracker = start_run(cfg, "train", name=run_name) if rank == 0 and start_epoch < settings.epochs else None

    for epoch in range(start_epoch, settings.epochs):
        backbone.train()
        head.train()
        steps = reader.steps_per_epoch(epoch)
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        correct = torch.zeros((), dtype=torch.int64, device=device)
        seen = 0
        started = time.perf_counter()
        skipped_before = reader.skipped
        for step, (images, labels) in enumerate(prefetch(reader.batches(epoch), depth=2)):
            lr = lr_at(settings, epoch + step / max(steps, 1))
            for group in optimizer.param_groups:
                group["lr"] = lr
            images = images.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)

            embeddings = backbone(images)
            loss = head(embeddings, labels)
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(backbone.parameters(), GRAD_CLIP_NORM)
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                torch.nn.utils.clip_grad_norm_(backbone.parameters(), GRAD_CLIP_NORM)
                optimizer.step()

            loss_sum += loss.detach().double() * len(labels)
            correct += unwrap(head).correct(labels)
            seen += len(labels)
        elapsed = time.perf_counter() - started

        total_loss, total_correct, total_seen, total_skipped = _sum_over_workers(
            [float(loss_sum), float(correct), float(seen), float(reader.skipped - skipped_before)], device
        )
        metrics: dict = {
            "epoch": epoch + 1,
            "loss": total_loss / max(total_seen, 1),
            "train_accuracy": total_correct / max(total_seen, 1),
            "lr": optimizer.param_groups[0]["lr"],
            "throughput": total_seen / max(elapsed, 1e-9),
            "images": int(total_seen),
            "skipped_rows": int(total_skipped),
            "buckets": len({int(reader.shards[i]["bucket"]) for i in reader.epoch_shards(epoch)}),
        }
        if rank == 0 and bins:
            metrics.update(_verify(unwrap(backbone), bins, cfg, device))
        history.append(metrics)
        if rank == 0:
            shown = " ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k.startswith("val/") and not k.endswith("_std"))
            print(f"[train {run_name}] epoch {epoch + 1}/{settings.epochs} loss {metrics['loss']:.3f} "
                  f"acc {metrics['train_accuracy']:.3f} {metrics['throughput']:.0f} img/s {shown}", flush=True)
        if tracker is not None:
            tracker.log(metrics, step=epoch + 1)

        with tempfile.TemporaryDirectory() as tmp:
            epoch_checkpoint = None
            if rank == 0:
                save_backbone(f"{tmp}/backbone", backbone, settings.arch, settings.width, settings.embedding_size)
                extra = {"history": history, "run_name": run_name, "resumed_from_epoch": start_epoch}
                save_training_state(f"{tmp}/state", head, optimizer, epoch + 1, extra)
                epoch_checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=epoch_checkpoint, checkpoint_dir_name=f"epoch-{epoch + 1:04d}")

    if tracker is not None:
        if history:
            tracker.summary({k: v for k, v in history[-1].items() if k.startswith("val/")})
        tracker.finish()


def _absolute(path: str) -> str:
    return path if "://" in str(path) else os.path.abspath(path)


def _finished(run_dir: str, epochs: int) -> TrainResult | None:
    """The recorded result of a run that already trained ``epochs`` epochs, else None."""
    path = f"{run_dir}/{RESULT_FILE}"
    if not exists(path):
        return None
    done = read_json(path)
    if int(done.get("epochs_completed", 0)) < epochs or not exists(f"{done['backbone_dir']}/backbone.json"):
        return None
    return TrainResult(run_dir, done["backbone_dir"], int(done["epochs_completed"]), list(done.get("history", [])),
                       resumed_from_epoch=int(done["epochs_completed"]))


def train(cfg: FacegenConfig, shards_dir: str, eval_bins: list[str] | None = None) -> TrainResult:
    """Train (or resume) ``cfg.train`` on a shard set with Ray Train; exports ``<run_dir>/backbone``.

    Ray must already be initialised. A re-run with the same run name continues after the last
    completed epoch, and returns at once when all ``cfg.train.epochs`` are done.
    """
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    settings = cfg.train
    run_name = settings.run_name or cfg.run.name
    # Workers do not share the driver's working directory: every path they get is absolute.
    cfg = cfg.model_copy(deep=True)
    cfg.run.output_dir = _absolute(cfg.run.output_dir)
    shards_dir = _absolute(shards_dir)
    bins = [_absolute(b) for b in (cfg.eval.bins if eval_bins is None else eval_bins)]
    storage_path = cfg.stage_dir("train")
    run_dir = f"{storage_path}/{run_name}"
    backbone_dir = f"{run_dir}/backbone"

    # Before Ray Train starts: a run resumes only on the shard set it started on (run.overwrite restarts it).
    check_training_input(run_dir, shards_dir, shard_set_digest(shards_dir), cfg.run.overwrite)
    finished = _finished(run_dir, settings.epochs)
    if finished is not None:
        logger.info("%s: all %d epochs already done", run_dir, finished.epochs_completed)
        return finished

    # Fail here, not inside a worker, when an epoch would have no full batch on some rank.
    probe = CurriculumReader(shards_dir, 0, settings.num_workers, settings.batch_size, cfg.run.seed,
                             mode=settings.curriculum, total_epochs=settings.epochs)
    for epoch in range(settings.epochs):
        if probe.steps_per_epoch(epoch) == 0:
            raise ValueError(f"{shards_dir}: epoch {epoch + 1} has no full batch of train.batch_size="
                             f"{settings.batch_size} per worker for {settings.num_workers} workers")

    resources = {"CPU": settings.cpus_per_worker, **settings.resources}
    if settings.use_gpu:
        resources["GPU"] = 1
    trainer = TorchTrainer(
        train_func,
        train_loop_config={"cfg": cfg.model_dump(mode="json"), "shards_dir": shards_dir,
                           "eval_bins": bins, "run_name": run_name},
        scaling_config=ScalingConfig(num_workers=settings.num_workers, use_gpu=settings.use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(name=run_name, storage_path=storage_path,
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"{run_dir}: training finished without a checkpoint")
    with result.checkpoint.as_directory() as ckpt_dir:
        model = load_backbone(f"{ckpt_dir}/backbone", arch=settings.arch)
        state = read_json(f"{ckpt_dir}/state/state.json")
    save_backbone(backbone_dir, model, settings.arch, settings.width, settings.embedding_size)
    epochs_done = int(state["epoch"])
    extra = state.get("extra") or {}
    outcome = TrainResult(run_dir, backbone_dir, epochs_done, list(extra.get("history", [])),
                          int(extra.get("resumed_from_epoch", 0)))
    write_json_atomic({"run_name": run_name, "epochs_completed": epochs_done, "backbone_dir": backbone_dir,
                       "resumed_from_epoch": outcome.resumed_from_epoch, "history": outcome.history},
                      f"{run_dir}/{RESULT_FILE}")
    return outcome
