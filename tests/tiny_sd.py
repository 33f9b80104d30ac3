"""A tiny, randomly initialised Stable Diffusion pipeline saved to disk (for offline tests).

Every part is the real diffusers/transformers class on a tiny config, as in diffusers' own tests:
UNet and VAE with (32, 64) channels, a 2-layer CLIP text encoder with 32 hidden units, a byte-level
BPE tokenizer written as ``vocab.json`` + ``merges.txt`` and loaded with ``from_pretrained`` (the
way transformers 5 reads them), and a DDIM scheduler. The saved folder loads with
``StableDiffusionPipeline.from_pretrained(directory)`` like any hub model.
"""

from __future__ import annotations

import os
import tempfile

from facegen import storage

# A few merges so the tokenizer is real BPE, not only bytes.
_MERGES = [("t", "h"), ("th", "e</w>"), ("a", "n"), ("i", "n"), ("e", "r"), ("o", "n"), ("r", "e"), ("a", "r")]
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


def build_tiny_sd(directory: str, seed: int = 0) -> str:
    """Build and ``save_pretrained`` a tiny SD pipeline into ``directory``; returns the directory."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    directory = os.fspath(directory)
    with tempfile.TemporaryDirectory() as token_dir:
        vocab_size = _write_tokenizer_files(token_dir)
        tokenizer = CLIPTokenizer.from_pretrained(token_dir, model_max_length=77)

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
    )
    vae = AutoencoderKL(
        block_out_channels=(32, 64),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=vocab_size,
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
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
