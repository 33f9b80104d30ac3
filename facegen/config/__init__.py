"""Typed settings of every stage, loaded from YAML with ``--set key.path=value`` overrides.

One ``FacegenConfig`` describes a whole run; each stage reads only its own section. Unknown keys
are errors (``extra="forbid"``) so a typo never silently falls back to a default. Every loading
failure is raised as ``ConfigError`` with one line naming the file and the dotted field.

The sections live in one module per area (``run``, ``identities``, ``generation``, ``faces``,
``clean``, ``training``); every class is importable from ``facegen.config`` itself.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError, field_validator, model_validator

from facegen.config._base import ConfigError, _Section  # noqa: F401
from facegen.config.resources import PoolSettings, TaskSettings  # noqa: F401
from facegen.config.run import (  # noqa: F401  (re-exported: one import path for every setting)
    DemoSettings,
    RaySettings,
    RunSettings,
    StorageSettings,
    TrackingSettings,
)
from facegen.config.identities import (  # noqa: F401  (re-exported: one import path for every setting)
    ClassifierSettings,
    DirectionsSettings,
    IdentitySettings,
    LangevinSettings,
    SamplerSettings,
    Vec2FaceSamplerSettings,
)
from facegen.config.gan import (  # noqa: F401  (re-exported: one import path for every setting)
    DiscoSettings,
    DispersionSettings,
    ForceEmbedderSettings,
    GanCropSettings,
)
from facegen.config.generation import (  # noqa: F401  (re-exported: one import path for every setting)
    Arc2FaceSettings,
    CemiFaceSettings,
    DiffusionSettings,
    EXPANDER_PRESETS,
    EXPANSION_PRESETS,
    ExpansionSettings,
    GeneratorSettings,
    HybridSettings,
    ParametricSettings,
    ReferenceSettings,
    Vec2FaceSettings,
)
from facegen.templates import ARCFACE_EYES, ARCFACE_TEMPLATE_112, FFHQ_EYES  # noqa: F401  (re-exported)
from facegen.config.faces import (  # noqa: F401  (re-exported: one import path for every setting)
    DetectorSettings,
    detector_settings,
    EmbedderSettings,
    EmbedderWeights,
    FaceSettings,
    IngestSettings,
)
from facegen.config.rerender import PhraseTable, RerenderSettings  # noqa: F401  (re-exported)
from facegen.config.clean import (  # noqa: F401  (re-exported: one import path for every setting)
    AugmentSettings,
    CleanSettings,
    DbscanSettings,
    DedupSettings,
    ExpertSettings,
    FusionRule,
    FusionSettings,
    LeakageSettings,
    SearchSettings,
    SelectionSettings,
)
from facegen.config.generator_training import (  # noqa: F401  (re-exported: one import path for every setting)
    CemiFaceNetSettings,
    GeneratorTrainSettings,
)
from facegen.config.training import (  # noqa: F401  (re-exported: one import path for every setting)
    DATACV_SCALES,
    EvalSettings,
    PartialFCSettings,
    ShardSettings,
    TrainAugmentSettings,
    TrainDataSettings,
    TrainSettings,
)


class FacegenConfig(_Section):
    """The whole run. Load with :func:`load_config`."""

    run: RunSettings = RunSettings()
    ray: RaySettings = RaySettings()
    identities: IdentitySettings = IdentitySettings()
    directions: DirectionsSettings = DirectionsSettings()
    generator: GeneratorSettings = GeneratorSettings()
    faces: FaceSettings = FaceSettings()
    ingest: IngestSettings = IngestSettings()
    clean: CleanSettings = CleanSettings()
    shards: ShardSettings = ShardSettings()
    train: TrainSettings = TrainSettings()
    train_generator: GeneratorTrainSettings = GeneratorTrainSettings()
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

    @model_validator(mode="after")
    def _identities_fit_the_generator(self) -> "FacegenConfig":
        """A GAN reads latents, ``hybrid.reference.backend: identities`` reads features: the sampler
        must make what the generator reads (a feature of the right width would pass silently)."""
        g, space, kind = self.generator, self.identities.space(), self.identities.sampler.kind
        reads = g.identity_space()
        if g.disco.fit and g.disco.directions:
            raise ValueError("generator.disco.fit: the run's fitted directions replace disco.directions; set one of them")
        if reads == "latent" and space == "feature":
            raise ValueError(f"identities.sampler: {kind} makes identity features, which generator.backend {g.backend} "
                             "would read as latents; sample latents (gaussian, or langevin with space latent) or use "
                             "a feature-conditioned generator (hybrid with reference.backend identities)")
        if reads == "feature":
            if space != "feature":
                raise ValueError("generator.hybrid.reference.backend: identities reads identity features; set "
                                 "identities.sampler.kind to vec2face, or langevin with space feature")
            unit = kind == "langevin"
            if unit and g.hybrid.expander != "cemiface" and g.hybrid.expansion.feature_norm == "own":
                raise ValueError("generator.hybrid.expansion.feature_norm: own takes each feature's own norm, but "
                                 "Langevin's feature identities are unit vectors; give the norm the expander takes "
                                 "(e.g. 25)")
        return self

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


def source_of(field: str, source: str, overrides: list[str] | None) -> str:
    """Where the value of dotted ``field`` came from: the last ``--set`` that names it (or a section
    above it), else ``source`` (the YAML file), so an error blames what the user typed."""
    for text in reversed(overrides or []):
        key = text.split("=", 1)[0].strip()
        if field == key or field.startswith((f"{key}.", f"{key}[")):
            return f"--set {text}"
    return source


def _format_validation_error(source: str, exc: ValidationError, overrides: list[str] | None = None) -> str:
    def where(loc: tuple) -> str:
        # pydantic adds the union member or validator it tried ("function-after[...]", "literal['auto']")
        return ".".join(str(p) for p in loc if isinstance(p, int) or re.fullmatch(r"[A-Za-z_]\w*", str(p))) or "<root>"

    err = exc.errors()[0]
    field = where(err["loc"])
    value = err.get("input")
    shown = "" if isinstance(value, dict) else f" (got {value!r})"
    others = {where(e["loc"]) for e in exc.errors()} - {field}
    more = f" [+{len(others)} more]" if others else ""
    message = err["msg"].removeprefix("Value error, ")
    # a section's own validator names the field inside it first ("faces.detector: kind: ..."): blame a --set of that field
    inner = re.match(r"([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*): ", message)
    blamed = source_of(f"{field}.{inner.group(1)}" if inner else field, source, overrides)
    return f"{blamed}: {field}: {message}{shown}{more}"


def config_from_dict(data: dict[str, Any], source: str = "<dict>", overrides: list[str] | None = None) -> FacegenConfig:
    """Validate a plain mapping (plus ``key=value`` overrides) into a :class:`FacegenConfig`."""
    tree = json.loads(json.dumps(data or {}))
    for text in overrides or []:
        key, value = parse_override(text)
        _set_dotted(tree, key, value, f"--set {text}")
    try:
        return FacegenConfig.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(source, exc, overrides)) from None


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
