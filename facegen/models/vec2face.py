"""Vec2Face (Wu et al., ICLR 2025): a face image from an identity feature, one forward pass.

Architecture, as the paper and its public release describe it (parameter names follow the public
checkpoint's ``model_vec2face`` state dict, so it loads strictly):

* the 512-d feature is projected to the encoder width (``latent_prior_proj_f``) and spread into a
  7x7 grid of 49 tokens by a learned 1 -> 49 linear map per channel (``feature_token``); a random
  subset of the tokens (the mask, at least ``mask_ratio_min`` of them) is replaced by the projected
  feature itself, and the projected feature is prepended, giving 50 tokens;
* ``token_emb``: learned position embeddings added, LayerNorm (eps 1e-6);
* the first ``ceil(49 * mask_ratio_min)`` masked tokens are dropped; a ViT encoder (``blocks``,
  ``norm``) runs on the rest;
* ``decoder_embed`` maps to the decoder width; every dropped or masked position is filled with the
  first (feature) token; learned position embeddings (``decoder_pos_embed_learned``); a ViT decoder
  (``decoder_blocks``, ``decoder_norm``);
* the 49 grid tokens become a 7x7 map of 256 channels (``im_decoder_proj``) that a VQGAN-style
  convolutional decoder (``im_decoder``: 512 channels at 7x7, four nearest-neighbour x2 upsamplings
  with channel multipliers (1, 1, 2, 2, 4) x 128, two residual blocks per level) turns into a
  112x112 RGB image in [-1, 1].

The release also carries ``patch_embed`` and ``center_token``, which generation does not use; they
are kept so the state dict matches. The residual blocks of the image decoder have bias-free
convolutions and, where the channel count changes, add a 1x1 projection of the block's own output
(not of its input) to that output: that is the function the released weights were trained with.

The random masking is an input here (``token_noise``, ``num_masked``), so every sample can be drawn
from its own seeded stream (:func:`draw_token_masks`).
"""

from __future__ import annotations

import argparse
import io
import math
import os
import uuid
from statistics import NormalDist

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

GRID = 7
NUM_TOKENS = GRID * GRID
FEATURE_DIM = 512
CHECKPOINT_KEY = "model_vec2face"


class Attention(nn.Module):
    """Multi-head self-attention with a fused ``qkv`` projection (computed with SDPA)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    """Two linear layers with GELU between (``fc1``, ``fc2``)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TokenEmbedding(nn.Module):
    """Learned position embeddings added to the tokens, then LayerNorm."""

    def __init__(self, dim: int, num_positions: int):
        super().__init__()
        self.position_embeddings = nn.Embedding(num_positions, dim)
        self.LayerNorm = nn.LayerNorm(dim, eps=1e-6)  # noqa: N815 (the checkpoint's name)
        self.register_buffer("position_ids", torch.arange(num_positions).expand((1, -1)))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        positions = self.position_embeddings(self.position_ids[:, : tokens.shape[1]])
        return self.LayerNorm(tokens + positions)


class PatchEmbed(nn.Module):
    """The 16x16 patch projection of the release (unused by generation, kept for the state dict)."""

    def __init__(self, dim: int, patch: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    """Residual block of the image decoder (see the module docstring for its shortcut)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = _group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.norm2 = _group_norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.nin_shortcut = nn.Conv2d(out_channels, out_channels, 1, bias=False) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (self.nin_shortcut(h) if self.nin_shortcut is not None else x) + h


class Upsample(nn.Module):
    """Nearest-neighbour x2, then a 3x3 convolution."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class ImageDecoder(nn.Module):
    """VQGAN-style decoder: ``z_channels`` at 7x7 -> RGB at 7 * 2**(levels - 1)."""

    def __init__(self, z_channels: int = 256, ch: int = 128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks: int = 2):
        super().__init__()
        channels = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, channels, 3, padding=1)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(channels, channels)
        self.mid.block_2 = ResnetBlock(channels, channels)
        levels: list[nn.Module] = []
        for level in reversed(range(len(ch_mult))):  # lowest resolution first; stored highest first
            stage = nn.Module()
            blocks = []
            for _ in range(num_res_blocks):
                blocks.append(ResnetBlock(channels, ch * ch_mult[level]))
                channels = ch * ch_mult[level]
            stage.block = nn.ModuleList(blocks)
            if level != 0:
                stage.upsample = Upsample(channels)
            levels.insert(0, stage)
        self.up = nn.ModuleList(levels)
        self.norm_out = _group_norm(channels)
        self.conv_out = nn.Conv2d(channels, 3, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid.block_2(self.mid.block_1(self.conv_in(z)))
        for level in reversed(range(len(self.up))):
            stage = self.up[level]
            for block in stage.block:
                h = block(h)
            if level != 0:
                h = stage.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Vec2Face(nn.Module):
    """The Vec2Face generator: features ``[B, 512]`` -> images ``[B, 3, 112, 112]`` in [-1, 1]."""

    def __init__(
        self,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        decoder_embed_dim: int = 768,
        decoder_depth: int = 8,
        decoder_num_heads: int = 16,
        mlp_ratio: float = 4.0,
        patch_size: int = 16,
        feature_dim: int = FEATURE_DIM,
        z_channels: int = 256,
        decoder_ch: int = 128,
        mask_ratio_min: float = 0.1,
    ):
        super().__init__()
        self.num_dropped = int(math.ceil(NUM_TOKENS * mask_ratio_min))
        self.token_emb = TokenEmbedding(embed_dim, NUM_TOKENS + 1)
        self.latent_prior_proj_f = nn.Linear(feature_dim, embed_dim)
        self.feature_token = nn.Linear(1, NUM_TOKENS)
        self.center_token = nn.Linear(embed_dim, NUM_TOKENS)
        self.im_decoder = ImageDecoder(z_channels, decoder_ch)
        self.im_decoder_proj = nn.Linear(decoder_embed_dim, z_channels)
        self.patch_embed = PatchEmbed(embed_dim, patch_size)
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim)
        self.decoder_pos_embed_learned = nn.Parameter(torch.zeros(1, NUM_TOKENS + 1, decoder_embed_dim))
        self.decoder_blocks = nn.ModuleList(
            Block(decoder_embed_dim, decoder_num_heads, mlp_ratio) for _ in range(decoder_depth)
        )
        self.decoder_norm = nn.LayerNorm(decoder_embed_dim, eps=1e-6)
        nn.init.normal_(self.decoder_pos_embed_learned, std=0.02)

    def forward(self, features: torch.Tensor, token_noise: torch.Tensor, num_masked: torch.Tensor) -> torch.Tensor:
        """``token_noise [B, 49]``: distinct values ranking the grid tokens (lowest are masked first);
        ``num_masked [B]``: how many are masked, at least :attr:`num_dropped` (those are dropped)."""
        return self.im_decoder(self.latent_map(features, token_noise, num_masked))

    def latent_map(self, features: torch.Tensor, token_noise: torch.Tensor, num_masked: torch.Tensor) -> torch.Tensor:
        """The transformer half of :meth:`forward`: the ``[B, 256, 7, 7]`` input of ``im_decoder``."""
        b = features.shape[0]
        rank = token_noise.argsort(dim=1).argsort(dim=1)  # 0 = first to be masked
        masked = rank < num_masked.view(b, 1)
        dropped = rank < self.num_dropped
        if bool((masked.sum(1) < self.num_dropped).any()):
            raise ValueError(f"num_masked must be >= {self.num_dropped} (the dropped tokens)")
        feature = self.latent_prior_proj_f(features)
        grid = self.feature_token(feature.unsqueeze(-1)).transpose(1, 2)
        grid = torch.where(masked.unsqueeze(-1), feature.unsqueeze(1), grid)
        tokens = self.token_emb(torch.cat([feature.unsqueeze(1), grid], dim=1))
        keep = torch.cat([torch.ones(b, 1, dtype=torch.bool, device=dropped.device), ~dropped], dim=1)
        x = tokens[keep].reshape(b, -1, tokens.shape[-1])
        for block in self.blocks:
            x = block(x)
        x = self.decoder_embed(self.norm(x))
        first = x[:, :1].expand(-1, NUM_TOKENS + 1, -1)
        full = first.clone()
        full[keep] = x.reshape(-1, x.shape[-1])
        fill = torch.cat([torch.zeros(b, 1, dtype=torch.bool, device=masked.device), masked], dim=1)
        x = torch.where(fill.unsqueeze(-1), first, full) + self.decoder_pos_embed_learned
        for block in self.decoder_blocks:
            x = block(x)
        x = self.decoder_norm(x)[:, 1:].reshape(b, GRID, GRID, -1)
        return self.im_decoder_proj(x).permute(0, 3, 1, 2)


def vec2face_vit_base_patch16(**kwargs) -> Vec2Face:
    """The released base model: ViT-B encoder (768 wide, 12 blocks, 12 heads), 8-block decoder."""
    return Vec2Face(embed_dim=768, depth=12, num_heads=12, decoder_embed_dim=768, decoder_depth=8,
                    decoder_num_heads=16, **kwargs)


def draw_token_masks(rng: np.random.Generator, num_dropped: int, ratio_min: float = 0.1, ratio_max: float = 1.0,
                     ratio_mu: float = 0.15, ratio_std: float = 0.25) -> tuple[np.ndarray, int]:
    """One sample's masking: token noise ``[49]`` and the masked count ``ceil(49 r)`` with ``r``
    from a normal ``(mu, std)`` truncated to ``[min, max]`` (the release's generation defaults)."""
    normal = NormalDist(ratio_mu, ratio_std)
    low, high = normal.cdf(ratio_min), normal.cdf(ratio_max)
    ratio = normal.inv_cdf(low + (high - low) * float(rng.uniform(0.0, 1.0)))
    num_masked = min(NUM_TOKENS, max(num_dropped, int(math.ceil(NUM_TOKENS * ratio))))
    return rng.permutation(NUM_TOKENS).astype(np.float32) / NUM_TOKENS, num_masked


def read_state_dict(data: bytes | str, source: str) -> dict[str, torch.Tensor]:
    """The ``model_vec2face`` state dict of a checkpoint (its bytes, or a local path, which is
    memory-mapped), unpickled with ``weights_only=True`` (a training checkpoint's
    ``argparse.Namespace`` of arguments is allowed as plain data; nothing else outside tensors and
    containers is)."""
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            if isinstance(data, str):
                checkpoint = torch.load(data, map_location="cpu", weights_only=True, mmap=True)
            else:
                checkpoint = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:
        message = " ".join(str(exc).split())[:200]
        raise ValueError(f"{source}: not a readable Vec2Face checkpoint ({type(exc).__name__}: {message})") from None
    state = checkpoint.get(CHECKPOINT_KEY, checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{source}: no '{CHECKPOINT_KEY}' state dict in the checkpoint")
    return state


def load_vec2face(path: str, device: str | torch.device = "cpu") -> Vec2Face:
    """The base Vec2Face with the weights of ``path`` (strict: every name and shape must match)."""
    from facegen.storage import exists, is_remote, read_bytes

    if not exists(path):
        raise FileNotFoundError(f"{path}: Vec2Face checkpoint not found")
    local = str(path).removeprefix("file://")
    state = read_state_dict(read_bytes(path) if is_remote(path) else local, path)
    with torch.device("meta"):  # no random initialisation of weights that are replaced next
        model = vec2face_vit_base_patch16()
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        lines = str(exc).strip().splitlines()
        raise ValueError(f"{path}: weights do not match the Vec2Face base model ({' '.join(lines[:2])[:300]})") from None
    return model.eval().to(device)


def save_vec2face(path: str, model: Vec2Face) -> str:
    """Write ``{"model_vec2face": state_dict}`` (the release's layout) atomically; returns ``path``."""
    from facegen.storage import is_remote, write_bytes_atomic

    checkpoint = {CHECKPOINT_KEY: {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}}
    if is_remote(path):
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        write_bytes_atomic(buffer.getvalue(), path)
        return path
    local = str(path).removeprefix("file://")  # straight to a temporary sibling: no second copy in memory
    os.makedirs(os.path.dirname(os.path.abspath(local)), exist_ok=True)
    tmp = f"{local}.tmp-{uuid.uuid4().hex}"
    try:
        torch.save(checkpoint, tmp)
        os.replace(tmp, local)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path
