"""StyleGAN2 weights from NVIDIA ``.pkl`` network pickles and rosinality ``.pt`` checkpoints, safely.

NVIDIA pickles (stylegan2-ada-pytorch, stylegan3) hold ``{"G", "D", "G_ema", ...}`` whose modules are
``torch_utils.persistence`` records: ``_reconstruct_persistent_obj(meta)`` with ``meta`` =
``{type, version, module_src, class_name, state}``, where ``module_src`` is Python source that
NVIDIA's loader executes and ``state`` is the module's ``__dict__`` (``_parameters``, ``_buffers``,
``_modules``, attributes). Tensors are pickled the way torch pickles them outside ``torch.save``:
``torch._utils._rebuild_tensor_v2(torch.storage._load_from_bytes(<torch.save bytes>), ...)``.

:class:`RestrictedUnpickler` reads that layout without running anything from the file: the
persistence hook becomes a :class:`PersistentRecord` (the carried source is dropped unread), storages
are read back with ``torch.load(weights_only=True)``, a handful of plain containers are allowed, and
every other global is refused. facegen then builds its own :class:`StyleGAN2Generator` from the
records' attributes and tensor shapes and loads the tensors with ``strict=True``.

rosinality checkpoints (``{"g_ema": state_dict, "latent_avg": ...}``) are read with
``torch.load(weights_only=True)`` and their keys renamed onto NVIDIA's layout.
"""

from __future__ import annotations

import argparse
import io
import pickle
import re
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from facegen.models.iresnet_checkpoint import load_state_dict_strict, load_weights_only, read_required
from facegen.models.stylegan2 import StyleGAN2Config, StyleGAN2Generator

STYLEGAN2_MODEL = "a StyleGAN2 generator"  # how load errors name the model
_STYLEGAN2_CLASSES = {"Generator", "MappingNetwork", "SynthesisNetwork", "SynthesisBlock", "SynthesisLayer",
                      "ToRGBLayer", "FullyConnectedLayer", "Conv2dLayer"}


@dataclass
class PersistentRecord:
    """What a ``torch_utils.persistence`` object becomes: its class name and its state, nothing run."""

    class_name: str
    state: dict[str, Any]
    source_chars: int = 0  # length of the carried module source, which is never executed

    def child(self, name: str) -> "PersistentRecord":
        """A submodule record (``_modules[name]``); a missing one is a ``ValueError``."""
        node = (self.state.get("_modules") or {}).get(name)
        if not isinstance(node, PersistentRecord):
            raise ValueError(f"{self.class_name}: has no submodule {name!r}")
        return node

    def attr(self, name: str, default: Any = None) -> Any:
        """A plain attribute of the recorded object."""
        return self.state.get(name, default)

    def tensors(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """Parameters and persistent buffers of the whole subtree, by state-dict key."""
        out: dict[str, torch.Tensor] = {}
        skip = set(self.state.get("_non_persistent_buffers_set") or ())
        for group in ("_parameters", "_buffers"):
            for name, value in (self.state.get(group) or {}).items():
                if isinstance(value, torch.Tensor) and name not in skip:
                    out[prefix + name] = value
        for name, child in (self.state.get("_modules") or {}).items():
            if isinstance(child, PersistentRecord):
                out.update(child.tensors(f"{prefix}{name}."))
        return out


def _persistent_record(meta: Any) -> PersistentRecord:
    if not isinstance(meta, dict) or meta.get("type") != "class" or not isinstance(meta.get("class_name"), str):
        raise pickle.UnpicklingError("persistence record without type 'class' and a class_name")
    state = meta.get("state")
    if not isinstance(state, dict):
        raise pickle.UnpicklingError(f"persistence record {meta['class_name']}: state is not a mapping")
    source = meta.get("module_src")
    return PersistentRecord(meta["class_name"], dict(state), len(source) if isinstance(source, str) else 0)


def _storage_from_bytes(data: bytes) -> Any:
    if not isinstance(data, (bytes, bytearray)):
        raise pickle.UnpicklingError("tensor storage is not a byte string")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TypedStorage deprecation notice
        storage = torch.load(io.BytesIO(bytes(data)), map_location="cpu", weights_only=True)
    if not isinstance(storage, (torch.TypedStorage, torch.UntypedStorage)):
        raise pickle.UnpicklingError(f"tensor storage decoded to {type(storage).__name__}")
    return storage


def _rebuild_tensor(storage: Any, offset: int, size: tuple, stride: tuple, requires_grad: bool = False,
                    backward_hooks: Any = None, metadata: Any = None) -> torch.Tensor:
    if not isinstance(storage, (torch.TypedStorage, torch.UntypedStorage)):
        raise pickle.UnpicklingError("tensor rebuilt from something that is not a storage")
    return torch._utils._rebuild_tensor_v2(storage, int(offset), tuple(size), tuple(stride), False, OrderedDict())


def _rebuild_parameter(data: Any, requires_grad: bool = False, backward_hooks: Any = None, state: Any = None) -> torch.Tensor:
    if not isinstance(data, torch.Tensor):
        raise pickle.UnpicklingError("parameter rebuilt from something that is not a tensor")
    return data


class _EasyDict(dict):
    """Stand-in for ``dnnlib.EasyDict`` (a dict with attribute access): only the items are kept."""

    def __setstate__(self, state: Any) -> None:
        pass


class _Dtype:
    """A numpy dtype as pickled (``numpy.dtype(name, align, copy)`` + state); numeric kinds only."""

    def __init__(self, name: Any, align: Any = False, copy: Any = False):
        if not isinstance(name, str) or not re.fullmatch(r"[biuf][1248]|b1|\?", name):
            raise pickle.UnpicklingError(f"numpy dtype {name!r} is not a plain numeric type")
        self.name, self.byteorder = name, "="

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) > 1 and state[1] in ("<", ">", "|", "="):
            self.byteorder = state[1]

    def numpy(self) -> np.dtype:
        dtype = np.dtype(self.name)
        return dtype.newbyteorder(self.byteorder) if self.byteorder in "<>" else dtype


def _numpy_scalar(dtype: Any, data: Any = None) -> Any:
    if not isinstance(dtype, _Dtype) or not isinstance(data, (bytes, bytearray)):
        raise pickle.UnpicklingError("numpy scalar with an unsupported dtype or payload")
    return np.frombuffer(bytes(data), dtype=dtype.numpy(), count=1)[0].item()


class _NdarrayClass:
    """Stand-in for ``numpy.ndarray`` as the first argument of numpy's pickled ``_reconstruct``."""


class _Array:
    """A numpy array as pickled (``_reconstruct`` then state): numeric dtypes, raw bytes only."""

    def __init__(self, cls: Any = None, shape: Any = None, typecode: Any = None):
        if cls is not _NdarrayClass:
            raise pickle.UnpicklingError("numpy array reconstructed from something that is not ndarray")
        self.array: np.ndarray | None = None

    def __setstate__(self, state: Any) -> None:
        if not (isinstance(state, tuple) and len(state) == 5 and isinstance(state[2], _Dtype)
                and isinstance(state[4], (bytes, bytearray))):
            raise pickle.UnpicklingError("numpy array state is not (version, shape, dtype, fortran, bytes)")
        _, shape, dtype, fortran, raw = state
        self.array = np.frombuffer(bytes(raw), dtype=dtype.numpy()).reshape(tuple(shape), order="F" if fortran else "C")


_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _persistent_record,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch.storage", "_load_from_bytes"): _storage_from_bytes,
    ("collections", "OrderedDict"): OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("__builtin__", "set"): set,
    ("dnnlib.util", "EasyDict"): _EasyDict,
    ("dnnlib", "EasyDict"): _EasyDict,
    ("numpy", "dtype"): _Dtype,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,
    ("numpy", "ndarray"): _NdarrayClass,
    ("numpy.core.multiarray", "_reconstruct"): _Array,
    ("numpy._core.multiarray", "_reconstruct"): _Array,
}


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles NVIDIA network pickles onto inert records; any other global raises."""

    def find_class(self, module: str, name: str) -> Any:
        target = _ALLOWED_GLOBALS.get((module, name))
        if target is None:
            raise pickle.UnpicklingError(f"refusing global {module}.{name}: not part of a network pickle")
        return target

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("refusing persistent id: not part of a network pickle")


def read_network_pickle(data: bytes, source: str = "<bytes>") -> dict[str, Any]:
    """The top-level mapping of an NVIDIA network pickle, with modules as :class:`PersistentRecord`."""
    try:
        obj = RestrictedUnpickler(io.BytesIO(data)).load()
    except pickle.UnpicklingError as exc:
        raise ValueError(f"{source}: unsafe or unsupported network pickle ({exc})") from None
    except (EOFError, AttributeError, TypeError, IndexError, KeyError, RuntimeError, ValueError) as exc:
        raise ValueError(f"{source}: not a readable network pickle ({type(exc).__name__}: {exc})"[:400]) from None
    if not isinstance(obj, dict):
        raise ValueError(f"{source}: a network pickle holds a dict, this one holds {type(obj).__name__}")
    return obj


# --- NVIDIA records -> facegen generator ---------------------------------------------------------

def _config_from_records(g: PersistentRecord) -> StyleGAN2Config:
    synthesis, mapping = g.child("synthesis"), g.child("mapping")
    res = int(g.attr("img_resolution"))
    if not synthesis.attr("block_resolutions"):
        layers = sorted({c.class_name for c in (synthesis.state.get("_modules") or {}).values() if isinstance(c, PersistentRecord)})
        raise ValueError(f"not a StyleGAN2 generator: its synthesis network has no resolution blocks (has {', '.join(layers)}); "
                         "StyleGAN3 (alias-free) networks are not supported")
    blocks = {int(r): synthesis.child(f"b{int(r)}") for r in synthesis.attr("block_resolutions")}
    if not blocks or max(blocks) != res:
        raise ValueError(f"synthesis blocks {sorted(blocks)} do not end at img_resolution {res}")
    for block in blocks.values():
        for name, child in (block.state.get("_modules") or {}).items():
            if isinstance(child, PersistentRecord) and child.class_name not in _STYLEGAN2_CLASSES:
                raise ValueError(f"synthesis block has a {child.class_name} ({name}): not a StyleGAN2 generator")
    channels = {r: int(b.child("conv1").tensors()["weight"].shape[0]) for r, b in blocks.items()}
    fp16 = [r for r, b in blocks.items() if b.attr("use_fp16")]
    fc0 = mapping.child("fc0")
    hidden = int(fc0.tensors()["weight"].shape[0]) if int(mapping.attr("num_layers")) > 1 else None
    layer = blocks[4].child("conv1")
    filt = blocks[4].tensors().get("resample_filter")
    return StyleGAN2Config(
        z_dim=int(g.attr("z_dim")), w_dim=int(g.attr("w_dim")), c_dim=int(g.attr("c_dim", 0) or 0),
        img_resolution=res, img_channels=int(g.attr("img_channels", 3)), channels=channels,
        mapping_layers=int(mapping.attr("num_layers")),
        mapping_features=None if hidden == int(g.attr("w_dim")) else hidden,
        mapping_lr_multiplier=float(fc0.attr("bias_gain", 0.01)),
        mapping_activation=str(fc0.attr("activation", "lrelu")),
        embed_features=int(mapping.child("embed").tensors()["weight"].shape[0]) if int(g.attr("c_dim", 0) or 0) else None,
        architecture=str(blocks[res].attr("architecture", "skip")),
        resample_filter=_filter_taps(filt),
        conv_clamp=None if layer.attr("conv_clamp") is None else float(layer.attr("conv_clamp")),
        fp16_min_resolution=min(fp16) if fp16 else None,
        use_noise=bool(layer.attr("use_noise", True)),
    )


def _filter_taps(filt: torch.Tensor | None) -> tuple[float, ...]:
    """The 1-D taps of a stored separable filter (normalised; setup_filter renormalises)."""
    if filt is None:
        return (1, 3, 3, 1)
    if filt.ndim == 1:
        return tuple(float(v) for v in filt)
    taps = filt.sum(dim=0)
    if not torch.allclose(torch.outer(taps, taps) / taps.sum() ** 2 * filt.sum(), filt, atol=1e-6):
        raise ValueError("resample_filter is not separable")
    return tuple(float(v) for v in taps)


def generator_from_records(g: PersistentRecord, source: str) -> StyleGAN2Generator:
    """Build facegen's generator from a ``G``/``G_ema`` record and load its tensors strictly."""
    if g.class_name != "Generator":
        raise ValueError(f"{source}: G_ema is a {g.class_name}, expected a StyleGAN2 Generator")
    try:
        cfg = _config_from_records(g)
    except (TypeError, KeyError) as exc:
        raise ValueError(f"{source}: G_ema is missing a StyleGAN2 attribute ({type(exc).__name__}: {exc})") from None
    except ValueError as exc:
        raise ValueError(f"{source}: {exc}") from None
    model = StyleGAN2Generator(cfg)
    load_state_dict_strict(model, g.tensors(), source, STYLEGAN2_MODEL)
    return model


# --- rosinality state dicts -> NVIDIA layout ---------------------------------------------------------

def _rosinality_to_nvidia(sd: dict[str, torch.Tensor], latent_avg: torch.Tensor | None) -> tuple[StyleGAN2Config, dict]:
    n_mlp = len({k.split(".")[1] for k in sd if k.startswith("style.") and k.endswith(".weight")})
    const = sd["input.input"]
    conv_ids = sorted({int(k.split(".")[1]) for k in sd if k.startswith("convs.")})
    log_size = 2 + len(conv_ids) // 2
    res = 2**log_size
    channels = {4: int(const.shape[1])}
    for i in range(3, log_size + 1):
        channels[2**i] = int(sd[f"convs.{2 * (i - 3)}.conv.weight"].shape[1])
    style_dim = int(sd["style.1.weight"].shape[1])
    blur = sd.get("to_rgbs.0.upsample.kernel")
    cfg = StyleGAN2Config(z_dim=style_dim, w_dim=style_dim, img_resolution=res, channels=channels,
                          mapping_layers=n_mlp, mapping_lr_multiplier=0.01, resample_filter=_filter_taps(blur))
    out: dict[str, torch.Tensor] = {}
    for i in range(n_mlp):
        out[f"mapping.fc{i}.weight"] = sd[f"style.{i + 1}.weight"]
        out[f"mapping.fc{i}.bias"] = sd[f"style.{i + 1}.bias"]

    def styled(dst: str, src: str, noise_idx: int) -> None:
        out[f"{dst}.weight"] = sd[f"{src}.conv.weight"][0]
        out[f"{dst}.affine.weight"] = sd[f"{src}.conv.modulation.weight"]
        out[f"{dst}.affine.bias"] = sd[f"{src}.conv.modulation.bias"]
        out[f"{dst}.noise_strength"] = sd[f"{src}.noise.weight"].reshape([])
        out[f"{dst}.bias"] = sd[f"{src}.activate.bias"].reshape(-1)
        out[f"{dst}.noise_const"] = sd[f"noises.noise_{noise_idx}"][0, 0]

    def to_rgb(dst: str, src: str) -> None:
        out[f"{dst}.weight"] = sd[f"{src}.conv.weight"][0]
        out[f"{dst}.affine.weight"] = sd[f"{src}.conv.modulation.weight"]
        out[f"{dst}.affine.bias"] = sd[f"{src}.conv.modulation.bias"]
        out[f"{dst}.bias"] = sd[f"{src}.bias"].reshape(-1)

    out["synthesis.b4.const"] = const[0]
    styled("synthesis.b4.conv1", "conv1", 0)
    to_rgb("synthesis.b4.torgb", "to_rgb1")
    for i in range(3, log_size + 1):
        k = i - 3
        styled(f"synthesis.b{2**i}.conv0", f"convs.{2 * k}", 2 * k + 1)
        styled(f"synthesis.b{2**i}.conv1", f"convs.{2 * k + 1}", 2 * k + 2)
        to_rgb(f"synthesis.b{2**i}.torgb", f"to_rgbs.{k}")
    if latent_avg is not None:
        out["mapping.w_avg"] = latent_avg.reshape(-1)[:style_dim]
    return cfg, out


def _mean_w(model: StyleGAN2Generator, samples: int = 10_000, seed: int = 0) -> torch.Tensor:
    """w_avg for checkpoints that carry none: the mean of ``samples`` mapped z (fixed seed)."""
    z = torch.randn(samples, model.z_dim, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model.mapping(z)[:, 0].mean(dim=0)


def load_rosinality_checkpoint(data: bytes, source: str) -> StyleGAN2Generator:
    """A rosinality ``.pt`` (``g_ema`` state dict, optional ``latent_avg``) as a facegen generator."""
    ckpt = load_weights_only(data, source, [argparse.Namespace])  # training checkpoints store their args
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("g_ema"), dict):
        raise ValueError(f"{source}: a rosinality checkpoint needs a 'g_ema' state dict")
    sd = ckpt["g_ema"]
    try:
        cfg, state = _rosinality_to_nvidia(sd, ckpt.get("latent_avg"))
    except (KeyError, IndexError) as exc:
        raise ValueError(f"{source}: g_ema is not a rosinality StyleGAN2 generator (missing {exc})") from None
    model = StyleGAN2Generator(cfg)
    # rosinality keeps its blur kernels per layer; facegen's filters are the same taps, normalised.
    state.update({k: v for k, v in model.state_dict().items() if k.endswith("resample_filter")})
    has_w_avg = "mapping.w_avg" in state
    state.setdefault("mapping.w_avg", torch.zeros(cfg.w_dim))
    load_state_dict_strict(model, state, source, STYLEGAN2_MODEL)
    if not has_w_avg:
        model.mapping.w_avg.copy_(_mean_w(model))
    return model


def load_stylegan2(path: str, device: str | torch.device = "cpu", key: str = "G_ema") -> StyleGAN2Generator:
    """A StyleGAN2 generator in eval mode from an NVIDIA ``.pkl`` or a rosinality ``.pt``/``.pth``.

    Nothing from the file is executed: pickles go through :class:`RestrictedUnpickler`, torch
    checkpoints through ``torch.load(weights_only=True)``. ``key`` picks the network of a pickle.
    """
    path = str(path)
    data = read_required(path, "StyleGAN2 checkpoint")
    if data[:2] == b"PK" or path.endswith((".pt", ".pth")):
        model = load_rosinality_checkpoint(data, path)
    else:
        networks = read_network_pickle(data, path)
        g = networks.get(key)
        if not isinstance(g, PersistentRecord):
            raise ValueError(f"{path}: no network {key!r} in the pickle (has {sorted(map(str, networks))})")
        model = generator_from_records(g, path)
    return model.to(device).eval().requires_grad_(False)

