"""Verification during training: ``.bin`` sets (LFW, CFP-FP, AgeDB-30, CALFW, CPLFW, ...) on a schedule.

Each set is embedded flip-summed and scored with K-fold accuracy (mean and std over the folds,
:mod:`facegen.eval.verification`); ``val/mean`` is the mean over the sets, the "average of the
benchmarks" that papers report. The best ``val/mean`` so far is kept with its step, so a run
records its best point in every checkpoint and in W&B.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from facegen.models.iresnet_checkpoint import unwrap


class Validator:
    """Loads the sets once; ``validator(model, step, epoch)`` -> ``val/*`` metrics (with ``val/best_mean``)."""

    def __init__(self, paths: list[str], batch_size: int = 64, nrof_folds: int = 10, best: dict | None = None):
        from facegen.eval.verification import load_bin, set_name

        self.sets: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for path in paths:
            name = set_name(path)
            if name in self.sets:
                raise ValueError(f"eval.bins: two sets are named {name!r} ({path})")
            self.sets[name] = load_bin(path)
        self.batch_size = batch_size
        self.nrof_folds = nrof_folds
        self.best: dict[str, Any] | None = best

    def __bool__(self) -> bool:
        return bool(self.sets)

    @torch.no_grad()
    def __call__(self, model: nn.Module, step: int, epoch: float) -> dict[str, float]:
        from facegen.eval.verification import embed_images, evaluate

        net = unwrap(model)
        was_training = net.training
        net.eval()
        device = next(net.parameters()).device
        out: dict[str, float] = {}
        try:
            for name, (images, issame) in self.sets.items():
                embeddings = embed_images(net, images, self.batch_size, device)
                out[f"val/{name}"], out[f"val/{name}_std"] = evaluate(embeddings, issame, min(self.nrof_folds, len(issame)))
        finally:
            net.train(was_training)
        out["val/mean"] = float(np.mean([out[f"val/{name}"] for name in self.sets]))
        if self.best is None or out["val/mean"] > self.best["val/mean"]:
            self.best = {"step": int(step), "epoch": float(epoch), **out}
        out["val/best_mean"] = self.best["val/mean"]
        out["val/best_step"] = self.best["step"]
        return out
