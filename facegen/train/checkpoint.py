"""Training-state checkpoints (resume) in safe formats only.

A training-state directory::

    head.safetensors       the margin head's state dict
    optimizer.pt           optimizer state (tensors + plain containers; weights_only loadable)
    state.json             {"epoch", "extra", "format_version"}

Backbone folders (``backbone.safetensors`` + ``backbone.json``) live in
:mod:`facegen.models.iresnet_checkpoint`, shared with every stage that embeds faces.
"""

from __future__ import annotations

import io
import json

import torch
from torch import nn

from facegen.models.iresnet_checkpoint import (
    FORMAT_VERSION,
    load_safetensors_file,
    load_state_dict_strict,
    read_required,
    state_dict_bytes,
)
from facegen.storage import exists, read_json, write_bytes_atomic, write_json_atomic

HEAD_WEIGHTS = "head.safetensors"
OPTIMIZER_STATE = "optimizer.pt"
TRAIN_STATE = "state.json"


def save_training_state(
    directory: str, head: nn.Module, optimizer: torch.optim.Optimizer, epoch: int, extra: dict | None = None
) -> str:
    """Write the head weights, optimizer state and ``{"epoch", "extra"}`` (JSON) into ``directory``."""
    directory = str(directory).rstrip("/")
    state = {"epoch": int(epoch), "extra": extra or {}, "format_version": FORMAT_VERSION}
    try:
        json.dumps(state)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"save_training_state: extra must be JSON-serialisable ({exc})") from None
    write_bytes_atomic(state_dict_bytes(head), f"{directory}/{HEAD_WEIGHTS}")
    buf = io.BytesIO()
    torch.save(optimizer.state_dict(), buf)
    write_bytes_atomic(buf.getvalue(), f"{directory}/{OPTIMIZER_STATE}")
    write_json_atomic(state, f"{directory}/{TRAIN_STATE}")
    return directory


def load_training_state(directory: str, head: nn.Module, optimizer: torch.optim.Optimizer | None) -> tuple[int, dict]:
    """Restore ``head`` (and ``optimizer`` when given) in place; returns ``(epoch, extra)``."""
    directory = str(directory).rstrip("/")
    state_path = f"{directory}/{TRAIN_STATE}"
    if not exists(state_path):
        raise FileNotFoundError(f"{directory}: not a training-state directory ({TRAIN_STATE} not found)")
    state = read_json(state_path)
    if not isinstance(state, dict) or "epoch" not in state:
        raise ValueError(f"{state_path}: missing field 'epoch'")
    head_path = f"{directory}/{HEAD_WEIGHTS}"
    load_state_dict_strict(head, load_safetensors_file(head_path, "head weights"), head_path)
    if optimizer is not None:
        opt_path = f"{directory}/{OPTIMIZER_STATE}"
        data = read_required(opt_path, "optimizer state")
        try:
            opt_state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
            optimizer.load_state_dict(opt_state)
        except Exception as exc:  # unreadable file or a state of another optimizer / parameter layout
            raise ValueError(f"{opt_path}: cannot restore optimizer ({type(exc).__name__}: {exc})"[:400]) from None
    return int(state["epoch"]), dict(state.get("extra") or {})
