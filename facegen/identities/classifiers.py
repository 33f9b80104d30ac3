"""ONNX attribute classifiers for ``facegen directions``: a user's expression (or any attribute)
model, run with onnxruntime on the aligned 112 px crops the lighting attributes read.

A model is described by :class:`facegen.config.ClassifierSettings` (input side, channel order,
normalisation, layout, what its outputs are); each named output column becomes an attribute that a
direction is fitted to and checked by, like yaw. A model is probed once when it is loaded, so a
wrong input description or an output width that disagrees with the names fails in one line before
any sample is drawn.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from facegen.config import ClassifierSettings
from facegen.faces.align import ALIGNED_SIZE

#: Images per onnxruntime call when the model takes any batch size.
RUN_BATCH = 256


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:160] + ("..." if len(text) > 160 else "")


class OnnxAttributeClassifier:
    """One classifier loaded once: ``classifier(crops)`` maps uint8 RGB crops ``[n, 112, 112, 3]`` to
    ``{name: float64 [n]}`` for each of its named outputs (:attr:`names`). ``field`` names the
    setting in errors; ``providers``: onnxruntime's (CUDA first when present by default)."""

    def __init__(self, settings: ClassifierSettings, field: str = "directions.classifiers[0]",
                 providers: Sequence[str] | None = None):
        import onnxruntime

        from facegen.devices import onnx_providers

        self.settings, self.field = settings, field
        self.names = [o for o in settings.outputs if o != "_"]
        try:
            self.session = onnxruntime.InferenceSession(settings.path, providers=list(providers or onnx_providers()))
        except Exception as exc:  # onnxruntime raises its own types for unreadable or invalid files
            raise ValueError(f"{field}.path: {settings.path}: onnxruntime cannot load it ({_short(exc)})") from None
        first = self.session.get_inputs()[0]
        self.input_name = first.name
        fixed = first.shape[0] if first.shape else None
        self.fixed_batch = isinstance(fixed, int) and fixed > 0  # a graph exported for one batch size
        self.batch = fixed if self.fixed_batch else RUN_BATCH
        blank = np.zeros((1, ALIGNED_SIZE, ALIGNED_SIZE, 3), np.uint8)
        try:
            probe = self._raw(blank)
        except Exception as exc:  # the input description does not match the graph's
            raise ValueError(f"{field}: {settings.path} refused a {list(self._prepare(blank).shape)} input "
                             f"({_short(exc)}); check input_size, channels and layout") from None
        if probe.shape[1] != len(settings.outputs):
            raise ValueError(f"{field}: {settings.path} gives {probe.shape[1]} outputs per image but outputs names "
                             f"{len(settings.outputs)} ({', '.join(settings.outputs)}); name every column (_ skips one)")

    def _prepare(self, crops: np.ndarray) -> np.ndarray:
        """Crops resized, recoloured, normalised and laid out as the model takes them (float32)."""
        import cv2

        s = self.settings
        if crops.shape[1:3] != (s.input_size, s.input_size):
            shrink = s.input_size < crops.shape[1]
            crops = np.stack([cv2.resize(c, (s.input_size, s.input_size),
                                         interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR) for c in crops])
        x = crops.astype(np.float32)
        if s.channels == "bgr":
            x = x[..., ::-1]
        elif s.channels == "gray":
            x = (x @ np.array([0.299, 0.587, 0.114], np.float32))[..., None]
        x = (x - np.asarray(s.mean, np.float32)) / np.asarray(s.std, np.float32)
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2) if s.layout == "nchw" else x, np.float32)

    def _raw(self, crops: np.ndarray) -> np.ndarray:
        """The model's first output, ``[n, columns]`` float64, before any activation."""
        parts = []
        for start in range(0, len(crops), self.batch):
            x = self._prepare(crops[start:start + self.batch])
            real = len(x)
            if self.fixed_batch and real < self.batch:  # pad the last part to the graph's batch size
                x = np.concatenate([x, np.zeros((self.batch - real, *x.shape[1:]), np.float32)])
            out = np.asarray(self.session.run(None, {self.input_name: x})[0], np.float64)
            parts.append(out.reshape(len(x), -1)[:real])
        return np.concatenate(parts)

    def __call__(self, crops: np.ndarray) -> dict[str, np.ndarray]:
        """``{name: [n]}`` per named output, after the activation ``output`` asks for."""
        scores = self._raw(np.asarray(crops, np.uint8))
        if self.settings.output == "logits":
            scores = np.exp(scores - scores.max(axis=1, keepdims=True))
            scores /= scores.sum(axis=1, keepdims=True)
        elif self.settings.output == "sigmoid":
            scores = 1.0 / (1.0 + np.exp(-scores))
        return {name: scores[:, j] for j, name in enumerate(self.settings.outputs) if name != "_"}


def load_classifiers(settings: Sequence[ClassifierSettings], providers: Sequence[str] | None = None,
                     prefix: str = "directions.classifiers") -> list[OnnxAttributeClassifier]:
    """Every classifier of ``settings`` loaded and probed (one line for the first that fails)."""
    return [OnnxAttributeClassifier(c, f"{prefix}[{i}]", providers) for i, c in enumerate(settings)]
