"""Device choice: the one rule every stage and backend uses to pick where torch (and onnxruntime) runs."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` -> cuda when available, else cpu; anything else is passed to ``torch.device``."""
    import torch  # here, not at the top: backends that load torch lazily import this module too

    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def onnx_providers() -> list[str]:
    """onnxruntime providers to use: CUDA first when this onnxruntime build has it."""
    import onnxruntime

    available = onnxruntime.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
