"""Brownian identity diffusion (Geissbühler et al., ALGORITHMS.md 2): spread identities apart.

Particles ``p_i`` (GAN latents, or points on the embedding hypersphere) carry unit identity
embeddings ``e_i``; angles ``d_ij = arccos <e_i, e_j>``. The energy is a soft-sphere repulsion

    E = sum_{i<j} k/2 (d0 - d_ij)^2 [d_ij < d0]  +  sum_{i, r} k_cst/2 (d0_cst - d_ir)^2 [d_ir < d0_cst]

whose second term pushes particles away from fixed real-face embeddings ``r`` (one-sided). Both
radii are widened by a small ``skin`` so that Brownian jitter around the equilibrium leaves no pair
inside the nominal radius (statistics count against the nominal radii). Per
iteration: ``F = -dE/dp`` (through G and the embedder in latent space: a vector-Jacobian product per
batch), plus the latent pull ``k_l (w_avg - p)``; ``dt = min(tau mu min|p_i - p_j| / max|F_i|, dt_max)``
(the paper has no ``dt_max``: as pairs clear the radius the forces fade and its step grows without
bound, and the latent pull and the noise then take over; measured in bench/RESULTS.md);
``p <- p + dt/mu F + sqrt(dt)/mu eta``. In latent space ``eta = eta0 N(0, I)`` per coordinate, as the
paper; on the sphere ``eta`` is tangent noise of total size ``eta0`` (``eta0 / sqrt(D)`` per
coordinate: unscaled, 0.01 per coordinate in 512-d moves a particle about 0.25 rad per step and
re-creates close pairs as fast as repulsion removes them), and each particle is renormalised.

Pairs come from k-nearest-neighbour lists (exact, or a faiss IVF index at millions of particles on
CPU; :mod:`facegen.identities.knn`) rebuilt every ``knn_every`` iterations (the minimum
latent distance of ``dt`` is taken over those pairs); every array pass runs in chunks, so memory is a
few copies of the particle array, never N x N.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch

from facegen.devices import resolve_device
from facegen.identities import knn

if TYPE_CHECKING:  # the settings class needs pydantic; the sampler itself does not
    from facegen.config import LangevinSettings


class FeatureSpace:
    """Particles are unit vectors; their embeddings are themselves."""

    kind = "feature"

    def embed(self, particles: np.ndarray) -> np.ndarray:
        return particles

    def pullback(self, particles: np.ndarray, grad: np.ndarray, chunk: int) -> np.ndarray:
        """Project embedding gradients onto the tangent planes (in place)."""
        return tangent_project(particles, grad, chunk)


class LatentSpace:
    """Particles are GAN latents; embeddings come from an :class:`IdentityEncoder`."""

    kind = "latent"

    def __init__(self, encoder: Any, latent_mean: np.ndarray):
        self.encoder, self.latent_mean = encoder, np.asarray(latent_mean, np.float32)

    def embed(self, particles: np.ndarray) -> np.ndarray:
        return self.encoder.embed(particles)

    def pullback(self, particles: np.ndarray, grad: np.ndarray, chunk: int) -> np.ndarray:
        return self.encoder.pullback(particles, grad)


def tangent_project(points: np.ndarray, vectors: np.ndarray, chunk: int) -> np.ndarray:
    """``v - <v, x> x`` for unit rows ``x`` (in place on ``vectors``)."""
    for s in range(0, len(points), chunk):
        x, v = points[s : s + chunk], vectors[s : s + chunk]
        v -= np.einsum("ij,ij->i", v, x)[:, None] * x
    return vectors


def normalize_rows(points: np.ndarray, chunk: int) -> np.ndarray:
    """Unit rows (in place)."""
    for s in range(0, len(points), chunk):
        part = points[s : s + chunk]
        part /= np.maximum(np.linalg.norm(part, axis=1, keepdims=True), 1e-12)
    return points


def soft_sphere_gradient(e: np.ndarray, pairs: np.ndarray, k: float, d0: float, chunk: int,
                         grad: np.ndarray) -> np.ndarray:
    """Add ``dE/de`` of the pair repulsion to ``grad``; returns the pair angles (radians)."""
    et, gt = torch.from_numpy(e), torch.from_numpy(grad)
    angles = np.empty(len(pairs), np.float32)
    for s in range(0, len(pairs), chunk):
        i = torch.from_numpy(pairs[s : s + chunk, 0])
        j = torch.from_numpy(pairs[s : s + chunk, 1])
        cos = (et[i] * et[j]).sum(dim=1).clamp(-1 + 1e-7, 1 - 1e-7)
        theta = torch.arccos(cos)
        angles[s : s + len(i)] = theta.numpy()
        active = theta < d0
        if bool(active.any()):
            i, j, cos, theta = i[active], j[active], cos[active], theta[active]
            coef = (k * (d0 - theta) / torch.sqrt(1 - cos * cos))[:, None]
            gt.index_add_(0, i, coef * et[j])
            gt.index_add_(0, j, coef * et[i])
    return angles


def reference_gradient(e: np.ndarray, reference: np.ndarray, neighbours: np.ndarray, k: float, radius: float,
                       chunk: int, grad: np.ndarray) -> None:
    """Add the one-sided repulsion from fixed reference embeddings to ``grad``."""
    et, rt, gt = torch.from_numpy(e), torch.from_numpy(reference), torch.from_numpy(grad)
    for s in range(0, len(e), chunk):
        ids = torch.from_numpy(neighbours[s : s + chunk])
        ref = rt[ids.clamp(min=0)]  # [n, k, d]
        cos = torch.einsum("nd,nkd->nk", et[s : s + chunk], ref).clamp(-1 + 1e-7, 1 - 1e-7)
        theta = torch.arccos(cos)
        coef = torch.where((theta < radius) & (ids >= 0), k * (radius - theta) / torch.sqrt(1 - cos * cos), 0.0)
        gt[s : s + chunk] += torch.einsum("nk,nkd->nd", coef, ref)


def min_pair_distance(points: np.ndarray, pairs: np.ndarray, chunk: int) -> float:
    """The smallest ``|p_i - p_j|`` over the pair list (inf without pairs)."""
    pt = torch.from_numpy(points)
    best = math.inf
    for s in range(0, len(pairs), chunk):
        i, j = torch.from_numpy(pairs[s : s + chunk, 0]), torch.from_numpy(pairs[s : s + chunk, 1])
        best = min(best, float((pt[i] - pt[j]).norm(dim=1).min()))
    return best


@dataclass
class LangevinState:
    """Everything a checkpoint holds: particles, the next iteration, the noise stream, the statistics."""

    particles: np.ndarray
    iteration: int
    rng: np.random.Generator
    history: list[dict[str, Any]] = field(default_factory=list)


class LangevinSampler:
    """Runs iterations on a :class:`LangevinState` in ``space`` (feature or latent)."""

    def __init__(self, settings: "LangevinSettings", space: Any, reference: np.ndarray | None = None,
                 knn_options: knn.KnnOptions | None = None):
        self.s, self.space = settings, space
        self.options = knn_options or knn.KnnOptions(k=settings.neighbours, chunk_size=settings.chunk_size,
                                                     index=settings.neighbour_index, use_gpu=settings.search_device != "cpu")
        self.reference = None if reference is None else np.ascontiguousarray(reference, np.float32)
        self.reference_index = None if self.reference is None else knn.ExactIndex(
            self.reference, resolve_device(settings.search_device))
        self.pairs = np.zeros((0, 2), np.int64)
        self.reference_neighbours: np.ndarray | None = None

    def rebuild_neighbours(self, embeddings: np.ndarray) -> None:
        """Fresh pair list (and nearest reference embeddings) from the current embeddings."""
        self.pairs = knn.neighbour_pairs(embeddings, self.options)
        if self.reference_index is not None:
            _, self.reference_neighbours = self.reference_index.search(embeddings, min(4, len(self.reference)))

    def within_reference(self, embeddings: np.ndarray) -> tuple[int, float]:
        """Particles closer than ``constant_radius`` to a reference embedding, and the smallest such angle."""
        if self.reference_index is None:
            return 0, math.nan
        sims, _ = self.reference_index.search(embeddings, 1)
        angles = np.arccos(np.clip(sims[:, 0], -1.0, 1.0))
        return int((angles < self.s.constant_radius).sum()), float(angles.min())

    def step(self, state: LangevinState, rebuild: bool) -> dict[str, Any]:
        """One iteration; returns its statistics (measured before the move)."""
        started = time.time()
        s, chunk = self.s, self.options.chunk_size
        p = state.particles
        e = np.ascontiguousarray(self.space.embed(p), np.float32)
        if rebuild or len(self.pairs) == 0:
            self.rebuild_neighbours(e)
        grad = np.zeros_like(e)
        angles = soft_sphere_gradient(e, self.pairs, s.k, s.d0 + s.skin, chunk, grad)
        within_real, nearest_real = self.within_reference(e)
        if self.reference_neighbours is not None:
            reference_gradient(e, self.reference, self.reference_neighbours, s.k_cst, s.constant_radius + s.skin, chunk, grad)
        force = self.space.pullback(p, grad, chunk)
        np.negative(force, out=force)
        if self.space.kind == "latent" and s.k_l > 0:
            force += s.k_l * (self.space.latent_mean[None, :] - p)
        norms = np.concatenate([np.linalg.norm(force[i : i + chunk], axis=1) for i in range(0, len(force), chunk)])
        max_force = float(norms.max()) if len(norms) else 0.0
        min_dist = min_pair_distance(p, self.pairs, chunk)
        adaptive = s.tau * s.mu * min_dist / max_force if max_force > 0.0 else math.inf
        cap = s.dt_max
        dt = adaptive if cap is None else min(adaptive, cap)
        if not math.isfinite(dt):
            dt = 0.0  # no force and no cap: the particles are at rest, and an unbounded step would be all noise
        self._move(state, force, dt)
        stats = {
            "iteration": state.iteration,
            "pairs": int(len(angles)),
            "min_angle": float(angles.min()) if len(angles) else math.nan,
            "mean_angle": float(angles.mean()) if len(angles) else math.nan,
            "max_angle": float(angles.max()) if len(angles) else math.nan,
            "pairs_within_d0": int((angles < s.d0).sum()),
            "fraction_pairs_above_d0": float((angles >= s.d0).mean()) if len(angles) else 1.0,
            "within_real": within_real,
            "nearest_real_angle": nearest_real,
            "force_mean": float(norms.mean()) if len(norms) else 0.0,
            "force_max": max_force,
            "min_distance": min_dist,
            "dt": float(dt),
            "dt_capped": bool(cap is not None and adaptive > cap),
            "neighbours_rebuilt": bool(rebuild),
            "seconds": round(time.time() - started, 3),
        }
        state.iteration += 1
        state.history.append(stats)
        return stats

    def _move(self, state: LangevinState, force: np.ndarray, dt: float) -> None:
        s, chunk, p = self.s, self.options.chunk_size, state.particles
        dim = p.shape[1]
        spherical = self.space.kind == "feature"
        eta = s.eta0 / math.sqrt(dim) if spherical else s.eta0
        for start in range(0, len(p), chunk):
            part = p[start : start + chunk]
            noise = state.rng.standard_normal(part.shape, dtype=np.float32) * np.float32(eta)
            if spherical:
                tangent_project(part, noise, chunk)
            part += np.float32(dt / s.mu) * force[start : start + chunk] + np.float32(math.sqrt(dt) / s.mu) * noise
            if spherical:
                normalize_rows(part, chunk)

    def measure(self, particles: np.ndarray) -> dict[str, Any]:
        """Statistics of ``particles`` with a fresh neighbour list (the start or the end of a run)."""
        e = np.ascontiguousarray(self.space.embed(particles), np.float32)
        self.rebuild_neighbours(e)
        grad = np.zeros_like(e)
        angles = soft_sphere_gradient(e, self.pairs, self.s.k, self.s.d0, self.options.chunk_size, grad)
        within_real, nearest_real = self.within_reference(e)
        return {
            "pairs": int(len(angles)),
            "min_angle": float(angles.min()) if len(angles) else math.nan,
            "mean_angle": float(angles.mean()) if len(angles) else math.nan,
            "pairs_within_d0": int((angles < self.s.d0).sum()),
            "within_real": within_real,
            "nearest_real_angle": nearest_real,
        }

    def run(self, state: LangevinState, iterations: int, on_step: Callable[[LangevinState, dict], None] | None = None) -> LangevinState:
        """Iterate until ``state.iteration == iterations``; neighbours are rebuilt at multiples of
        ``knn_every`` and on the first step of a (resumed) run."""
        first = True
        while state.iteration < iterations:
            stats = self.step(state, rebuild=first or state.iteration % self.s.knn_every == 0)
            first = False
            if on_step is not None:
                on_step(state, stats)
        return state
