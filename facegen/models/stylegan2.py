"""StyleGAN2 generator (Karras et al. 2020, config F) in plain torch, laid out like NVIDIA's code.

Module and parameter names follow stylegan2-ada-pytorch / stylegan3 ``networks(_stylegan2).py``
(``mapping.fc0.weight``, ``mapping.w_avg``, ``synthesis.b4.const``, ``synthesis.b8.conv0.affine.weight``,
``synthesis.b8.torgb.bias``, ...), so NVIDIA's state dicts load with ``strict=True``:

    mapping     z -> normalise -> [FC + lrelu] x num_layers (lr multiplier 0.01) -> w, broadcast to
                num_ws copies; truncation ``w_avg + psi (w - w_avg)`` on the first ``cutoff`` copies
    synthesis   b4 (learned constant, conv1, torgb), b8 .. bR (conv0 with 2x FIR upsampling, conv1,
                torgb); every conv is modulated by an affine map of its own w, demodulated, gets
                per-pixel noise scaled by a learned strength, then bias + lrelu * sqrt(2), clamped to
                ``conv_clamp``; the "skip" architecture sums every block's ToRGB into an image that
                is FIR-upsampled between blocks

Blocks at resolutions >= ``fp16_min_resolution`` run in fp16 on CUDA (like NVIDIA's
``num_fp16_res``); on CPU, or with ``force_fp32``, everything runs in float32. Load weights with
:func:`facegen.models.stylegan2_checkpoint.load_stylegan2`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from facegen.models.stylegan2_ops import (
    activation_gain,
    bias_act,
    conv2d_resample,
    modulated_conv2d,
    normalize_2nd_moment,
    setup_filter,
    upsample2d,
)

NOISE_MODES = ("const", "random", "none")


@dataclass(frozen=True)
class StyleGAN2Config:
    """Everything that shapes a StyleGAN2 generator (checkpoint readers derive it from the weights)."""

    z_dim: int = 512
    w_dim: int = 512
    c_dim: int = 0
    img_resolution: int = 256
    img_channels: int = 3
    channels: dict[int, int] = field(default_factory=dict)  # resolution -> feature maps
    mapping_layers: int = 8
    mapping_features: int | None = None  # hidden width of the mapping MLP (None = w_dim)
    mapping_lr_multiplier: float = 0.01
    mapping_activation: str = "lrelu"
    embed_features: int | None = None  # label embedding width when c_dim > 0 (None = w_dim)
    architecture: str = "skip"  # "skip" | "orig" | "resnet"
    resample_filter: tuple[float, ...] = (1, 3, 3, 1)
    conv_clamp: float | None = None
    fp16_min_resolution: int | None = None  # blocks at or above this run in fp16 on CUDA
    use_noise: bool = True

    def __post_init__(self) -> None:
        res = self.img_resolution
        if res < 4 or res & (res - 1):
            raise ValueError(f"img_resolution must be a power of two >= 4, got {res}")
        if self.architecture not in ("skip", "orig", "resnet"):
            raise ValueError(f"architecture must be skip, orig or resnet, got {self.architecture!r}")
        missing = [r for r in self.block_resolutions if r not in self.channels]
        if missing:
            raise ValueError(f"channels: no channel count for resolutions {missing}")

    @property
    def block_resolutions(self) -> list[int]:
        """4, 8, ..., img_resolution."""
        return [2**i for i in range(2, int(math.log2(self.img_resolution)) + 1)]

    @classmethod
    def from_channel_base(cls, img_resolution: int, channel_base: int = 32768, channel_max: int = 512,
                          num_fp16_res: int = 0, **kwargs) -> "StyleGAN2Config":
        """NVIDIA's sizing: ``min(channel_base // res, channel_max)`` maps at each resolution and fp16
        for the ``num_fp16_res`` highest resolutions (never below 8)."""
        log2 = int(math.log2(img_resolution))
        channels = {2**i: min(channel_base // 2**i, channel_max) for i in range(2, log2 + 1)}
        fp16 = max(2 ** (log2 + 1 - num_fp16_res), 8) if num_fp16_res > 0 else None
        return cls(img_resolution=img_resolution, channels=channels, fp16_min_resolution=fp16, **kwargs)


class FullyConnectedLayer(nn.Module):
    """Equalised-learning-rate linear layer: weights stored as ``N(0,1)/lr`` and scaled at run time."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, activation: str = "linear",
                 lr_multiplier: float = 1.0, bias_init: float = 0.0):
        super().__init__()
        self.activation = activation
        self.weight = nn.Parameter(torch.randn(out_features, in_features) / lr_multiplier)
        self.bias = nn.Parameter(torch.full([out_features], float(bias_init))) if bias else None
        self.weight_gain = lr_multiplier / math.sqrt(in_features)
        self.bias_gain = lr_multiplier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.to(x.dtype) * self.weight_gain
        b = self.bias
        if b is not None:
            b = b.to(x.dtype)
            if self.bias_gain != 1:
                b = b * self.bias_gain
        if self.activation == "linear" and b is not None:
            return torch.addmm(b.unsqueeze(0), x, w.t())
        return bias_act(x.matmul(w.t()), b, act=self.activation)


class MappingNetwork(nn.Module):
    """z (and label c) -> w, broadcast to ``num_ws`` copies, truncated toward ``w_avg``."""

    def __init__(self, cfg: StyleGAN2Config, num_ws: int):
        super().__init__()
        self.z_dim, self.c_dim, self.w_dim, self.num_ws = cfg.z_dim, cfg.c_dim, cfg.w_dim, num_ws
        self.num_layers = cfg.mapping_layers
        embed = 0 if cfg.c_dim == 0 else (cfg.embed_features or cfg.w_dim)
        hidden = cfg.mapping_features or cfg.w_dim
        features = [cfg.z_dim + embed] + [hidden] * (cfg.mapping_layers - 1) + [cfg.w_dim]
        if cfg.c_dim > 0:
            self.embed = FullyConnectedLayer(cfg.c_dim, embed)
        for idx in range(cfg.mapping_layers):
            layer = FullyConnectedLayer(features[idx], features[idx + 1], activation=cfg.mapping_activation,
                                        lr_multiplier=cfg.mapping_lr_multiplier)
            setattr(self, f"fc{idx}", layer)
        self.register_buffer("w_avg", torch.zeros([cfg.w_dim]))

    def forward(self, z: torch.Tensor | None, c: torch.Tensor | None = None, truncation_psi: float = 1.0,
                truncation_cutoff: int | None = None) -> torch.Tensor:
        x = None
        if self.z_dim > 0:
            if z is None or z.ndim != 2 or z.shape[1] != self.z_dim:
                raise ValueError(f"mapping: z must have shape [N, {self.z_dim}], got {None if z is None else tuple(z.shape)}")
            x = normalize_2nd_moment(z.to(torch.float32))
        if self.c_dim > 0:
            if c is None or c.ndim != 2 or c.shape[1] != self.c_dim:
                raise ValueError(f"mapping: this generator is conditional, c must have shape [N, {self.c_dim}]")
            y = normalize_2nd_moment(self.embed(c.to(torch.float32)))
            x = torch.cat([x, y], dim=1) if x is not None else y
        for idx in range(self.num_layers):
            x = getattr(self, f"fc{idx}")(x)
        x = x.unsqueeze(1).repeat([1, self.num_ws, 1])
        if truncation_psi != 1:
            if truncation_cutoff is None:
                x = self.w_avg.lerp(x, truncation_psi)
            else:
                x = x.clone()
                x[:, :truncation_cutoff] = self.w_avg.lerp(x[:, :truncation_cutoff], truncation_psi)
        return x


class SynthesisLayer(nn.Module):
    """Modulated 3x3 convolution (optionally 2x upsampling) + noise + bias + lrelu (+ clamp)."""

    def __init__(self, in_channels: int, out_channels: int, cfg: StyleGAN2Config, resolution: int, up: int = 1):
        super().__init__()
        self.resolution, self.up, self.use_noise = resolution, up, cfg.use_noise
        self.activation, self.conv_clamp = "lrelu", cfg.conv_clamp
        self.register_buffer("resample_filter", setup_filter(cfg.resample_filter))
        self.padding = 1
        self.act_gain = activation_gain(self.activation)
        self.affine = FullyConnectedLayer(cfg.w_dim, in_channels, bias_init=1)
        self.weight = nn.Parameter(torch.randn([out_channels, in_channels, 3, 3]))
        if cfg.use_noise:
            self.register_buffer("noise_const", torch.randn([resolution, resolution]))
            self.noise_strength = nn.Parameter(torch.zeros([]))
        self.bias = nn.Parameter(torch.zeros([out_channels]))

    def forward(self, x: torch.Tensor, w: torch.Tensor, noise_mode: str = "const", fused: bool = True,
                gain: float = 1.0) -> torch.Tensor:
        styles = self.affine(w)
        noise = None
        if self.use_noise and noise_mode == "random":
            noise = torch.randn([x.shape[0], 1, self.resolution, self.resolution], device=x.device) * self.noise_strength
        elif self.use_noise and noise_mode == "const":
            noise = self.noise_const * self.noise_strength
        x = modulated_conv2d(x, self.weight, styles, noise=noise, up=self.up, padding=self.padding,
                             resample_filter=self.resample_filter, flip_weight=self.up == 1, fused=fused)
        clamp = self.conv_clamp * gain if self.conv_clamp is not None else None
        return bias_act(x, self.bias.to(x.dtype), act=self.activation, gain=self.act_gain * gain, clamp=clamp)


class ToRGBLayer(nn.Module):
    """Modulated 1x1 convolution to RGB (no demodulation) + bias (+ clamp)."""

    def __init__(self, in_channels: int, out_channels: int, cfg: StyleGAN2Config):
        super().__init__()
        self.conv_clamp = cfg.conv_clamp
        self.affine = FullyConnectedLayer(cfg.w_dim, in_channels, bias_init=1)
        self.weight = nn.Parameter(torch.randn([out_channels, in_channels, 1, 1]))
        self.bias = nn.Parameter(torch.zeros([out_channels]))
        self.weight_gain = 1 / math.sqrt(in_channels)

    def forward(self, x: torch.Tensor, w: torch.Tensor, fused: bool = True) -> torch.Tensor:
        styles = self.affine(w) * self.weight_gain
        x = modulated_conv2d(x, self.weight, styles, demodulate=False, fused=fused)
        return bias_act(x, self.bias.to(x.dtype), clamp=self.conv_clamp)


class Conv2dLayer(nn.Module):
    """Plain equalised 1x1 convolution with 2x upsampling: the residual path of ``resnet`` blocks."""

    def __init__(self, in_channels: int, out_channels: int, cfg: StyleGAN2Config):
        super().__init__()
        self.up = 2
        self.register_buffer("resample_filter", setup_filter(cfg.resample_filter))
        self.weight_gain = 1 / math.sqrt(in_channels)
        self.weight = nn.Parameter(torch.randn([out_channels, in_channels, 1, 1]))

    def forward(self, x: torch.Tensor, gain: float = 1.0) -> torch.Tensor:
        w = (self.weight * self.weight_gain).to(x.dtype)
        x = conv2d_resample(x, w, self.resample_filter, up=self.up, flip_weight=False)
        return x * gain if gain != 1 else x


class SynthesisBlock(nn.Module):
    """One resolution: (const | conv0 up) -> conv1 -> ToRGB added to the upsampled image."""

    def __init__(self, in_channels: int, out_channels: int, cfg: StyleGAN2Config, resolution: int):
        super().__init__()
        self.in_channels, self.resolution = in_channels, resolution
        self.is_last = resolution == cfg.img_resolution
        self.architecture = cfg.architecture
        self.use_fp16 = cfg.fp16_min_resolution is not None and resolution >= cfg.fp16_min_resolution
        self.register_buffer("resample_filter", setup_filter(cfg.resample_filter))
        self.num_conv = 0
        self.num_torgb = 0
        if in_channels == 0:
            self.const = nn.Parameter(torch.randn([out_channels, resolution, resolution]))
        else:
            self.conv0 = SynthesisLayer(in_channels, out_channels, cfg, resolution, up=2)
            self.num_conv += 1
        self.conv1 = SynthesisLayer(out_channels, out_channels, cfg, resolution)
        self.num_conv += 1
        if self.is_last or cfg.architecture == "skip":
            self.torgb = ToRGBLayer(out_channels, cfg.img_channels, cfg)
            self.num_torgb += 1
        if in_channels != 0 and cfg.architecture == "resnet":
            self.skip = Conv2dLayer(in_channels, out_channels, cfg)

    def forward(self, x: torch.Tensor | None, img: torch.Tensor | None, ws: torch.Tensor, noise_mode: str,
                force_fp32: bool = False, fused: bool | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        w_iter = iter(ws.unbind(dim=1))
        fp16 = self.use_fp16 and not force_fp32 and ws.device.type == "cuda"
        dtype = torch.float16 if fp16 else torch.float32
        if fused is None:  # NVIDIA's inference choice: grouped conv unless a large fp16 batch
            fused = dtype == torch.float32 or ws.shape[0] == 1
        if self.in_channels == 0:
            x = self.const.to(dtype).unsqueeze(0).repeat([ws.shape[0], 1, 1, 1])
            x = self.conv1(x, next(w_iter), noise_mode, fused)
        elif self.architecture == "resnet":
            x = x.to(dtype)
            y = self.skip(x, gain=math.sqrt(0.5))
            x = self.conv0(x, next(w_iter), noise_mode, fused)
            x = y + self.conv1(x, next(w_iter), noise_mode, fused, gain=math.sqrt(0.5))
        else:
            x = x.to(dtype)
            x = self.conv0(x, next(w_iter), noise_mode, fused)
            x = self.conv1(x, next(w_iter), noise_mode, fused)
        if img is not None:
            img = upsample2d(img, self.resample_filter)
        if self.num_torgb:
            y = self.torgb(x, next(w_iter), fused).to(torch.float32)
            img = img + y if img is not None else y
        return x, img


class SynthesisNetwork(nn.Module):
    """ws ``[N, num_ws, w_dim]`` -> image ``[N, C, R, R]`` (roughly in [-1, 1])."""

    def __init__(self, cfg: StyleGAN2Config):
        super().__init__()
        self.w_dim, self.img_resolution, self.img_channels = cfg.w_dim, cfg.img_resolution, cfg.img_channels
        self.block_resolutions = cfg.block_resolutions
        self.num_ws = 0
        for res in self.block_resolutions:
            in_channels = cfg.channels[res // 2] if res > 4 else 0
            block = SynthesisBlock(in_channels, cfg.channels[res], cfg, res)
            self.num_ws += block.num_conv + (block.num_torgb if block.is_last else 0)
            setattr(self, f"b{res}", block)

    def forward(self, ws: torch.Tensor, noise_mode: str = "const", force_fp32: bool = False,
                fused_modconv: bool | None = None) -> torch.Tensor:
        if noise_mode not in NOISE_MODES:
            raise ValueError(f"noise_mode must be one of {NOISE_MODES}, got {noise_mode!r}")
        if ws.ndim != 3 or ws.shape[1] != self.num_ws or ws.shape[2] != self.w_dim:
            raise ValueError(f"synthesis: ws must have shape [N, {self.num_ws}, {self.w_dim}], got {tuple(ws.shape)}")
        ws = ws.to(torch.float32)
        x = img = None
        w_idx = 0
        for res in self.block_resolutions:
            block = getattr(self, f"b{res}")
            block_ws = ws.narrow(1, w_idx, block.num_conv + block.num_torgb)
            w_idx += block.num_conv
            x, img = block(x, img, block_ws, noise_mode, force_fp32, fused_modconv)
        return img


class StyleGAN2Generator(nn.Module):
    """Mapping + synthesis. ``G(z)`` / ``G.mapping(z, truncation_psi=0.7)`` / ``G.synthesis(ws)``."""

    def __init__(self, cfg: StyleGAN2Config):
        super().__init__()
        self.config = cfg
        self.z_dim, self.c_dim, self.w_dim = cfg.z_dim, cfg.c_dim, cfg.w_dim
        self.img_resolution, self.img_channels = cfg.img_resolution, cfg.img_channels
        self.synthesis = SynthesisNetwork(cfg)
        self.num_ws = self.synthesis.num_ws
        self.mapping = MappingNetwork(cfg, self.num_ws)

    @property
    def w_avg(self) -> torch.Tensor:
        """The tracked average of w (the centre of truncation and of the latent pull)."""
        return self.mapping.w_avg

    def forward(self, z: torch.Tensor, c: torch.Tensor | None = None, truncation_psi: float = 1.0,
                truncation_cutoff: int | None = None, noise_mode: str = "const", force_fp32: bool = False) -> torch.Tensor:
        ws = self.mapping(z, c, truncation_psi=truncation_psi, truncation_cutoff=truncation_cutoff)
        return self.synthesis(ws, noise_mode=noise_mode, force_fp32=force_fp32)
