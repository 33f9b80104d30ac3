"""Curriculum shards, training (Partial FC, data streams, augmentations) and evaluation."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from facegen.config._base import IResNetArch, _Section
from facegen.config.resources import PooledSection, PoolSettings


class AssemblySettings(_Section):
    """HybridGen's dataset assembly: a cleaned ingested set (HSFace10K through ``facegen ingest`` and
    ``facegen clean``) whose identities left with fewer than ``min_images`` images are dropped and
    replaced by new generated identities, in identity order, up to ``num_identities``."""

    ingested: str = Field(description="clean blocks of the ingested set (its run's <output_dir>/clean)",
                          json_schema_extra={"input_path": "folder"})
    generated: str | None = Field(
        default=None, description="clean blocks of the new generated identities; None: this run's <output_dir>/clean",
        json_schema_extra={"input_path": "folder"})
    num_identities: int = Field(ge=1, description="identities of the assembled set (HybridGen: 10,000 at the 10k scale)")
    min_images: int = Field(default=10, ge=1, description="an identity with fewer usable (status ok) images is dropped")


class ShardSettings(PooledSection):
    """Curriculum-ordered shards: difficulty = 1 - cos(embedding, identity centre)."""

    num_buckets: int = Field(default=4, ge=1, description="easy-to-hard difficulty buckets")
    order: Literal["difficulty", "source"] = Field(
        default="difficulty", description="difficulty: easy to hard over all identities; source: HybridGen's curriculum, "
        "the groups of source_order one after another, easy to hard inside each")
    source_order: list[Literal["generated", "ingested"]] = Field(
        default=["generated", "ingested"], min_length=1, description="order: source: the groups in curriculum order; an "
        "identity's group is its origin (or, assembled, the input it came from)")
    assembly: AssemblySettings | None = Field(default=None, description="one set from an ingested and a generated "
                                              "clean set (None: this run's clean blocks as they are)")
    pool: PoolSettings = Field(default_factory=lambda: PoolSettings(max_size=2), description="actor pool splitting blocks into bucket files")

    @model_validator(mode="after")
    def _groups_once(self) -> "ShardSettings":
        if len(set(self.source_order)) != len(self.source_order):
            raise ValueError(f"source_order: names a group twice: {self.source_order}")
        return self


class PartialFCSettings(_Section):
    """Partial FC (insightface v2): class centres sharded over workers, a sampled share of negatives."""

    sample_rate: float = Field(default=1.0, gt=0.0, le=1.0, description="share of each worker's centres per step (positives always kept)")


class TrainDataSettings(_Section):
    """How training batches are read: streams (fixed, so resume works on any worker count), shuffling, threads."""

    streams: int = Field(default=8, ge=1, description="independent readers; each worker serves streams/num_workers of them")
    chunk_rows: int = Field(default=16384, ge=1, description="largest contiguous run of an epoch's rows given to one stream")
    shuffle_rows: int = Field(default=4096, ge=1, description="rows a stream shuffles together (its shuffle buffer)")
    decode_threads: int = Field(default=2, ge=0, description="threads decoding and augmenting per worker (0 = inline)")
    prefetch_batches: int = Field(default=2, ge=1)
    cached_shards: int = Field(default=4, ge=1, description="shard files a worker keeps in memory")


class TrainAugmentSettings(_Section):
    """Training augmentations (probabilities as data); AdaFace-style crop / low-res / photometric, flip, erasing."""

    hflip_p: float = Field(default=0.5, ge=0.0, le=1.0)
    crop_p: float = Field(default=0.0, ge=0.0, le=1.0, description="keep a random box in place, black elsewhere")
    crop_scale: tuple[float, float] = (0.2, 1.0)
    crop_ratio: tuple[float, float] = (0.75, 4.0 / 3.0)
    low_res_p: float = Field(default=0.0, ge=0.0, le=1.0, description="down-sample and back with a random interpolation")
    low_res_scale: tuple[float, float] = (0.2, 1.0)
    photometric_p: float = Field(default=0.0, ge=0.0, le=1.0, description="brightness/contrast/saturation jitter")
    photometric: tuple[float, float, float] = (0.5, 0.5, 0.5)
    erase_p: float = Field(default=0.0, ge=0.0, le=1.0, description="random erasing (grey box, after the rest)")
    erase_scale: tuple[float, float] = (0.02, 0.33)
    erase_ratio: tuple[float, float] = (0.3, 3.3)

    @model_validator(mode="after")
    def _ranges(self) -> "TrainAugmentSettings":
        for name in ("crop_scale", "crop_ratio", "low_res_scale", "erase_scale", "erase_ratio"):
            lo, hi = getattr(self, name)
            if not 0 < lo <= hi:
                raise ValueError(f"{name}: need 0 < low <= high, got {(lo, hi)}")
        if self.crop_scale[1] > 1 or self.low_res_scale[1] > 1 or self.erase_scale[1] > 1:
            raise ValueError("crop_scale, low_res_scale and erase_scale must stay <= 1")
        return self


#: The DataCV ICCV 2025 challenge's dataset scales: name -> (most identities, most images).
DATACV_SCALES: dict[str, tuple[int, int]] = {
    "10k": (10_000, 500_000), "20k": (20_000, 1_000_000), "100k": (100_000, 5_000_000),
}


class TrainSettings(_Section):
    """Ray Train IResNet + Partial FC margin head; defaults follow arcface_torch, and
    ``configs/train_datacv_r50.yaml`` sets the DataCV organisers' fixed recipe."""

    arch: IResNetArch = Field(default="iresnet50", description="iresnet18/34/50/100 (insightface), or with _se: the "
                              "DataCV organisers' SE-IResNet (squeeze-excitation on each stage's first block)")
    width: int = Field(default=64, ge=4, description="channels of the first stage (64 = insightface)")
    embedding_size: int = Field(default=512, ge=8)
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0, description="dropout on the flattened map before the embedding "
                           "layer (arcface_torch: 0; the organisers' IResNet: 0.4)")
    head: Literal["arcface", "cosface", "combined"] = "arcface"
    scale: float = Field(default=64.0, gt=0.0)
    margin: float = Field(default=0.5, ge=0.0)
    arcface_monotone: bool = Field(
        default=True, description="head arcface: past theta + m > pi the target continues as cos(theta) - m sin(m) "
        "(insightface); false: cos(theta + m) everywhere, as the organisers' ArcFace")
    combined_margins: tuple[float, float, float] = Field(default=(1.0, 0.5, 0.0), description="(m1, m2, m3) of head: combined")
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(default=0.1, gt=0.0)
    momentum: float = Field(default=0.9, ge=0.0)
    weight_decay: float = Field(default=5e-4, ge=0.0)
    bn_weight_decay: bool = Field(default=True, description="weight decay on batch-norm scales and shifts too "
                                  "(arcface_torch: yes; the organisers' trainer: no)")
    batch_size: int = Field(default=512, ge=1, description="global batch, split evenly over the workers")
    epochs: int = Field(default=26, ge=1)
    lr_steps: list[int] = [12, 20, 24]
    warmup_epochs: float = Field(default=0.0, ge=0.0)
    grad_clip_norm: float = Field(default=5.0, ge=0.0, description="backbone gradient norm clip (0 = off)")
    amp: Literal["auto", "bf16", "fp16", "off"] = Field(default="auto", description="auto: bf16 on GPUs that have it, else fp16 + scaler; off on CPU")
    loss_scale_growth_interval: int = Field(default=2000, ge=1, description="fp16: steps without overflow before the "
                                            "loss scale doubles (torch: 2000; the organisers' trainer: 100)")
    sync_bn: bool = Field(default=False, description="batch-norm statistics over the global batch")
    channels_last: bool = Field(
        default=True, description="on a GPU, backbone and images in channels-last memory (faster convolutions); never on a "
        "CPU, where torch 2.13's channels-last IResNet backward crashes")
    compile: bool = Field(
        default=False, description="torch.compile the backbone and the margin head (no graph break in either; one around "
        "Partial FC's class sampling below sample rate 1.0); the first steps pay the compilation")
    curriculum: Literal["ordered", "shuffled"] = "ordered"
    datacv_scale: Literal["10k", "20k", "100k"] | None = Field(
        default=None, description="refuse, before training starts, a shard set above this DataCV scale: 10k = at most "
        "10,000 identities and 500,000 images, 20k = 20,000 and 1M, 100k = 100,000 and 5M (None: no cap)")
    num_workers: int = Field(default=1, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(default=1.0, gt=0.0)
    resources: dict[str, float] = Field(default_factory=dict, description="custom Ray resources per worker, e.g. {training: 1}")
    run_name: str | None = Field(default=None, description="defaults to run.name; same name resumes")
    max_failures: int = Field(default=0, ge=-1, description="worker-group restarts from the latest checkpoint (-1 = unlimited)")
    checkpoint_every_steps: int = Field(default=0, ge=0, description="also checkpoint every N steps (0 = per epoch only)")
    max_steps: int = Field(default=0, ge=0, description="stop (with a checkpoint) after this many steps; 0 = all epochs")
    checkpoints_to_keep: int = Field(default=2, ge=1)
    eval_every_steps: int = Field(default=0, ge=0, description="validate every N steps (0 = after each epoch)")
    partial_fc: PartialFCSettings = PartialFCSettings()
    data: TrainDataSettings = TrainDataSettings()
    augment: TrainAugmentSettings = TrainAugmentSettings()

    @model_validator(mode="after")
    def _divisible(self) -> "TrainSettings":
        if self.data.streams % self.num_workers:
            raise ValueError(f"data.streams ({self.data.streams}) must be a multiple of num_workers ({self.num_workers})")
        if self.batch_size % self.data.streams:
            raise ValueError(f"batch_size ({self.batch_size}) must be a multiple of data.streams ({self.data.streams})")
        return self


class EvalSettings(_Section):
    """Verification sets in insightface ``.bin`` format, 10-fold accuracy."""

    bins: list[str] = Field(default=[], json_schema_extra={"input_path": "required"})
    batch_size: int = Field(default=64, ge=1)
    nrof_folds: int = Field(default=10, ge=2)
