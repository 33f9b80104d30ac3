"""Identity seeds and identity-space samplers (Gaussian, Langevin) of ``facegen identities``."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from facegen.config._base import _Section
from facegen.config.faces import AnyDetector, detector_settings
from facegen.config.resources import PooledSection, PoolSettings, TaskSettings

#: The attributes ``facegen directions`` estimates itself (:mod:`facegen.identities.directions`):
#: pose from the landmarks, lighting from the aligned crop.
ESTIMATED_ATTRIBUTES = ("yaw", "pitch", "roll", "illumination", "brightness")


#: Where a faiss / torch neighbour search runs (the spelling of ``clean.search.device``).
SearchDevice = Literal["auto", "cpu", "cuda"]


class SearchSection(_Section):
    """A section with ``search_device``, whose old spelling ``search_on_gpu`` (a bool) still loads."""

    @model_validator(mode="before")
    @classmethod
    def _legacy_search_on_gpu(cls, data: Any) -> Any:
        if not isinstance(data, dict) or "search_on_gpu" not in data:
            return data
        if "search_device" in data:
            raise ValueError("search_on_gpu is now search_device (auto, cpu or cuda); give only search_device")
        data = dict(data)
        data["search_device"] = "auto" if data.pop("search_on_gpu") else "cpu"
        return data


class LangevinSettings(SearchSection):
    """Brownian identity diffusion (ALGORITHMS.md 2): soft-sphere repulsion of radius d0 between
    identity embeddings, latent pull toward w_avg, Brownian noise, adaptive time step.

    Defaults are the paper's 10k-identity run as face_synthetics' README gives it (its
    ``--langevin-*`` options in brackets); that code's own defaults differ where noted. Beyond the
    paper: pairs come from k-nearest-neighbour lists instead of all pairs, the radius has a skin,
    the step has a cap (``dt_max``), and particles may live on the embedding sphere (``feature``)."""

    space: Literal["latent", "feature"] = Field(default="latent", description="latent: GAN latents through G and the embedder; feature: points on the embedding hypersphere")
    iterations: int = Field(default=100, ge=0, description="the paper's run (face_synthetics' code default: 10)")
    k: float = Field(default=1.0, ge=0.0, description="repulsion stiffness (repulsion-coefficient)")
    d0: float = Field(default=1.4, gt=0.0, le=3.1416, description="repulsion radius, an angle in radians (repulsion-radius: 1.4 in the paper's run, 1.7 as the code's default)")
    k_l: float = Field(default=0.1, ge=0.0, description="latent pull toward w_avg, latent space only (latent-force: 0.1 in the paper's run on StyleGAN2's W, 0.0 as the code's default)")
    eta0: float = Field(default=0.01, ge=0.0, description="Brownian noise (random-force): per coordinate in latent space, as the paper; on the sphere the total step, spread over the dimensions")
    tau: float = Field(default=0.3, gt=0.0, description="adaptive step dt = tau * mu * min latent distance / max force (timestep -0.3: face_synthetics' negative timestep "
                                                        "means this rule with tau = 0.3, a positive one a fixed step, which nothing here uses); the "
                                                        "min distance is over the neighbour pairs, the paper's over all pairs (up to 6.5 % smaller on the DCGAN)")
    mu: float = Field(default=1.0, gt=0.0, description="viscosity (viscous-coefficient)")
    dt_max: float | None = Field(default=1.0, gt=0.0, description=(
        "cap of the adaptive step, not in the paper (None: uncapped, the paper's rule). As pairs clear the radius the "
        "forces fade and the uncapped step grows (to 20 on the DCGAN): the latent pull then shrinks every latent by "
        "k_l * dt per step (DCGAN latent norm 10.0 -> 4.0 in 20 iterations, against 8.5 capped, and close pairs "
        "oscillate); on the sphere, where nothing pulls, it reaches 67 and the noise sqrt(dt) eta0 grows with it. "
        "Measured in bench/RESULTS.md, latent-space Langevin on the DCGAN"))
    skin: float = Field(default=0.01, ge=0.0, description="repulsion acts out to radius + skin, so Brownian jitter leaves no pair inside the radius (not in the paper)")
    batch_size: int = Field(default=64, ge=1, description="particles per pass through G and the embedder (the paper's run: 64)")
    neighbours: int = Field(default=16, ge=1, description="k of the k-nearest-neighbour pair list; the paper sums over all pairs, which a particle with more than k others inside the radius feels only in part")
    neighbour_index: Literal["auto", "exact", "ivf"] = Field(default="auto", description="auto: exact up to 200k particles or on a GPU, faiss IVF beyond")
    knn_every: int = Field(default=5, ge=1, description="iterations between neighbour-list rebuilds")
    chunk_size: int = Field(default=65536, ge=1, description="queries per faiss search / force chunk")
    checkpoint_every: int = Field(default=10, ge=1, description="iterations between checkpoints (checkpoint-iter: 10 in the paper's run)")
    feature_dim: int = Field(default=512, ge=2, description="dimension of feature-space particles")
    real_embeddings: str | None = Field(
        default=None, description=".npy or Parquet of real-face embeddings to stay away from",
        json_schema_extra={"input_path": "required"},
    )
    real_column: str = "embedding"
    constant_radius: float = Field(default=1.4, gt=0.0, le=3.1416, description="repulsion radius around real embeddings, radians (constant-distance; the code's default 0 turns it off, facegen's switch is real_embeddings)")
    k_cst: float = Field(default=1.0, ge=0.0, description="stiffness of the repulsion from real embeddings (face_synthetics uses k for both)")
    search_device: SearchDevice = Field(default="auto", description="where neighbours are searched: auto (the GPU when "
                                        "CUDA is present), cpu or cuda; the old search_on_gpu: true/false reads as auto/cpu")
    workers: int = Field(default=1, ge=1, description=(
        "latent space: encoder actors sharing each iteration's passes through G and the embedder (one per GPU on a "
        "cluster), given whole batches of particles; the Langevin task keeps the particles, the neighbour lists, the "
        "step and the noise, so the particles do not depend on this number. 1: the Langevin task runs G itself"))
    worker: TaskSettings = Field(default_factory=lambda: TaskSettings(num_cpus=1.0), description=(
        "resources of each encoder actor when workers > 1 (num_gpus: 1 for a GPU each; the Langevin task, "
        "identities.sampler.pool, then needs none)"))

    @model_validator(mode="after")
    def _workers_need_latent_space(self) -> "LangevinSettings":
        if self.workers > 1 and self.space == "feature":
            raise ValueError(f"workers: {self.workers} encoder actors split the passes through G and the embedder, "
                             "which feature space has none of; use workers: 1 with space: feature")
        return self


class Vec2FaceSamplerSettings(SearchSection):
    """Vec2Face's identity sampler (ALGORITHMS.md, Vec2Face): identity features drawn from a Gaussian
    or from a multivariate normal fitted (PCA) on class-centre features of a real set, each kept only
    while its cosine to every identity kept before it stays below ``max_similarity`` (exact faiss
    search). Features keep their drawn norm: about sqrt(dim) for ``gaussian``, the centres' own
    scale for ``pca``, as the feature-conditioned generator takes them."""

    distribution: Literal["gaussian", "pca"] = "gaussian"
    dim: int = Field(default=512, ge=2, description="feature width (gaussian; pca takes the centres' width)")
    max_similarity: float = Field(default=0.3, gt=-1.0, le=1.0, description="largest cosine allowed between two identities (Vec2Face used 0.3; its code's default is 0.4)")
    centres: str | None = Field(
        default=None, description="pca: .npy or Parquet of class-centre features (a real set's, e.g. MS1MV2's)",
        json_schema_extra={"input_path": "required"},
    )
    centres_column: str = "embedding"
    components: int | None = Field(default=None, ge=1, description="pca: principal components kept (None: all, the full covariance)")
    candidates_per_round: int = Field(default=8192, ge=1, description="candidates drawn and filtered together (part of the random stream)")
    max_candidates_ratio: float = Field(default=50.0, ge=1.0, description="give up after this many candidates per wanted identity")
    search_device: SearchDevice = Field(default="auto", description="where the pairwise filter searches: auto (the GPU "
                                        "when faiss has one), cpu or cuda; the old search_on_gpu: true/false reads as auto/cpu")

    @model_validator(mode="after")
    def _pca_needs_centres(self) -> "Vec2FaceSamplerSettings":
        if self.distribution == "pca" and not self.centres:
            raise ValueError("centres: distribution pca fits class-centre features; give their .npy or Parquet file")
        return self


class SamplerSettings(PooledSection):
    """How identities are drawn: GAN latents independently (gaussian) or spread apart (langevin, in
    the GAN's latent space or on the feature sphere), or identity features by Vec2Face's sampler
    (vec2face) for feature-conditioned generators."""

    kind: Literal["gaussian", "langevin", "vec2face"] = "gaussian"
    langevin: LangevinSettings = LangevinSettings()
    vec2face: Vec2FaceSamplerSettings = Vec2FaceSamplerSettings()
    pool: PoolSettings = Field(default_factory=lambda: PoolSettings(num_cpus=1.0),
                               description="resources of the Langevin task and of the actors writing identity blocks")


class IdentitySettings(_Section):
    """The identity seed stream: ids ``first_id .. first_id + num_identities - 1`` in blocks."""

    num_identities: int = Field(default=100, ge=1)
    first_id: int = Field(default=0, ge=0)
    block_size: int = Field(default=50, ge=1, description="identities per resumable block/file")
    sampler: SamplerSettings = SamplerSettings()

    def space(self) -> str:
        """What the sampler makes: ``latent`` (GAN latents) or ``feature`` (identity features)."""
        s = self.sampler
        if s.kind == "vec2face" or (s.kind == "langevin" and s.langevin.space == "feature"):
            return "feature"
        return "latent"


class InversionSettings(_Section):
    """GAN inversion of labelled images (:mod:`facegen.identities.inversion`): pixel MSE, an optional
    identity term through ``generator.embedder`` (differentiable), a pull to the latent centre."""

    steps: int = Field(default=200, ge=1)
    lr: float = Field(default=0.05, gt=0.0)
    starts: int = Field(default=16, ge=1, description="prior draws tried per image; the closest in pixels starts")
    identity_weight: float = Field(default=0.0, ge=0.0, description="> 0 needs generator.embedder (a torch embedder)")
    prior_weight: float = Field(default=1e-3, ge=0.0)
    batch_size: int = Field(default=16, ge=1, description="images inverted together")


class ClassifierSettings(_Section):
    """One ONNX attribute classifier (an expression model, ...) run on the aligned 112 px crops the
    lighting attributes read: each crop is resized to ``input_size``, its ``channels`` scaled as
    ``(pixel - mean) / std`` (pixels 0..255) and laid out as ``layout``; the model's first output,
    ``[n, len(outputs)]``, gives one attribute per name."""

    path: str = Field(description="the .onnx file", json_schema_extra={"input_path": "required"})
    outputs: list[str] = Field(min_length=1, description="one attribute name per output column, in order; _ reads a "
                                                         "column (a softmax needs it) without making it an attribute")
    input_size: int = Field(default=112, ge=8, description="side of the square input the model takes")
    channels: Literal["rgb", "bgr", "gray"] = "rgb"
    layout: Literal["nchw", "nhwc"] = "nchw"
    mean: list[float] = Field(default_factory=lambda: [127.5], description="subtracted per channel (one value: every channel)")
    std: list[float] = Field(default_factory=lambda: [127.5], description="divides per channel after the mean")
    output: Literal["probabilities", "logits", "sigmoid"] = Field(
        default="probabilities", description="probabilities: used as they come (any score); logits: a softmax over "
                                             "the model's outputs; sigmoid: each output a yes/no logit")

    @model_validator(mode="after")
    def _consistent(self) -> "ClassifierSettings":
        width = 1 if self.channels == "gray" else 3
        for name in ("mean", "std"):
            if len(getattr(self, name)) not in (1, width):
                raise ValueError(f"{name}: one value or one per channel ({width} for {self.channels})")
        if any(s == 0 for s in self.std):
            raise ValueError("std: a zero divides by zero")
        named = [o for o in self.outputs if o != "_"]
        if not named or len(set(named)) < len(named):
            raise ValueError(f"outputs: {self.outputs}: needs at least one name and no name twice")
        if self.output == "logits" and len(self.outputs) < 2:
            raise ValueError("output: a softmax over one logit is always 1; a single logit is output: sigmoid")
        return self


class DirectionsSettings(_Section):
    """``facegen directions``: DisCo's latent directions fitted on the GAN's own samples, labelled by
    facegen's estimators (:mod:`facegen.identities.directions`), written to
    ``<output_dir>/directions/directions.npz`` with a check along each one."""

    attributes: list[str] = Field(
        default_factory=lambda: ["yaw", "pitch", "roll", "illumination"], min_length=1,
        description="on generated samples: facegen's estimators (yaw, pitch, roll, illumination, brightness; every "
                    "classifier output is added); with labelled: columns of its labels.csv")
    classifiers: list[ClassifierSettings] = Field(
        default_factory=list, description="ONNX attribute classifiers (expressions, ...): each named output labels the "
                                          "generated samples and checks the direction of its name")
    labelled: str | None = Field(
        default=None, description="a folder of face images with labels.csv (file, then one numeric column per "
                                  "attribute), projected into the GAN's latent space by inversion (the paper's MultiPIE route)",
        json_schema_extra={"input_path": "folder"})
    inversion: InversionSettings = Field(default_factory=lambda: InversionSettings())
    samples: int = Field(default=2000, ge=20, description="GAN samples drawn and labelled")
    method: Literal["svm", "regression"] = Field(default="svm", description="svm: the paper's linear SVM on the two tails; regression: least squares on all")
    tail: float = Field(default=0.3, gt=0.0, le=0.5, description="svm: the lowest and the highest fraction are the two classes")
    svm_c: float = Field(default=0.01, gt=0.0)
    detector: AnyDetector = Field(default_factory=lambda: detector_settings(min_size=20.0),
                                       description="landmarks of the generated faces (images upscaled to upscale first)")
    upscale: int = Field(default=128, ge=16, description="GAN images smaller than this are resized up before detection")
    batch_size: int = Field(default=64, ge=1, description="latents rendered per pass")
    check_identities: int = Field(default=16, ge=1, description="latents stepped along each direction for its check")
    check_steps: int = Field(default=9, ge=3)
    check_range: float = Field(default=2.0, gt=0.0, description="steps span -range .. +range spreads")
    pool: PoolSettings = Field(default_factory=lambda: PoolSettings(num_cpus=1.0), description="resources of the fitting task (a GPU where the GAN runs on one)")

    @field_validator("classifiers")
    @classmethod
    def _distinct_outputs(cls, classifiers: list[ClassifierSettings]) -> list[ClassifierSettings]:
        classified = [o for c in classifiers for o in c.outputs if o != "_"]
        clashes = sorted({o for o in classified if o in ESTIMATED_ATTRIBUTES or classified.count(o) > 1})
        if clashes:
            raise ValueError(f"outputs {clashes} name a built-in estimator ({', '.join(ESTIMATED_ATTRIBUTES)}) or another "
                             "classifier's output; rename them")
        return classifiers

    @model_validator(mode="after")
    def _known_attributes(self) -> "DirectionsSettings":
        classified = self.classified()
        unknown = [a for a in self.attributes if a not in ESTIMATED_ATTRIBUTES and a not in classified]
        if unknown and self.labelled is None:
            raise ValueError(f"attributes: {unknown} are not facegen's estimators ({', '.join(ESTIMATED_ATTRIBUTES)}) nor a "
                             "classifier's outputs; other attributes come from a labelled folder (directions.labelled)")
        return self

    def classified(self) -> list[str]:
        """The attributes ``classifiers`` give, in order."""
        return [o for c in self.classifiers for o in c.outputs if o != "_"]

    def fitted(self) -> list[str]:
        """The directions fitted: ``attributes``, then on generated samples every classifier output
        not listed there (a labelled folder's are its columns only)."""
        if self.labelled:
            return list(self.attributes)
        return [*self.attributes, *(o for o in self.classified() if o not in self.attributes)]
