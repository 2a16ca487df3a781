"""params.yaml -> frozen, validated settings.

params.yaml is the single source of settings (one section per stage, as DVC's
example-get-started lays it out). This module turns it into frozen pydantic models: an unknown or
misspelled key is an error that lists the valid keys of its section, and a wrong type names the
key and the type it expects. Components never receive the whole config; flows pick the fields a
component needs and pass them as arguments.
"""

from __future__ import annotations

import copy
import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

__all__ = [
    "ConfigError",
    "Params",
    "load_params",
    "parse_params",
    "deep_merge",
    "flatten",
    "apply_overrides",
]


class ConfigError(ValueError):
    """params.yaml (or an override) does not describe valid settings."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# ----------------------------------------------------------------------------------------- paths
class PathsConfig(_Section):
    """Where every stage reads and writes, relative to the project root. Written once, here;
    dvc.yaml templates them (``${paths.pseudo}``) and the code reads them from this object."""

    data: str = "data"
    raw: str = "data/raw"
    datasets: str = "data/datasets"
    images: str = "data/datasets/coco_train/images/train"
    incoming: str = "data/incoming"
    pseudo: str = "data/pseudo"
    features: str = "data/features"
    models: str = "models"
    metrics: str = "metrics"
    reports: str = "reports"


# ---------------------------------------------------------------------------------------- models
class ModelProfile(_Section):
    """Registry names (components/models/registry.py) of the three foundation models."""

    clip: str
    sam: str
    dino: str


class ModelsConfig(_Section):
    profile: str = "paper"
    profiles: dict[str, ModelProfile] = Field(
        default_factory=lambda: {
            "paper": ModelProfile(clip="ViT-L-14-336/openai", sam="vit_h", dino="dinov2_vitl14"),
            "demo": ModelProfile(clip="mini-clip", sam="mini-sam", dino="mini-dino"),
        }
    )
    device: str = "auto"
    dtype: Literal["fp32", "bf16", "fp16"] = "bf16"
    weights_dir: str | None = None

    @model_validator(mode="after")
    def _profile_exists(self) -> ModelsConfig:
        if self.profile not in self.profiles:
            raise ValueError(f"models.profile {self.profile!r} is not one of {sorted(self.profiles)}")
        return self

    @property
    def selected(self) -> ModelProfile:
        """The profile chosen by ``models.profile``."""
        return self.profiles[self.profile]


# -------------------------------------------------------------------------------------- datasets
class DatasetOverride(_Section):
    """Per-dataset mirror (``url``) or data the user already has (``root``, used in place)."""

    url: str | None = None
    root: str | None = None


class DownloadConfig(_Section):
    """What ``download@<dataset>`` fetches. ``synthetic`` writes each source's synthetic twin in its
    raw on-disk format instead of downloading it (the demo and the tests); the real converters run
    on it either way."""

    datasets: tuple[str, ...] = ("coco_train", "pv21", "pv20", "pc59", "co80", "cs171", "cityscapes", "ade20k")
    synthetic: bool = False
    synthetic_images: int = Field(8, ge=1)
    seed: int = 0

    @field_validator("datasets")
    @classmethod
    def _known_datasets(cls, names: tuple[str, ...]) -> tuple[str, ...]:
        from components.datasets.registry import BENCHMARKS

        unknown = [n for n in names if n not in BENCHMARKS]
        if unknown:
            raise ValueError(f"unknown dataset(s) {unknown}; known datasets: {', '.join(sorted(BENCHMARKS))}")
        return names


# ----------------------------------------------------------------------------------------- label
class AmgConfig(_Section):
    """SamAutomaticMaskGenerator settings plus the size filter (paper appendix 1.2)."""

    points_per_side: int = Field(32, ge=1)
    points_per_batch: int = Field(64, ge=1)
    pred_iou_thresh: float = Field(0.97, ge=0.0, le=1.0)
    stability_score_thresh: float = Field(0.95, ge=0.0, le=1.0)
    stability_score_offset: float = 1.0
    box_nms_thresh: float = Field(0.7, ge=0.0, le=1.0)
    min_mask_region_area: int = Field(0, ge=0)
    min_area_frac: float = Field(0.001, ge=0.0, le=1.0)
    max_area_frac: float = Field(0.95, ge=0.0, le=1.0)


class LabelConfig(_Section):
    vocabulary: str = "cocostuff171"
    templates: tuple[str, ...] = ("a photo of a {}.",)
    grid: int = Field(4, ge=1)
    dense_mode: Literal["vanilla", "maskclip", "fmbseg", "clearclip"] = "fmbseg"
    min_crops: int = Field(1, ge=1)
    top_k_points: int = Field(5, ge=1)
    sam_size: int = Field(518, ge=16)
    label_size: int = Field(518, ge=16)
    presence: Literal["clip", "ground_truth"] = "clip"
    ground_truth_dir: str | None = None
    amg: AmgConfig = AmgConfig()
    shard_size: int = Field(256, ge=1)
    crop_batch: int = Field(16, ge=1)
    num_workers: int = Field(2, ge=0)
    external_symlinks: Literal["refuse", "follow"] = "refuse"  # links out of the image folder

    @field_validator("templates")
    @classmethod
    def _one_slot_per_template(cls, templates: tuple[str, ...]) -> tuple[str, ...]:
        if not templates:
            raise ValueError("needs at least one prompt template, e.g. 'a photo of a {}.'")
        for template in templates:
            try:
                filled = template.format("\0")
            except (IndexError, KeyError, ValueError):
                filled = ""
            if template.count("{}") != 1 or filled.count("\0") != 1:
                raise ValueError(f"template {template!r} must hold exactly one '{{}}' (where the class name goes) "
                                 "and no other braces")
        return templates

    @model_validator(mode="after")
    def _semi_needs_labels(self) -> LabelConfig:
        if self.presence == "ground_truth" and not self.ground_truth_dir:
            raise ValueError("label.presence 'ground_truth' needs label.ground_truth_dir (a canonical layout root)")
        return self


# --------------------------------------------------------------------------------------- balance
class BalanceConfig(_Section):
    ratio: float = Field(0.75, ge=0.0, le=1.0)
    seed: int = 0


# -------------------------------------------------------------------------------------- features
class FeaturesConfig(_Section):
    image_size: int = Field(518, ge=14)
    batch_size: int = Field(16, ge=1)
    shard_size: int = Field(512, ge=1)
    cache: bool = True
    num_workers: int = Field(2, ge=0)

    @field_validator("image_size")
    @classmethod
    def _multiple_of_patch(cls, v: int) -> int:
        if v % 14:
            raise ValueError(f"features.image_size must be a multiple of DINOv2's patch size 14, got {v}")
        return v


# ------------------------------------------------------------------------------- aligner / train
class AlignerConfig(_Section):
    kind: Literal["transformer", "mlp", "linear"] = "transformer"
    num_heads: int = Field(8, ge=1)


class TrainConfig(_Section):
    loss: Literal["tsupcon", "prototype", "supcon"] = "tsupcon"
    temperature: float = Field(1.0, gt=0.0)
    lr: float = Field(0.1, gt=0.0)
    momentum: float = Field(0.9, ge=0.0)
    weight_decay: float = Field(0.01, ge=0.0)
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(5, ge=1)
    seed: int = 0
    num_workers: int = Field(2, ge=0)


# ------------------------------------------------------------------------------------- evaluate
class EvaluateConfig(_Section):
    benchmarks: tuple[str, ...] = ("pv21", "pv20", "pc59", "co80", "cs171", "cityscapes", "ade20k")
    split: str = "val"
    short_side: int | None = Field(448, ge=14)
    window: int = Field(448, ge=14)
    stride: int = Field(224, ge=1)
    templates: tuple[str, ...] = ("a photo of a {}.",)
    bg_threshold: float | None = None
    refine: bool = True
    amg: AmgConfig = AmgConfig(pred_iou_thresh=0.88, min_area_frac=0.0, max_area_frac=1.0)
    batch_size: int = Field(8, ge=1)
    limit: int | None = Field(None, ge=1)
    overlays: int = Field(4, ge=0)


# -------------------------------------------------------------------------------------- tracking
class TrackingConfig(_Section):
    experiment: str = "fmbseg"
    tracking_uri: str | None = None
    registered_model: str = "fmbseg-aligner"


# ----------------------------------------------------------------------------------- orchestration
class OrchestrationConfig(_Section):
    task_runner: Literal["threads", "dask", "ray"] = "threads"
    max_workers: int = Field(2, ge=1)
    dask_address: str | None = None
    # an int, or "auto": one worker per visible GPU, each pinned to its own device (1 on a machine without GPUs)
    dask_workers: int | Literal["auto"] = 2
    ray_address: str | None = None
    gpus_per_task: float = Field(0.0, ge=0.0)  # ray: GPUs each shard task reserves (1: one task per GPU)

    @field_validator("dask_workers")
    @classmethod
    def _positive_workers(cls, value: int | str) -> int | str:
        if isinstance(value, int) and value < 1:
            raise ValueError("dask_workers must be >= 1 or 'auto'")
        return value


class NightlyConfig(_Section):
    source_dir: str | None = None
    benchmarks: tuple[str, ...] = ("pv21", "cs171")
    metric: str = "mIoU_base"
    dvc_remote: str | None = None


# ------------------------------------------------------------------------------------------- all
class Params(_Section):
    """All of params.yaml."""

    paths: PathsConfig = PathsConfig()
    models: ModelsConfig = ModelsConfig()
    datasets: dict[str, DatasetOverride] = Field(default_factory=dict)
    download: DownloadConfig = DownloadConfig()
    label: LabelConfig = LabelConfig()
    balance: BalanceConfig = BalanceConfig()
    features: FeaturesConfig = FeaturesConfig()
    aligner: AlignerConfig = AlignerConfig()
    train: TrainConfig = TrainConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    tracking: TrackingConfig = TrackingConfig()
    orchestration: OrchestrationConfig = OrchestrationConfig()
    nightly: NightlyConfig = NightlyConfig()


def _model_at(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The pydantic model class that holds the key at ``loc`` (None where none does)."""
    model: Any = Params
    parts = list(loc[:-1])
    while parts:
        part = parts.pop(0)
        field = model.model_fields.get(str(part)) if isinstance(model, type) else None
        if field is None:
            return None
        ann = field.annotation
        if getattr(ann, "__origin__", None) is dict:  # dict[str, Section]: the next part is a key
            ann = ann.__args__[1]
            if parts:
                parts.pop(0)
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return None
        model = ann
    return model


MAX_VOCABULARY = 254  # 8-bit label maps: index 0 = background, 1..254 = classes, 255 = ignore


def check_vocabulary(lines: list[str], *, source: str) -> list[str]:
    """A vocabulary's class lines, or ConfigError naming ``source``: not empty, no class name (the
    first name of a line) twice, and at most MAX_VOCABULARY classes (what 8-bit label maps hold)."""
    if not lines:
        raise ConfigError(f"{source} holds no class names: a vocabulary lists one class per line")
    seen: dict[str, int] = {}
    for number, line in enumerate(lines, start=1):
        name = line.split(",")[0].strip().lower()
        if name in seen:
            raise ConfigError(f"{source}: class {name!r} appears more than once (lines {seen[name]} and {number})")
        seen[name] = number
    if len(lines) > MAX_VOCABULARY:
        raise ConfigError(f"{source} has {len(lines)} classes; 8-bit label maps hold at most {MAX_VOCABULARY}")
    return lines


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"invalid settings in {source}:"]
    for e in err.errors():
        loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and p.startswith("function-after")))
        key = ".".join(str(p) for p in loc) or "<top level>"
        if e["type"] == "extra_forbidden":
            owner = _model_at(loc)
            valid = sorted(owner.model_fields) if owner else []
            close = difflib.get_close_matches(str(loc[-1]), valid, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            lines.append(f"  - unknown key {key!r}{hint} valid keys here: {', '.join(valid)}")
        elif e["type"] == "missing":
            lines.append(f"  - missing key {key!r}")
        else:
            owner = _model_at(loc)
            expected = ""
            if owner is not None and str(loc[-1]) in owner.model_fields:
                ann = owner.model_fields[str(loc[-1])].annotation
                if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
                    expected = f" (expected {getattr(ann, '__name__', None) or str(ann).replace('typing.', '')})"
            lines.append(f"  - {key}: {e['msg']}{expected}; got {e.get('input')!r}")
    return "\n".join(lines)


def parse_params(raw: dict[str, Any] | None, source: str = "params.yaml") -> Params:
    """Validate a params dict (as read from YAML) into :class:`Params`, or raise ConfigError."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source} must hold a mapping of sections, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source)) from None


def load_params(path: str | Path = "params.yaml", overrides: dict[str, Any] | None = None) -> Params:
    """Read and validate params.yaml; ``overrides`` are dotted keys (``{"train.lr": 0.1}``)."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path} does not exist: run fmbseg from the project root or pass --params")
    with open(path, encoding="utf-8") as f:
        try:
            raw = yaml.safe_load(f)
        except yaml.YAMLError as err:
            raise ConfigError(f"{path} is not valid YAML: {err}") from None
    if overrides:
        raw = apply_overrides(raw or {}, overrides)
    return parse_params(raw, str(path))


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """A new dict: ``update`` merged into ``base`` recursively (mappings merge, the rest replaces)."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def apply_overrides(raw: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Apply dotted-key overrides (``{"label.amg.points_per_side": 8}``) to a raw params dict."""
    nested: dict[str, Any] = {}
    for dotted, value in overrides.items():
        node = nested
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return deep_merge(raw, nested)


def flatten(params: Params | dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten nested settings to dotted keys (MLflow params): ``{"train.lr": 0.05, ...}``."""
    data = params.model_dump(mode="json") if isinstance(params, BaseModel) else params
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out
