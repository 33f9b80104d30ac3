"""Generator backends: parametric, diffusion, hybrid (references, Arc2Face, Vec2Face); the GANs'
sections are in :mod:`facegen.config.gan`."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, field_validator, model_validator

from facegen.config._base import Device, _Section
from facegen.config.components import ComponentSettings, ComponentTable
from facegen.config.faces import AnyDetector, EmbedderSettings, detector_settings
from facegen.config.gan import DiscoSettings, DispersionSettings, ForceEmbedderSettings
from facegen.config.rerender import RerenderSettings
from facegen.config.resources import PooledSection, PoolSettings


class BackendSettings(ComponentSettings):
    """The base of a generator backend's own settings section (``generator.<backend>``), for the
    backends whose module declares ``SETTINGS``; the built-in backends' sections are below."""


#: The generator backends (``generator.backend``): name -> its module, which has
#: ``build(settings: GeneratorSettings, seed, **options)`` returning the callable Ray Data maps over
#: identity rows (:mod:`facegen.generators`), and may declare ``SETTINGS`` (a :class:`BackendSettings`),
#: its section ``generator.<name>``. A backend with the ``latent_space`` trait is a GAN: its module
#: also has ``load_gan(section, device)`` (:mod:`facegen.generators.gan`).
GENERATORS = ComponentTable("generator.backend", BackendSettings, {
    "parametric": "facegen.generators.parametric",
    "diffusion": "facegen.generators.diffusion",
    "hybrid": "facegen.generators.hybrid",
    "stylegan2": ("facegen.generators.stylegan2", "latent_space"),
    "dcgan": ("facegen.generators.dcgan", "latent_space"),
})


def gan_backends() -> tuple[str, ...]:
    """The generator backends whose identities are GAN latents (the ``latent_space`` trait)."""
    return GENERATORS.with_trait("latent_space")


class ParametricSettings(_Section):
    """CPU face renderer (no weights) for demos and tests."""

    image_size: int = Field(default=128, ge=64)
    wrong_identity_rate: float = Field(default=0.1, ge=0.0, le=1.0)
    nuisance: float = Field(default=1.0, ge=0.0, le=2.0, description="scale of pose/light/blur/occlusion")


class DiffusersSettings(_Section):
    """What every diffusers text-to-image backend shares: sampling steps and guidance, image size,
    half precision on GPU, an optional LCM-LoRA, batching, and offline loading."""

    num_inference_steps: int = Field(default=30, ge=1)
    guidance_scale: float = Field(default=7.5, ge=0.0)
    height: int = Field(default=512, ge=8)
    width: int = Field(default=512, ge=8)
    fp16: bool = True
    half_dtype: Literal["float16", "bfloat16"] = Field(default="float16", description="the dtype of fp16 on GPU")
    lcm_lora: str | None = Field(default=None, description="LCM-LoRA folder or hub id: LCMScheduler, few steps",
                                 json_schema_extra={"input_path": "local_or_hub"})
    compile_unet: bool = Field(default=False, description="torch.compile the UNet (GPU)")
    micro_batch: int = Field(default=8, ge=1, description="images per pipeline call (one identity at a time)")
    variation_phrases: bool = Field(default=False, description="append a per-sample pose/expression/light phrase")
    local_files_only: bool = False


class DiffusionSettings(DiffusersSettings):
    """Stable Diffusion text-to-image through diffusers ``from_pretrained``."""

    model: str = Field(default="stabilityai/stable-diffusion-2-1-base", json_schema_extra={"input_path": "local_or_hub"})
    negative_prompt: str = (
        "low quality, blurry, text, watermark, logo, painting, drawing, cartoon, deformed, "
        "disfigured, multiple faces, cropped face, occluded face"
    )


#: The published noise recipes of ``generator.hybrid.expansion.preset``: each sets sigmas, shares and
#: feature_norm. hsface: Vec2Face's HSFace sets (sigma 0.3 / 0.5 / 0.7 for 40 / 40 / 20 % of each
#: identity's images); hybridgen: HybridGen's expansion of its references (Vec2Face's
#: ``image_generation_with_reference.py``: sigma 0.2 for every image). Both re-scale each noisy
#: feature to the identity feature's own (raw, unnormalised) norm, as Vec2Face's ``sample_nearby_vectors``.
EXPANSION_PRESETS: dict[str, dict[str, Any]] = {
    "hsface": {"sigmas": [0.3, 0.5, 0.7], "shares": [0.4, 0.4, 0.2], "feature_norm": "own"},
    "hybridgen": {"sigmas": [0.2], "shares": [1.0], "feature_norm": "own"},
}
#: The preset whose values an expander takes for the expansion fields a config leaves out.
EXPANDER_PRESETS: dict[str, str] = {"vec2face": "hybridgen"}


def _same_value(given: Any, published: Any) -> bool:
    if isinstance(published, list):
        try:
            return [float(v) for v in given] == published
        except (TypeError, ValueError):
            return False
    return given == published


class ExpansionSettings(_Section):
    """How each expanded sample's conditioning feature derives from its identity feature
    (``facegen.identities.expansion``): Vec2Face noise or a CemiFace similarity band.

    ``preset`` names a published noise recipe (:data:`EXPANSION_PRESETS`) instead of ``sigmas``,
    ``shares`` and ``feature_norm``; a field given next to it must agree with it. Under
    ``generator.hybrid`` with ``expander: vec2face`` the fields left out take preset ``hybridgen``'s
    values (the whole preset when none is given); the defaults below are the other expanders'.
    """

    mode: Literal["noise", "band"] = "noise"
    preset: Literal["hsface", "hybridgen"] | None = Field(
        default=None, description="a published noise recipe: hsface (sigma 0.3/0.5/0.7 at 40/40/20 %) or hybridgen "
        "(sigma 0.2 for all), both re-scaled to the feature's own norm; None: sigmas, shares and feature_norm as given")
    sigmas: list[float] = Field(default=[0.3, 0.5, 0.7], description="noise mode: per-dimension sigmas (HSFace)")
    shares: list[float] = Field(default=[0.4, 0.4, 0.2], description="noise mode: share of samples per sigma")
    band: tuple[float, float] = Field(default=(0.55, 0.8), description="band mode: target cosine range")
    feature_norm: Annotated[float, Field(gt=0.0)] | Literal["own"] = Field(
        default=25.0,
        description="the norm the identity feature has before perturbing. own: the embedder's raw, unnormalised "
        "output (one forward pass, no flip), what Vec2Face was trained on and re-normalises to; a number: the unit "
        "feature scaled to it (raw ArcFace norms are of order 20-30; Arc2Face re-normalises its input anyway)",
    )
    histogram_bins: int = Field(default=40, ge=2, description="bins of the per-run similarity histograms on [-1, 1]")

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: Any) -> Any:
        if not isinstance(data, dict) or data.get("preset") not in EXPANSION_PRESETS:
            return data  # no preset, or an unknown name that the field's own check reports
        preset = data["preset"]
        if data.get("mode", "noise") != "noise":
            raise ValueError(f"preset {preset} is a noise recipe: mode must be noise (got {data['mode']!r})")
        values = EXPANSION_PRESETS[preset]
        for name, published in values.items():
            if name in data and not _same_value(data[name], published):
                raise ValueError(f"{name} {data[name]!r} is not preset {preset}'s {published!r}: drop the preset "
                                 f"to set your own values")
        return {**data, **{name: list(v) if isinstance(v, list) else v for name, v in values.items()}}

    @field_validator("feature_norm", mode="before")
    @classmethod
    def _norm_or_own(cls, v: Any) -> Any:
        if isinstance(v, str) and v != "own":
            raise ValueError("expected a number > 0 or own")
        return v

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

    backend: str = Field(default="text_to_image", description="text_to_image, photos, any generator backend, or "
                                                                "identities: the identities stage's features, no image")
    text_to_image: DiffusionSettings = DiffusionSettings(
        model="stabilityai/stable-diffusion-xl-base-1.0", height=1024, width=1024, micro_batch=1
    )
    photos_dir: str | None = Field(default=None, description="backend photos: a folder of face photos",
                                   json_schema_extra={"input_path": "required"})
    max_attempts: int = Field(default=5, ge=1)

    @field_validator("backend")
    @classmethod
    def _known_backend(cls, v: str) -> str:
        allowed = ("text_to_image", "photos", "identities") + tuple(b for b in GENERATORS.kinds if b != "hybrid")
        if v not in allowed:
            raise ValueError(f"unknown reference backend {v!r}, expected one of {', '.join(allowed)}")
        return v


class Arc2FaceSettings(DiffusersSettings):
    """Arc2Face through diffusers: its UNet and ID encoder with the VAE, tokenizer and scheduler of
    the base SD 1.5 model (folders or hub ids; ``*_subfolder`` as in the public model repository)."""

    unet: str = Field(default="FoivosPar/Arc2Face", json_schema_extra={"input_path": "local_or_hub"})
    unet_subfolder: str | None = "arc2face"
    encoder: str = Field(default="FoivosPar/Arc2Face", json_schema_extra={"input_path": "local_or_hub"})
    encoder_subfolder: str | None = "encoder"
    base_model: str = Field(default="stable-diffusion-v1-5/stable-diffusion-v1-5", json_schema_extra={"input_path": "local_or_hub"})
    id_prompt: str = "photo of a id person"
    id_token: str = "id"
    scheduler: Literal["dpm_multistep", "ddim", "base"] = "dpm_multistep"
    num_inference_steps: int = Field(default=25, ge=1)
    guidance_scale: float = Field(default=3.0, ge=0.0)
    lcm_lora: str | None = Field(default=None, description="LCM-LoRA for SD 1.5: LCMScheduler, 2-4 steps, guidance 1",
                                 json_schema_extra={"input_path": "local_or_hub"})
    variation_phrases: bool = Field(default=False, description="append a per-sample phrase to the ID prompt")


class Vec2FaceSettings(_Section):
    """Vec2Face (facegen.models.vec2face): a ``.pth`` holding ``model_vec2face``, 112 px output."""

    checkpoint: str | None = Field(default=None, json_schema_extra={"input_path": "required"})
    arch: Literal["vec2face_vit_base_patch16"] = "vec2face_vit_base_patch16"
    mask_ratio_min: float = Field(default=0.1, ge=0.0, le=1.0)
    mask_ratio_max: float = Field(default=1.0, ge=0.0, le=1.0)
    mask_ratio_mu: float = Field(default=0.15, ge=0.0, le=1.0)
    mask_ratio_std: float = Field(default=0.25, gt=0.0)
    fp16: bool = True
    micro_batch: int = Field(default=64, ge=1, description="images per forward pass (one identity at a time)")


class CemiFaceSettings(_Section):
    """CemiFace expansion (``facegen.generators.cemiface``): a generator ``facegen train-generator``
    trained, drawn with DDIM at target similarities m to the identity feature."""

    model: str | None = Field(default=None, description="generator folder (<run>/generator/<name>/model)",
                              json_schema_extra={"input_path": "required"})
    ddim_steps: int = Field(default=20, ge=1)
    similarity: list[float] = Field(default=[0.0], min_length=1,
                                    description="m per sample, cycled by sample index (CemiFace draws at m = 0)")
    similarity_band: tuple[float, float] | None = Field(
        default=None, description="draw m uniformly in [low, high] per sample instead of the list")
    fp16: bool = Field(default=True, description="float16 autocast on GPU")
    micro_batch: int = Field(default=50, ge=1, description="images per DDIM run (one identity at a time)")

    @model_validator(mode="after")
    def _targets(self) -> "CemiFaceSettings":
        values = list(self.similarity) + list(self.similarity_band or ())
        bad = [m for m in values if not -1.0 <= m <= 1.0]
        if bad:
            raise ValueError(f"similarity: target similarity {bad[0]} is outside [-1, 1]")
        if self.similarity_band is not None and self.similarity_band[0] > self.similarity_band[1]:
            raise ValueError(f"similarity_band: low {self.similarity_band[0]} is above high {self.similarity_band[1]}")
        return self


class HybridSettings(_Section):
    """``generator.backend: hybrid``: references -> identity feature -> K expanded images."""

    reference: ReferenceSettings = ReferenceSettings()
    rerender: RerenderSettings = Field(default_factory=lambda: RerenderSettings(),
                                       description="HybridGen's InstantID re-render of each accepted reference")
    detector: AnyDetector = Field(
        default_factory=detector_settings, description="references (and expanded images when measured)"
    )
    embedder: EmbedderSettings = Field(
        default_factory=lambda: EmbedderSettings(), description="identity feature: the one the expander was trained on"
    )
    expander: Literal["arc2face", "vec2face", "cemiface", "gan"] = Field(
        default="arc2face", description="gan: perturb the latent of a dcgan/stylegan2 reference"
    )
    arc2face: Arc2FaceSettings = Arc2FaceSettings()
    vec2face: Vec2FaceSettings = Vec2FaceSettings()
    cemiface: CemiFaceSettings = CemiFaceSettings()
    expansion: ExpansionSettings = ExpansionSettings()
    measure_similarity: bool = Field(default=True, description="embed each expanded image: realised similarity")

    @model_validator(mode="before")
    @classmethod
    def _expander_expansion(cls, data: Any) -> Any:
        """An expander's own recipe (:data:`EXPANDER_PRESETS`) for the expansion fields left out."""
        if not isinstance(data, dict) or data.get("expander") not in EXPANDER_PRESETS:
            return data
        expansion = data.get("expansion", {})
        if not isinstance(expansion, dict) or expansion.get("preset") is not None:
            return data  # a built ExpansionSettings, or a preset named
        preset = EXPANDER_PRESETS[data["expander"]]
        missing = {k: v for k, v in EXPANSION_PRESETS[preset].items() if k not in expansion}
        if len(missing) == len(EXPANSION_PRESETS[preset]) and expansion.get("mode", "noise") == "noise":
            missing = {"preset": preset}  # nothing of it given: named, so the recorded settings say which
        return {**data, "expansion": {**expansion, **missing}}

    @model_validator(mode="after")
    def _gan_needs_gan_references(self) -> "HybridSettings":
        if self.reference.backend == "identities" and self.rerender.enabled:
            raise ValueError("rerender.enabled: reference.backend identities gives features, no image to re-render")
        if self.expander == "gan" and self.rerender.enabled:
            raise ValueError("rerender.enabled: expander gan perturbs the reference's own GAN latent; a re-render has none")
        if self.expander == "gan" and self.reference.backend not in gan_backends():
            raise ValueError(f"expander gan perturbs a GAN reference's latent: reference.backend must be one of "
                             f"{', '.join(gan_backends())} (got {self.reference.backend})")
        return self




class GeneratorSettings(PooledSection):
    """Which backend renders images and how its Ray Data actor pool is sized. A backend's settings are
    the section named after it: a field below for the built-in ones, or the ``SETTINGS`` its module
    declares (:data:`GENERATORS`)."""

    model_config = ConfigDict(extra="allow", validate_assignment=True)  # the sections of registered backends

    backend: str = Field(default="parametric", description="parametric, diffusion, hybrid, stylegan2, dcgan, or any backend in GENERATORS")
    images_per_identity: int = Field(default=20, ge=1)
    batch_size: int = Field(default=8, ge=1, description="identities per generator call inside a block")
    pool: PoolSettings = Field(default_factory=PoolSettings, description="the generate stage's Ray Data actor pool: each "
                               "actor holds the generator and the face stage, and asks for what both need")
    parametric: ParametricSettings = ParametricSettings()
    diffusion: DiffusionSettings = DiffusionSettings()
    variation: Literal["noise", "dispersion", "disco"] = Field(default="noise", description="GAN backends: how the images of one identity vary")
    device: Device = Field(default="auto", description="GAN backends: torch device")
    embedder: ForceEmbedderSettings = ForceEmbedderSettings()
    dispersion: DispersionSettings = DispersionSettings()
    disco: DiscoSettings = DiscoSettings()
    hybrid: HybridSettings = Field(default_factory=lambda: HybridSettings())

    @field_validator("backend")
    @classmethod
    def _known_backend(cls, v: str) -> str:
        if v not in GENERATORS.kinds:
            raise ValueError(f"unknown backend {v!r}, expected one of {', '.join(GENERATORS.kinds)}")
        return v

    @model_validator(mode="after")
    def _backend_sections(self) -> "GeneratorSettings":
        for name, value in list((self.__pydantic_extra__ or {}).items()):
            settings_class = getattr(GENERATORS.module(name), "SETTINGS", None) if name in GENERATORS.kinds else None
            if settings_class is None:
                raise ValueError(f"{name}: Extra inputs are not permitted (a backend's own section is named after it: "
                                 f"{', '.join(GENERATORS.kinds)})")
            try:
                self.__pydantic_extra__[name] = GENERATORS.settings({"kind": name, **value} if isinstance(value, dict) else value)
            except ValueError as exc:
                raise ValueError(f"{name}: {exc}") from None
        return self

    def backend_settings(self, backend: str | None = None) -> Any:
        """The own section of ``backend`` (default: the chosen one): its field, the section given for
        it, or its module's ``SETTINGS`` defaults (None for a backend without a section)."""
        backend = backend or self.backend
        section = getattr(self, backend, None)
        if section is not None:
            return section
        settings_class = getattr(GENERATORS.module(backend), "SETTINGS", None)
        return settings_class() if settings_class is not None else None

    def identity_space(self) -> str | None:
        """What this generator reads from the identities stage: ``latent`` (a GAN backend),
        ``feature`` (the hybrid backend with ``reference.backend: identities``) or None (nothing)."""
        if self.backend in gan_backends():
            return "latent"
        if self.backend == "hybrid" and self.hybrid.reference.backend == "identities":
            return "feature"
        return None

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
        if h.expander == "cemiface" and not h.cemiface.model:
            raise ValueError("hybrid.cemiface.model: the cemiface expander needs a generator folder (facegen train-generator)")
        if h.reference.backend == "photos" and not h.reference.photos_dir:
            raise ValueError("hybrid.reference.photos_dir: the photos reference backend needs a folder")
        return self
