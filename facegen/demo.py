"""Extras the local demo needs when no real weights exist, built from the same stages.

- ``bootstrap_embedder``: an IResNet trained on *separate* identities (their own id range, no
  injected errors) so the main run's cleaning sees embeddings from a model, not the renderer's
  ground truth.
- ``calibrate_bootstrap_embedder``: that embedder's similarity scale, measured on pairs of further
  identities that vary as the training data does, so cleaning's thresholds follow it.
- ``write_heldout_bin``: a verification set of further unseen identities in the insightface
  ``.bin`` format, so validation measures generalisation to new people.
"""

from __future__ import annotations

import numpy as np

from facegen import storage
from facegen.config import FacegenConfig

BOOTSTRAP_FIRST_ID = 10_000_000
HELDOUT_FIRST_ID = 20_000_000
CALIBRATION_FIRST_ID = 30_000_000
HELDOUT_IMAGES_PER_IDENTITY = 4


def _side_config(cfg: FacegenConfig, name: str, first_id: int, num_identities: int, images_per_identity: int,
                 keep_variation: bool = False) -> FacegenConfig:
    side = cfg.model_copy(deep=True)
    side.run.output_dir = f"{cfg.run.output_dir.rstrip('/')}/{name}"
    side.run.name = f"{cfg.run.name}-{name}"
    side.identities.first_id = first_id
    side.identities.num_identities = num_identities
    side.generator.images_per_identity = images_per_identity
    side.generator.parametric.wrong_identity_rate = 0.0
    side.faces.embedder.kind, side.faces.embedder.path = "facegen", None
    # Langevin's repulsion needs the embedder the bootstrap side run is about to train, and held-out
    # people are plain draws from the generator: both sides sample gaussian identities.
    side.identities.sampler.kind = "gaussian"
    if not keep_variation:
        side.generator.variation = "noise"  # Dispersion/DisCo need the embedder this side run may be training
    else:  # DisCo on the main run's fitted directions, not a folder of the side run's own
        from facegen.stages.directions import with_fitted_directions

        side.generator.disco = with_fitted_directions(cfg).generator.disco
    return side


def bootstrap_embedder(cfg: FacegenConfig, progress: bool = True) -> str:
    """Train the demo's embedder on its own identities; returns the backbone directory."""
    from facegen.stages.generate import run_generate
    from facegen.stages.shard import run_shard
    from facegen.train.loop import train

    demo = cfg.demo
    side = _side_config(cfg, "bootstrap", BOOTSTRAP_FIRST_ID, demo.bootstrap_identities, demo.bootstrap_images_per_identity)
    side.train.epochs = demo.bootstrap_epochs
    side.train.lr_steps = [max(1, demo.bootstrap_epochs - 1)]
    side.train.curriculum = "shuffled"
    side.train.run_name = "bootstrap-embedder"
    side.shards.num_buckets = 1
    run_generate(side, progress=progress)
    run_shard(side, source_dir=side.stage_dir("raw"), progress=progress)
    result = train(side, side.stage_dir("shards"), eval_bins=[])
    return result.backbone_dir


def with_run_embedders(cfg: FacegenConfig, progress: bool = True) -> FacegenConfig:
    """``cfg`` with the embedders its settings imply filled in, the same for ``facegen pipeline`` and
    for each stage command, so both compute the same lineage digests and reuse each other's blocks:

    - no ``faces.embedder.path`` and ``demo.bootstrap_identities > 0``: the bootstrap embedder
      (trained on first use, then found where that run left it; its training resumes like any);
    - a GAN backend without ``generator.embedder.path``: identity forces (Langevin, Dispersion) go
      through the run's own facegen / arcface_torch embedder.
    """
    from facegen.config.faces import EMBEDDERS
    from facegen.config.generation import gan_backends

    cfg = cfg.model_copy(deep=True)
    if cfg.demo.bootstrap_identities and not cfg.faces.embedder.enabled:
        cfg.faces.embedder.kind, cfg.faces.embedder.path = "facegen", bootstrap_embedder(cfg, progress=progress)
    faces_embedder = cfg.faces.embedder
    if (cfg.generator.backend in gan_backends() and faces_embedder.enabled and not cfg.generator.embedder.path
            and EMBEDDERS.hook(faces_embedder.kind, "differentiable_model")):
        cfg.generator.embedder.kind, cfg.generator.embedder.path = faces_embedder.kind, faces_embedder.path
        cfg.generator.embedder.arch = faces_embedder.arch
    if cfg.demo.bootstrap_identities and cfg.demo.calibration_identities and not cfg.faces.embedder.calibration:
        cfg.faces.embedder.calibration = calibrate_bootstrap_embedder(cfg, progress=progress)
    return cfg


def calibrate_bootstrap_embedder(cfg: FacegenConfig, progress: bool = True) -> str:
    """Measure the similarity scale of ``cfg.faces.embedder`` (the bootstrap embedder) on
    ``demo.calibration_identities`` further identities with the run's images per identity, varied as
    the run's images are (Dispersion and DisCo through ``generator.embedder``); returns the
    calibration file, reused while the embedder's weights and the set's settings are the same."""
    from facegen.config import TaskSettings
    from facegen.lineage import raw_digest, settings_digest
    from facegen.models.iresnet_checkpoint import BACKBONE_WEIGHTS
    from facegen.stages.generate import run_generate
    from facegen.stages.tasks import run_task

    # as many images per identity as the run: Dispersion spreads an identity's images further the more there are
    side = _side_config(cfg, "calibration", CALIBRATION_FIRST_ID, cfg.demo.calibration_identities,
                        cfg.generator.images_per_identity, keep_variation=True)
    weights = storage.sha256_of(f"{cfg.faces.embedder.path.rstrip('/')}/{BACKBONE_WEIGHTS}")
    key = settings_digest(raw_digest(side), cfg.demo.calibration_pairs, cfg.eval.nrof_folds, weights)
    path = f"{side.run.output_dir}/calibration-{key}.json"  # reused while the embedder and the set are the same
    if storage.exists(path):
        return path
    bin_path = f"{side.run.output_dir}/calibration-{key}.bin"
    if not storage.exists(bin_path):
        run_generate(side, progress=progress)
        run_task(_write_bin_task, side.stage_dir("raw"), bin_path, cfg.demo.calibration_pairs, cfg.run.seed,
                 resources=TaskSettings(num_cpus=0.25), field="demo.calibration_identities", name="calibration .bin")
    resources = TaskSettings(num_cpus=cfg.train.cpus_per_worker, num_gpus=1 if cfg.train.use_gpu else 0,
                             resources=cfg.train.resources)
    return run_task(_calibrate_task, cfg.faces.embedder.model_dump_json(), bin_path, path, cfg.eval.nrof_folds,
                    resources=resources, field="train.resources", name="calibrate the bootstrap embedder")


def _calibrate_task(embedder_json: str, bin_path: str, path: str, nrof_folds: int) -> str:
    """Embed the calibration set on a worker and write the calibration (a Ray task body)."""
    from facegen.cache import fetch, localized
    from facegen.config import EmbedderSettings
    from facegen.faces.calibration import calibrate_embedder
    from facegen.faces.embed import build_embedder

    settings = localized(EmbedderSettings.model_validate_json(embedder_json), "faces.embedder.")
    calibration = calibrate_embedder(build_embedder(settings), [fetch(bin_path, "demo.calibration_identities")], settings.kind,
                                     settings.batch_size, nrof_folds, min_pairs=200, source=bin_path)
    storage.write_json_atomic(calibration.model_dump(), path)
    return path


def heldout_pairs(identity_ids: np.ndarray, num_pairs: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Half genuine, half impostor pairs as row-index pairs into ``identity_ids`` (deterministic)."""
    rng = np.random.default_rng([seed, 0xB1])
    by_identity: dict[int, np.ndarray] = {}
    for ident in np.unique(identity_ids):
        rows = np.flatnonzero(identity_ids == ident)
        if len(rows) >= 2:
            by_identity[int(ident)] = rows
    people = np.array(sorted(by_identity))
    if len(people) < 2:
        raise ValueError("held-out set needs at least two identities with two good images each")
    pairs, same = [], []
    for k in range(num_pairs):
        if k % 2 == 0:
            rows = by_identity[int(rng.choice(people))]
            a, b = rng.choice(rows, 2, replace=False)
        else:
            p, q = rng.choice(people, 2, replace=False)
            a, b = rng.choice(by_identity[int(p)]), rng.choice(by_identity[int(q)])
        pairs.append((a, b))
        same.append(k % 2 == 0)
    return np.array(pairs, np.int64), np.array(same, bool)


def write_heldout_bin(cfg: FacegenConfig, progress: bool = True, same_variation: bool = False) -> str:
    """Render unseen identities, align them, and write ``<output>/heldout/heldout.bin``.

    The held-out identities are ``demo.heldout_identities`` ids from :data:`HELDOUT_FIRST_ID` on, so a
    GAN backend draws their latents apart from the training ones. Their images vary by plain noise,
    unless ``same_variation``: then by ``generator.variation`` as the training data (Dispersion and
    DisCo need ``generator.embedder``), so genuine pairs differ as much as training images do.
    """
    from facegen.config import TaskSettings
    from facegen.stages.generate import run_generate
    from facegen.stages.tasks import run_task

    side = _side_config(cfg, "heldout", HELDOUT_FIRST_ID, cfg.demo.heldout_identities, HELDOUT_IMAGES_PER_IDENTITY,
                        keep_variation=same_variation)
    path = f"{side.run.output_dir}/heldout.bin"
    if storage.exists(path):
        return path
    run_generate(side, progress=progress)
    return run_task(_write_bin_task, side.stage_dir("raw"), path, cfg.demo.heldout_pairs, cfg.run.seed,
                    resources=TaskSettings(num_cpus=0.25), field="demo.heldout_identities", name="heldout .bin")


def _write_bin_task(raw_dir: str, path: str, num_pairs: int, seed: int) -> str:
    """The held-out raw blocks as an insightface ``.bin`` (a Ray task body: images never reach the driver)."""
    from facegen.eval.report import load_samples
    from facegen.eval.verification import write_bin

    table = load_samples(raw_dir, columns=["identity_id", "image"])
    images = table.column("image").to_pylist()
    pairs, issame = heldout_pairs(table.column("identity_id").to_numpy(), num_pairs, seed)
    write_bin(path, [images[i] for pair in pairs for i in pair], issame)
    return path
