"""The images of one identity: plain latent noise, Dispersion, and DisCo (ALGORITHMS.md 2).

``noise``       variant ``a`` = ``w_ref + sigma N(0, I)``, each from its own sample seed.
``dispersion``  start from the noise variants, then ``iterations`` steps of
                ``w <- w + dt/mu (F_e + F_w + F_g + eta)``: ``F_e = -grad U_e`` with
                ``U_e = 1/2 sum_a k_e/2 angle(e_a, e_ref)^2`` pulls each variant's embedding back to the
                reference's; ``F_w`` is the soft-sphere repulsion ``k_w/2 (r_w - |w_a - w_b|)^2`` between
                variants closer than ``r_w`` in latent space; ``F_g = k_g (w_avg - w)``; ``eta = eta0 N(0, I)``.
``disco``       dispersion whose start adds covariates ``sum_d u_d s_d v_d``, ``u_d ~ U(-0.5, 0.5)``,
                along unit latent directions ``v_d`` (pose, illumination, expressions) scaled by their
                spreads ``s_d`` in latent space.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from facegen.config import DiscoSettings, DispersionSettings
from facegen.storage import exists, read_bytes


def noise_variants(reference: np.ndarray, sample_seeds: list[int], sigma: float) -> np.ndarray:
    """``reference + sigma N(0, I)``, variant ``a`` drawn from ``sample_seeds[a]`` alone."""
    reference = np.asarray(reference, np.float32)
    rows = [reference + np.float32(sigma) * np.random.default_rng(int(s)).standard_normal(reference.shape, dtype=np.float32)
            for s in sample_seeds]
    return np.stack(rows) if rows else np.zeros((0, len(reference)), np.float32)


def load_directions(settings: DiscoSettings, latent_dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Unit covariate directions ``[K, latent_dim]`` and their spreads ``[K]`` from ``disco.directions``.

    A ``.npy`` holds the direction vectors (spreads: ``disco.spreads`` or the vectors' norms); an
    ``.npz`` may hold ``directions`` and ``spreads``. Read with ``allow_pickle=False``.
    """
    import io

    path = settings.directions
    if not path:
        raise ValueError("generator.disco.directions: DisCo needs a .npy of latent directions")
    if not exists(path):
        raise FileNotFoundError(f"{path}: DisCo directions not found")
    try:
        loaded = np.load(io.BytesIO(read_bytes(path)), allow_pickle=False)
    except ValueError as exc:
        raise ValueError(f"{path}: not a numeric .npy/.npz ({exc})") from None
    spreads = None
    if isinstance(loaded, np.lib.npyio.NpzFile):
        if "directions" not in loaded:
            raise ValueError(f"{path}: an .npz of DisCo directions needs a 'directions' array")
        vectors = loaded["directions"]
        spreads = loaded["spreads"] if "spreads" in loaded else None
    else:
        vectors = loaded
    vectors = np.asarray(vectors, np.float64)
    if vectors.ndim != 2 or vectors.shape[1] != latent_dim:
        raise ValueError(f"{path}: directions must have shape [K, {latent_dim}], got {vectors.shape}")
    norms = np.linalg.norm(vectors, axis=1)
    if np.any(norms == 0):
        raise ValueError(f"{path}: a direction vector is zero")
    if settings.spreads is not None:
        spreads = settings.spreads
    spreads = norms if spreads is None else np.asarray(spreads, np.float64).reshape(-1)
    if len(spreads) != len(vectors):
        raise ValueError(f"generator.disco.spreads: {len(spreads)} spreads for {len(vectors)} directions")
    return (vectors / norms[:, None]).astype(np.float32), spreads.astype(np.float32)


def covariate_offsets(directions: np.ndarray, spreads: np.ndarray, count: int, amplitude: float,
                      rng: np.random.Generator) -> np.ndarray:
    """``sum_d u_d s_d v_d`` for ``count`` variants, ``u_d ~ U(-amplitude, amplitude)``."""
    u = rng.uniform(-amplitude, amplitude, size=(count, len(directions))).astype(np.float32)
    return (u * spreads[None, :]) @ directions


def _latent_repulsion(w: torch.Tensor, k_w: float, r_w: float) -> torch.Tensor:
    """Force of the soft-sphere repulsion between variants closer than ``r_w`` (all pairs: A is small)."""
    w = w.detach().requires_grad_(True)
    dist = torch.cdist(w, w)
    overlap = torch.triu(torch.clamp(r_w - dist, min=0.0), diagonal=1)
    energy = (k_w / 2 * overlap**2).sum()
    (grad,) = torch.autograd.grad(energy, w)
    return -grad


def disperse(reference: np.ndarray, start: np.ndarray, encoder: Any, latent_mean: np.ndarray,
             settings: DispersionSettings, rng: np.random.Generator, mu: float = 1.0) -> tuple[np.ndarray, dict[str, float]]:
    """Run Dispersion from ``start`` variants ``[A, D]`` of ``reference``; returns the variants and a summary."""
    device = encoder.gan.device
    with torch.no_grad():
        e_ref = encoder.embed_tensor(torch.from_numpy(np.asarray(reference, np.float32)[None]).to(device))[0]
    w = torch.from_numpy(np.array(start, np.float32)).to(device)
    mean = torch.from_numpy(np.asarray(latent_mean, np.float32)).to(device)
    s = settings
    angles = torch.zeros(len(w))
    for _ in range(s.iterations):
        force_e = torch.zeros_like(w)
        for b in range(0, len(w), encoder.batch_size):
            part = w[b : b + encoder.batch_size].detach().requires_grad_(True)
            cos = (encoder.embed_tensor(part) * e_ref).sum(dim=1).clamp(-1 + 1e-7, 1 - 1e-7)
            theta = torch.arccos(cos)
            energy = (s.k_e / 4 * theta**2).sum()  # 1/2 sum_a k_e/2 angle^2
            (grad,) = torch.autograd.grad(energy, part)
            force_e[b : b + len(part)] = -grad
            angles[b : b + len(part)] = theta.detach().cpu()
        force_w = _latent_repulsion(w, s.k_w, s.r_w)
        force_g = s.k_g * (mean[None, :] - w)
        eta = torch.from_numpy(rng.standard_normal(tuple(w.shape), dtype=np.float32)).to(device) * s.eta0
        w = w + s.dt / mu * (force_e + force_w + force_g + eta)
    spread = float(torch.cdist(w, w).sum() / max(len(w) * (len(w) - 1), 1))
    summary = {"mean_angle_to_reference_rad": float(angles.mean()) if s.iterations else math.nan,
               "mean_pairwise_latent_distance": spread,
               "mean_distance_to_reference": float((w - torch.from_numpy(np.asarray(reference, np.float32)).to(device)).norm(dim=1).mean())}
    return w.detach().cpu().numpy().astype(np.float32), summary
