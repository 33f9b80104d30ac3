"""``generator.hybrid.rerender``: HybridGen's identity-preserving re-render of each reference.

The published values are HybridGen's ``generate_id.py`` (``Ferry-Li/datacv_fr``): InstantID on SDXL
base with an LCM-LoRA, 10 steps at guidance 1.0, the keypoint image scaled by U(0.8, 1.2) and pasted
at a random offset on a white canvas of the same size, ControlNet scale U(0.1, 0.5), IP-Adapter scale
U(0.95, 1.0), and a prompt built from weighted phrase tables.
"""

from __future__ import annotations

import string
from typing import Literal

from pydantic import Field, model_validator

from facegen.config._base import _Section
from facegen.config.faces import EmbedderSettings


class PhraseTable(_Section):
    """One slot of the re-render prompt: its phrases and their weights (None: equally likely)."""

    phrases: list[str] = Field(min_length=1)
    weights: list[float] | None = None

    @model_validator(mode="after")
    def _weights_fit(self) -> "PhraseTable":
        if self.weights is not None:
            if len(self.weights) != len(self.phrases):
                raise ValueError(f"weights: {len(self.weights)} weights for {len(self.phrases)} phrases")
            if any(w < 0 for w in self.weights) or sum(self.weights) <= 0:
                raise ValueError("weights: must be >= 0 with a positive sum")
        return self

    def probabilities(self) -> list[float]:
        """The normalised weights."""
        weights = self.weights or [1.0] * len(self.phrases)
        return [w / sum(weights) for w in weights]


#: HybridGen's phrase tables as published (``generate_id.py``); the accessory slot draws one of
#: nine entries of which three are empty, so most prompts carry none.
HYBRIDGEN_PHRASES: dict[str, dict] = {
    "pose": {"phrases": ["facing forward", "facing left", "facing right", "head tilted to the left",
                         "head tilted to the right", "chin slightly up", "glancing sideways"],
             "weights": [0.05, 0.25, 0.25, 0.15, 0.15, 0.075, 0.075]},
    "expression": {"phrases": ["neutral expression", "slight smile", "serious look", "subtle frown", "gentle smile",
                               "relaxed face", "thoughtful gaze", "calm demeanor"]},
    "lighting": {"phrases": ["under natural daylight", "lit by a soft lamp", "with backlight from a window",
                             "in harsh sunlight", "under fluorescent indoor lighting", "with soft shadows",
                             "in golden hour lighting", "with overhead lighting"]},
    "camera": {"phrases": ["tight close-up", "medium close-up", "head and shoulders shot", "upper-body shot",
                           "zoomed-out portrait", "cropped at chin", "high-angle selfie", "low-angle shot"]},
    "background": {"phrases": ["in front of a plain wall", "in a cozy room", "in an office setting",
                               "with a blurred background", "in a park", "near a window", "with bookshelf behind",
                               "at a cafe", "in a hallway", "with bokeh lights in the background"]},
    "accessory": {"phrases": ["", " wearing glasses", " with a scarf", " with a beanie hat", " wearing a hoodie",
                              " with earphones", " wearing a turtleneck"],
                  "weights": [3, 1, 1, 1, 1, 1, 1]},
}
HYBRIDGEN_TEMPLATE = "A {expression} portrait of the person, {pose}, {camera}, {lighting}, {background}{accessory}."
HYBRIDGEN_NEGATIVE = ("(lowres, low quality, worst quality:1.2), (text:1.2), watermark, painting, drawing, illustration, "
                      "glitch, deformed, mutated, cross-eyed, ugly, disfigured")


class RerenderSettings(_Section):
    """InstantID-style re-render of an accepted reference (:mod:`facegen.generators.rerender`).

    SDXL base with InstantID's IdentityNet ControlNet on the reference's five keypoints and its
    image-prompt adapter on the reference's face embedding; the re-render goes through
    ``generator.hybrid.detector``'s one-face rule like a reference, the next attempt after a rejection.
    """

    enabled: bool = False
    model: str | None = Field(default=None, description="SDXL base folder or hub id; None: the reference's "
                              "text_to_image.model (HybridGen uses sd-xl-base-1.0 for both)",
                              json_schema_extra={"input_path": "local_or_hub"})
    controlnet: str | None = Field(default=None, description="InstantID's IdentityNet (ControlNetModel folder, "
                                   "checkpoints/ControlNetModel)", json_schema_extra={"input_path": "required"})
    ip_adapter: str | None = Field(default=None, description="InstantID's ip-adapter.bin (or .safetensors): image_proj "
                                   "+ ip_adapter, read weights-only", json_schema_extra={"input_path": "required"})
    lcm_lora: str | None = Field(default=None, description="LCM-LoRA for SDXL (folder, file's folder or hub id): fused, "
                                 "LCMScheduler", json_schema_extra={"input_path": "local_or_hub"})
    embedder: EmbedderSettings | None = Field(
        default=None, description="the face embedding the adapter conditions on (InstantID: antelopev2's "
        "glintr100.onnx, raw norm); None: generator.hybrid.embedder's raw feature")
    num_inference_steps: int = Field(default=10, ge=1)
    guidance_scale: float = Field(default=1.0, ge=0.0, description="1.0: no classifier-free guidance (LCM)")
    height: int = Field(default=1280, ge=8, description="HybridGen re-renders at its 1024 px reference resized to 1280")
    width: int = Field(default=1280, ge=8)
    kps_scale: tuple[float, float] = Field(default=(0.8, 1.2), description="keypoint image resized by U(low, high)")
    kps_pad_value: int = Field(default=255, ge=0, le=255, description="canvas the resized keypoint image is pasted "
                               "on at a random offset (HybridGen: white)")
    controlnet_scale: tuple[float, float] = Field(default=(0.1, 0.5), description="IdentityNet scale U(low, high)")
    ip_adapter_scale: tuple[float, float] = Field(default=(0.95, 1.0), description="image-prompt scale U(low, high)")
    prompt_template: str = HYBRIDGEN_TEMPLATE
    phrases: dict[str, PhraseTable] = Field(
        default_factory=lambda: {k: PhraseTable(**v) for k, v in HYBRIDGEN_PHRASES.items()},
        description="one weighted table per {slot} of prompt_template")
    negative_prompt: str = Field(default=HYBRIDGEN_NEGATIVE, description="used only with guidance_scale > 1")
    max_attempts: int = Field(default=3, ge=1, description="re-renders of one reference before the reference is "
                              "rejected (then the reference search goes on)")
    fp16: bool = True
    half_dtype: Literal["float16", "bfloat16"] = "float16"
    local_files_only: bool = False

    @model_validator(mode="after")
    def _consistent(self) -> "RerenderSettings":
        for name in ("kps_scale", "controlnet_scale", "ip_adapter_scale"):
            low, high = getattr(self, name)
            if not 0 <= low <= high:
                raise ValueError(f"{name}: need 0 <= low <= high (got [{low}, {high}])")
        if self.kps_scale[0] <= 0:
            raise ValueError("kps_scale: low must be > 0")
        slots = [f for _, f, _, _ in string.Formatter().parse(self.prompt_template) if f is not None]
        missing = [s for s in slots if s not in self.phrases]
        if missing:
            raise ValueError(f"prompt_template: no phrase table for {{{missing[0]}}}")
        unused = [s for s in self.phrases if s not in slots]
        if unused:
            raise ValueError(f"phrases.{unused[0]}: not a slot of prompt_template")
        if self.enabled and not self.controlnet:
            raise ValueError("controlnet: the re-render needs InstantID's IdentityNet folder")
        if self.enabled and not self.ip_adapter:
            raise ValueError("ip_adapter: the re-render needs InstantID's ip-adapter file")
        return self
