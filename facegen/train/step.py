"""One training step and the AMP choice, in torch alone (no settings, no Ray).

:func:`facegen.train.fit.fit` runs them per step; ``bench/gpu_training.py`` times the same step on
machines that have torch but not pydantic or Ray.
"""

from __future__ import annotations

import torch
from torch import nn

from facegen.train.partial_fc import PartialFC


def resolve_amp(mode: str, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """``(autocast dtype or None, use a loss scaler)``: bf16 where the GPU has it, else fp16 + scaler."""
    if device.type != "cuda" or mode == "off":
        return None, False
    if mode == "bf16" and not torch.cuda.is_bf16_supported():
        raise ValueError("train.amp: bf16 requested but this GPU does not support it (use auto or fp16)")
    if mode == "bf16" or (mode == "auto" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16, False
    return torch.float16, True


def train_step(
    model: nn.Module, head: PartialFC, optimizers: list[torch.optim.Optimizer], scaler: torch.amp.GradScaler | None,
    images: torch.Tensor, labels: torch.Tensor, step: int, clip_norm: float,
) -> torch.Tensor:
    """Forward, Partial FC loss, backward (scaled when fp16), backbone clipping, optimizer steps; the loss."""
    loss = head(model(images), labels, step)
    for optimizer in optimizers:
        optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        for optimizer in optimizers:
            scaler.unscale_(optimizer)
    else:
        loss.backward()
    if clip_norm > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip_norm)
    for optimizer in optimizers:
        if scaler is not None:
            scaler.step(optimizer)
        else:
            optimizer.step()
    if scaler is not None:
        scaler.update()
    return loss.detach()
