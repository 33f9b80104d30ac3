"""Export a trained backbone for other tools: ONNX for insightface, or an arcface_torch state dict.

- ``onnx``: one input ``[N, 3, 112, 112]`` (RGB in [-1, 1]), one output (the embedding), batch
  dimension dynamic. ``insightface.model_zoo.get_model(path)`` routes such a file to its ArcFace
  recogniser, which feeds ``(BGR->RGB - 127.5) / 127.5``: exactly the input the network trained on.
  After writing, the file is run with onnxruntime and compared with torch (``max_abs_diff``).
- ``arcface_torch``: a plain ``state_dict`` ``.pth`` with insightface ``arcface_torch`` parameter
  names (``backbone.load_state_dict(torch.load(path))`` in its scripts); only width-64 networks
  match its architectures. An ``*_se`` backbone's file has the DataCV organisers' names instead:
  their ``iresnet(depth, mode="se")`` loads it (``get_submission_file.py``).

``--checkpoint`` may name a backbone directory, a training checkpoint (``step-*``) or a run
directory (its exported ``backbone/``).
"""

from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from facegen.models.iresnet import IResNet
from facegen.models.iresnet_checkpoint import BACKBONE_META, load_backbone
from facegen.storage import exists, read_json, write_bytes_atomic

ARCFACE_TORCH_WIDTH = 64
ONNX_INPUT, ONNX_OUTPUT = "input.1", "embedding"


@dataclass(frozen=True)
class ExportResult:
    """What was written, and how far its outputs are from torch's on a check batch."""

    path: str
    format: str
    arch: str
    embedding_size: int
    max_abs_diff: float


def find_backbone(path: str) -> str:
    """The backbone directory under ``path`` (itself, ``<path>/backbone``); one-line error otherwise."""
    path = str(path).rstrip("/")
    for candidate in (path, f"{path}/backbone"):
        if exists(f"{candidate}/{BACKBONE_META}"):
            return candidate
    raise FileNotFoundError(f"{path}: no backbone here (expected {BACKBONE_META} in it or in its backbone/ folder)")


def _check_batch() -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.rand(4, 3, 112, 112, generator=gen) * 2 - 1


def export_onnx(model: IResNet, output: str, opset: int = 17) -> float:
    """Write ``model`` as ONNX to ``output``; returns the max |onnxruntime - torch| on a check batch."""
    import onnxruntime

    model = model.float().eval()
    buffer = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        # torch 2.13 calls the TorchScript exporter "legacy"; the new one needs onnxscript, not installed here.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(model, (torch.zeros(1, 3, 112, 112),), buffer, input_names=[ONNX_INPUT], output_names=[ONNX_OUTPUT],
                          dynamic_axes={ONNX_INPUT: {0: "batch"}, ONNX_OUTPUT: {0: "batch"}}, opset_version=opset,
                          dynamo=False)
    data = buffer.getvalue()
    write_bytes_atomic(data, output)
    session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
    x = _check_batch()
    with torch.no_grad():
        expected = model(x).numpy()
    got = session.run(None, {ONNX_INPUT: x.numpy()})[0]
    return float(np.abs(got - expected).max())


def export_arcface_torch(model: IResNet, output: str) -> None:
    """Write ``model.state_dict()`` as an arcface_torch ``.pth`` (plain tensors, loadable weights-only)."""
    width = int(model.conv1.out_channels)
    if width != ARCFACE_TORCH_WIDTH:
        raise ValueError(f"arcface_torch format: its IResNets have width {ARCFACE_TORCH_WIDTH}, this backbone has {width} "
                         "(train.width); export it as onnx instead")
    buffer = io.BytesIO()
    torch.save({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, buffer)
    write_bytes_atomic(buffer.getvalue(), output)


def export_backbone(checkpoint: str, fmt: str, output: str | None = None) -> ExportResult:
    """Export the backbone found under ``checkpoint`` as ``fmt`` (``onnx`` | ``arcface_torch``)."""
    if fmt not in ("onnx", "arcface_torch"):
        raise ValueError(f"--format: expected onnx or arcface_torch, got {fmt!r}")
    directory = find_backbone(checkpoint)
    meta = read_json(f"{directory}/{BACKBONE_META}")
    model = load_backbone(directory)
    suffix = ".onnx" if fmt == "onnx" else ".pth"
    output = output or f"{directory}/{meta['arch']}{suffix}"
    if not output.endswith(suffix):
        raise ValueError(f"--output {output}: a {fmt} export is written as a {suffix} file")
    if fmt == "onnx":
        diff = export_onnx(model, output)
    else:
        export_arcface_torch(model, output)
        reloaded = load_backbone(output, arch=meta["arch"])  # strict, weights-only: what arcface_torch does
        x = _check_batch()
        with torch.no_grad():
            diff = float((reloaded(x) - model(x)).abs().max())
    return ExportResult(output if "://" in output else os.path.abspath(output), fmt, meta["arch"],
                        int(meta["embedding_size"]), diff)
