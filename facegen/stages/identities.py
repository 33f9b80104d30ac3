"""Identity sampling stage: every identity's latent, written as data before generation.

``<output_dir>/identities/`` holds one ``block-XXXXXX.parquet`` (IDENTITY rows: ``identity_id``,
``latent``, ``sampler``) and stats record per block of consecutive ids, and ``sampler.json`` (the
sampler, its settings, per-iteration statistics, the start and end measurements), written last:
the stage is done when it and every block exist. Generation reads the latents when they exist.

Nothing runs in the driver: Langevin is one Ray task on a worker (``identities.sampler.pool``'s
resources: a GPU where configured) that checkpoints and, restarted after a node loss, resumes; in
latent space its passes through G and the embedder may run on ``langevin.workers`` encoder actors
(one per GPU, :mod:`facegen.stages.langevin_workers`) while the task keeps the particles; the
identity blocks are a block stage on a Ray Data actor pool (:mod:`facegen.stages.runner`) whose
workers draw Gaussian latents or read their rows of Langevin's final particles.

``gaussian`` draws each identity's latent independently (the GAN's own prior); ``langevin`` moves all
of them together (:mod:`facegen.identities.langevin`), in the GAN's latent space (forces through G,
the ArcFace crop and a differentiable embedder) or on the embedding hypersphere (``feature``, for
feature-conditioned generators); ``vec2face`` draws identity features by Vec2Face's sampler
(:mod:`facegen.identities.feature_sampler`), one Ray task like Langevin. Langevin checkpoints its particles every ``checkpoint_every``
iterations under ``identities/langevin-checkpoint/`` and resumes from there.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from facegen import blocks as blk
from facegen import storage
from facegen.config import FacegenConfig
from facegen.schema import identity_table
from facegen.stages import StageReport
from facegen.stages.runner import BlockStage, BlockWorker, run_block_stage

SAMPLER_JSON = "sampler.json"
CHECKPOINT_DIR = "langevin-checkpoint"
#: Domain tags of the sampler's random streams.
FEATURE_TAG = 0xFEA7
LANGEVIN_NOISE_TAG = 0x1A76


def sampler_name(cfg: FacegenConfig) -> str:
    """``gaussian``, ``langevin-latent``, ``langevin-feature``, ``vec2face-gaussian`` or ``vec2face-pca``."""
    s = cfg.identities.sampler
    if s.kind == "vec2face":
        return f"vec2face-{s.vec2face.distribution}"
    return "gaussian" if s.kind == "gaussian" else f"langevin-{s.langevin.space}"


def identity_ids(cfg: FacegenConfig) -> np.ndarray:
    """All identity ids of the run, ascending."""
    return np.arange(cfg.identities.first_id, cfg.identities.first_id + cfg.identities.num_identities, dtype=np.int64)


def feature_gaussian(seed: int, ids: np.ndarray, dim: int) -> np.ndarray:
    """Independent unit vectors on the ``dim``-sphere, one per identity (a function of seed and id)."""
    from facegen.identities.seeds import identity_rng

    out = np.empty((len(ids), dim), np.float32)
    for row, identity_id in enumerate(ids):
        v = identity_rng(seed, int(identity_id), FEATURE_TAG).standard_normal(dim)
        out[row] = v / np.linalg.norm(v)
    return out


def load_reference_embeddings(path: str, column: str, dim: int) -> np.ndarray:
    """Real-face embeddings ``[M, dim]`` (unit rows) from a ``.npy`` or a Parquet column."""
    array = storage.read_vectors(path, column, "identities.sampler.langevin.real_embeddings")
    if array.ndim != 2 or array.shape[1] != dim or len(array) == 0:
        raise ValueError(f"{path}: real embeddings must have shape [M, {dim}], got {array.shape}")
    norms = np.linalg.norm(array, axis=1, keepdims=True)
    if not np.all(np.isfinite(array)) or np.any(norms == 0):
        raise ValueError(f"{path}: real embeddings contain zero or non-finite rows")
    return array / norms


def _digest(cfg: FacegenConfig) -> str:
    """What shapes the identities: seed, identity and sampler settings, the GAN and the force
    embedder (input files by content, scheduling fields left out: :mod:`facegen.lineage`)."""
    from facegen.config.generation import gan_backends
    from facegen.lineage import backend_section, settings_digest

    g = cfg.generator
    gan = backend_section(g, g.backend) if g.backend in gan_backends() else None
    return settings_digest(cfg.run.seed, cfg.identities, g.backend, gan, g.embedder)


def _save_checkpoint(directory: str, state: Any, extra: dict[str, Any]) -> None:
    buf = io.BytesIO()
    np.save(buf, state.particles)
    storage.write_bytes_atomic(buf.getvalue(), f"{directory}/particles.npy")
    record = {"iteration": state.iteration, "rng": state.rng.bit_generator.state, "history": state.history, **extra}
    storage.write_json_atomic(record, f"{directory}/state.json")


def _load_checkpoint(directory: str, digest: str, shape: tuple[int, int]):
    from facegen.identities.langevin import LangevinState

    if not storage.exists(f"{directory}/state.json"):
        return None, None
    record = storage.read_json(f"{directory}/state.json")
    if record.get("digest") != digest:
        return None, None  # written under other settings: start over
    particles = np.load(io.BytesIO(storage.read_bytes(f"{directory}/particles.npy")), allow_pickle=False)
    if particles.shape != shape:
        return None, None
    rng = np.random.default_rng()
    rng.bit_generator.state = record["rng"]
    return LangevinState(np.ascontiguousarray(particles, np.float32), int(record["iteration"]), rng, list(record["history"])), record


FINAL_PARTICLES = "final.npy"


class IdentityBlockWriter(BlockWorker):
    """Block worker of the identity blocks: each block's latents drawn from the GAN's Gaussian
    prior, or read from Langevin's final particles (``particles``)."""

    def __init__(self, cfg_json: str, stage_dir: str, name: str, particles: str | None = None):
        self.cfg = FacegenConfig.model_validate_json(cfg_json)
        self.stage_dir, self.name, self.particles = stage_dir, name, particles
        self.gan = None
        if particles is None:
            from facegen.cache import localized
            from facegen.generators.gan import build_gan

            self.gan = build_gan(localized(self.cfg.generator, "generator"))

    def make(self, row: dict[str, Any]) -> dict[str, Any]:
        block_id, first, end = int(row["block_id"]), int(row["first_id"]), int(row["end_id"])
        ids = np.arange(first, end, dtype=np.int64)
        if self.gan is not None:
            latents = self.gan.gaussian_latents(self.cfg.run.seed, ids)
        else:
            offset = first - self.cfg.identities.first_id
            latents = storage.read_npy_rows(self.particles, offset, offset + len(ids))
        return self.commit(self.stage_dir, block_id, identity_table(ids, latents, self.name),
                           {"identities": len(ids), "sampler": self.name, "latent_dim": int(latents.shape[1])})


def _write_blocks(cfg: FacegenConfig, out: str, name: str, particles: str | None, progress: bool) -> int:
    """Every identity block through the block runner; returns how many were written."""
    planned = blk.plan_blocks(cfg.identities)
    pool = cfg.identities.sampler.pool
    outcome = run_block_stage(BlockStage(
        "identities", out, IdentityBlockWriter, {"cfg_json": cfg.model_dump_json(), "stage_dir": out, "name": name,
                                                 "particles": particles},
        pool, "identities.sampler.pool", {b.block_id: {"first_id": b.first_id, "end_id": b.end_id} for b in planned},
        verify="size", overwrite=cfg.run.overwrite), progress=progress)
    return outcome.report.blocks_written


def _langevin_space(cfg: FacegenConfig, ids: np.ndarray):
    """The space the particles live in, their start and the embedding width. In latent space G and
    the embedder run in this task (``workers`` 1) or on encoder actors, which fetch the models to
    their own nodes (``cfg.generator``'s paths as the user gave them)."""
    from facegen.identities.langevin import FeatureSpace, LatentSpace

    ls = cfg.identities.sampler.langevin
    if ls.space == "feature":
        return FeatureSpace(), feature_gaussian(cfg.run.seed, ids, ls.feature_dim), ls.feature_dim
    if ls.workers > 1:
        from facegen.stages.langevin_workers import ActorLatentSpace

        space = ActorLatentSpace(cfg.generator, ls.batch_size, ls.workers, ls.worker)
        start = space.gaussian_latents(cfg.run.seed, ids)
    else:
        from facegen.cache import localized
        from facegen.stages.langevin_workers import build_encoder

        encoder = build_encoder(localized(cfg.generator, "generator"), ls.batch_size)
        space = LatentSpace(encoder, encoder.gan.latent_mean.cpu().numpy())
        start = encoder.gan.gaussian_latents(cfg.run.seed, ids)
    return space, start, int(space.embed(start[:1]).shape[1])


def langevin_task(cfg_json: str, out: str, digest: str, report: Callable[..., None]) -> dict[str, Any]:
    """Run (or resume) Langevin over every identity on this worker (G and the embedder here, or on
    ``langevin.workers`` encoder actors, stopped when it returns); writes checkpoints and the final
    particles (``langevin-checkpoint/final.npy``); returns the sampler's summary."""
    from facegen.cache import localized

    cfg = FacegenConfig.model_validate_json(cfg_json)
    cfg = cfg.model_copy(update={"identities": localized(cfg.identities, "identities")})
    space, start, embed_dim = _langevin_space(cfg, identity_ids(cfg))
    try:
        return _run_langevin(cfg, out, digest, report, space, start, embed_dim)
    finally:
        if hasattr(space, "close"):
            space.close()


def _run_langevin(cfg: FacegenConfig, out: str, digest: str, report: Callable[..., None], space: Any,
                  start: np.ndarray, embed_dim: int) -> dict[str, Any]:
    from facegen.identities.langevin import LangevinSampler, LangevinState
    from facegen.identities.seeds import identity_rng
    from facegen.tracking import start_run

    ls = cfg.identities.sampler.langevin
    ids = identity_ids(cfg)
    reference = load_reference_embeddings(ls.real_embeddings, ls.real_column, embed_dim) if ls.real_embeddings else None
    sampler = LangevinSampler(ls, space, reference)
    ckpt_dir = f"{out}/{CHECKPOINT_DIR}"
    state, record = _load_checkpoint(ckpt_dir, digest, start.shape)
    if state is None:
        initial = sampler.measure(start)
        state = LangevinState(start.copy(), 0, identity_rng(cfg.run.seed, 0, LANGEVIN_NOISE_TAG), [])
    else:
        initial = record["gaussian"]
    resumed_from = state.iteration
    extra = {"digest": digest, "gaussian": initial}
    tracker = start_run(cfg, "identities")
    report(state.iteration, ls.iterations)

    def on_step(st: Any, stats: dict[str, Any]) -> None:
        report(st.iteration, ls.iterations, f"within_d0={stats['pairs_within_d0']}, min_angle={stats['min_angle']:.3f}")
        tracker.log({f"langevin/{k}": v for k, v in stats.items() if isinstance(v, (int, float))}, step=st.iteration)
        if st.iteration % ls.checkpoint_every == 0 or st.iteration == ls.iterations:
            _save_checkpoint(ckpt_dir, st, extra)

    try:
        sampler.run(state, ls.iterations, on_step)
        if state.iteration == 0:
            _save_checkpoint(ckpt_dir, state, extra)
        final = sampler.measure(state.particles)
        tracker.summary({"langevin/final_pairs_within_d0": final["pairs_within_d0"], "langevin/final_min_angle": final["min_angle"],
                         "langevin/gaussian_pairs_within_d0": initial["pairs_within_d0"], "langevin/final_within_real": final["within_real"]})
    finally:
        tracker.finish()
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(state.particles, np.float32))
    storage.write_bytes_atomic(buf.getvalue(), f"{ckpt_dir}/{FINAL_PARTICLES}")
    reduction = initial["pairs_within_d0"] / max(final["pairs_within_d0"], 1)
    return {"kind": "langevin", "space": ls.space, "unit_norm": ls.space == "feature", "backend": cfg.generator.backend if ls.space == "latent" else None,
            "latent_dim": int(state.particles.shape[1]), "embedding_dim": embed_dim, "identities": len(ids),
            "settings": ls.model_dump(mode="json"), "resumed_from_iteration": resumed_from,
            "gaussian": initial, "final": final, "pairs_within_d0_reduction": round(reduction, 2),
            "iterations": state.history}


FEATURES_DIR = "vec2face-sampler"


def vec2face_task(cfg_json: str, out: str, report: Callable[..., None]) -> dict[str, Any]:
    """Draw every identity's feature by Vec2Face's sampler on this worker; writes
    ``vec2face-sampler/final.npy`` and returns the sampler's summary."""
    from facegen.cache import localized
    from facegen.identities.feature_sampler import sample_feature_identities

    cfg = FacegenConfig.model_validate_json(cfg_json)
    settings = localized(cfg.identities, "identities").sampler.vec2face
    centres = None
    if settings.distribution == "pca":
        centres = load_class_centres(settings.centres, settings.centres_column)
    features, figures = sample_feature_identities(settings, cfg.run.seed, cfg.identities.num_identities, centres, report)
    buf = io.BytesIO()
    np.save(buf, features)
    storage.write_bytes_atomic(buf.getvalue(), f"{out}/{FEATURES_DIR}/{FINAL_PARTICLES}")
    return {"kind": "vec2face", "space": "feature", "latent_dim": int(features.shape[1]),
            "embedding_dim": int(features.shape[1]), "unit_norm": False, "identities": len(features),
            "settings": settings.model_dump(mode="json"), **figures}


def load_class_centres(path: str, column: str) -> np.ndarray:
    """Raw class-centre features ``[m, d]`` from a ``.npy`` or a Parquet list column (norms kept)."""
    array = storage.read_vectors(path, column, "identities.sampler.vec2face.centres")
    if array.ndim != 2 or len(array) < 2 or not np.all(np.isfinite(array)):
        raise ValueError(f"{path}: class centres must be a finite [m >= 2, d] array, got shape {array.shape}")
    return array


def _sample(cfg: FacegenConfig, out: str, progress: bool, digest: str) -> dict[str, Any]:
    from facegen.stages.tasks import run_tracked

    started = time.time()
    s = cfg.identities.sampler
    if s.kind == "gaussian":
        from facegen.config.generation import gan_backends

        if cfg.generator.backend not in gan_backends():
            raise ValueError(f"identities.sampler.kind: gaussian latents need a GAN backend (generator.backend is "
                             f"{cfg.generator.backend})")
        written = _write_blocks(cfg, out, "gaussian", None, progress)
        summary = {"kind": "gaussian", "space": "latent", "backend": cfg.generator.backend,
                   "identities": cfg.identities.num_identities, "blocks_written": written}
    elif s.kind == "vec2face":
        summary = run_tracked(vec2face_task, cfg.model_dump_json(), out, resources=s.pool, field="identities.sampler.pool",
                              name=f"vec2face sampler ({cfg.identities.num_identities} identities)", progress=progress)
        summary["blocks_written"] = _write_blocks(cfg, out, sampler_name(cfg), f"{out}/{FEATURES_DIR}/{FINAL_PARTICLES}", progress)
    else:
        summary = run_tracked(langevin_task, cfg.model_dump_json(), out, digest, resources=s.pool,
                              field="identities.sampler.pool", name=f"langevin ({cfg.identities.num_identities} identities)",
                              progress=progress)
        summary["blocks_written"] = _write_blocks(cfg, out, sampler_name(cfg), f"{out}/{CHECKPOINT_DIR}/{FINAL_PARTICLES}", progress)
    if "latent_dim" not in summary:
        first = blk.plan_blocks(cfg.identities)[0].block_id
        summary["latent_dim"] = int(storage.read_json(blk.stats_path(out, first))["latent_dim"])
    summary["seconds"] = round(time.time() - started, 2)
    summary["digest"] = digest
    storage.write_json_atomic(summary, f"{out}/{SAMPLER_JSON}")
    return summary


def run_identities(cfg: FacegenConfig, progress: bool = True) -> StageReport:
    """Sample (or resume sampling) the latent of every identity of ``cfg`` into ``identities/``."""
    out = cfg.stage_dir("identities")
    started = time.time()
    planned = blk.plan_blocks(cfg.identities)
    if cfg.run.overwrite:
        storage.remove(f"{out}/{SAMPLER_JSON}")
        storage.remove(f"{out}/{CHECKPOINT_DIR}/state.json")
    digest = _digest(cfg)
    if storage.exists(f"{out}/{SAMPLER_JSON}") and storage.read_json(f"{out}/{SAMPLER_JSON}").get("digest") != digest:
        storage.remove(f"{out}/{SAMPLER_JSON}")  # sampled under other settings: sample again
        blk.reset_blocks(out, [b.block_id for b in planned])
    done = [b for b in planned if blk.is_done(out, b.block_id)]
    if storage.exists(f"{out}/{SAMPLER_JSON}") and len(done) == len(planned) and not cfg.run.overwrite:
        summary = storage.read_json(f"{out}/{SAMPLER_JSON}")
        return StageReport("identities", out, len(planned), len(planned), 0, 0.0, _totals(summary))
    summary = _sample(cfg, out, progress, digest)
    return StageReport("identities", out, len(planned), len(planned) - summary["blocks_written"], summary["blocks_written"],
                       round(time.time() - started, 2), _totals(summary))


def _totals(summary: dict[str, Any]) -> dict[str, Any]:
    totals: dict[str, Any] = {"identities": summary.get("identities", 0), "latent_dim": summary.get("latent_dim", 0)}
    if summary.get("kind") == "vec2face":
        totals.update({"candidates drawn": summary["candidates"], "acceptance": summary["acceptance"],
                       "max pairwise cosine": summary["max_pairwise_similarity"],
                       "feature norm": f"{summary['norm_mean']:.2f} ± {summary['norm_std']:.2f}"})
    if summary.get("kind") == "langevin":
        totals.update({"pairs_within_d0 gaussian": summary["gaussian"]["pairs_within_d0"],
                       "pairs_within_d0 langevin": summary["final"]["pairs_within_d0"],
                       "min_angle langevin": round(summary["final"]["min_angle"], 4),
                       "within_real langevin": summary["final"]["within_real"]})
    return totals
