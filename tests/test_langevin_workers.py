"""Latent-space Langevin on encoder actors: the particles do not depend on the number of workers,
a run resumes with another number, a dead actor comes back, and bad settings fail in one line."""

import json
from pathlib import Path

import numpy as np
import pytest

from facegen.config import ConfigError, load_config
from facegen.stages import StageError
from facegen.stages.identities import run_identities
from facegen.stages.identity_blocks import read_latents
from facegen.stages.langevin_workers import batch_chunks

N, BATCH, ITERATIONS, CHECKPOINT_EVERY = 22, 4, 4, 2


def _config(out, embedder, workers, extra=()):
    """22 DCGAN identities (the packaged gan-face-generate model) in batches of 4: the last batch is
    short, and with several workers each actor gets a few whole batches per pass. Checkpoints fall on
    neighbour rebuilds, as a resumed run rebuilds its lists on its first step."""
    return load_config(None, [
        f"run.output_dir={out}", "tracking.mode=disabled", f"identities.num_identities={N}", "identities.block_size=11",
        "generator.backend=dcgan", "generator.device=cpu", f"generator.embedder.path={embedder}",
        "identities.sampler.kind=langevin", f"identities.sampler.langevin.iterations={ITERATIONS}",
        f"identities.sampler.langevin.batch_size={BATCH}", "identities.sampler.langevin.neighbours=8",
        f"identities.sampler.langevin.knn_every={CHECKPOINT_EVERY}", f"identities.sampler.langevin.checkpoint_every={CHECKPOINT_EVERY}",
        "identities.sampler.langevin.search_device=cpu", f"identities.sampler.langevin.workers={workers}",
        "identities.sampler.langevin.worker.num_cpus=0.25", *extra])


@pytest.fixture(scope="module")
def one_worker(tmp_path_factory, force_embedder, ray_local):
    """The uninterrupted run with G and the embedder in the Langevin task itself."""
    cfg = _config(tmp_path_factory.mktemp("one") / "out", force_embedder, 1)
    run_identities(cfg, progress=False)
    return cfg, json.loads((_stage(cfg) / "sampler.json").read_text())


def _stage(cfg):
    return Path(cfg.stage_dir("identities"))


def test_chunks_hold_whole_batches_and_cover_every_particle():
    for n, pieces in ((22, 8), (22, 2), (3, 4), (64, 3), (0, 2)):
        ranges = batch_chunks(n, BATCH, pieces)
        assert len(ranges) <= pieces and all(s % BATCH == 0 and s < e for s, e in ranges)
        assert [s for s, _ in ranges[1:]] == [e for _, e in ranges[:-1]]  # contiguous, in particle order
        assert (ranges[0][0], ranges[-1][1]) == (0, n) if n else ranges == []


def test_two_workers_give_the_particles_of_one(tmp_path, force_embedder, one_worker):
    from facegen.stages.identities import CHECKPOINT_DIR, FINAL_PARTICLES, _digest, langevin_task

    cfg1, summary1 = one_worker
    cfg2 = _config(tmp_path / "out", force_embedder, 2)
    out = cfg2.stage_dir("identities")
    # as sampler.json stores it (json's one NaN object compares equal to itself)
    summary2 = json.loads(json.dumps(langevin_task(cfg2.model_dump_json(), out, _digest(cfg2), lambda *a: None)))
    latents2 = np.load(f"{out}/{CHECKPOINT_DIR}/{FINAL_PARTICLES}")
    ids1, latents1 = read_latents(cfg1)
    # every particle felt a force and moved, and the Brownian noise (eta0 0.01) was drawn
    assert summary1["final"]["pairs_within_d0"] < summary1["gaussian"]["pairs_within_d0"]
    assert all(it["force_max"] > 0 and it["dt"] > 0 for it in summary1["iterations"])
    # the same batches through the same networks, the same noise from the task's stream: bitwise
    np.testing.assert_array_equal(ids1, np.arange(N))
    np.testing.assert_array_equal(latents2, latents1)
    assert summary2["gaussian"] == summary1["gaussian"] and summary2["final"] == summary1["final"]
    for a, b in zip(summary1["iterations"], summary2["iterations"], strict=True):
        assert {k: v for k, v in a.items() if k != "seconds"} == {k: v for k, v in b.items() if k != "seconds"}


def test_a_run_interrupted_after_a_checkpoint_resumes_with_another_worker_count(tmp_path, force_embedder, one_worker):
    from facegen.stages.identities import _digest, langevin_task

    _, summary1 = one_worker
    broken = _config(tmp_path / "out", force_embedder, 2)

    def stop_after_the_checkpoint(done, total, postfix=""):
        if done == CHECKPOINT_EVERY + 1:  # iteration 3 is done, the checkpoint of iteration 2 is on storage
            raise KeyboardInterrupt("stopped")

    with pytest.raises(KeyboardInterrupt):
        langevin_task(broken.model_dump_json(), broken.stage_dir("identities"), _digest(broken), stop_after_the_checkpoint)
    resumed = _config(tmp_path / "out", force_embedder, 1)
    run_identities(resumed, progress=False)
    summary = json.loads((_stage(resumed) / "sampler.json").read_text())
    assert summary["resumed_from_iteration"] == CHECKPOINT_EVERY and len(summary["iterations"]) == ITERATIONS
    np.testing.assert_array_equal(read_latents(resumed)[1], read_latents(one_worker[0])[1])
    assert summary["final"] == summary1["final"]


def test_a_killed_encoder_actor_is_restarted_and_its_chunk_retried(force_embedder, ray_local):
    import ray

    from facegen.stages.langevin_workers import ActorLatentSpace

    cfg = _config("/tmp/unused", force_embedder, 1)
    space = ActorLatentSpace(cfg.generator, BATCH, 1, cfg.identities.sampler.langevin.worker)
    try:
        latents = space.gaussian_latents(0, np.arange(N))
        before = space.embed(latents)
        in_flight = space.actors[0].embed.remote(latents)
        ray.kill(space.actors[0], no_restart=False)  # its process dies mid-call, as on a lost node
        np.testing.assert_array_equal(ray.get(in_flight), before)
        np.testing.assert_array_equal(space.embed(latents), before)
    finally:
        space.close()


def test_bad_worker_settings_fail_in_one_line(tmp_path, force_embedder, ray_local):
    with pytest.raises(ConfigError) as feature:
        load_config(None, ["identities.sampler.kind=langevin", "identities.sampler.langevin.space=feature",
                           "identities.sampler.langevin.workers=2"])
    assert "\n" not in str(feature.value)
    assert "identities.sampler.langevin: workers: 2 encoder actors" in str(feature.value)
    assert "use workers: 1 with space: feature" in str(feature.value)
    with pytest.raises(ConfigError, match=r"identities.sampler.langevin.workers: .*greater than or equal to 1"):
        load_config(None, ["identities.sampler.langevin.workers=0"])
    # a GPU per actor on this CPU-only cluster: refused before any actor waits for one, by the CLI's
    # check before the stage starts and by the Langevin task itself
    from facegen.stages.tasks import check_stage_resources

    gpu = _config(tmp_path / "out", force_embedder, 2, ["identities.sampler.langevin.worker.num_gpus=1"])
    wanted = "identities.sampler.langevin.worker: one actor or task asks for CPU 0.25, GPU 1"
    with pytest.raises(StageError, match=wanted):
        check_stage_resources(gpu, ["identities"])
    with pytest.raises(StageError) as refused:
        run_identities(gpu, progress=False)
    assert "\n" not in str(refused.value) and str(refused.value).startswith(wanted)
    # an actor that cannot load its models: the constructor's own error, not Ray's traceback
    unloadable = _config(tmp_path / "out2", tmp_path / "no-embedder", 2)
    with pytest.raises(StageError) as failed:
        run_identities(unloadable, progress=False)
    assert "\n" not in str(failed.value)
    assert str(failed.value).startswith("identities.sampler.langevin.worker: an encoder actor failed to start: ")
    assert "no-embedder" in str(failed.value)
