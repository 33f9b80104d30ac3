"""IResNet checkpoints in safe formats only: a facegen backbone folder, or an insightface ``.pth``.

A backbone directory (what every stage loads, like a diffusers folder)::

    backbone.safetensors   the IResNet state dict
    backbone.json          {"arch", "width", "embedding_size", "format_version"}

The JSON is written last, so a directory without it is incomplete. ``load_backbone`` also takes a
public insightface arcface_torch ``.pth`` state dict (``arch=`` required), read with
``torch.load(weights_only=True)``: nothing in the file is executed.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from facegen.models.iresnet import ARCH_DEPTHS, IResNet, build_backbone
from facegen.storage import exists, read_bytes, read_json, write_bytes_atomic, write_json_atomic

FORMAT_VERSION = 1
BACKBONE_WEIGHTS = "backbone.safetensors"
BACKBONE_META = "backbone.json"


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel / DataParallel wrapper (or the model itself)."""
    return getattr(model, "module", model)


def state_dict_bytes(model: nn.Module) -> bytes:
    state = {k: v.detach().cpu().contiguous() for k, v in unwrap(model).state_dict().items()}
    return st_save(state)


def read_required(path: str, what: str) -> bytes:
    """The bytes of ``path``; ``FileNotFoundError`` "<path>: <what> not found" when it is missing."""
    if not exists(path):
        raise FileNotFoundError(f"{path}: {what} not found")
    return read_bytes(path)


def load_safetensors_file(path: str, what: str) -> dict[str, torch.Tensor]:
    data = read_required(path, what)
    try:
        return st_load(data)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise ValueError(f"{path}: corrupt {what} ({exc})") from None


def load_weights_only(data: bytes, path: str, safe_globals: Sequence[type] = ()) -> Any:
    """``torch.load(weights_only=True)`` of a checkpoint's bytes (plus ``safe_globals`` as plain
    data); whatever goes wrong is one ``ValueError`` naming ``path``."""
    try:
        with torch.serialization.safe_globals(list(safe_globals)):
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle / zip errors vary by torch version; all mean "unreadable"
        raise ValueError(f"{path}: not a readable weights-only torch checkpoint ({type(exc).__name__}: {exc})"[:400]) from None


def load_state_dict_strict(model: nn.Module, state: dict[str, torch.Tensor], path: str, what: str = "the model") -> None:
    """``load_state_dict(strict=True)``; a name or shape mismatch is one ``ValueError`` naming ``path``."""
    try:
        unwrap(model).load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        raise ValueError(f"{path}: weights do not match {what} ({' '.join(first[:2])[:300]})") from None


def save_backbone(directory: str, model: nn.Module, arch: str, width: int, embedding_size: int) -> str:
    """Write ``backbone.safetensors`` then ``backbone.json`` into ``directory``; returns it."""
    if arch not in ARCH_DEPTHS:
        raise ValueError(f"save_backbone: unknown arch {arch!r}")
    directory = str(directory).rstrip("/")
    write_bytes_atomic(state_dict_bytes(model), f"{directory}/{BACKBONE_WEIGHTS}")
    meta = {"arch": arch, "width": int(width), "embedding_size": int(embedding_size), "format_version": FORMAT_VERSION}
    write_json_atomic(meta, f"{directory}/{BACKBONE_META}")
    return directory


def _strip_prefix(state: dict[str, torch.Tensor], prefix: str = "module.") -> dict[str, torch.Tensor]:
    if state and all(k.startswith(prefix) for k in state):
        return {k[len(prefix):]: v for k, v in state.items()}
    return state


def _load_pth(path: str, arch: str | None) -> IResNet:
    if arch is None:
        raise ValueError(f"{path}: an insightface .pth state dict needs arch= (one of {sorted(ARCH_DEPTHS)})")
    state = load_weights_only(read_required(path, "insightface checkpoint"), path)
    if not isinstance(state, dict) or "conv1.weight" not in _strip_prefix(state):
        raise ValueError(f"{path}: not an IResNet state dict (no conv1.weight)")
    state = _strip_prefix(state)
    # Width and embedding size are read off the weights, so any insightface variant loads by arch alone.
    model = build_backbone(arch, width=int(state["conv1.weight"].shape[0]), embedding_size=int(state["fc.weight"].shape[0]))
    load_state_dict_strict(model, state, path)
    return model


def load_backbone(path: str, device: str | torch.device = "cpu", arch: str | None = None) -> IResNet:
    """Load a backbone in eval mode from a facegen directory or an insightface ``.pth`` file."""
    path = str(path).rstrip("/")
    if path.endswith((".pth", ".pt")):
        model = _load_pth(path, arch)
    else:
        meta_path = f"{path}/{BACKBONE_META}"
        if not exists(meta_path):
            raise FileNotFoundError(f"{path}: not a backbone directory ({BACKBONE_META} not found)")
        meta = read_json(meta_path)
        try:
            model = build_backbone(meta["arch"], width=int(meta["width"]), embedding_size=int(meta["embedding_size"]))
        except (KeyError, TypeError) as exc:
            raise ValueError(f"{meta_path}: missing or bad field {exc}") from None
        if arch is not None and arch != meta["arch"]:
            raise ValueError(f"{meta_path}: arch is {meta['arch']!r}, expected {arch!r}")
        load_state_dict_strict(model, load_safetensors_file(f"{path}/{BACKBONE_WEIGHTS}", "backbone weights"), f"{path}/{BACKBONE_WEIGHTS}")
    return model.to(device).eval()
