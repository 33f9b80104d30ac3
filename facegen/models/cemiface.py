"""CemiFace's similarity-conditioned diffusion UNet (seed 002; ALGORITHMS.md 3 and 7).

A pixel-space denoiser in the DCFace style, built from diffusers parts: a ``UNet2DConditionModel``
whose ResNet blocks take the timestep through adaptive group norm (``resnet_time_scale_shift:
scale_shift``) and whose cross-attention reads ``context_tokens`` tokens of C_att:

    C_sim = F1(m)                          a linear layer on the target similarity m in [-1, 1]
    C_att = F2(cat(C_id, C_sim))           a linear layer to ``context_tokens x cross_attention_dim``

where C_id is the unit identity feature of the inquiry image (any facegen embedder). The model
predicts the noise of ``x_t``; :func:`ddim_sample` draws images with DDIM (eta 0), each from its own
seeded starting noise, so an image depends only on its feature, its m and its seed.

Saved with ``save_pretrained`` (``config.json`` + safetensors) and read with ``from_pretrained``
(weights only, never code); :func:`save_generator` / :func:`load_generator` add the noise schedule
and what the model was conditioned on (``cemiface.json``) in one folder. The network and sampler
need only torch and diffusers (the GPU benchmark imports them without facegen's storage stack).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

#: Files of a generator folder (``save_generator``).
UNET_DIR, SCHEDULER_DIR, INFO_FILE = "unet", "scheduler", "cemiface.json"
#: Domain tag of the per-sample starting noise.
NOISE_TAG = 0xCE31


def check_similarities(values: Any, where: str = "similarity") -> np.ndarray:
    """Target similarities as float32, each finite and in [-1, 1]; one line naming the bad one."""
    m = np.asarray(values, np.float64).reshape(-1)
    bad = np.flatnonzero(~(np.isfinite(m) & (np.abs(m) <= 1.0)))
    if bad.size:
        raise ValueError(f"{where}: target similarity {m[bad[0]]!r} (item {int(bad[0])}) is outside [-1, 1]")
    return m.astype(np.float32)


class CemiFaceUNet(ModelMixin, ConfigMixin):
    """Noise predictor ``eps(x_t, t, C_id, m)`` (see the module docstring for the conditioning)."""

    @register_to_config
    def __init__(
        self,
        image_size: int = 112,
        id_dim: int = 512,
        similarity_dim: int = 64,
        context_tokens: int = 4,
        cross_attention_dim: int = 256,
        block_out_channels: Sequence[int] = (64, 128, 256, 256),
        layers_per_block: int = 2,
        attention_head_dim: int = 8,
        norm_num_groups: int = 32,
    ):
        super().__init__()
        levels = len(block_out_channels)
        if image_size % (2 ** (levels - 1)):
            raise ValueError(f"image_size {image_size} must be divisible by 2**{levels - 1} for {levels} UNet levels")
        self.similarity_proj = nn.Linear(1, similarity_dim)  # F1
        self.context_proj = nn.Linear(id_dim + similarity_dim, context_tokens * cross_attention_dim)  # F2
        self.unet = UNet2DConditionModel(
            sample_size=image_size,
            in_channels=3,
            out_channels=3,
            down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (levels - 1),
            up_block_types=("CrossAttnUpBlock2D",) * (levels - 1) + ("UpBlock2D",),
            block_out_channels=tuple(block_out_channels),
            layers_per_block=layers_per_block,
            cross_attention_dim=cross_attention_dim,
            attention_head_dim=attention_head_dim,
            norm_num_groups=norm_num_groups,
            resnet_time_scale_shift="scale_shift",  # time enters through adaptive group norm
        )

    def context(self, id_features: torch.Tensor, similarity: torch.Tensor) -> torch.Tensor:
        """C_att ``[B, tokens, cross_attention_dim]`` from C_id ``[B, id_dim]`` and m ``[B]``."""
        c = self.config
        c_sim = self.similarity_proj(similarity.reshape(-1, 1).to(self.similarity_proj.weight.dtype))
        c_att = self.context_proj(torch.cat([id_features.to(c_sim.dtype), c_sim], dim=1))
        return c_att.reshape(-1, c.context_tokens, c.cross_attention_dim)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, id_features: torch.Tensor,
                similarity: torch.Tensor) -> torch.Tensor:
        """The predicted noise of ``sample`` ``[B, 3, S, S]`` at ``timestep`` ``[B]``."""
        return self.unet(sample, timestep, encoder_hidden_states=self.context(id_features, similarity)).sample


def noise_scheduler(num_train_timesteps: int = 1000) -> DDPMScheduler:
    """The training schedule: T steps, linear betas (DDPM / DCFace)."""
    return DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_schedule="linear", clip_sample=True)


def predicted_clean(scheduler: DDPMScheduler, noisy: torch.Tensor, noise_pred: torch.Tensor,
                    timesteps: torch.Tensor) -> torch.Tensor:
    """x0 estimated from ``x_t`` and the predicted noise: ``(x_t - sqrt(1 - a_t) eps) / sqrt(a_t)``."""
    alphas = scheduler.alphas_cumprod.to(noisy.device)[timesteps].float().reshape(-1, 1, 1, 1)
    return (noisy.float() - (1 - alphas).sqrt() * noise_pred.float()) / alphas.sqrt()


def cemiface_loss(model: nn.Module, scheduler: Any, batch: Any, weight: float, embedder: nn.Module | None,
                   timesteps_total: int) -> tuple[torch.Tensor, dict[str, float]]:
    """CemiFace's loss of one batch and its parts: ``MSE(eps_hat, eps) + weight * mean((1 - t/T) L_rec +
    (t/T) L_sim)``, ``L_rec = mean((x0_hat - x0)^2)`` per sample, ``L_sim = |cos(E(x0_hat), C_id) - m|``
    with E the frozen differentiable ``embedder`` at 112 px (None or weight 0: the MSE alone).
    ``batch`` has ``images`` (x0 in [-1, 1]), ``noise``, ``timesteps``, ``id_features``, ``similarity``."""
    noisy = scheduler.add_noise(batch.images, batch.noise, batch.timesteps)
    eps = model(noisy, batch.timesteps, batch.id_features, batch.similarity)
    mse = F.mse_loss(eps.float(), batch.noise)
    if embedder is None or weight <= 0:
        return mse, {"mse": float(mse.detach())}
    x0 = predicted_clean(scheduler, noisy, eps, batch.timesteps).clamp(-1, 1)
    rec = (x0 - batch.images).square().flatten(1).mean(1)
    crops = F.interpolate(x0, size=(112, 112), mode="bilinear", align_corners=False)
    realised = F.cosine_similarity(embedder(crops).float(), batch.id_features.float(), dim=1)
    sim = (realised - batch.similarity).abs()
    share = batch.timesteps.float() / timesteps_total
    simmat = ((1 - share) * rec + share * sim).mean()
    return mse + weight * simmat, {"mse": float(mse.detach()), "l_rec": float(rec.mean().detach()),
                                   "l_sim": float(sim.mean().detach())}


def starting_noise(seeds: Sequence[int], image_size: int) -> torch.Tensor:
    """``[n, 3, S, S]`` float32 standard normal, one stream per sample seed."""
    out = []
    for seed in seeds:
        g = torch.Generator().manual_seed(int(np.random.SeedSequence([int(seed), NOISE_TAG]).generate_state(1)[0]))
        out.append(torch.randn(1, 3, image_size, image_size, generator=g))
    return torch.cat(out) if out else torch.zeros(0, 3, image_size, image_size)


@torch.inference_mode()
def ddim_sample(model: CemiFaceUNet, scheduler_config: dict, id_features: np.ndarray, similarities: Sequence[float],
                seeds: Sequence[int], steps: int = 20, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Images ``[n, 3, S, S]`` in [-1, 1] drawn with ``steps`` DDIM steps (eta 0) at the given m."""
    features = np.asarray(id_features, np.float32)
    m = check_similarities(similarities)
    if features.ndim != 2 or features.shape[1] != model.config.id_dim:
        raise ValueError(f"identity features of shape {features.shape} do not fit the model's id_dim {model.config.id_dim}")
    if not len(features) == len(m) == len(seeds):
        raise ValueError(f"{len(features)} features, {len(m)} similarities and {len(seeds)} seeds: expected one each")
    if steps < 1:
        raise ValueError(f"DDIM steps must be >= 1, got {steps}")
    device = next(model.parameters()).device
    scheduler = DDIMScheduler.from_config(scheduler_config)
    scheduler.set_timesteps(int(steps), device=device)
    x = starting_noise(seeds, model.config.image_size).to(device)
    f = torch.from_numpy(features).to(device)
    s = torch.from_numpy(m).to(device)
    with torch.autocast(device.type, dtype=dtype or torch.float16, enabled=dtype is not None):
        for t in scheduler.timesteps:
            eps = model(x, t.expand(len(x)), f, s).float()
            x = scheduler.step(eps, t, x, eta=0.0).prev_sample
    return x.clamp(-1, 1)


def to_aligned_crops(images: torch.Tensor, size: int = 112) -> np.ndarray:
    """``[n, 3, S, S]`` in [-1, 1] -> uint8 ``[n, size, size, 3]`` RGB (bicubic when S differs)."""
    import cv2

    pixels = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    if pixels.shape[1] == size:
        return pixels
    return np.stack([cv2.resize(p, (size, size), interpolation=cv2.INTER_CUBIC) for p in pixels]) if len(pixels) else \
        np.zeros((0, size, size, 3), np.uint8)


def save_generator(directory: str, model: CemiFaceUNet, scheduler_config: dict, info: dict) -> None:
    """``<directory>/unet`` (safetensors), ``scheduler/`` and ``cemiface.json`` (what C_id is)."""
    import tempfile

    from facegen.storage import is_remote, upload_tree, write_json_atomic

    directory = str(directory).rstrip("/")
    if is_remote(directory):
        with tempfile.TemporaryDirectory() as tmp:
            save_generator(tmp, model, scheduler_config, info)
            upload_tree(tmp, directory)
        return
    model.save_pretrained(f"{directory}/{UNET_DIR}", safe_serialization=True)
    DDPMScheduler.from_config(scheduler_config).save_pretrained(f"{directory}/{SCHEDULER_DIR}")
    write_json_atomic(dict(info), f"{directory}/{INFO_FILE}")


def load_generator(directory: str, field: str = "generator.hybrid.cemiface.model",
                   device: str | torch.device = "cpu") -> tuple[CemiFaceUNet, dict, dict]:
    """``(model in eval mode, scheduler config, info)`` of a folder :func:`save_generator` wrote."""
    from facegen.cache import fetch
    from facegen.storage import exists, read_json

    local = fetch(str(directory).rstrip("/"), field)
    if not exists(f"{local}/{INFO_FILE}") or not exists(f"{local}/{UNET_DIR}/config.json"):
        raise FileNotFoundError(f"{field}: {directory}: not a CemiFace generator folder ({INFO_FILE} and {UNET_DIR}/ expected)")
    model = CemiFaceUNet.from_pretrained(f"{local}/{UNET_DIR}", use_safetensors=True)
    scheduler_config = dict(DDPMScheduler.load_config(f"{local}/{SCHEDULER_DIR}"))
    return model.eval().to(device), scheduler_config, read_json(f"{local}/{INFO_FILE}")
