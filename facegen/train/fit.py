"""One worker's training loop, without Ray: IResNet + Partial FC on curriculum shards.

``fit`` reads top to bottom like arcface_torch ``train_v2.py``: settings, data, backbone, head,
optimizers, resume, then per step: learning rate, forward, Partial FC loss, backward (AMP, clipped),
and on schedule a checkpoint every ``checkpoint_every_steps``, verification every
``eval_every_steps`` (or per epoch) and a report per epoch. What runs it is a :class:`Session`:
Ray Train's (:mod:`facegen.train.loop`) or :class:`LocalSession` (plain PyTorch, one process or an
already initialised ``torch.distributed`` group), so benchmarks and tests run the same loop.

A resumed run continues at the exact stream positions of its checkpoint with the same centres,
optimizer and scaler state and the same Partial FC draws, so it reaches the parameters of an
uninterrupted run (up to summation order when the worker count changes, with ``sync_bn``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import nn

from facegen.config import FacegenConfig, TrainSettings
from facegen.models.iresnet import build_backbone
from facegen.shards import check_datacv_scale, manifest_set_digest
from facegen.storage import read_json, write_json_atomic
from facegen.train.checkpoint import load_checkpoint, save_checkpoint
from facegen.train.data import CurriculumReader, prefetch
from facegen.train.heads import build_margin
from facegen.train.partial_fc import PartialFC
from facegen.train.step import resolve_amp, train_step
from facegen.train.sync_bn import convert_sync_batchnorm
from facegen.train.validation import Validator


class Session(Protocol):
    """What runs :func:`fit`: this worker's place, checkpoints in and out, model wrapping."""

    rank: int
    world_size: int
    device: torch.device

    def latest_checkpoint(self) -> contextlib.AbstractContextManager[str | None]: ...

    def prepare(self, model: nn.Module) -> nn.Module: ...

    def report(self, metrics: dict, checkpoint_dir: str | None, name: str) -> None: ...


class LocalSession:
    """Plain PyTorch: checkpoints in ``<storage_dir>/<name>`` (shared by the workers), latest in ``latest.json``."""

    def __init__(self, storage_dir: str, device: str | torch.device = "cpu", keep: int = 2):
        self.storage_dir = os.path.abspath(storage_dir)
        self.device = torch.device(device)
        self.keep = keep
        self.distributed = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.distributed else 0
        self.world_size = dist.get_world_size() if self.distributed else 1
        self.reports: list[dict] = []

    def latest_checkpoint(self) -> contextlib.AbstractContextManager[str | None]:
        path = os.path.join(self.storage_dir, "latest.json")
        name = read_json(path)["name"] if os.path.exists(path) else None
        return contextlib.nullcontext(os.path.join(self.storage_dir, name) if name else None)

    def prepare(self, model: nn.Module) -> nn.Module:
        model = model.to(self.device)
        return nn.parallel.DistributedDataParallel(model) if self.world_size > 1 else model

    def report(self, metrics: dict, checkpoint_dir: str | None, name: str) -> None:
        self.reports.append(dict(metrics))
        if checkpoint_dir is None:
            return
        shutil.copytree(checkpoint_dir, os.path.join(self.storage_dir, name), dirs_exist_ok=True)
        if self.distributed:
            dist.barrier()
        if self.rank == 0:
            done = sorted(d for d in os.listdir(self.storage_dir) if d.startswith("step-"))
            for old in done[: -self.keep]:
                shutil.rmtree(os.path.join(self.storage_dir, old))
            write_json_atomic({"name": name}, os.path.join(self.storage_dir, "latest.json"))
        if self.distributed:
            dist.barrier()


def lr_at(settings: TrainSettings, epoch: float) -> float:
    """Learning rate at (fractional) ``epoch``: linear warm-up, then /10 at each of ``lr_steps``."""
    if settings.warmup_epochs and epoch < settings.warmup_epochs:
        return settings.lr * (epoch + 1e-3) / settings.warmup_epochs
    return settings.lr * 0.1 ** sum(1 for step in settings.lr_steps if epoch >= step)


def backbone_param_groups(settings: TrainSettings, backbone: nn.Module) -> list[dict[str, Any]]:
    """The backbone's trainable parameters as optimizer groups: one, or with ``bn_weight_decay``
    off two, the batch-norm scales and shifts without weight decay (the organisers' ``separate_bn_param``)."""
    trainable = [p for p in backbone.parameters() if p.requires_grad]
    if settings.bn_weight_decay:
        return [{"params": trainable}]
    norms = {id(p) for m in backbone.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) for p in m.parameters()}
    return [{"params": [p for p in trainable if id(p) not in norms]},
            {"params": [p for p in trainable if id(p) in norms], "weight_decay": 0.0}]


def build_optimizer(settings: TrainSettings, params: list[nn.Parameter] | list[dict[str, Any]], fused: bool = False
                    ) -> torch.optim.Optimizer:
    """SGD with momentum (the DataCV recipe) or AdamW over ``params`` (tensors or groups); ``fused``:
    one kernel for all parameters (CUDA), the same update."""
    extra = {"fused": True} if fused else {}
    if settings.optimizer == "sgd":
        return torch.optim.SGD(params, lr=settings.lr, momentum=settings.momentum, weight_decay=settings.weight_decay, **extra)
    return torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay, **extra)


def _sum_over_workers(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def _all_positions(positions: dict[int, int], streams: int, device: torch.device) -> dict[str, int]:
    """Every stream's position (each worker knows only its own streams)."""
    values = [0.0] * streams
    for stream, position in positions.items():
        values[stream] = float(position)
    return {str(i): int(v) for i, v in enumerate(_sum_over_workers(values, device))}


def fit(session: Session, cfg: FacegenConfig, shards_dir: str, eval_bins: list[str], run_name: str) -> list[dict]:
    """Train (or continue) ``cfg.train`` on a shard set; returns the per-epoch history."""
    settings = cfg.train
    rank, world_size, device = session.rank, session.world_size, session.device
    amp_dtype, use_scaler = resolve_amp(settings.amp, device)
    torch.manual_seed(cfg.run.seed)  # the same initial backbone on every worker and every worker count

    reader = CurriculumReader(shards_dir, rank, world_size, settings.batch_size, cfg.run.seed, mode=settings.curriculum,
                              total_epochs=settings.epochs, data=settings.data, augment=settings.augment)
    check_datacv_scale(settings.datacv_scale, reader.manifest, shards_dir)
    digest = manifest_set_digest(reader.manifest)
    backbone = build_backbone(settings.arch, settings.width, settings.embedding_size, fp16=amp_dtype is not None,
                              dropout=settings.dropout)
    backbone.amp_dtype = amp_dtype or torch.float16
    if settings.sync_bn:
        backbone = convert_sync_batchnorm(backbone, device)
    backbone = backbone.to(device)
    on_gpu = device.type == "cuda"
    channels_last = settings.channels_last and on_gpu
    if channels_last:
        backbone = backbone.to(memory_format=torch.channels_last)
    head = PartialFC(build_margin(settings), settings.embedding_size, reader.num_classes, settings.partial_fc.sample_rate,
                     seed=cfg.run.seed, rank=rank, world_size=world_size, amp_dtype=amp_dtype).to(device)
    backbone_optimizer = build_optimizer(settings, backbone_param_groups(settings, backbone), fused=on_gpu)
    head_optimizer = build_optimizer(settings, [head.weight], fused=on_gpu)
    optimizers = [backbone_optimizer, head_optimizer]
    scaler = torch.amp.GradScaler("cuda", growth_interval=settings.loss_scale_growth_interval) if use_scaler else None

    state: dict[str, Any] = {"epoch": 0, "step_in_epoch": 0, "global_step": 0, "positions": {}, "history": [],
                             "best": None, "validation": None, "resumes": []}
    with session.latest_checkpoint() as ckpt_dir:
        if ckpt_dir:
            saved = load_checkpoint(ckpt_dir, rank=rank, world_size=world_size, backbone=backbone, head=head,
                                    backbone_optimizer=backbone_optimizer, head_optimizer=head_optimizer, scaler=scaler)
            if saved.get("shard_digest") != digest:
                raise ValueError(f"{ckpt_dir}: checkpoint of another shard set ({saved.get('shard_digest')} != {digest})")
            state.update({k: saved[k] for k in state if k in saved})
            state["resumes"] = list(state["resumes"]) + [{"global_step": saved["global_step"], "world_size": world_size,
                                                          "from_world_size": saved.get("world_size")}]
    model = session.prepare(backbone)
    step_model, step_head = (torch.compile(model), torch.compile(head)) if settings.compile else (model, head)
    validator = Validator(eval_bins, cfg.eval.batch_size, cfg.eval.nrof_folds, best=state["best"]) if rank == 0 else None
    tracker = None
    if rank == 0 and state["epoch"] < settings.epochs:
        from facegen.tracking import start_run

        tracker = start_run(cfg, "train", name=run_name)
    meta = (settings.arch, settings.width, settings.embedding_size)

    def validate(epoch: float) -> dict:
        out = validator(model, state["global_step"], epoch) if validator else {}
        if out:
            state["validation"], state["best"] = out, validator.best
        return out

    def checkpoint(metrics: dict) -> None:
        state["positions"] = _all_positions(positions, settings.data.streams, device) if state["step_in_epoch"] else {}
        with tempfile.TemporaryDirectory() as tmp:
            save_checkpoint(tmp, rank=rank, world_size=world_size, backbone=backbone, backbone_meta=meta, head=head,
                            backbone_optimizer=backbone_optimizer, head_optimizer=head_optimizer, scaler=scaler,
                            state={**state, "shard_digest": digest, "run_name": run_name})
            session.report(metrics, tmp, f"step-{state['global_step']:09d}")

    positions: dict[int, int] = {}
    stop_at = settings.max_steps or None
    for epoch in range(state["epoch"], settings.epochs):
        model.train()
        steps = reader.steps_per_epoch(epoch)
        start_step = state["step_in_epoch"]
        start_positions = {int(k): v for k, v in state["positions"].items()} if start_step else None
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        correct = torch.zeros((), dtype=torch.int64, device=device)
        skipped_before, done, started = reader.skipped, 0, time.perf_counter()
        batches: Iterator = prefetch(reader.batches(epoch, start_step, start_positions), settings.data.prefetch_batches)
        for batch in batches:
            lr = lr_at(settings, epoch + batch.step / max(steps, 1))
            for optimizer in optimizers:
                for group in optimizer.param_groups:
                    group["lr"] = lr
            images = batch.images.to(device, non_blocking=True)
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            labels = batch.labels.to(device, non_blocking=True)
            loss_sum += train_step(step_model, step_head, optimizers, scaler, images, labels, state["global_step"],
                                   settings.grad_clip_norm).double()
            correct += head.last_correct
            done += 1
            positions = batch.positions
            state["global_step"] += 1
            state["step_in_epoch"] = batch.step + 1
            last_of_epoch = batch.step + 1 == steps
            # Decided the same way on every worker (only worker 0 validates; all report together).
            eval_now = bool(eval_bins) and settings.eval_every_steps and state["global_step"] % settings.eval_every_steps == 0
            step_metrics = validate(epoch + (batch.step + 1) / steps) if eval_now else {}
            stopping = stop_at is not None and state["global_step"] >= stop_at and not last_of_epoch
            every = settings.checkpoint_every_steps
            if not last_of_epoch and (stopping or (every and state["global_step"] % every == 0)):
                checkpoint({"step": state["global_step"], "epoch": epoch + 1, "loss": float(loss_sum) / done, **step_metrics})
            elif eval_now:
                session.report({"step": state["global_step"], "epoch": epoch + 1, **step_metrics}, None, "")
            if step_metrics:  # kept for the report's curves, which plot validation against the step
                state["validations"] = list(state.get("validations", [])) + [{"step": state["global_step"], **step_metrics}]
            if step_metrics and tracker is not None:
                tracker.log(step_metrics, step=state["global_step"])
            if stopping:
                batches.close()
                break
        if not done or state["step_in_epoch"] < steps:  # stopped at max_steps mid-epoch
            break
        elapsed = time.perf_counter() - started
        (skipped,) = _sum_over_workers([float(reader.skipped - skipped_before)], device)
        metrics: dict[str, Any] = {
            "epoch": epoch + 1, "step": state["global_step"], "loss": float(loss_sum) / done,
            "train_accuracy": float(correct) / (done * settings.batch_size), "lr": lr,
            "throughput": done * settings.batch_size / max(elapsed, 1e-9), "images": done * settings.batch_size,
            "steps": done, "skipped_rows": int(skipped),
            "buckets": len({int(reader.shards[i]["bucket"]) for i in reader.epoch_shards(epoch)}),
        }
        if not settings.eval_every_steps:
            metrics.update(validate(epoch + 1))
        state["history"] = list(state["history"]) + [metrics]
        state.update(epoch=epoch + 1, step_in_epoch=0)
        if rank == 0:
            shown = " ".join(f"{k[4:]} {v:.4f}" for k, v in metrics.items()
                             if k.startswith("val/") and not k.endswith("_std") and not k.startswith("val/best"))
            print(f"[train {run_name}] epoch {epoch + 1}/{settings.epochs} loss {metrics['loss']:.3f} "
                  f"acc {metrics['train_accuracy']:.3f} {metrics['throughput']:.0f} img/s {shown}", flush=True)
        if tracker is not None:
            tracker.log(metrics, step=state["global_step"])
        checkpoint(metrics)
        if stop_at is not None and state["global_step"] >= stop_at:
            break
    if tracker is not None:
        if state["best"]:
            tracker.summary({f"best/{k[4:]}" if k.startswith("val/") else f"best/{k}": v for k, v in state["best"].items()})
        tracker.finish()
    return list(state["history"])
