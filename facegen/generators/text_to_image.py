"""Loading and running diffusers Stable Diffusion pipelines (SD 1.x/2.x, SDXL, Arc2Face's base).

One config key names the model (a local folder or a hub id); the pipeline class follows the
folder's ``model_index.json`` (``StableDiffusionPipeline`` or ``StableDiffusionXLPipeline``). On GPU
the weights are cast to float16 or bfloat16, attention runs through PyTorch's
``scaled_dot_product_attention`` (diffusers ``AttnProcessor2_0``), an LCM-LoRA switches to the
LCM scheduler for few-step sampling, and the UNet can be compiled. Every failure to load is one
line naming the setting and the model.

Each image gets its own CPU ``torch.Generator`` seeded with its sample seed, so its initial latents
do not depend on the device or on the other images of its call.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator

import numpy as np

#: ``model_index.json`` class name -> the text-to-image pipeline facegen builds for it.
TEXT_TO_IMAGE_CLASSES = {
    "StableDiffusionPipeline": "StableDiffusionPipeline",
    "StableDiffusionXLPipeline": "StableDiffusionXLPipeline",
}


@contextlib.contextmanager
def quiet_hf() -> Iterator[None]:
    """diffusers/transformers without their progress bars and warnings (restored after): loading
    prints per-file bars, sampling warns about every prompt CLIP truncates to 77 tokens."""
    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog

    levels = dlog.get_verbosity(), tlog.get_verbosity()
    bars = dlog.is_progress_bar_enabled(), tlog.is_progress_bar_enabled()
    dlog.set_verbosity_error(), tlog.set_verbosity_error()
    dlog.disable_progress_bar(), tlog.disable_progress_bar()
    try:
        yield
    finally:
        dlog.set_verbosity(levels[0]), tlog.set_verbosity(levels[1])
        if bars[0]:
            dlog.enable_progress_bar()
        if bars[1]:
            tlog.enable_progress_bar()


def looks_local(model: str) -> bool:
    """Whether ``model`` names a path rather than a hub id (``owner/name``)."""
    return os.path.isabs(model) or model.startswith((".", "~")) or os.path.exists(model) or model.count("/") > 1


def resolve_model(model: str, field: str) -> str:
    """A local folder (``~`` expanded; it must exist) or a hub id, unchanged."""
    if looks_local(model):
        path = os.path.expanduser(model)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"{field}: {model}: no such directory")
        return path
    return model


def load_error(field: str, model: str, what: str, exc: BaseException) -> RuntimeError:
    """The one-line error for a model that does not load."""
    message = " ".join(str(exc).split())[:300]
    return RuntimeError(f"{field}: {model}: cannot load {what} ({type(exc).__name__}: {message})")


def torch_dtype(fp16: bool, half_dtype: str, device: str):
    """float16/bfloat16 on GPU when ``fp16``; float32 otherwise (CPU half precision is slow)."""
    import torch

    if fp16 and device.startswith("cuda"):
        return torch.bfloat16 if half_dtype == "bfloat16" else torch.float16
    return torch.float32


def pipeline_class_name(model: str, local_files_only: bool, field: str) -> str:
    """The text-to-image pipeline class for ``model``, read from its ``model_index.json``."""
    from diffusers import DiffusionPipeline

    try:
        index = DiffusionPipeline.load_config(model, local_files_only=local_files_only)
    except Exception as exc:
        raise load_error(field, model, "a Stable Diffusion pipeline", exc) from None
    name = index.get("_class_name", "")
    if name not in TEXT_TO_IMAGE_CLASSES:
        raise ValueError(f"{field}: {model}: {name or 'unknown'} is not an SD 1.x/2.x or SDXL text-to-image model")
    return TEXT_TO_IMAGE_CLASSES[name]


def use_sdpa(pipeline: Any) -> None:
    """Attention of the UNet and VAE through ``torch.nn.functional.scaled_dot_product_attention``."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    for name in ("unet", "vae"):
        module = getattr(pipeline, name, None)
        if module is not None and hasattr(module, "set_attn_processor"):
            module.set_attn_processor(AttnProcessor2_0())


def finish_pipeline(pipeline: Any, settings: Any, device: str, field: str) -> Any:
    """SDPA, optional LCM-LoRA (+ LCM scheduler), dtype and device, channels-last and no VAE tiling on a
    GPU, optional ``torch.compile``.

    ``settings`` needs ``fp16``, ``half_dtype``, ``lcm_lora``, ``compile_unet``, ``local_files_only``
    (a :class:`facegen.config.DiffusionSettings` or :class:`facegen.config.Arc2FaceSettings`).
    """
    import torch

    pipeline.set_progress_bar_config(disable=True)
    if settings.lcm_lora:
        from diffusers import LCMScheduler

        lora = resolve_model(settings.lcm_lora, f"{field}.lcm_lora")
        try:
            pipeline.load_lora_weights(lora, local_files_only=settings.local_files_only)
            pipeline.fuse_lora()  # merged into the weights: no LoRA branch at sampling time
            pipeline.unload_lora_weights()
        except Exception as exc:
            raise load_error(f"{field}.lcm_lora", settings.lcm_lora, "an LCM-LoRA", exc) from None
        pipeline.scheduler = LCMScheduler.from_config(pipeline.scheduler.config)
    use_sdpa(pipeline)
    # Cast after loading: the load keyword was renamed torch_dtype -> dtype (diffusers #14205).
    pipeline = pipeline.to(device, torch_dtype(settings.fp16, settings.half_dtype, device))
    if device.startswith("cuda"):  # diffusers' speed guide: channels-last convolutions, whole-image VAE decode
        for name in ("unet", "vae", "controlnet"):
            if getattr(pipeline, name, None) is not None:
                getattr(pipeline, name).to(memory_format=torch.channels_last)
        if getattr(pipeline, "vae", None) is not None and hasattr(pipeline.vae, "disable_tiling"):
            pipeline.vae.disable_tiling()
            pipeline.vae.disable_slicing()
    if settings.compile_unet and device.startswith("cuda"):  # reduce-overhead: CUDA graphs over the static-shape steps
        pipeline.unet = torch.compile(pipeline.unet, mode="reduce-overhead", fullgraph=True)
    return pipeline


def load_text_to_image(settings: Any, device: str, field: str = "generator.diffusion.model") -> Any:
    """The SD or SDXL pipeline of ``settings.model`` (a :class:`facegen.config.DiffusionSettings`)."""
    import diffusers

    model = resolve_model(settings.model, field)
    class_name = pipeline_class_name(model, settings.local_files_only, field)
    extra = {"safety_checker": None, "requires_safety_checker": False} if class_name == "StableDiffusionPipeline" else {}
    with quiet_hf():
        try:
            pipeline = getattr(diffusers, class_name).from_pretrained(
                model, local_files_only=settings.local_files_only, **extra
            )
        except Exception as exc:
            raise load_error(field, settings.model, "a Stable Diffusion pipeline", exc) from None
        return finish_pipeline(pipeline, settings, device, field.rsplit(".", 1)[0])


def to_uint8(images: list[Any], width: int, height: int) -> list[np.ndarray]:
    """PIL images from a pipeline -> uint8 RGB arrays, checking the size."""
    out = []
    for image in images:
        if image.size != (width, height):
            raise ValueError(f"pipeline returned {image.size[0]}x{image.size[1]}, expected {width}x{height}")
        out.append(np.asarray(image.convert("RGB")))
    return out


def render_text(pipeline: Any, settings: Any, prompts: list[str], seeds: list[int]) -> list[np.ndarray]:
    """One image per prompt, each from its own seeded CPU generator; uint8 RGB arrays."""
    import torch

    with quiet_hf():
        result = pipeline(
            prompt=prompts,
            negative_prompt=[settings.negative_prompt] * len(prompts),
            generator=[torch.Generator("cpu").manual_seed(int(s)) for s in seeds],
            num_inference_steps=settings.num_inference_steps,
            guidance_scale=settings.guidance_scale,
            height=settings.height,
            width=settings.width,
            output_type="pil",
        )
    if len(result.images) != len(prompts):
        raise ValueError(f"pipeline returned {len(result.images)} images for {len(prompts)} prompts")
    return to_uint8(result.images, settings.width, settings.height)
