"""Arc2Face expansion through plain diffusers: a face image from an ArcFace-style identity feature.

Arc2Face (Papantoniou et al., ECCV 2024) is Stable Diffusion 1.5 with its own UNet
(``UNet2DConditionModel``) and its own ID encoder (a ``CLIPTextModel``). The identity enters as the
prompt "photo of a id person" whose "id" token's input embedding is replaced by the L2-normalised
feature, zero-padded to the encoder's width; the encoder's output is the ``prompt_embeds`` of an
ordinary ``StableDiffusionPipeline`` with the VAE, tokenizer and scheduler of the base SD 1.5
model. Defaults follow the release: DPM-Solver multistep, 25 steps, guidance 3.0 (the
unconditional branch encodes the empty prompt with the same encoder).

The replacement is done without a custom encoder class: the encoder's own forward runs with a
forward hook on its input-embedding table that returns the prepared token embeddings.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from facegen.devices import resolve_device
from facegen.generators.text_to_image import (
    finish_pipeline,
    load_error,
    pipeline_class_name,
    quiet_hf,
    resolve_model,
    to_uint8,
)

FIELD = "generator.hybrid.arc2face"


def id_token_id(tokenizer: Any, id_token: str) -> int:
    """The vocabulary id of ``id_token``, which must be a single token."""
    ids = tokenizer.encode(id_token, add_special_tokens=False)
    if len(ids) != 1:
        raise ValueError(f"{FIELD}.id_token: {id_token!r} is {len(ids)} tokens for this tokenizer, expected one")
    return int(ids[0])


def id_prompt_ids(tokenizer: Any, prompts: list[str], token_id: int):
    """Token ids ``[n, max_length]`` of the prompts, checking that each holds the id token once."""
    input_ids = tokenizer(
        prompts, truncation=True, padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt"
    ).input_ids
    counts = (input_ids == token_id).sum(dim=1)
    if bool((counts != 1).any()):
        bad = int((counts != 1).nonzero()[0, 0])
        raise ValueError(f"{FIELD}.id_prompt: {prompts[bad]!r} holds the id token {int(counts[bad])} times, expected once")
    return input_ids


def padded_features(features: np.ndarray, width: int) -> np.ndarray:
    """Rows L2-normalised (in float64), zero-padded to ``width``, as float32 ``[n, width]``."""
    f = np.asarray(features, np.float64)
    if f.ndim != 2 or f.shape[1] > width:
        raise ValueError(f"identity features of shape {f.shape} do not fit the ID encoder's width {width}")
    norms = np.linalg.norm(f, axis=1, keepdims=True)
    if not (np.isfinite(f).all() and (norms > 0).all()):
        raise ValueError("identity features must be finite and non-zero")
    out = np.zeros((f.shape[0], width), np.float32)
    out[:, : f.shape[1]] = f / norms
    return out


def id_token_embeddings(text_encoder: Any, input_ids, token_id: int, features: np.ndarray):
    """The encoder's input token embeddings ``[n, L, H]`` with the id token's row replaced by the
    padded normalised feature of each sample."""
    import torch

    table = text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        embeds = table[input_ids.to(table.device)]  # a lookup that is a copy, not a call of the module
    padded = torch.from_numpy(padded_features(features, embeds.shape[-1])).to(embeds.device, embeds.dtype)
    rows, cols = (input_ids.to(embeds.device) == token_id).nonzero(as_tuple=True)
    embeds[rows, cols] = padded[rows]
    return embeds


def encode_id_prompts(text_encoder: Any, input_ids, token_embeds):
    """The encoder's last hidden state for ``input_ids`` whose input embeddings are ``token_embeds``."""
    import torch

    table = text_encoder.get_input_embeddings()

    def replace(module, args, output):
        if output.shape != token_embeds.shape:
            raise ValueError(f"token embeddings {tuple(token_embeds.shape)} do not match {tuple(output.shape)}")
        return token_embeds

    handle = table.register_forward_hook(replace, prepend=True)  # before any other hook sees the output
    try:
        with torch.no_grad():
            return text_encoder(input_ids.to(token_embeds.device))[0]
    finally:
        handle.remove()


def load_arc2face(settings: Any, device: str) -> Any:
    """A ``StableDiffusionPipeline``: Arc2Face's UNet and encoder on the base SD 1.5 components."""
    with quiet_hf():
        return _load_arc2face(settings, device)


def _load_arc2face(settings: Any, device: str) -> Any:
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    only = settings.local_files_only
    unet_path = resolve_model(settings.unet, f"{FIELD}.unet")
    encoder_path = resolve_model(settings.encoder, f"{FIELD}.encoder")
    base = resolve_model(settings.base_model, f"{FIELD}.base_model")
    try:
        unet = UNet2DConditionModel.from_pretrained(unet_path, subfolder=settings.unet_subfolder, local_files_only=only)
    except Exception as exc:
        raise load_error(f"{FIELD}.unet", settings.unet, "the Arc2Face UNet (UNet2DConditionModel)", exc) from None
    try:
        encoder = CLIPTextModel.from_pretrained(encoder_path, subfolder=settings.encoder_subfolder, local_files_only=only)
    except Exception as exc:
        raise load_error(f"{FIELD}.encoder", settings.encoder, "the Arc2Face ID encoder (CLIPTextModel)", exc) from None
    if pipeline_class_name(base, only, f"{FIELD}.base_model") != "StableDiffusionPipeline":
        raise ValueError(f"{FIELD}.base_model: {settings.base_model}: Arc2Face needs an SD 1.5 base model")
    try:
        pipeline = StableDiffusionPipeline.from_pretrained(
            base, unet=unet, text_encoder=encoder, safety_checker=None, requires_safety_checker=False, local_files_only=only
        )
    except Exception as exc:
        raise load_error(f"{FIELD}.base_model", settings.base_model, "the SD 1.5 VAE, tokenizer and scheduler", exc) from None
    if settings.scheduler == "dpm_multistep":
        pipeline.scheduler = DPMSolverMultistepScheduler.from_config(pipeline.scheduler.config)
    elif settings.scheduler == "ddim":
        pipeline.scheduler = DDIMScheduler.from_config(pipeline.scheduler.config)
    return finish_pipeline(pipeline, settings, device, FIELD)


class Arc2FaceExpander:
    """Loads Arc2Face once; :meth:`render` draws one image per conditioning feature."""

    source = "arc2face"

    def __init__(self, settings: Any, device: str | None = None):
        self.settings = settings
        self.device = device or resolve_device().type
        self.pipeline = load_arc2face(settings, self.device)
        self.token_id = id_token_id(self.pipeline.tokenizer, settings.id_token)

    @property
    def takes_text(self) -> bool:
        """Arc2Face reads text only through its ID prompt; phrases extend it when configured
        (its encoder was trained on the bare prompt, so this is off by default)."""
        return bool(self.settings.variation_phrases)

    def prompt_embeds(self, features: np.ndarray, phrases: list[str] | None = None):
        """``prompt_embeds`` ``[n, L, H]`` for the features (ID prompt, optionally + a phrase each)."""
        prompt = self.settings.id_prompt
        prompts = [f"{prompt}, {p}" if p else prompt for p in (phrases or [""] * len(features))]
        input_ids = id_prompt_ids(self.pipeline.tokenizer, prompts, self.token_id)
        encoder = self.pipeline.text_encoder
        return encode_id_prompts(encoder, input_ids, id_token_embeddings(encoder, input_ids, self.token_id, features))

    def render(self, features: np.ndarray, sample_seeds: list[int], phrases: list[str] | None = None) -> list[np.ndarray]:
        """uint8 RGB images (``height x width``), one per row of ``features``."""
        import torch

        s = self.settings
        if len(features) != len(sample_seeds):
            raise ValueError(f"{len(features)} features for {len(sample_seeds)} sample seeds")
        with quiet_hf():
            result = self.pipeline(
                prompt_embeds=self.prompt_embeds(features, phrases),
                num_inference_steps=s.num_inference_steps,
                guidance_scale=s.guidance_scale,
                height=s.height,
                width=s.width,
                generator=[torch.Generator("cpu").manual_seed(int(seed)) for seed in sample_seeds],
                output_type="pil",
            )
        return to_uint8(result.images, s.width, s.height)
