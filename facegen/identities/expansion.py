"""Per-sample conditioning features of an identity: Vec2Face noise and CemiFace semi-hard bands.

An identity is expanded into K images from one feature ``f`` (ALGORITHMS.md 1.6 and 3). Each sample
gets its own conditioning feature, in one of two ways:

* **noise** (Vec2Face, HSFace): ``g = f + n``, ``n ~ N(0, sigma^2 I)``, then ``g`` is re-scaled to
  ``|f|``. Each identity's K samples share the configured sigmas in the configured shares (preset
  ``hsface``: 0.3, 0.5, 0.7 at 40 %, 40 %, 20 %; preset ``hybridgen``, HybridGen's references: 0.2
  for all). The resulting cosine depends on ``|f|``: about ``|f| / sqrt(|f|^2 + d sigma^2)`` in
  ``d`` dimensions, so sigma only means something for features of the norm the generator was
  trained on: Vec2Face's is the raw (unnormalised) ArcFace output, ``feature_norm: own``.
* **band** (CemiFace): a target cosine ``m`` is drawn uniformly from ``[low, high]`` and ``f`` is
  rotated toward a random direction orthogonal to it by ``arccos(m)``:
  ``g = |f| (m f^ + sqrt(1 - m^2) u)``, so ``cos(g, f) = m`` exactly, whatever ``|f|`` is.

Everything a sample draws comes from its own stream, seeded by the row's sample seed (a pure
function of ``(run seed, identity id, sample index)``); the sigma schedule of an identity comes
from the identity's stream. So one sample can be recomputed alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from facegen.identities.seeds import identity_rng

#: Domain tags of the expansion draws (independent of every other use of the same seeds).
SCHEDULE_TAG = 0x51C4
SAMPLE_NOISE_TAG = 0xB4ED

MODE_NOISE = "noise"
MODE_BAND = "band"


@dataclass(frozen=True)
class Conditioning:
    """One sample's conditioning feature and how it was made.

    ``sigma`` is NaN in band mode; ``band`` is ``(nan, nan)`` and ``requested_similarity`` is the
    cosine of ``feature`` to the identity feature (what the perturbation produced) in noise mode.
    """

    feature: np.ndarray
    mode: str
    sigma: float
    band: tuple[float, float]
    requested_similarity: float


def _as_feature(feature: np.ndarray) -> np.ndarray:
    f = np.asarray(feature, dtype=np.float64)
    if f.ndim != 1 or f.size < 2:
        raise ValueError(f"identity feature: expected a vector of length >= 2, got shape {f.shape}")
    if not np.isfinite(f).all():
        raise ValueError("identity feature: contains NaN or infinite values")
    if not np.linalg.norm(f) > 0:
        raise ValueError("identity feature: has zero norm")
    return f


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of two vectors (float64)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def feature_noise(dim: int, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """The noise Vec2Face adds to a feature: ``dim`` i.i.d. ``N(0, sigma^2)`` draws (absolute units,
    whatever the feature's norm), the first thing drawn from ``rng``."""
    if not sigma >= 0:
        raise ValueError(f"sigma must be >= 0, got {sigma}")
    return rng.normal(0.0, sigma, int(dim))


def add_feature_noise(feature: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Vec2Face's perturbation: ``feature + N(0, sigma^2 I)`` re-scaled to the feature's norm."""
    f = _as_feature(feature)
    noisy = f + feature_noise(f.size, sigma, rng)
    norm = np.linalg.norm(noisy)
    if not norm > 0:  # only possible when the noise cancels the feature exactly
        raise ValueError("noisy feature has zero norm")
    return noisy * (np.linalg.norm(f) / norm)


def random_orthogonal_direction(feature: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A uniformly random unit vector orthogonal to ``feature``."""
    f = _as_feature(feature)
    unit = f / np.linalg.norm(f)
    while True:  # a Gaussian draw is parallel to f with probability 0; loop only for safety
        u = rng.standard_normal(f.shape)
        u -= (u @ unit) * unit
        u -= (u @ unit) * unit  # second Gram-Schmidt pass: orthogonal to rounding error
        norm = np.linalg.norm(u)
        if norm > 1e-8:
            return u / norm


def rotate_to_similarity(feature: np.ndarray, similarity: float, rng: np.random.Generator) -> np.ndarray:
    """``feature`` rotated toward a random orthogonal direction until its cosine to itself is
    ``similarity`` (in [-1, 1]); the norm is kept."""
    f = _as_feature(feature)
    if not -1.0 <= similarity <= 1.0:
        raise ValueError(f"similarity must be in [-1, 1], got {similarity}")
    norm = np.linalg.norm(f)
    u = random_orthogonal_direction(f, rng)
    return norm * (similarity * (f / norm) + np.sqrt(1.0 - similarity**2) * u)


def split_counts(shares: Sequence[float], count: int) -> list[int]:
    """``count`` split by ``shares`` (largest remainder): ``[0.4, 0.4, 0.2], 50 -> [20, 20, 10]``."""
    shares = np.asarray(shares, np.float64)
    if shares.ndim != 1 or shares.size == 0 or (shares < 0).any() or not shares.sum() > 0:
        raise ValueError(f"shares must be non-negative with a positive sum, got {shares.tolist()}")
    exact = shares / shares.sum() * int(count)
    counts = np.floor(exact).astype(np.int64)
    order = np.argsort(-(exact - counts), kind="stable")  # ties go to the earlier sigma
    counts[order[: int(count) - int(counts.sum())]] += 1
    return counts.tolist()


def sigma_schedule(seed: int, identity_id: int, count: int, sigmas: Sequence[float], shares: Sequence[float]) -> np.ndarray:
    """The sigma of each of an identity's ``count`` samples: the shares exactly (to one sample),
    in an order shuffled by the identity's own stream."""
    if len(sigmas) != len(shares):
        raise ValueError(f"{len(sigmas)} sigmas but {len(shares)} shares")
    values = np.repeat(np.asarray(sigmas, np.float64), split_counts(shares, count))
    return identity_rng(seed, identity_id, SCHEDULE_TAG).permutation(values)


def sample_rng(sample_seed: int) -> np.random.Generator:
    """The stream of one sample's expansion draws (``sample_seed`` is the row's seed column)."""
    return np.random.default_rng([int(sample_seed), SAMPLE_NOISE_TAG])


def noise_conditioning(feature: np.ndarray, sigma: float, sample_seed: int) -> Conditioning:
    """One sample's Vec2Face-style conditioning feature."""
    f = _as_feature(feature)
    g = add_feature_noise(f, sigma, sample_rng(sample_seed))
    nan = float("nan")
    return Conditioning(g.astype(np.float32), MODE_NOISE, float(sigma), (nan, nan), cosine(g, f))


def band_conditioning(feature: np.ndarray, band: tuple[float, float], sample_seed: int) -> Conditioning:
    """One sample's CemiFace-style conditioning feature: cosine drawn uniformly in ``band``."""
    low, high = float(band[0]), float(band[1])
    if not -1.0 <= low <= high <= 1.0:
        raise ValueError(f"similarity band must satisfy -1 <= low <= high <= 1, got [{low}, {high}]")
    rng = sample_rng(sample_seed)
    target = float(rng.uniform(low, high))
    g = rotate_to_similarity(feature, target, rng)
    return Conditioning(g.astype(np.float32), MODE_BAND, float("nan"), (low, high), target)


def similarity_histogram(values: Sequence[float], bins: int = 20, low: float = -1.0, high: float = 1.0) -> dict:
    """Counts of the finite ``values`` in ``bins`` equal bins over ``[low, high]`` (plain JSON)."""
    v = np.asarray(values, np.float64)
    v = v[np.isfinite(v)]
    counts, edges = np.histogram(np.clip(v, low, high), bins=int(bins), range=(low, high))
    return {"edges": [round(float(e), 6) for e in edges], "counts": counts.tolist()}


def merge_histograms(histograms: Sequence[dict]) -> dict | None:
    """The sum of histograms with identical edges (per-block histograms -> one per run)."""
    histograms = [h for h in histograms if h]
    if not histograms:
        return None
    edges = histograms[0]["edges"]
    if any(h["edges"] != edges for h in histograms):
        raise ValueError("cannot merge similarity histograms with different bin edges")
    return {"edges": edges, "counts": np.sum([h["counts"] for h in histograms], axis=0).tolist()}


def format_histograms(histograms: dict[str, dict], width: int = 30, trim: bool = False) -> str:
    """Histograms with the same edges as one text table, one bar column per name, side by side
    (``trim``: without the empty bins below the first and above the last count)."""
    names = list(histograms)
    if not names:
        return ""
    edges = histograms[names[0]]["edges"]
    if any(histograms[n]["edges"] != edges for n in names):
        raise ValueError("histograms to print side by side need identical edges")
    totals = {n: max(1, sum(histograms[n]["counts"])) for n in names}
    lines = ["cosine bin     " + "".join(f"{n[:width - 7]:<{width}}" for n in names)]
    rows = range(len(edges) - 1)
    if trim:
        used = [i for i in rows if any(histograms[n]["counts"][i] for n in names)] or [0]
        rows = range(used[0], used[-1] + 1)
    for i in rows:
        cells = []
        for n in names:
            count = histograms[n]["counts"][i]
            bar = "#" * int(round(count / totals[n] * (width - 9)))
            cells.append(f"{count:5d} {bar:<{width - 6}}")
        lines.append(f"[{edges[i]:+.2f},{edges[i + 1]:+.2f})  " + "".join(cells))
    return "\n".join(lines)


def sample_conditioning(feature: np.ndarray, settings, seed: int, identity_id: int, sample_idx: int, count: int,
                        sample_seed: int) -> Conditioning:
    """The conditioning feature of sample ``sample_idx`` of ``count`` under ``settings``
    (an :class:`facegen.config.ExpansionSettings`): noise with the identity's sigma schedule, or a
    cosine drawn from ``settings.band``."""
    if settings.mode == MODE_BAND:
        return band_conditioning(feature, tuple(settings.band), sample_seed)
    sigmas = sigma_schedule(seed, identity_id, count, settings.sigmas, settings.shares)
    return noise_conditioning(feature, float(sigmas[sample_idx]), sample_seed)
