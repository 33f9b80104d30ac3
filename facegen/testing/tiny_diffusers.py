"""Tiny, randomly initialised Stable Diffusion models saved to disk (for offline tests).

Every part is the real diffusers/transformers class on a tiny config, as in diffusers' own tests:
UNet and VAE with (32, 64) channels, CLIP text encoders with 32 hidden units, a byte-level BPE
tokenizer written as ``vocab.json`` + ``merges.txt`` and loaded with ``from_pretrained`` (the way
transformers 5 reads them). Three layouts:

* :func:`build_tiny_sd`: an SD 1.x folder (``StableDiffusionPipeline``, DDIM scheduler);
* :func:`build_tiny_sdxl`: an SDXL folder (``StableDiffusionXLPipeline``: two text encoders, the
  second with a projection, a UNet with SDXL's text-time conditioning, Euler scheduler);
* :func:`build_tiny_arc2face`: Arc2Face's release layout, ``arc2face/`` (UNet2DConditionModel) and
  ``encoder/`` (CLIPTextModel, 512 wide so a 512-d feature fits), next to a base SD folder.

Each folder loads with the real ``from_pretrained`` like a hub model.
"""

from __future__ import annotations

import os
import tempfile

from facegen import storage

# A few merges so the tokenizer is real BPE, not only bytes.
_MERGES = [("t", "h"), ("th", "e</w>"), ("a", "n"), ("i", "n"), ("e", "r"), ("o", "n"), ("r", "e"), ("a", "r"),
           ("i", "d</w>")]  # "id" is one token, as in SD 1.5's vocabulary (Arc2Face's ID prompt)
_SPECIAL = ["<|startoftext|>", "<|endoftext|>"]


def _write_tokenizer_files(directory: str) -> int:
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = sorted(ByteLevel.alphabet())
    tokens = alphabet + [c + "</w>" for c in alphabet] + ["".join(pair) for pair in _MERGES] + _SPECIAL
    vocab = {token: i for i, token in enumerate(dict.fromkeys(tokens))}
    storage.write_json_atomic(vocab, f"{directory}/vocab.json")
    merges = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in _MERGES)
    storage.write_bytes_atomic(merges.encode(), f"{directory}/merges.txt")
    return len(vocab)


def _tokenizer():
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as token_dir:
        vocab_size = _write_tokenizer_files(token_dir)
        return CLIPTokenizer.from_pretrained(token_dir, model_max_length=77), vocab_size


def _text_config(tokenizer, vocab_size: int, hidden: int = 32, layers: int = 2, **extra):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=37,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **extra,
    )


def _unet(cross_attention_dim: int = 32, **extra):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        **extra,
    )


def _vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(32, 64),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
    )


def build_tiny_sd(directory: str, seed: int = 0) -> str:
    """Build and ``save_pretrained`` a tiny SD pipeline into ``directory``; returns the directory."""
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextModel

    directory = os.fspath(directory)
    tokenizer, vocab_size = _tokenizer()
    torch.manual_seed(seed)
    unet = _unet()
    vae = _vae()
    text_encoder = CLIPTextModel(_text_config(tokenizer, vocab_size))
    pipeline = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=DDIMScheduler(  # Stable Diffusion's own settings
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            clip_sample=False,
            set_alpha_to_one=False,
            steps_offset=1,
        ),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(directory)
    return directory


def build_tiny_sdxl(directory: str, seed: int = 0) -> str:
    """Build and ``save_pretrained`` a tiny SDXL pipeline into ``directory``; returns the directory."""
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    directory = os.fspath(directory)
    tokenizer, vocab_size = _tokenizer()
    torch.manual_seed(seed)
    # Cross-attention sees both encoders' hidden states side by side (32 + 32); the added
    # conditioning is the pooled projection (32) plus six time ids embedded in 8 dims each.
    unet = _unet(
        cross_attention_dim=64,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 32,
    )
    pipeline = StableDiffusionXLPipeline(
        vae=_vae(),
        text_encoder=CLIPTextModel(_text_config(tokenizer, vocab_size, projection_dim=32)),
        text_encoder_2=CLIPTextModelWithProjection(_text_config(tokenizer, vocab_size, projection_dim=32)),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=EulerDiscreteScheduler(
            beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
            timestep_spacing="leading",
        ),
    )
    pipeline.save_pretrained(directory)
    return directory


def build_tiny_arc2face(directory: str, seed: int = 0, width: int = 512) -> dict[str, str]:
    """Arc2Face's layout under ``directory``: ``models/arc2face`` (UNet), ``models/encoder``
    (CLIPTextModel ``width`` wide) and ``base`` (a tiny SD 1.x folder for VAE, tokenizer and
    scheduler). Returns ``{"models": ..., "base": ...}``."""
    import torch
    from transformers import CLIPTextModel

    directory = os.fspath(directory)
    base = build_tiny_sd(f"{directory}/base", seed=seed)
    tokenizer, vocab_size = _tokenizer()
    torch.manual_seed(seed + 1)
    _unet(cross_attention_dim=width).save_pretrained(f"{directory}/models/arc2face")
    CLIPTextModel(_text_config(tokenizer, vocab_size, hidden=width, layers=1)).save_pretrained(f"{directory}/models/encoder")
    return {"models": f"{directory}/models", "base": base}


def build_tiny_lora(sd_directory: str, directory: str, seed: int = 0) -> str:
    """A LoRA for the UNet of :func:`build_tiny_sd` (rank 4 on the attention projections, random
    up and down matrices), written with ``save_lora_weights`` as LCM-LoRAs are published."""
    import torch
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, get_peft_model_state_dict

    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_pretrained(sd_directory, subfolder="unet")
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                init_lora_weights="gaussian"))
    for name, param in unet.named_parameters():
        if "lora_B" in name:  # gaussian init leaves B at zero: give the adapter an effect
            torch.nn.init.normal_(param, std=0.05)
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    StableDiffusionPipeline.save_lora_weights(os.fspath(directory), unet_lora_layers=layers)
    return os.fspath(directory)


def _instantid_resampler(embed_dim: int, output_dim: int, dim: int = 64, heads: int = 1, queries: int = 4,
                         depth: int = 4, ff_mult: int = 4) -> dict:
    """Random weights under the names of InstantID's ``Resampler`` (IP-Adapter Plus's perceiver:
    ``layers.i.0`` attention with ``norm1``/``norm2``/``to_q``/``to_kv``/``to_out``, ``layers.i.1``
    a LayerNorm-Linear-GELU-Linear feed-forward), heads of 64 dims."""
    import torch

    inner = heads * 64
    state = {"latents": torch.randn(1, queries, dim) / dim**0.5,
             "proj_in.weight": torch.randn(dim, embed_dim) * 0.1, "proj_in.bias": torch.zeros(dim),
             "proj_out.weight": torch.randn(output_dim, dim) * 0.1, "proj_out.bias": torch.zeros(output_dim),
             "norm_out.weight": torch.ones(output_dim), "norm_out.bias": torch.zeros(output_dim)}
    for i in range(depth):
        for norm in ("norm1", "norm2"):
            state[f"layers.{i}.0.{norm}.weight"], state[f"layers.{i}.0.{norm}.bias"] = torch.ones(dim), torch.zeros(dim)
        state[f"layers.{i}.0.to_q.weight"] = torch.randn(inner, dim) * 0.1
        state[f"layers.{i}.0.to_kv.weight"] = torch.randn(2 * inner, dim) * 0.1
        state[f"layers.{i}.0.to_out.weight"] = torch.randn(dim, inner) * 0.1
        state[f"layers.{i}.1.0.weight"], state[f"layers.{i}.1.0.bias"] = torch.ones(dim), torch.zeros(dim)
        state[f"layers.{i}.1.1.weight"] = torch.randn(dim * ff_mult, dim) * 0.1
        state[f"layers.{i}.1.3.weight"] = torch.randn(dim, dim * ff_mult) * 0.1
    return state


def build_tiny_instantid(directory: str, embed_dim: int = 128, seed: int = 0) -> dict[str, str]:
    """InstantID's release layout for the tiny SDXL of :func:`build_tiny_sdxl`: ``sdxl/`` (the base),
    ``ControlNetModel/`` (an IdentityNet built from the UNet, zero convolutions made non-zero so the
    keypoints act) and ``ip-adapter.bin`` (``{"image_proj": Resampler, "ip_adapter": to_k_ip/to_v_ip
    of every cross-attention, numbered by position among all attention processors}``, for
    ``embed_dim``-d face embeddings). Returns ``{"sdxl", "controlnet", "ip_adapter"}`` paths."""
    import torch
    from diffusers import ControlNetModel, UNet2DConditionModel

    directory = os.fspath(directory)
    sdxl = build_tiny_sdxl(f"{directory}/sdxl", seed=seed)
    unet = UNet2DConditionModel.from_pretrained(sdxl, subfolder="unet")
    torch.manual_seed(seed + 2)
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32))
    for name, param in controlnet.named_parameters():
        if "zero_conv" in name or "controlnet_cond_embedding.conv_out" in name or "controlnet_mid_block" in name:
            torch.nn.init.normal_(param, std=0.3)
    controlnet.save_pretrained(f"{directory}/ControlNetModel")
    ip_adapter = {}
    for i, (name, _) in enumerate(unet.attn_processors.items()):
        if name.endswith("attn2.processor"):
            attention = unet.get_submodule(name.removesuffix(".processor"))
            hidden, cross = attention.to_out[0].out_features, attention.to_k.in_features
            ip_adapter[f"{i}.to_k_ip.weight"] = torch.randn(hidden, cross) * 0.1
            ip_adapter[f"{i}.to_v_ip.weight"] = torch.randn(hidden, cross) * 0.1
    state = {"image_proj": _instantid_resampler(embed_dim, unet.config.cross_attention_dim), "ip_adapter": ip_adapter}
    torch.save(state, f"{directory}/ip-adapter.bin")
    return {"sdxl": sdxl, "controlnet": f"{directory}/ControlNetModel", "ip_adapter": f"{directory}/ip-adapter.bin"}
