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
from pathlib import Path, PurePosixPath
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_serializer,
    field_validator,
    model_validator,
)

from components.aligner.settings import AlignerKind, LossName
from components.io import MAX_LABEL_CLASSES
from components.labelling.settings import DenseMode

__all__ = [
    "ConfigError",
    "SUB_PATHS",
    "PathsConfig",
    "derived_paths",
    "without_derived_paths",
    "TEMPLATE_SETS",
    "EvaluateSettings",
    "template_set",
    "shipped_protocols",
    "load_protocol",
    "ServeConfig",
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
# Each stage's own output (and the files inside one that a later stage reads), as a place under a
# base path: key -> (the base's key, its name there). A params file that leaves a key out gets
# this place under its own base, so params files written before the key existed keep working.
SUB_PATHS: dict[str, tuple[str, str]] = {
    "stage1": ("pseudo", "stage1"),                      # label: the Stage 1 store
    "train_index": ("pseudo", "train_index.parquet"),    # balance: the training index
    "corrections": ("pseudo", "corrections"),            # import-labels: corrected maps (balance, train read them)
    "checkpoint": ("models", "aligner.pt"),              # train: the self-describing checkpoint
    "train_state": ("models", "train_state.pt"),         # train: end-of-epoch state while it runs
    "train_epochs": ("metrics", "train_epochs.csv"),     # train: one row per epoch
    "train_loss_plot": ("metrics", "train_loss.png"),    # train: the loss curve (dvc plots)
    "stage1_metrics": ("metrics", "stage1"),             # evaluate-stage1: <benchmark>_<variant>.json
    "overlays": ("reports", "overlays"),                 # evaluate: <benchmark>/<image>.png
    "eval_state": ("reports", ".eval_state"),            # evaluate: resume state of a run
    "report_md": ("reports", "report.md"),               # report: the tables
    "report_csv": ("reports", "report.csv"),
    "stage1_csv": ("reports", "stage1.csv"),
}


class PathsConfig(_Section):
    """Where every stage reads and writes, relative to the project root. Written once, here;
    dvc.yaml templates them (``${paths.stage1}``) and the code reads them from this object, never
    composing one from another. The keys of :data:`SUB_PATHS` left out follow their base."""

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
    # filled from SUB_PATHS when absent (:meth:`_sub_paths_follow_their_base`)
    stage1: str
    train_index: str
    corrections: str
    checkpoint: str
    train_state: str
    train_epochs: str
    train_loss_plot: str
    stage1_metrics: str
    overlays: str
    eval_state: str
    report_md: str
    report_csv: str
    stage1_csv: str

    @model_validator(mode="before")
    @classmethod
    def _sub_paths_follow_their_base(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        return {**derived_paths(data), **data}


def derived_paths(paths: dict[str, Any]) -> dict[str, str]:
    """The keys of :data:`SUB_PATHS`, each placed under its base as ``paths`` (a raw ``paths``
    section) gives it, or under the base's default: ``{"stage1": "<pseudo>/stage1", ...}``."""
    out = {}
    for key, (base, name) in SUB_PATHS.items():
        root = paths.get(base, PathsConfig.model_fields[base].default)
        out[key] = (PurePosixPath(str(root)) / name).as_posix()
    return out


def without_derived_paths(raw: dict[str, Any]) -> dict[str, Any]:
    """Raw params without the sub-paths that only restate :data:`SUB_PATHS` (``paths.stage1`` =
    ``<paths.pseudo>/stage1``); the same settings once parsed, but an overlay merged on top of them
    that moves a base (``paths.pseudo``) then moves those sub-paths with it."""
    paths = raw.get("paths")
    if not isinstance(paths, dict):
        return raw
    derived = derived_paths(paths)
    kept = {k: v for k, v in paths.items() if not (k in derived and v == derived[k])}
    return {**raw, "paths": kept}


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
            # today's models in the three roles (configs/modern.yaml selects it)
            "modern": ModelProfile(clip="ViT-H-14-worldwide/metaclip2_worldwide", sam="sam2.1-hiera-large",
                                   dino="dinov3_vitl16"),
            "demo": ModelProfile(clip="world-clip", sam="world-sam", dino="world-dino"),
            # random miniatures of the same classes: tests of a stage's mechanics, whatever the models see
            "mini": ModelProfile(clip="mini-clip", sam="mini-sam", dino="mini-dino"),
        }
    )
    device: str = "auto"
    dtype: Literal["fp32", "bf16", "fp16"] = "bf16"
    weights_dir: str | None = None
    # the concept teacher's registry name (sam3 | mini-sam3): Stage 1 also writes stage1_sam3; null: the paper's Stage 1
    teacher: str | None = None

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
    synthetic_train_images: int | None = Field(None, ge=1)  # coco_train's twin (the unlabelled set); None: synthetic_images
    seed: int = 0

    def twin_images(self, dataset: str) -> int:
        """Images of ``dataset``'s synthetic twin."""
        if dataset == "coco_train" and self.synthetic_train_images is not None:
            return self.synthetic_train_images
        return self.synthetic_images

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
    """SamAutomaticMaskGenerator settings plus the size filter (paper appendix 1.2): the fields of
    components.labelling.settings.AmgSettings, and Stage1Settings' min_area_frac / max_area_frac."""

    points_per_side: int = Field(32, ge=1)
    points_per_batch: int = Field(64, ge=1)
    pred_iou_thresh: float = Field(0.97, ge=0.0, le=1.0)
    stability_score_thresh: float = Field(0.95, ge=0.0, le=1.0)
    stability_score_offset: float = 1.0
    box_nms_thresh: float = Field(0.7, ge=0.0, le=1.0)
    min_mask_region_area: int = Field(0, ge=0)
    min_area_frac: float = Field(0.001, ge=0.0, le=1.0)
    max_area_frac: float = Field(0.95, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _size_filter_keeps_something(self) -> AmgConfig:
        if self.min_area_frac > self.max_area_frac:
            raise ValueError(f"min_area_frac {self.min_area_frac} > max_area_frac {self.max_area_frac}: "
                             "the size filter would drop every mask")
        return self


class ConceptsConfig(_Section):
    """The concept teacher's Stage 1 (variant stage1_sam3, with ``models.teacher``): the fields of
    components.labelling.concepts.ConceptSettings (thresholds on sigmoid scores, prompts per
    detector pass, which classes are prompted)."""

    presence: float = Field(0.5, ge=0.0, le=1.0)  # a prompt counts when its presence score reaches this
    instance: float = Field(0.5, ge=0.0, le=1.0)  # an instance is painted when query score x presence reaches this
    mask: float = Field(0.5, ge=0.0, le=1.0)      # a pixel is in an instance's mask above this
    pixel: float = Field(0.5, ge=0.0, le=1.0)     # a pixel is labelled when its best score reaches this
    chunk_size: int = Field(16, ge=1)             # prompts per detector pass (memory grows with it)
    prompt: Literal["vocabulary", "detected"] = "vocabulary"  # every class, or those CLIP detects




class LabelConfig(_Section):
    """The fields of components.labelling.settings.Stage1Settings (same names, same types; the size
    filter under ``amg``), plus what picks and feeds the images and classes (vocabulary, templates,
    presence, shards, workers), which flows/label.py reads itself."""

    vocabulary: str = "cocostuff171"
    templates: tuple[str, ...] = ("a photo of a {}.",)
    grid: int = Field(4, ge=1)
    dense_mode: DenseMode = "fmbseg"
    min_crops: int = Field(1, ge=0)  # T: present when a class wins MORE than T crops (the paper's rule)
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
    concepts: ConceptsConfig = ConceptsConfig()  # the concept teacher's Stage 1 (with models.teacher)

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

    @field_validator("vocabulary")
    @classmethod
    def _fits_8bit_label_maps(cls, value: str) -> str:
        # Checked when params.yaml is read, before any model runs: Stage 1's label maps are uint8
        # with 255 = unlabelled, so class indices 0..254. A path that does not exist is the label
        # stage's to name (components/datasets/registry.py reads both kinds of vocabulary).
        from components.datasets.registry import class_list_path, read_class_file

        path = class_list_path(value)
        if path.is_file():
            check_vocabulary(read_class_file(path), source=str(path))
        return value

    @model_validator(mode="after")
    def _semi_needs_labels(self) -> LabelConfig:
        if self.presence == "ground_truth" and not self.ground_truth_dir:
            raise ValueError("label.presence 'ground_truth' needs label.ground_truth_dir (a canonical layout root)")
        return self

    @model_validator(mode="after")
    def _a_class_can_win_enough_crops(self) -> LabelConfig:
        # G x G crops vote; a class is present when it wins MORE than T of them (evaluate-stage1
        # scores this CLIP presence even when label.presence is ground_truth)
        crops = self.grid * self.grid
        if self.min_crops >= crops:
            raise ValueError(f"label.min_crops {self.min_crops} must be below label.grid² = {crops} crops: a class "
                             "is present when it wins more than min_crops of them, so none ever would")
        return self


# --------------------------------------------------------------------------------------- balance
class BalanceConfig(_Section):
    ratio: float = Field(0.75, ge=0.0, le=1.0)
    seed: int = 0
    # share of the images whose map of each variant joins training, over the paper's
    # {stage1_1: 1.0, stage1_2: ratio}; e.g. {stage1_sam3: 1.0} adds the concept teacher's maps
    variants: dict[str, float] = Field(default_factory=dict)

    @field_validator("variants")
    @classmethod
    def _known_shares(cls, shares: dict[str, float]) -> dict[str, float]:
        from components.labelling.settings import LABEL_VARIANTS

        for variant, share in shares.items():
            if variant not in LABEL_VARIANTS:
                raise ValueError(f"unknown variant {variant!r}; known: {', '.join(LABEL_VARIANTS)}")
            if not 0.0 <= share <= 1.0:
                raise ValueError(f"the share of {variant} must be in [0, 1], got {share}")
        return shares

    def shares(self) -> dict[str, float]:
        """Share of the images per variant: the paper's {stage1_1: 1.0, stage1_2: ratio}, then ``variants``."""
        return {"stage1_1": 1.0, "stage1_2": self.ratio, **self.variants}


# -------------------------------------------------------------------------------------- features
class FeaturesConfig(_Section):
    """``image_size``: the student's input side, a multiple of its patch (checked against the spec by
    the model stages, flows/common.check_models: the registry imports the model libraries)."""

    image_size: int = Field(518, ge=1)
    batch_size: int = Field(16, ge=1)
    shard_size: int = Field(512, ge=1)
    cache: bool = True
    num_workers: int = Field(2, ge=0)


# ------------------------------------------------------------------------------- aligner / train
class AlignerConfig(_Section):
    """The aligner's fields of components.aligner.settings.TrainSettings (same names, same types)."""

    kind: AlignerKind = "transformer"
    num_heads: int = Field(8, ge=1)


class TrainConfig(_Section):
    """The training fields of components.aligner.settings.TrainSettings (same names, same types),
    plus ``num_workers`` (data loading, which cannot change the weights)."""

    loss: LossName = "tsupcon"
    temperature: float = Field(1.0, gt=0.0)
    lr: float = Field(0.1, gt=0.0)
    momentum: float = Field(0.9, ge=0.0)
    weight_decay: float = Field(0.01, ge=0.0)
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(5, ge=1)
    seed: int = 0
    num_workers: int = Field(2, ge=0)


# ------------------------------------------------------------------------------------- evaluate
PROTOCOLS_DIR = Path(__file__).resolve().parents[1] / "configs" / "protocols"
TEMPLATE_SETS: tuple[str, ...] = ("imagenet80",)


def template_set(name: str) -> tuple[str, ...]:
    """A named set of prompt templates: ``imagenet80`` = OpenAI's 80 ImageNet templates (CLIP's
    zero-shot notebook; the set SCLIP, ClearCLIP, ProxyCLIP and Trident prompt with), as open_clip
    ships them, written with ``{}`` for the class name."""
    if name not in TEMPLATE_SETS:
        raise ValueError(f"unknown template set {name!r}; template sets: {', '.join(TEMPLATE_SETS)} (or a list)")
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    return tuple(template("{}") for template in OPENAI_IMAGENET_TEMPLATES)


def shipped_protocols() -> list[str]:
    """Names of the evaluation protocols shipped in configs/protocols/ (``evaluate.protocol``)."""
    return sorted(p.stem for p in PROTOCOLS_DIR.glob("*.yaml"))


class EvaluateSettings(_Section):
    """The settings of one benchmark's evaluation: ``evaluate`` itself, or evaluate merged with
    the protocol's and then ``evaluate.overrides.<benchmark>`` (:meth:`EvaluateConfig.for_benchmark`).
    ``templates``: a list, or the name of a template set (:func:`template_set`)."""

    split: str = "val"
    short_side: int | None = Field(448, ge=1)
    window: int = Field(448, ge=1)  # pixels; windows are zero-padded to the student's patch grid
    stride: int = Field(224, ge=1)
    templates: tuple[str, ...] = ("a photo of a {}.",)
    bg_threshold: float | None = None
    logit_scale: float | None = Field(None, gt=0.0)  # set: bg_threshold compares softmax(scale * cosine) probabilities
    synonyms: Literal["mean", "max"] = "mean"  # a class line's synonyms: one mean prototype | one prompt each, max
    bg_prompts: bool = True  # add the benchmark's extra background prompts (PV-21: the COCO-Stuff stuff classes)
    refine: bool = True
    amg: AmgConfig = AmgConfig(pred_iou_thresh=0.88, min_area_frac=0.0, max_area_frac=1.0)
    batch_size: int = Field(8, ge=1)
    limit: int | None = Field(None, ge=1)
    overlays: int = Field(4, ge=0)

    @field_validator("templates", mode="before")
    @classmethod
    def _named_template_set(cls, value: Any) -> Any:
        return template_set(value) if isinstance(value, str) else value


def _known_benchmarks(value: dict[str, EvaluateSettings]) -> dict[str, EvaluateSettings]:
    """Per-benchmark overrides name labelled benchmarks of the registry only."""
    from components.datasets.registry import BENCHMARKS

    labelled = [name for name, spec in BENCHMARKS.items() if spec.labelled]
    unknown = sorted(set(value) - set(labelled))
    if unknown:
        raise ValueError(f"unknown benchmark {unknown[0]!r}; benchmarks: {', '.join(labelled)}")
    return value


class ProtocolFile(EvaluateSettings):
    """A configs/protocols/<name>.yaml file: the evaluate settings one published protocol fixes
    (only the keys it writes), per-benchmark ``overrides``, and where the values come from."""

    description: str
    source: str
    overrides: dict[str, EvaluateSettings] = Field(default_factory=dict)

    @field_validator("overrides")
    @classmethod
    def _overrides_known(cls, value: dict[str, EvaluateSettings]) -> dict[str, EvaluateSettings]:
        return _known_benchmarks(value)


def _settings_set(settings: EvaluateSettings) -> dict[str, Any]:
    """The keys given for `settings` (not the defaults filled in), as plain JSON types."""
    return settings.model_dump(mode="json", exclude_unset=True, include=set(EvaluateSettings.model_fields))


def load_protocol(spec: str) -> ProtocolFile:
    """``evaluate.protocol``: a shipped protocol's name (configs/protocols/<name>.yaml) or a path."""
    path = PROTOCOLS_DIR / f"{spec}.yaml" if spec in shipped_protocols() else Path(spec)
    if not path.is_file():
        raise ValueError(f"unknown protocol {spec!r}; shipped protocols: {', '.join(shipped_protocols())} (or a path)")
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    try:
        return ProtocolFile.model_validate(raw)
    except ValidationError as err:
        raise ValueError(f"protocol file {path} is not valid: {err}") from None


class EvaluateConfig(EvaluateSettings):
    """``evaluate``: the benchmarks, their shared settings, and ``overrides``: benchmark -> the
    settings it changes (``{cityscapes: {short_side: 560}, pv21: {bg_threshold: 0.3}}``; only the
    keys given there change, ``amg`` key by key)."""

    benchmarks: tuple[str, ...] = ("pv21", "pv20", "pc59", "co80", "cs171", "cityscapes", "ade20k")
    stage1_benchmarks: tuple[str, ...] = ("pv21",)  # Stage 1 pseudo labels scored on these (Table 2; evaluate-stage1)
    protocol: str | None = None
    overrides: dict[str, EvaluateSettings] = Field(default_factory=dict)

    @field_validator("stage1_benchmarks")
    @classmethod
    def _stage1_labelled(cls, names: tuple[str, ...]) -> tuple[str, ...]:
        _known_benchmarks(dict.fromkeys(names))
        return names

    @field_validator("overrides")
    @classmethod
    def _overrides_known(cls, value: dict[str, EvaluateSettings]) -> dict[str, EvaluateSettings]:
        return _known_benchmarks(value)

    @field_serializer("overrides")
    def _only_what_is_set(self, value: dict[str, EvaluateSettings]) -> dict[str, Any]:
        # what the user wrote, not every default of the override (flatten -> MLflow params)
        return {name: s.model_dump(mode="json", exclude_unset=True) for name, s in value.items()}

    @model_validator(mode="after")
    def _protocol_is_not_contradicted(self) -> EvaluateConfig:
        # A protocol wins over evaluate's shared keys (params.yaml spells out every default), so a
        # key changed from its default that the protocol sets otherwise would be silently lost.
        if self.protocol is None:
            return self
        fixed = _settings_set(load_protocol(self.protocol))
        ours = self.model_dump(mode="json", include=set(fixed))
        defaults = EvaluateSettings().model_dump(mode="json", include=set(fixed))
        for key, value in fixed.items():
            if ours[key] != defaults[key] and ours[key] != value:
                raise ValueError(f"evaluate.{key} is {ours[key]!r} but protocol {self.protocol!r} sets {value!r}: "
                                 "change it per benchmark in evaluate.overrides, or set evaluate.protocol: null")
        return self

    @model_validator(mode="after")
    def _windows_cover_every_pixel(self) -> EvaluateConfig:
        # each benchmark's effective settings: a layer (override, protocol) may set one of the two
        names = [None, *self.benchmarks, *self.overrides]
        if self.protocol is not None:
            names += list(load_protocol(self.protocol).overrides)
        for name in dict.fromkeys(names):
            settings = self.for_benchmark(name)
            if settings.stride > settings.window:
                where = "" if name is None else f" for {name} (its protocol and overrides applied)"
                raise ValueError(f"evaluate.stride {settings.stride} > evaluate.window {settings.window}{where} leaves "
                                 "pixels that no sliding window covers; set stride <= window")
        return self

    @model_validator(mode="after")
    def _bg_threshold_needs_background(self) -> EvaluateConfig:
        from components.datasets.registry import BENCHMARKS

        protocol = load_protocol(self.protocol).overrides if self.protocol is not None else {}
        names = [n for n in dict.fromkeys([*self.benchmarks, *protocol, *self.overrides]) if n in BENCHMARKS]
        without = [n for n in names if self.for_benchmark(n).bg_threshold is not None
                   and BENCHMARKS[n].background != "class0"]
        if without:
            raise ValueError(f"bg_threshold is set for {', '.join(without)}: no background class to assign "
                             "there; set it per benchmark (evaluate.overrides: {pv21: {bg_threshold: ...}})")
        unused = [n for n in names if self.for_benchmark(n).logit_scale is not None
                  and self.for_benchmark(n).bg_threshold is None]
        if unused:
            raise ValueError(f"logit_scale is set for {', '.join(unused)} without a bg_threshold: it only scales "
                             "the probabilities that threshold compares")
        return self

    def for_benchmark(self, name: str | None) -> EvaluateSettings:
        """The effective settings of benchmark `name`, each layer over the last: evaluate's shared
        keys, the protocol's (``evaluate.protocol``), the protocol's for `name`, then
        ``evaluate.overrides.<name>``. None: no benchmark's (what a checkpoint records)."""
        merged = self.model_dump(mode="json", include=set(EvaluateSettings.model_fields))
        layers = []
        if self.protocol is not None:
            protocol = load_protocol(self.protocol)
            layers.append(protocol)
            layers.append(protocol.overrides.get(name) if name is not None else None)
        layers.append(self.overrides.get(name) if name is not None else None)
        for layer in layers:
            if layer is not None:
                merged = deep_merge(merged, _settings_set(layer))
        return EvaluateSettings.model_validate(merged)


# -------------------------------------------------------------------------------------- tracking
class TrackingConfig(_Section):
    experiment: str = "fmbseg"
    tracking_uri: str | None = None
    registered_model: str = "fmbseg-aligner"


# ----------------------------------------------------------------------------------------- serve
class ServeConfig(_Section):
    """What the logged model takes in one request (``mlflow models serve``, ``flows/serving.py``):
    more is refused with a 400 before any compute. Recorded in each model when a run logs it (its
    MLmodel's pyfunc ``config``), so that a served model keeps the budgets it was logged with. The
    work of a request is at most max_pixels x max_classes upsampled scores."""

    max_pixels: int = Field(16_777_216, ge=1)  # the images of one request together (4096 x 4096)
    max_classes: int = Field(1024, ge=1, le=MAX_LABEL_CLASSES)  # the classes of one row (16-bit maps: <= 65535)


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
    serve: ServeConfig = ServeConfig()
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




def check_vocabulary(lines: list[str], *, source: str, unit: str = "line") -> list[str]:
    """A vocabulary's class lines, or ConfigError naming ``source``: not empty, no class name (the
    first name of a line, case-insensitive) twice, and at most MAX_LABEL_CLASSES classes (what 16-bit
    label maps hold). unit: what the error calls a line ("line", or "class" in a list)."""
    if not lines:
        raise ConfigError(f"{source} holds no class names: a vocabulary lists one class per line")
    seen: dict[str, int] = {}
    for number, line in enumerate(lines, start=1):
        name = line.split(",")[0].strip().lower()
        if name in seen:
            raise ConfigError(f"{source}: class {name!r} appears more than once ({unit}s {seen[name]} and {number})")
        seen[name] = number
    if len(lines) > MAX_LABEL_CLASSES:
        raise ConfigError(f"{source} has {len(lines)} classes; label maps are at most 16-bit (65535 = unlabelled), so a "
                          f"vocabulary holds at most {MAX_LABEL_CLASSES}: split it or merge synonyms into one line ('a, b')")
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
        elif e["type"] == "value_error":  # a validator's own message names the settings and values
            lines.append(f"  - {key}: {e['msg'].removeprefix('Value error, ')}")
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
