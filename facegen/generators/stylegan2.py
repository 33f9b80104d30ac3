"""StyleGAN2 generator backend: NVIDIA ``.pkl`` / rosinality ``.pt`` weights in facegen's own network.

``load_stylegan2(path)`` returns a :class:`facegen.models.stylegan2.StyleGAN2Generator` in eval mode:
``G.z_dim``, ``G.w_dim``, ``G.num_ws``, ``G.img_resolution``, ``G.mapping(z, truncation_psi=0.7)``
-> ``[N, num_ws, w_dim]``, ``G.synthesis(ws, noise_mode="const"|"random")`` -> ``[N, 3, R, R]`` in
NVIDIA's value range (about [-1, 1]), ``G(z, truncation_psi=..., noise_mode=...)``.
"""

from __future__ import annotations

from facegen.models.stylegan2 import StyleGAN2Config, StyleGAN2Generator
from facegen.models.stylegan2_checkpoint import load_stylegan2

__all__ = ["StyleGAN2Config", "StyleGAN2Generator", "load_stylegan2"]
