"""Latent-space Langevin with its passes through G and the embedder on several encoder actors.

In latent space an iteration costs two passes per particle through the GAN and the force embedder:
the forward one for the embeddings and the vector-Jacobian product that pulls their gradient back
to the latents (:class:`facegen.identities.encoder.IdentityEncoder`). Every particle's pass is
independent of the others, so :class:`ActorLatentSpace` sends them to ``workers`` encoder actors
(one per GPU on a cluster) in contiguous chunks that start at multiples of ``batch_size``: each
actor runs exactly the batches one process would, and the results come back in particle order.

The Langevin task keeps everything that sees all particles at once (the neighbour lists, the pair
forces, the step, the noise drawn from its own stream, the move, the checkpoints), so the particles
are the same for any number of workers. An actor whose process or node dies is restarted (on
another node) and its chunk retried by Ray; one that does not come back stops the run with one line,
and a rerun resumes from the last checkpoint.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from facegen.config import GeneratorSettings, TaskSettings
from facegen.stages import StageError

#: Chunks per actor and pass: a few, so an actor that finishes early (its particles felt no force and
#: skipped the backward pass) takes the next chunk instead of waiting for the slowest.
CHUNKS_PER_WORKER = 4
#: How often Ray restarts a dead encoder actor and retries its chunk before the run stops.
RESTARTS = 3
WORKER_FIELD = "identities.sampler.langevin.worker"


def build_encoder(generator: GeneratorSettings, batch_size: int):
    """The GAN of ``generator``, its force embedder and crop as one :class:`IdentityEncoder`
    (``generator``'s input paths must already point at this node's copies)."""
    from facegen.generators.gan import build_gan, crop_detector
    from facegen.identities.encoder import ForceEmbedder, IdentityEncoder

    gan = build_gan(generator)
    return IdentityEncoder(gan, ForceEmbedder(generator.embedder, gan.device), batch_size, crop_detector(generator))


def batch_chunks(n: int, batch_size: int, pieces: int) -> list[tuple[int, int]]:
    """At most ``pieces`` contiguous ``(start, stop)`` ranges covering ``n`` particles, every start a
    multiple of ``batch_size`` (so each range holds whole batches of the single-process run), their
    batch counts differing by at most one."""
    batches = -(-n // batch_size)
    pieces = max(1, min(pieces, batches))
    bounds = [min(i * batches // pieces * batch_size, n) for i in range(pieces + 1)]
    return [(start, stop) for start, stop in zip(bounds, bounds[1:]) if stop > start]


class EncoderWorker:
    """One encoder actor: the GAN and the force embedder loaded once on its node; embeds and pulls
    back chunks of particles."""

    def __init__(self, generator: GeneratorSettings, batch_size: int):
        from facegen.cache import localized

        self.encoder = build_encoder(localized(generator, "generator"), batch_size)

    def latent_mean(self) -> np.ndarray:
        """The GAN's latent centre (``w_avg``; zeros for the DCGAN)."""
        return self.encoder.gan.latent_mean.cpu().numpy()

    def gaussian_latents(self, seed: int, ids: np.ndarray) -> np.ndarray:
        """Every identity's independent latent (the start of a run)."""
        return self.encoder.gan.gaussian_latents(seed, ids)

    def embed(self, latents: np.ndarray) -> np.ndarray:
        """Unit embeddings of a chunk of latents."""
        return self.encoder.embed(latents)

    def pullback(self, latents: np.ndarray, grad: np.ndarray) -> np.ndarray:
        """``J^T g`` of a chunk: the gradient on latents of the embedding gradient ``grad``."""
        return self.encoder.pullback(latents, grad)


class ActorLatentSpace:
    """Latent space (the interface of :class:`facegen.identities.langevin.LatentSpace`) whose
    passes through G and the embedder run on ``workers`` :class:`EncoderWorker` actors, each with
    ``resources``. Call :meth:`close` when done (the actors hold their GPUs until then)."""

    kind = "latent"

    def __init__(self, generator: GeneratorSettings, batch_size: int, workers: int, resources: TaskSettings):
        import ray

        from facegen.stages.tasks import check_resources_fit

        check_resources_fit(resources.ray_resources(), WORKER_FIELD)
        actor = ray.remote(EncoderWorker).options(
            num_cpus=resources.num_cpus, num_gpus=resources.num_gpus, resources=resources.resources or None,
            max_restarts=RESTARTS, max_task_retries=RESTARTS)
        self.batch_size = int(batch_size)
        self.actors = [actor.remote(generator, batch_size) for _ in range(workers)]
        self.latent_mean = np.asarray(self._get(self.actors[0].latent_mean.remote()), np.float32)

    def gaussian_latents(self, seed: int, ids: np.ndarray) -> np.ndarray:
        """The start latents, drawn by one actor in one call, as a single process draws them."""
        return self._get(self.actors[0].gaussian_latents.remote(seed, ids))

    def embed(self, particles: np.ndarray) -> np.ndarray:
        """Unit embeddings ``[N, d]`` of all particles, in particle order."""
        return self._map("embed", particles)

    def pullback(self, particles: np.ndarray, grad: np.ndarray, chunk: int) -> np.ndarray:
        """The embedding gradients ``grad`` pulled back to the latents, in particle order."""
        return self._map("pullback", particles, grad)

    def close(self) -> None:
        """Stop the actors (their GPUs go back to the cluster)."""
        import ray

        for actor in self.actors:
            ray.kill(actor)
        self.actors = []

    def _map(self, method: str, particles: np.ndarray, *others: np.ndarray) -> np.ndarray:
        from ray.util import ActorPool

        ranges = batch_chunks(len(particles), self.batch_size, CHUNKS_PER_WORKER * len(self.actors))
        chunks = [tuple(a[start:stop] for a in (particles, *others)) for start, stop in ranges]
        pool = ActorPool(self.actors)
        try:
            parts = list(pool.map(lambda actor, args: getattr(actor, method).remote(*args), chunks))
        except Exception as exc:  # noqa: BLE001 - Ray's actor errors, raised through ActorPool
            raise self._failure(exc) from None
        return np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)

    def _get(self, ref: Any) -> Any:
        import ray

        try:
            return ray.get(ref)
        except Exception as exc:  # noqa: BLE001 - Ray's actor errors
            raise self._failure(exc) from None

    def _failure(self, exc: BaseException) -> BaseException:
        from ray.exceptions import RayActorError

        from facegen.stages.tasks import one_line, task_cause

        if isinstance(exc, RayActorError) and exc.actor_init_failed:
            # the message ends with the constructor's own exception line, after Ray's traceback
            lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
            return StageError(f"{WORKER_FIELD}: an encoder actor failed to start: {lines[-1] if lines else one_line(exc)}")
        if isinstance(exc, RayActorError):
            return StageError(f"{WORKER_FIELD}: an encoder actor died and was not restarted after {RESTARTS} tries "
                              f"({one_line(exc, 200)}); rerun the stage: it resumes from its last checkpoint")
        return task_cause(exc)
