"""What the GAN backends share: the crop from their images to ArcFace's, the differentiable embedder
identity forces go through, and Dispersion / DisCo variation. Each GAN's own section is declared by
its backend module (:mod:`facegen.generators.stylegan2`, :mod:`facegen.generators.dcgan`)."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from facegen.config._base import _Section
from facegen.config.faces import DETECTORS, EMBEDDERS, EmbedderWeights
from facegen.templates import ARCFACE_EYES, FFHQ_EYES


class GanCropSettings(_Section):
    """From a GAN image to the ArcFace crop: a fixed similarity transform of reference points
    (fractions of the generated image) onto 112x112 positions, or the faces stage's detector."""

    kind: Literal["fixed", "detector"] = "fixed"
    src_points: list[tuple[float, float]] = Field(default_factory=lambda: list(FFHQ_EYES), min_length=2)
    dst_points: list[tuple[float, float]] = Field(default_factory=lambda: list(ARCFACE_EYES), min_length=2)
    detector: str = Field(default="mtcnn", description="kind detector: the detector kind (default settings: mtcnn, dlib) whose landmarks identity forces crop by; generated rows carry none, the faces stage's detector aligns them")

    @model_validator(mode="after")
    def _paired(self) -> "GanCropSettings":
        if "detector" in self.model_fields_set and (
                self.detector not in DETECTORS.kinds or DETECTORS.hook(self.detector, "check") is not None):
            usable = [k for k in DETECTORS.kinds if DETECTORS.hook(k, "check") is None]
            raise ValueError(f"detector: {self.detector!r} is not a detector that runs with its default settings "
                             f"({', '.join(usable)})")
        if len(self.src_points) != len(self.dst_points):
            raise ValueError("src_points and dst_points must have the same length")
        return self


class ForceEmbedderSettings(EmbedderWeights):
    """The differentiable embedder identity forces go through: a facegen IResNet folder or an
    insightface arcface_torch ``.pth`` (with ``arch``); same names as ``faces.embedder``."""

    where: ClassVar[str] = "generator.embedder"

    @model_validator(mode="after")
    def _differentiable(self) -> "ForceEmbedderSettings":
        if "kind" in self.model_fields_set and self.kind in EMBEDDERS.kinds and not EMBEDDERS.hook(self.kind, "differentiable_model"):
            raise ValueError(f"kind: identity forces backpropagate through the embedder, and {self.kind} is not "
                             f"differentiable (use one of {', '.join(EMBEDDERS.having('differentiable_model'))})")
        return self


class DispersionSettings(_Section):
    """Variations of one identity (ALGORITHMS.md 2): variants pulled back to the reference embedding,
    repelled from each other in latent space, pulled toward w_avg, with noise."""

    sigma: float = Field(default=0.2, ge=0.0, description="initial spread w_ref + sigma N(0, I); also the spread of plain noise")
    iterations: int = Field(default=20, ge=0)
    k_e: float = Field(default=20.0, ge=0.0)
    k_w: float = Field(default=1.0, ge=0.0)
    r_w: float = Field(default=12.0, gt=0.0)
    k_g: float = Field(default=1.0, ge=0.0)
    eta0: float = Field(default=0.05, ge=0.0)
    dt: float = Field(default=0.05, gt=0.0)


class DiscoSettings(_Section):
    """DisCo covariates: latent directions (pose, illumination, expressions) with their spreads."""

    directions: str | None = Field(
        default=None, description=".npy: [D, latent] unit directions, or a dict-like .npz with 'directions' and 'spreads'",
        json_schema_extra={"input_path": "required"},
    )
    fit: bool = Field(default=False, description="use this run's own directions (facegen directions; facegen pipeline fits them first) instead of a file")
    spreads: list[float] | None = Field(default=None, description="per-direction spread in latent units (None = the vectors' norms)")
    amplitude: float = Field(default=0.5, gt=0.0, description="u_d ~ U(-amplitude, amplitude)")
