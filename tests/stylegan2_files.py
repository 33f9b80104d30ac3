"""Writers of the two foreign StyleGAN2 file layouts, for tests (no NVIDIA or rosinality code).

``write_nvidia_pickle`` produces what stylegan2-ada-pytorch's training loop writes: a plain pickle of
``{"G", "D", "G_ema", "training_set_kwargs"}`` in which each network module is a
``torch_utils.persistence._reconstruct_persistent_obj(meta)`` call carrying module source, its
class name and its ``__dict__`` (tensors pickled by torch itself, numpy float64 gains). Pickling
needs the name ``torch_utils.persistence._reconstruct_persistent_obj`` to resolve, so a stand-in
module is registered in ``sys.modules`` only while writing.

``write_rosinality_checkpoint`` produces rosinality's ``{"g_ema": state_dict, "latent_avg": w}``.
"""

from __future__ import annotations

import pickle
import sys
import types
from collections import OrderedDict
from typing import Any

import numpy as np
import torch
from torch import nn

from facegen.models.stylegan2 import StyleGAN2Generator

DUMMY_SOURCE = "# the module source NVIDIA's pickles carry; facegen never runs it\n"
_NVIDIA_NAMES = {"StyleGAN2Generator": "Generator"}
_FLOAT64_ATTRS = ("weight_gain", "act_gain", "bias_gain")


def _reconstruct_persistent_obj(meta):  # pragma: no cover - only its name is pickled
    raise AssertionError("the writer's stand-in must never be called")


_reconstruct_persistent_obj.__module__ = "torch_utils.persistence"


class _Record:
    def __init__(self, meta: dict):
        self.meta = meta

    def __reduce__(self):
        return (_reconstruct_persistent_obj, (self.meta,))


def nvidia_record(module: nn.Module, source: str = DUMMY_SOURCE, init_kwargs: dict | None = None) -> _Record:
    """A persistence record of ``module`` and its submodules, the way NVIDIA's pickles hold them."""
    state: dict[str, Any] = {}
    for key, value in module.__dict__.items():
        if key == "config":
            continue
        if key == "_modules":
            value = OrderedDict((n, nvidia_record(c, source) if c is not None else None) for n, c in value.items())
        elif key in ("_parameters", "_buffers"):
            value = OrderedDict(value)
        elif key in _FLOAT64_ATTRS and isinstance(value, float):
            value = np.float64(value)
        state[key] = value
    state["_init_args"] = ()
    state["_init_kwargs"] = dict(init_kwargs or {})
    name = _NVIDIA_NAMES.get(type(module).__name__, type(module).__name__)
    return _Record(dict(type="class", version=6, module_src=source, class_name=name, state=state))


def write_nvidia_pickle(path, G: StyleGAN2Generator, source: str = DUMMY_SOURCE, extra: dict | None = None) -> None:
    """Write ``G`` as ``G`` and ``G_ema`` of an NVIDIA network pickle (protocol 3, like Python 3.7's)."""
    kwargs = dict(z_dim=G.z_dim, c_dim=G.c_dim, w_dim=G.w_dim, img_resolution=G.img_resolution,
                  img_channels=G.img_channels, mapping_kwargs={}, synthesis_kwargs={})
    data = {"G": nvidia_record(G, source, kwargs), "D": None, "G_ema": nvidia_record(G, source, kwargs),
            "augment_pipe": None, "training_set_kwargs": {"resolution": G.img_resolution}, **(extra or {})}
    package = types.ModuleType("torch_utils")
    persistence = types.ModuleType("torch_utils.persistence")
    persistence._reconstruct_persistent_obj = _reconstruct_persistent_obj
    package.persistence = persistence
    saved = {k: sys.modules.get(k) for k in ("torch_utils", "torch_utils.persistence")}
    sys.modules.update({"torch_utils": package, "torch_utils.persistence": persistence})
    try:
        with open(path, "wb") as f:
            pickle.dump(data, f, protocol=3)
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


def write_rosinality_checkpoint(path, G: StyleGAN2Generator) -> None:
    """Write ``G`` (skip architecture, z_dim == w_dim) in rosinality's ``g_ema`` naming."""
    sd = {k: v.detach().clone() for k, v in G.state_dict().items()}
    out: dict[str, torch.Tensor] = {}
    for i in range(G.mapping.num_layers):
        out[f"style.{i + 1}.weight"] = sd[f"mapping.fc{i}.weight"]
        out[f"style.{i + 1}.bias"] = sd[f"mapping.fc{i}.bias"]
    blur = sd["synthesis.b4.resample_filter"] * 4

    def styled(dst: str, src: str, noise_idx: int, up: bool) -> None:
        out[f"{dst}.conv.weight"] = sd[f"{src}.weight"][None]
        out[f"{dst}.conv.modulation.weight"] = sd[f"{src}.affine.weight"]
        out[f"{dst}.conv.modulation.bias"] = sd[f"{src}.affine.bias"]
        if up:
            out[f"{dst}.conv.blur.kernel"] = blur
        out[f"{dst}.noise.weight"] = sd[f"{src}.noise_strength"].reshape(1)
        out[f"{dst}.activate.bias"] = sd[f"{src}.bias"]
        out[f"noises.noise_{noise_idx}"] = sd[f"{src}.noise_const"][None, None]

    def to_rgb(dst: str, src: str, up: bool) -> None:
        out[f"{dst}.conv.weight"] = sd[f"{src}.weight"][None]
        out[f"{dst}.conv.modulation.weight"] = sd[f"{src}.affine.weight"]
        out[f"{dst}.conv.modulation.bias"] = sd[f"{src}.affine.bias"]
        out[f"{dst}.bias"] = sd[f"{src}.bias"].reshape(1, -1, 1, 1)
        if up:
            out[f"{dst}.upsample.kernel"] = blur

    out["input.input"] = sd["synthesis.b4.const"][None]
    styled("conv1", "synthesis.b4.conv1", 0, False)
    to_rgb("to_rgb1", "synthesis.b4.torgb", False)
    for k, res in enumerate(G.synthesis.block_resolutions[1:]):
        styled(f"convs.{2 * k}", f"synthesis.b{res}.conv0", 2 * k + 1, True)
        styled(f"convs.{2 * k + 1}", f"synthesis.b{res}.conv1", 2 * k + 2, False)
        to_rgb(f"to_rgbs.{k}", f"synthesis.b{res}.torgb", True)
    torch.save({"g_ema": out, "latent_avg": sd["mapping.w_avg"]}, path)


def randomized(G: StyleGAN2Generator, seed: int = 0) -> StyleGAN2Generator:
    """Give every zero-initialised tensor (biases, noise strengths, w_avg) random values."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in G.named_parameters():
            if name.endswith("noise_strength"):
                p.fill_(0.2 + 0.2 * torch.rand((), generator=gen).item())
            elif name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
        G.mapping.w_avg.copy_(torch.randn(G.w_dim, generator=gen))
    return G.eval().requires_grad_(False)
