"""The sections of params.yaml, one frozen model each (``paths``: paths.py, ``evaluate``:
protocols.py, all of them together: params.py)."""

from __future__ import annotations

from typing import Literal

from pydantic import (
    Field,
    field_validator,
    model_validator,
)

from components.aligner.settings import AlignerKind, LossName
from components.config.base import Section
from components.config.errors import ConfigError
from components.io import MAX_LABEL_CLASSES
from components.labelling.settings import DenseMode


# ---------------------------------------------------------------------------------------- models
class ModelProfile(Section):
    """Registry names (components/models/registry.py) of the three foundation models."""

    clip: str
    sam: str
    dino: str


class ModelsConfig(Section):
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
class DatasetOverride(Section):
    """Per-dataset mirror (``url``) or data the user already has (``root``, used in place)."""

    url: str | None = None
    root: str | None = None


class DownloadConfig(Section):
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
class AmgConfig(Section):
    """SamAutomaticMaskGenerator settings plus the size filter (paper appendix 1.2): the fields of
    components.labelling.settings.AmgSettings, one for one and in its order."""

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


class ConceptsConfig(Section):
    """The concept teacher's Stage 1 (variant stage1_sam3, with ``models.teacher``): the fields of
    components.labelling.concepts.ConceptSettings (thresholds on sigmoid scores, prompts per
    detector pass, which classes are prompted)."""

    presence: float = Field(0.5, ge=0.0, le=1.0)  # a prompt counts when its presence score reaches this
    instance: float = Field(0.5, ge=0.0, le=1.0)  # an instance is painted when query score x presence reaches this
    mask: float = Field(0.5, ge=0.0, le=1.0)      # a pixel is in an instance's mask above this
    pixel: float = Field(0.5, ge=0.0, le=1.0)     # a pixel is labelled when its best score reaches this
    chunk_size: int = Field(16, ge=1)             # prompts per detector pass (memory grows with it)
    prompt: Literal["vocabulary", "detected"] = "vocabulary"  # every class, or those CLIP detects






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


class LabelConfig(Section):
    """The fields of components.labelling.settings.Stage1Settings (same names, same types), plus what picks and feeds the images and classes (vocabulary, templates,
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
class BalanceConfig(Section):
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
class FeaturesConfig(Section):
    """``image_size``: the student's input side, a multiple of its patch (checked against the spec by
    the model stages, flows/common.check_models: the registry imports the model libraries)."""

    image_size: int = Field(518, ge=1)
    batch_size: int = Field(16, ge=1)
    shard_size: int = Field(512, ge=1)
    cache: bool = True
    num_workers: int = Field(2, ge=0)


# ------------------------------------------------------------------------------- aligner / train
class AlignerConfig(Section):
    """The aligner's fields of components.aligner.settings.TrainSettings (same names, same types)."""

    kind: AlignerKind = "transformer"
    num_heads: int = Field(8, ge=1)


class TrainConfig(Section):
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




# -------------------------------------------------------------------------------------- tracking
class TrackingConfig(Section):
    experiment: str = "fmbseg"
    tracking_uri: str | None = None
    registered_model: str = "fmbseg-aligner"


# ----------------------------------------------------------------------------------------- serve
class ServeConfig(Section):
    """What the logged model takes in one request (``mlflow models serve``, ``flows/serving.py``):
    more is refused with a 400 before any compute. Recorded in each model when a run logs it (its
    MLmodel's pyfunc ``config``), so that a served model keeps the budgets it was logged with. The
    work of a request is at most max_pixels x max_classes upsampled scores."""

    max_pixels: int = Field(16_777_216, ge=1)  # the images of one request together (4096 x 4096)
    max_classes: int = Field(1024, ge=1, le=MAX_LABEL_CLASSES)  # the classes of one row (16-bit maps: <= 65535)


# ----------------------------------------------------------------------------------- orchestration
class OrchestrationConfig(Section):
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


class NightlyConfig(Section):
    source_dir: str | None = None
    benchmarks: tuple[str, ...] = ("pv21", "cs171")
    metric: str = "mIoU_base"
    dvc_remote: str | None = None
