"""One worker's CemiFace training loop, without Ray (run by Ray Train or a plain session).

Per step: the worker's slice of a global pair batch (:mod:`facegen.train.generator_data`),
``x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps``, the UNet's noise prediction given C_id and m, and

    loss = MSE(eps_hat, eps) + w * mean((1 - t/T) L_rec + (t/T) L_sim)

with ``L_rec = mean((x0_hat - x0)^2)`` per sample and ``L_sim = |cos(E(x0_hat), C_id) - m|``, E the
(frozen, differentiable) embedder C_id came from and ``x0_hat`` the clean image the prediction
implies (CemiFace's similarity-matching loss, :func:`facegen.models.cemiface.cemiface_loss`;
``w = similarity_weight``, 0 turns it off). AdamW,
AMP on GPU, gradient clipping. Every ``checkpoint_every_steps`` worker 0 saves the model, the
optimizer and the state, with the similarity-control figure measured on held-out identities and a
sample grid (rows: identities, columns: m). A resumed run continues at the exact batch of its
checkpoint with the same optimizer state, so it reaches an uninterrupted run's parameters.
"""

from __future__ import annotations

import io
import os
import tempfile
import time
from typing import Any

import numpy as np
import torch
from torch import nn

from facegen.config import FacegenConfig
from facegen.images import encode_png
from facegen.models.cemiface import (
    CemiFaceUNet,
    cemiface_loss,
    ddim_sample,
    load_generator,
    noise_scheduler,
    save_generator,
    to_aligned_crops,
)
from facegen.storage import read_bytes, read_json, write_bytes_atomic, write_json_atomic
from facegen.train.generator_data import PairSampler, PairTable
from facegen.train.step import resolve_amp

MODEL_DIR, OPTIMIZER_FILE, STATE_FILE, GRID_FILE = "model", "optimizer.pt", "state.json", "samples.png"


def build_model(cfg: FacegenConfig, id_dim: int) -> CemiFaceUNet:
    """The UNet ``train_generator.net`` describes, for features of width ``id_dim``."""
    net = cfg.train_generator.net
    return CemiFaceUNet(image_size=net.image_size, id_dim=id_dim, similarity_dim=net.similarity_dim,
                        context_tokens=net.context_tokens, cross_attention_dim=net.cross_attention_dim,
                        block_out_channels=tuple(net.block_out_channels), layers_per_block=net.layers_per_block,
                        attention_head_dim=net.attention_head_dim, norm_num_groups=net.norm_num_groups)


def _unwrap(model: nn.Module) -> CemiFaceUNet:
    return model.module if hasattr(model, "module") else model


def generator_info(cfg: FacegenConfig, index: dict) -> dict[str, Any]:
    """What a saved generator records of its conditioning (checked when it is used)."""
    s = cfg.train_generator
    return {"kind": "cemiface", "embedder": index["key"]["embedder"], "feature_dim": index["feature_dim"],
            "image_size": s.net.image_size, "similarity_step": s.similarity_step, "shards": index["key"]["shards"]}


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rank correlation (ties averaged)."""
    from scipy.stats import spearmanr

    return float(spearmanr(np.asarray(x, np.float64), np.asarray(y, np.float64)).statistic)


def similarity_control(model: CemiFaceUNet, scheduler_config: dict, table: PairTable, embedder: Any,
                       similarities: list[float], per_m: int, steps: int, seed: int) -> tuple[dict, np.ndarray]:
    """Draw ``per_m`` images per held-out identity and m, embed them, compare with the requested m.

    Returns the figure (Spearman of m against the realised cosine, mean and std per m) and a uint8
    grid image with one row per identity (up to 8) and one column per m."""
    rows = np.flatnonzero(table.holdout)
    labels = table.labels[rows]
    _, first = np.unique(labels, return_index=True)
    inquiries = rows[first]  # one inquiry image per held-out identity
    features = np.asarray(table.features[inquiries], np.float32)
    plan = [(i, m, k) for i in range(len(inquiries)) for m in similarities for k in range(per_m)]
    seeds = [int(np.random.SeedSequence([seed, i, k, int(round(m * 1000)) + 1000]).generate_state(1)[0]) for i, m, k in plan]
    model.eval()
    images = []
    for start in range(0, len(plan), 64):
        part = plan[start : start + 64]
        drawn = ddim_sample(model, scheduler_config, features[[i for i, _, _ in part]], [m for _, m, _ in part],
                            seeds[start : start + 64], steps)
        images.append(to_aligned_crops(drawn))
    pixels = np.concatenate(images)
    realised = np.einsum("nd,nd->n", embedder.embed(pixels).astype(np.float64),
                         features[[i for i, _, _ in plan]].astype(np.float64))
    requested = np.array([m for _, m, _ in plan])
    figure = {"spearman": spearman(requested, realised), "identities": len(inquiries), "images_per_m": per_m * len(inquiries),
              "by_m": [{"m": float(m), "mean": float(realised[requested == m].mean()),
                        "std": float(realised[requested == m].std())} for m in similarities]}
    shown = min(len(inquiries), 8)
    grid = np.concatenate([np.concatenate([pixels[plan.index((i, m, 0))] for m in similarities], axis=1)
                           for i in range(shown)], axis=0)
    return figure, grid


def _differentiable_embedder(cfg: FacegenConfig, device: torch.device) -> nn.Module | None:
    s = cfg.train_generator
    if s.similarity_weight <= 0:
        return None
    from facegen.cache import localized
    from facegen.config.faces import EMBEDDERS

    settings = localized(s.embedder, "train_generator.embedder")
    model = EMBEDDERS.hook(settings.kind, "differentiable_model")(settings, device)
    model.eval().requires_grad_(False)
    if hasattr(model, "fp16"):
        model.fp16 = False  # the outer autocast decides
    return model


def fit_generator(session: Any, cfg: FacegenConfig, data_dir: str, run_name: str) -> dict[str, Any]:
    """Train (or continue) ``cfg.train_generator`` on prepared pairs; returns the final state."""
    s = cfg.train_generator
    rank, world_size, device = session.rank, session.world_size, session.device
    amp_dtype, use_scaler = resolve_amp(s.amp, device)
    table = PairTable.load(data_dir)
    sampler = PairSampler(table, s.batch_size, cfg.run.seed, s.similarity_step, s.num_train_timesteps)
    torch.manual_seed(cfg.run.seed)  # the same initial weights on every worker and worker count
    model = build_model(cfg, table.index["feature_dim"]).to(device)
    scheduler = noise_scheduler(s.num_train_timesteps)
    optimizer = torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=s.weight_decay)
    scaler = torch.amp.GradScaler("cuda") if use_scaler else None
    state: dict[str, Any] = {"global_step": 0, "history": [], "control": None, "resumes": []}
    with session.latest_checkpoint() as ckpt:
        if ckpt:
            saved = read_json(f"{ckpt}/{STATE_FILE}")
            if saved.get("data_key") != table.index["key"]:
                raise ValueError(f"{ckpt}: checkpoint of other training data (shards, embedder or size changed)")
            saved_model, _, _ = load_generator(f"{ckpt}/{MODEL_DIR}", "checkpoint")
            model.load_state_dict(saved_model.state_dict())
            optimizer.load_state_dict(torch.load(io.BytesIO(read_bytes(f"{ckpt}/{OPTIMIZER_FILE}")), weights_only=True,
                                                 map_location=device))
            if scaler is not None and saved.get("scaler"):
                scaler.load_state_dict(saved["scaler"])
            state.update({k: saved[k] for k in state if k in saved})
            state["resumes"] = list(state["resumes"]) + [{"global_step": saved["global_step"], "world_size": world_size}]
    loss_embedder = _differentiable_embedder(cfg, device)
    model = session.prepare(model)
    judge = None
    tracker = None
    if rank == 0:
        from facegen.faces.embed import build_embedder
        from facegen.tracking import start_run

        judge = build_embedder(s.embedder)
        tracker = start_run(cfg, "train-generator", name=run_name)
    total = s.epochs * sampler.steps_per_epoch
    stop = min(total, s.max_steps) if s.max_steps else total
    timer, window = time.perf_counter(), []

    def checkpoint(metrics: dict) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            if rank == 0:
                base = _unwrap(model)
                figure, grid = similarity_control(base, dict(scheduler.config), table, judge, s.control_similarities,
                                                  s.control_images, s.ddim_steps, cfg.run.seed)
                base.train()
                state["control"] = {"global_step": state["global_step"], **figure}
                save_generator(f"{tmp}/{MODEL_DIR}", base, dict(scheduler.config), generator_info(cfg, table.index))
                buffer = io.BytesIO()
                torch.save(optimizer.state_dict(), buffer)
                write_bytes_atomic(buffer.getvalue(), f"{tmp}/{OPTIMIZER_FILE}")
                write_bytes_atomic(encode_png(grid), f"{tmp}/{GRID_FILE}")
                write_json_atomic({**state, "data_key": table.index["key"], "run_name": run_name, "world_size": world_size,
                                   "scaler": scaler.state_dict() if scaler is not None else None}, f"{tmp}/{STATE_FILE}")
                if tracker is not None:
                    tracker.log({"control/spearman": figure["spearman"],
                                 **{f"control/m={b['m']:g}": b["mean"] for b in figure["by_m"]}}, step=state["global_step"])
                    tracker.log_image("samples", grid, step=state["global_step"], caption="rows: identities, columns: m")
                metrics = {**metrics, "control_spearman": figure["spearman"]}
            session.report(metrics, tmp, f"step-{state['global_step']:09d}")

    model.train()
    while state["global_step"] < stop:
        step = state["global_step"]
        epoch, in_epoch = divmod(step, sampler.steps_per_epoch)
        batch = sampler.batch(epoch, in_epoch, rank, world_size)
        batch.images, batch.noise = batch.images.to(device), batch.noise.to(device)
        batch.id_features, batch.similarity = batch.id_features.to(device), batch.similarity.to(device)
        batch.timesteps = batch.timesteps.to(device)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float16, enabled=amp_dtype is not None):
            loss, parts = cemiface_loss(model, scheduler, batch, s.similarity_weight, loss_embedder, s.num_train_timesteps)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
        else:
            loss.backward()
        if s.grad_clip_norm:
            nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip_norm)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        state["global_step"] += 1
        window.append(parts)
        if state["global_step"] % s.checkpoint_every_steps == 0 or state["global_step"] == stop:
            elapsed = time.perf_counter() - timer
            metrics = {"step": state["global_step"], "epoch": state["global_step"] / sampler.steps_per_epoch,
                       **{k: float(np.mean([w[k] for w in window])) for k in window[0]},
                       "images_per_s": len(window) * s.batch_size / max(elapsed, 1e-9)}
            state["history"] = list(state["history"]) + [metrics]
            if tracker is not None:
                tracker.log({f"train/{k}": v for k, v in metrics.items()}, step=state["global_step"])
            checkpoint(metrics)
            if rank == 0:
                c = state["control"]
                print(f"[train-generator {run_name}] step {state['global_step']}/{stop} mse {metrics['mse']:.4f} "
                      f"{metrics['images_per_s']:.0f} img/s control spearman {c['spearman']:.3f} means "
                      + " ".join(f"{b['m']:g}:{b['mean']:.3f}" for b in c["by_m"]), flush=True)
            timer, window = time.perf_counter(), []
    if tracker is not None:
        tracker.finish()
    return dict(state)
