"""Cleaning experts, fusion, semi-hard selection, neighbour search, dedup and leakage."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, SerializeAsAny, field_validator, model_validator

from facegen.config._base import _Section
from facegen.config.components import ComponentTable, ComponentSettings
from facegen.config.faces import EmbedderSettings
from facegen.config.resources import PooledSection, PoolSettings, TaskSettings

#: The threshold specs on an embedder's own scale, resolved by :func:`facegen.faces.calibration.resolve_threshold`.
THRESHOLD_SPEC = re.compile(r"^(same_person|far:(?P<far>[0-9.eE+-]+)|genuine:(?P<q>[0-9.eE+-]+))$")


def check_threshold_spec(value: float | str) -> float | str:
    """``value`` if it is a cosine in [-1, 1] or a spec (same_person, far:RATE, genuine:PERCENTILE;
    :mod:`facegen.faces.calibration`); ValueError otherwise."""
    if isinstance(value, str):
        match = THRESHOLD_SPEC.match(value.strip())
        if not match:
            raise ValueError(f"{value!r}: give a cosine, same_person, far:RATE (e.g. far:1e-3) or genuine:PERCENTILE")
        if match.group("far") is not None and not 0.0 < float(match.group("far")) < 1.0:
            raise ValueError(f"{value!r}: the false-accept rate must be in (0, 1)")
        if match.group("q") is not None and not 0.0 <= float(match.group("q")) <= 100.0:
            raise ValueError(f"{value!r}: the percentile must be in [0, 100]")
        return value.strip()
    if not -1.0 <= float(value) <= 1.0:
        raise ValueError(f"{value}: a cosine must be in [-1, 1]")
    return float(value)


#: A similarity threshold: a cosine, or a spec on the embedder's own scale (same_person, far:RATE,
#: genuine:PERCENTILE; :mod:`facegen.faces.calibration`), resolved when the clean stage starts.
Threshold = Annotated[float | str, AfterValidator(check_threshold_spec)]


class DbscanSettings(_Section):
    """Per-identity DBSCAN (ALGORITHMS.md 1.2): ``eps = 1 - t``, cosine metric.

    ``calibrated`` (the default): one DBSCAN at ``t = threshold`` on the embedder's own scale (its
    same-person threshold unless given) finds the identity's majority person (the largest cluster);
    then every face whose mean cosine to the majority's faces is at least ``t`` is kept and every
    other dropped, so no face that is on average the same person is lost; an embedder without a
    calibration falls back to ``band``. ``band``: HybridGen's adaptive search, ``t`` moved from ``start_t`` in ``step``s until
    the largest cluster holds 50-80 % of the images (it drops some of every identity, clean or not).
    """

    mode: Literal["calibrated", "band"] = "calibrated"
    threshold: Threshold = Field(default="same_person", description="calibrated mode's t")
    min_calibration_accuracy: float = Field(
        default=0.8, ge=0.0, le=1.0, description="a measured calibration whose 10-fold accuracy is lower (an "
        "embedder that cannot tell the people of its verification set apart) is not trusted: band mode, and auto "
        "thresholds as without a calibration")
    start_t: Threshold = Field(default=0.6, description="band mode: where the search starts")
    step: float = Field(default=0.02, gt=0.0)
    t_min: Threshold = Field(default=0.3, description="band mode: the loosest t")
    t_max: Threshold = Field(default=0.9, description="band mode: the strictest t")
    keep_fraction_low: float = Field(default=0.5, ge=0.0, le=1.0)
    keep_fraction_high: float = Field(default=0.8, ge=0.0, le=1.0)
    max_rounds: int = Field(default=10, ge=1)
    min_samples: int = Field(default=2, ge=1)

    @model_validator(mode="after")
    def _ordered(self) -> "DbscanSettings":
        if not isinstance(self.t_min, str) and not isinstance(self.t_max, str) and self.t_min > self.t_max:
            raise ValueError("t_min must not exceed t_max")
        if self.keep_fraction_low > self.keep_fraction_high:
            raise ValueError("keep_fraction_low must not exceed keep_fraction_high")
        return self


class AugmentSettings(_Section):
    """Top-up augmentation list of ALGORITHMS.md 1.4 (probabilities and ranges)."""

    hflip_p: float = Field(default=0.5, ge=0.0, le=1.0)
    color_jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1)
    color_jitter_p: float = Field(default=0.8, ge=0.0, le=1.0)
    grayscale_p: float = Field(default=0.2, ge=0.0, le=1.0)
    affine_degrees: float = 10.0
    affine_translate: float = 0.05
    affine_scale: tuple[float, float] = (0.95, 1.05)
    affine_shear: float = 5.0
    affine_p: float = Field(default=0.5, ge=0.0, le=1.0)
    rotation_degrees: float = 5.0
    rotation_p: float = Field(default=0.5, ge=0.0, le=1.0)
    blur_kernel: int = 3
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    low_res_factor: float = Field(default=0.5, gt=0.0, le=1.0)


class ExpertSettings(ComponentSettings):
    """What every cleaning expert's settings share. ``kind`` names its module (:data:`EXPERTS`);
    ``name`` is what its votes are called in the rows and in ``clean.fusion.rules`` (default: the
    kind), so one kind can vote twice (two independent FR models)."""

    name: str | None = Field(default=None, pattern=r"^[a-z][a-z0-9_]*$", description="the votes' name (default: kind)")

    @property
    def expert_name(self) -> str:
        """The name the votes and the fusion rules use."""
        return self.name or self.kind


#: The cleaning experts besides the cluster expert (which always votes): kind -> its module, which
#: declares ``SETTINGS`` and ``build(settings, stage_dir=...)`` (:mod:`facegen.config.components`).
EXPERTS = ComponentTable("clean.experts", ExpertSettings, {
    "independent": "facegen.clean.independent",
    "vlm": "facegen.clean.vlm",
})
#: The sections that configured the experts before ``clean.experts`` (still read).
LEGACY_EXPERTS = ("independent", "vlm")
#: The expert that always votes: per-identity DBSCAN (``clean.dbscan``).
CLUSTER_EXPERT = "cluster"

class FusionRule(_Section):
    """If every expert named in ``when`` voted as given, ``then`` decides: keep, drop, or an expert's
    own vote (when that expert abstained, the next rule is tried)."""

    when: dict[str, Literal["keep", "drop", "abstain"]] = Field(default={}, description="expert name -> its vote")
    then: str = Field(description="keep, drop, or an expert's name (its own vote)")

    def experts(self) -> list[str]:
        """The expert names this rule reads."""
        return [*self.when, *([] if self.then in ("keep", "drop") else [self.then])]


def _default_rules() -> list[FusionRule]:
    return [
        FusionRule(when={"cluster": "drop", "independent": "drop"}, then="drop"),
        FusionRule(when={"cluster": "keep", "independent": "keep"}, then="keep"),
        FusionRule(then="vlm"),
        FusionRule(then="cluster"),
    ]


class FusionSettings(_Section):
    """How expert votes become one decision per sample: the first rule that decides wins."""

    rules: list[FusionRule] = Field(default_factory=_default_rules, description="the default names independent and vlm, "
                                    "which abstain when not configured")
    default: Literal["keep", "drop"] = "keep"


class SelectionSettings(_Section):
    """Which kept samples survive the trim to ``target_images`` (CemiFace: semi-hard first)."""

    mode: Literal["semi_hard", "central"] = "semi_hard"
    band: tuple[Threshold, Threshold] = (0.3, 0.8)
    target: Threshold = Field(default=0.7, description="inside the band, samples nearest this cosine go first")

    @model_validator(mode="after")
    def _ordered(self) -> "SelectionSettings":
        low, high = self.band
        if not isinstance(low, str) and not isinstance(high, str) and not low <= high:
            raise ValueError("band must be [low, high] with -1 <= low <= high <= 1")
        return self


class SearchSettings(_Section):
    """faiss search over identity centres: exact up to a size, IVF (or, if chosen, an HNSW graph) above."""

    device: Literal["auto", "cpu", "cuda"] = "auto"
    index: Literal["auto", "flat", "ivf", "hnsw"] = Field(
        default="auto", description="auto: exact (flat) up to exact_max_cpu / exact_max_gpu vectors, IVF above; "
                                    "flat/ivf/hnsw: always that index (hnsw is CPU only)")
    exact_max_cpu: int = Field(default=50_000, ge=0, description="exact search up to this many vectors on CPU")
    exact_max_gpu: int = Field(default=4_000_000, ge=0)
    hnsw_m: int = Field(default=32, ge=4)
    hnsw_ef_construction: int = Field(default=64, ge=8)
    hnsw_ef_search: int = Field(default=64, ge=8)
    vectors_per_list: int = Field(default=64, ge=16, description="IVF: lists = vectors / this")
    # 4096: above it the CPU quantizer is an HNSW graph, which at 1M centres cost more than the scan and
    # missed lists (dedup recall 0.98); a flat quantizer with 4096 lists (about 244 vectors each at 1M)
    # is BLAS-fast and exact (bench/RESULTS.md).
    max_lists: int = Field(default=4096, ge=1, description="IVF: at most this many lists")
    nprobe: int = Field(default=16, ge=1, description="IVF: lists searched per query (a self-join, dedup, probes half as "
                        "many: a pair is missed only when each of its two vectors misses the other's list)")
    # Lists capped by max_lists hold more vectors, so fewer probes scan as much; at 1M, 8 of 4096
    # found every planted pair (4: 99.8 %) for 55 % of the CPU time of 16.
    capped_nprobe: int = Field(default=8, ge=1, description="IVF: at most this many lists searched when max_lists caps the lists")
    # 32: at 100k (1562 lists of 64) 16 points per list let 1 % of planted pairs fall outside the probed
    # lists one-sided (32: 0.08 %); at 1M 16 were enough, 32 cost 15 more CPU seconds there.
    train_per_list: int = Field(default=32, ge=4, description="IVF k-means training points per list")
    # capped lists hold several times vectors_per_list: at 1M centres (4096 lists of 244) 16 points per
    # list found every planted pair, for half the k-means time of 32 (bench/RESULTS.md)
    capped_train_per_list: int = Field(default=16, ge=4, description="IVF k-means training points per list when max_lists caps the lists")
    train_iterations: int = Field(default=10, ge=1, description="IVF k-means iterations")
    scan: Literal["lists", "faiss"] = Field(
        default="lists", description="CPU IVF: lists = lists from a bfloat16 spherical k-means, each scanned once per "
        "batch of queries as one matrix product (facegen.clean.list_join; 3.4x faster at 1M centres, the same recall); faiss = faiss's k-means and its own scan, one query at a time")
    query_chunk: int = Field(default=8192, ge=1)
    knn: int = Field(default=16, ge=1, description="first k per query; grown while the k-th is above threshold")
    max_vectors_per_part: int = Field(default=2_000_000, ge=1, description="bounds the memory of one index")


class DedupSettings(_Section):
    """Cross-identity deduplication of identity centres."""

    enabled: bool = True
    threshold: Threshold | Literal["auto"] = Field(
        default="auto", description="at or above = same person (see measure); auto: the embedder's same_person when "
                                    "it has a calibration, else 0.7 (ArcFace's scale)")
    measure: Literal["auto", "centre", "mean_pair"] = Field(
        default="auto", description="what the threshold is compared with: centre: the cosine of the two identities' "
        "unit centres; mean_pair: the mean cosine between their images (the scale a calibration's same_person is on: "
        "averaging lifts centre cosines of different people above it); auto: mean_pair for a threshold on the "
        "embedder's scale (auto with a calibration, or a spec), centre for a cosine as written")
    action: Literal["drop_smaller", "merge"] = "drop_smaller"


class LeakageSettings(_Section):
    """Privacy audit: synthetic identities against embeddings of real people (.npy or Parquet)."""

    references: list[str] = Field(default=[], json_schema_extra={"input_path": "required"})
    threshold: Threshold | Literal["auto"] = Field(
        default="auto", description="when far is not set; auto: the embedder's same_person when it has a calibration, "
                                    "else 0.4 (ArcFace's scale)")
    far: float | None = Field(default=None, gt=0.0, lt=1.0, description="calibrate to this false-accept rate")
    verification: str | None = Field(default=None, description=".npz/.parquet with embedding + label, for far",
                                     json_schema_extra={"input_path": "required"})
    samples: bool = Field(default=False, description="also compare every kept sample, not only centres")
    report_pairs: int = Field(default=24, ge=0)

    @model_validator(mode="after")
    def _far_needs_set(self) -> "LeakageSettings":
        if self.far is not None and not self.verification:
            raise ValueError("far needs a verification set (leakage.verification)")
        return self


class CleanSettings(PooledSection):
    """Cleaning: expert votes fused per sample, dedup and leakage over all identities, selection, top-up."""

    dbscan: DbscanSettings = DbscanSettings()
    experts: list[SerializeAsAny[ExpertSettings]] = Field(
        default_factory=list, description="experts voting beside the cluster expert, asked in this order (cheap before "
        "costly: an expert is asked only about rows the fusion rules could still give to it); each a mapping with "
        f"kind ({', '.join(EXPERTS.kinds)}) and its settings")
    fusion: FusionSettings = FusionSettings()
    selection: SelectionSettings = SelectionSettings()
    dedup: DedupSettings = DedupSettings()
    leakage: LeakageSettings = LeakageSettings()
    search: SearchSettings = SearchSettings()
    replace_dropped: bool = Field(default=False, description="generate new identities for dropped ones")
    min_images: int = Field(default=10, ge=1, description="identities with fewer kept images are dropped")
    target_images: int = Field(default=50, ge=1, description="top up each kept identity to this count")
    augment: AugmentSettings = AugmentSettings()
    pool: PoolSettings = Field(default_factory=PoolSettings, description="actor pool of the expert and final passes")
    global_task: TaskSettings = Field(default_factory=lambda: TaskSettings(num_cpus=1.0),
                                      description="the Ray task of dedup + leakage (a GPU for faiss where configured)")

    @model_validator(mode="before")
    @classmethod
    def _legacy_experts(cls, data: Any) -> Any:
        """``independent: {enabled: ...}`` and ``vlm: {enabled: ...}`` sections (before ``experts``)
        become entries of ``experts``; both spellings at once is an error naming the new one."""
        if not isinstance(data, dict) or not any(k in data for k in LEGACY_EXPERTS):
            return data
        data = dict(data)
        if data.get("experts"):
            old = next(k for k in LEGACY_EXPERTS if k in data)
            raise ValueError(f"{old} is now an entry of experts ({{kind: {old}, ...}}); give only experts")
        experts = []
        for kind in LEGACY_EXPERTS:
            section = data.pop(kind, None)
            if section is None:
                continue
            if not isinstance(section, dict):
                raise ValueError(f"{kind}: expected a mapping (now written as experts: [{{kind: {kind}, ...}}])")
            section = dict(section)
            if section.pop("enabled", False):
                experts.append({"kind": kind, **section})
        data["experts"] = experts
        return data

    @field_validator("experts", mode="before")
    @classmethod
    def _expert_settings(cls, value: Any) -> Any:
        if not isinstance(value, list):
            return value
        built = []
        for i, item in enumerate(value):
            try:
                built.append(EXPERTS.settings(item))
            except ValueError as exc:
                raise ValueError(f"[{i}]: {exc}") from None
        return built

    @model_validator(mode="after")
    def _fusion_names_known(self) -> "CleanSettings":
        names = [e.expert_name for e in self.experts]
        twice = sorted({n for n in names if names.count(n) > 1} | ({CLUSTER_EXPERT} & set(names)))
        if twice:
            raise ValueError(f"experts: {twice[0]} names two experts: give one a name")
        configured = {CLUSTER_EXPERT, *names}
        explicit = self.fusion.rules != _default_rules()  # the defaults, also as a dumped config repeats them
        for i, rule in enumerate(self.fusion.rules):
            for name in rule.experts():
                if name in configured or (not explicit and name in EXPERTS.kinds):
                    continue  # the default rules name the built-in experts, which abstain when not configured
                raise ValueError(f"fusion.rules[{i}]: {name} is not a configured expert (configured: "
                                 f"{', '.join(sorted(configured))}; experts are set in clean.experts)")
        return self
