"""Training checkpoints: all a run needs to continue mid-epoch, on the same or another worker count.

A checkpoint directory (one per reported step; each worker writes its own files into it)::

    backbone/                          backbone.safetensors + backbone.json (worker 0)
    backbone_optimizer.pt              the backbone's optimizer state (worker 0; weights_only loadable)
    head/shard-00001.safetensors       worker 1's class centres and their optimizer state
    rng/rank-00001.safetensors         worker 1's torch RNG states
    state.json                         progress (epoch, step, stream positions), scaler, head layout,
                                       history, validation, best, shard-set digest (worker 0)

Class centres are re-sharded on load: a worker reads the saved shards that overlap its class range,
so a run resumes on any worker count. Only safetensors, JSON and weights-only torch files are read:
nothing in a checkpoint is executed.
"""

from __future__ import annotations

import io
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from facegen.models.iresnet_checkpoint import (
    FORMAT_VERSION,
    load_safetensors_file,
    load_state_dict_strict,
    read_required,
    save_backbone,
    unwrap,
)
from facegen.storage import exists, read_json, write_bytes_atomic, write_json_atomic
from facegen.train.partial_fc import PartialFC, class_range

STATE_FILE = "state.json"
BACKBONE_DIR = "backbone"
BACKBONE_OPTIMIZER = "backbone_optimizer.pt"


def head_file(rank: int) -> str:
    """Relative path of worker ``rank``'s class-centre shard."""
    return f"head/shard-{rank:05d}.safetensors"


def _torch_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _head_tensors(head: PartialFC, optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """The centres plus per-row optimizer tensors (momentum, Adam moments); scalars go to JSON."""
    tensors = {"weight": head.weight.detach().cpu().contiguous()}
    scalars = {}
    for key, value in optimizer.state.get(head.weight, {}).items():
        if torch.is_tensor(value) and value.dim() > 0 and value.shape[0] == head.num_local:
            tensors[f"optim.{key}"] = value.detach().cpu().contiguous()
        else:
            scalars[key] = float(value)  # e.g. Adam's step counter
    return tensors, scalars


def save_checkpoint(
    directory: str,
    *,
    rank: int,
    world_size: int,
    backbone: nn.Module,
    backbone_meta: tuple[str, int, int],
    head: PartialFC,
    backbone_optimizer: torch.optim.Optimizer,
    head_optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    state: dict[str, Any],
) -> None:
    """Write this worker's part of a checkpoint into ``directory`` (worker 0 adds the shared parts)."""
    directory = str(directory).rstrip("/")
    tensors, scalars = _head_tensors(head, head_optimizer)
    write_bytes_atomic(st_save(tensors), f"{directory}/{head_file(rank)}")
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["cuda"] = torch.cuda.get_rng_state()
    write_bytes_atomic(st_save(rng), f"{directory}/rng/rank-{rank:05d}.safetensors")
    if rank != 0:
        return
    arch, width, embedding_size = backbone_meta
    save_backbone(f"{directory}/{BACKBONE_DIR}", unwrap(backbone), arch, width, embedding_size)
    write_bytes_atomic(_torch_bytes(backbone_optimizer.state_dict()), f"{directory}/{BACKBONE_OPTIMIZER}")
    groups = [{k: v for k, v in g.items() if k != "params"} for g in head_optimizer.state_dict()["param_groups"]]
    full = {
        **state,
        "format_version": FORMAT_VERSION,
        "world_size": world_size,
        "num_classes": head.num_classes,
        "head_shards": [{"file": head_file(r), "class_start": class_range(head.num_classes, r, world_size)[0],
                         "num_local": class_range(head.num_classes, r, world_size)[1]} for r in range(world_size)],
        "head_optimizer": {"param_groups": groups, "scalars": scalars},
        "scaler": scaler.state_dict() if scaler is not None else None,
    }
    try:
        write_json_atomic(full, f"{directory}/{STATE_FILE}")
    except (TypeError, ValueError) as exc:
        raise ValueError(f"save_checkpoint: state must be JSON-serialisable ({exc})") from None


def read_state(directory: str) -> dict[str, Any]:
    """``state.json`` of a checkpoint; a clear error when the directory is not one."""
    path = f"{str(directory).rstrip('/')}/{STATE_FILE}"
    if not exists(path):
        raise FileNotFoundError(f"{directory}: not a training checkpoint ({STATE_FILE} not found)")
    state = read_json(path)
    for key in ("epoch", "step_in_epoch", "global_step", "head_shards", "num_classes"):
        if not isinstance(state, dict) or key not in state:
            raise ValueError(f"{path}: missing field {key!r}")
    return state


def _load_head(directory: str, state: dict, head: PartialFC, optimizer: torch.optim.Optimizer) -> None:
    """Fill this worker's centres (and their optimizer state) from the saved shards that overlap them."""
    if int(state["num_classes"]) != head.num_classes:
        raise ValueError(f"{directory}: checkpoint has {state['num_classes']} classes, the shard set {head.num_classes}")
    lo, hi = head.class_start, head.class_start + head.num_local
    parts: dict[str, list[torch.Tensor]] = {}
    for shard in state["head_shards"]:
        s_lo, s_hi = int(shard["class_start"]), int(shard["class_start"]) + int(shard["num_local"])
        if s_hi <= lo or s_lo >= hi:
            continue
        path = f"{directory}/{shard['file']}"
        tensors = load_safetensors_file(path, "class-centre shard")
        for key, value in tensors.items():
            if value.shape[0] != s_hi - s_lo:
                raise ValueError(f"{path}: {key} has {value.shape[0]} rows, expected {s_hi - s_lo}")
            parts.setdefault(key, []).append(value[max(lo, s_lo) - s_lo : min(hi, s_hi) - s_lo])
    rows = {key: torch.cat(values) for key, values in parts.items()}
    if "weight" not in rows or rows["weight"].shape != head.weight.shape:
        raise ValueError(f"{directory}: class-centre shards do not cover classes {lo}..{hi - 1}")
    with torch.no_grad():
        head.weight.copy_(rows.pop("weight"))
    saved = state.get("head_optimizer") or {}
    per_param = {key[len("optim."):]: value.to(head.weight.device) for key, value in rows.items()}
    per_param.update({key: torch.tensor(value) for key, value in (saved.get("scalars") or {}).items()})
    groups = [{**group, "params": [i]} for i, group in enumerate(saved.get("param_groups") or [])]
    if groups:
        optimizer.load_state_dict({"state": {0: per_param} if per_param else {}, "param_groups": groups})


def load_checkpoint(
    directory: str,
    *,
    rank: int,
    world_size: int,
    backbone: nn.Module,
    head: PartialFC,
    backbone_optimizer: torch.optim.Optimizer,
    head_optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
) -> dict[str, Any]:
    """Restore every part in place (re-sharding the centres for this worker count); returns ``state.json``."""
    directory = str(directory).rstrip("/")
    state = read_state(directory)
    weights = f"{directory}/{BACKBONE_DIR}/backbone.safetensors"
    load_state_dict_strict(unwrap(backbone), load_safetensors_file(weights, "backbone weights"), weights)
    opt_path = f"{directory}/{BACKBONE_OPTIMIZER}"
    try:
        backbone_optimizer.load_state_dict(torch.load(io.BytesIO(read_required(opt_path, "optimizer state")),
                                                      map_location="cpu", weights_only=True))
    except (RuntimeError, ValueError, KeyError) as exc:
        raise ValueError(f"{opt_path}: cannot restore the optimizer ({type(exc).__name__}: {exc})"[:400]) from None
    _load_head(directory, state, head, head_optimizer)
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    rng_path = f"{directory}/rng/rank-{rank:05d}.safetensors"
    if int(state.get("world_size", 0)) == world_size and exists(rng_path):
        rng = st_load(read_required(rng_path, "RNG state"))
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    return state
