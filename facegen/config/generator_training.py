"""``train_generator``: training CemiFace's similarity-conditioned diffusion generator (seed 002).

Defaults are the paper's (ALGORITHMS.md 3 and 7): T = 1000, m quantised in 0.02 steps over
[-1, 1], loss MSE + 0.05 x the similarity-matching term, AdamW, batch 160, 10 epochs, DDIM 20
steps when drawing. The network is a small DCFace-style UNet at 112 px.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from facegen.config._base import _Section
from facegen.config.faces import EMBEDDERS, EmbedderSettings


class CemiFaceNetSettings(_Section):
    """The UNet (``facegen.models.cemiface.CemiFaceUNet``); the identity width comes from the embedder."""

    image_size: int = Field(default=112, ge=8, description="pixels of the square aligned crop the model draws")
    block_out_channels: list[int] = Field(default=[64, 128, 256, 256], min_length=2)
    layers_per_block: int = Field(default=2, ge=1)
    attention_head_dim: int = Field(default=8, ge=1)
    norm_num_groups: int = Field(default=32, ge=1)
    cross_attention_dim: int = Field(default=256, ge=1, description="width of the C_att tokens")
    context_tokens: int = Field(default=4, ge=1, description="C_att tokens the cross-attention reads")
    similarity_dim: int = Field(default=64, ge=1, description="width of C_sim = F1(m)")

    @model_validator(mode="after")
    def _shapes(self) -> "CemiFaceNetSettings":
        levels = len(self.block_out_channels)
        if self.image_size % (2 ** (levels - 1)):
            raise ValueError(f"image_size: {self.image_size} must be divisible by 2**{levels - 1} "
                             f"({levels} levels in block_out_channels)")
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            raise ValueError(f"block_out_channels: {bad[0]} is not a multiple of norm_num_groups {self.norm_num_groups}")
        return self


class GeneratorTrainSettings(_Section):
    """``facegen train-generator``: Ray Train over a shard set, one checkpoint folder per N steps.

    Each training pair is a target image and an inquiry image of the same identity; C_id is the
    inquiry's embedding and m their cosine (both from ``embedder``), quantised to
    ``similarity_step``. Identities ``holdout_identities`` are kept out of training: the
    similarity-control figure of each checkpoint is measured on them.
    """

    kind: Literal["cemiface"] = "cemiface"
    run_name: str | None = Field(default=None, description="None: run.name; the same name resumes")
    shards: str | None = Field(default=None, description="shard set to learn from (None: <run.output_dir>/shards)",
                               json_schema_extra={"input_path": "required"})
    embedder: EmbedderSettings = Field(default_factory=EmbedderSettings,
                                       description="C_id and m; the generator is used with this embedder")
    net: CemiFaceNetSettings = CemiFaceNetSettings()
    num_train_timesteps: int = Field(default=1000, ge=2, description="T")
    similarity_step: float = Field(default=0.02, gt=0.0, le=0.5, description="m is quantised to this grid")
    similarity_weight: float = Field(default=0.05, ge=0.0, description="weight of L_SimMat; 0: MSE alone")
    batch_size: int = Field(default=160, ge=1, description="global: split evenly over the workers")
    lr: float = Field(default=1e-4, gt=0.0)
    weight_decay: float = Field(default=1e-2, ge=0.0)
    epochs: int = Field(default=10, ge=1, description="passes over the training images as targets")
    max_steps: int = Field(default=0, ge=0, description="stop after this many steps (0: all epochs)")
    grad_clip_norm: float = Field(default=1.0, ge=0.0, description="0: no clipping")
    amp: Literal["auto", "bf16", "fp16", "off"] = "auto"
    num_workers: int = Field(default=1, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(default=1.0, gt=0.0)
    resources: dict[str, float] = Field(default_factory=dict, description="custom Ray resources per worker")
    max_failures: int = Field(default=3, ge=0, description="worker-group restarts from the latest checkpoint")
    checkpoint_every_steps: int = Field(default=1000, ge=1)
    checkpoints_to_keep: int = Field(default=3, ge=1)
    holdout_identities: int = Field(default=8, ge=1, description="identities kept out for the control figure")
    control_similarities: list[float] = Field(default=[0.0, 0.3, 0.6, 0.9], min_length=2)
    control_images: int = Field(default=4, ge=1, description="images per held-out identity and m")
    ddim_steps: int = Field(default=20, ge=1, description="DDIM steps of the control figure and sample grid")
    prepare_cpus: float = Field(default=1.0, gt=0.0, description="CPUs of the task that embeds the shard set")

    @model_validator(mode="after")
    def _consistent(self) -> "GeneratorTrainSettings":
        if self.batch_size % self.num_workers:
            raise ValueError(f"batch_size: {self.batch_size} does not split evenly over num_workers={self.num_workers}")
        if (self.similarity_weight > 0 and "kind" in self.embedder.model_fields_set
                and not EMBEDDERS.hook(self.embedder.kind, "differentiable_model")):
            raise ValueError(f"similarity_weight: the similarity-matching loss backpropagates through the embedder, "
                             f"which must be differentiable ({', '.join(EMBEDDERS.having('differentiable_model'))}; "
                             f"got {self.embedder.kind}); "
                             "set similarity_weight: 0 to train with the MSE alone")
        bad = [m for m in self.control_similarities if not -1.0 <= m <= 1.0]
        if bad:
            raise ValueError(f"control_similarities: {bad[0]} is outside [-1, 1]")
        return self
