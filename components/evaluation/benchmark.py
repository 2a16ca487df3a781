"""Scoring a segmenter on a canonical benchmark (paper §4), resumable per batch of images.

The pieces, in the order the evaluate stages string them together:

- :func:`benchmark_prompts`: the prompts of a benchmark and the class each votes for (PV-21 adds
  the COCO-Stuff stuff classes, all mapped to background; paper §4.1).
- FMbSeg Stage 2 itself is ``components.segmenter.Segmenter`` (the one inference path that
  predict and the MLflow model run too); the loop scores it fixed to a benchmark's prompts
  (``VocabularySegmenter``).
- :class:`Stage1Segmenter`: Stage 1's pseudo label map of one image, to score it (Table 2).
- :func:`evaluate_batch`: a batch of image ids -> partial confusion matrices (small, plain lists),
  the ids scored, the ids that could not be read (reported, left out of the metric); overlay
  pictures for the chosen ids. A segmenter is any callable ``[H, W, 3] uint8 -> Prediction``.
- :class:`EvalState`: the dataset-level confusion matrices and the ids done so far, saved
  atomically after each batch (:func:`save_state`) under a key of the model and settings
  (:func:`state_key`); a rerun with the same key skips what is done, any other key starts over.
- :func:`summarize` / :func:`write_summary`: the metrics (mIoU / mAcc / aAcc per variant, from one
  dataset-level confusion matrix) and the per-class table.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from segment_anything.modeling import Sam
from torch import Tensor, nn

from components.datasets.readers import UnreadableImageError
from components.evaluation.inference import PromptSet, build_prompt_set
from components.evaluation.metrics import MeanIoU
from components.evaluation.overlay import write_overlay
from components.evaluation.paper_numbers import STAGE1_VARIANTS
from components.io import UNLABELLED, atomic_write_bytes, atomic_write_json, atomic_write_text
from components.labelling.stage1 import Stage1Settings, label_image
from components.segmenter import Prediction, size_filter

__all__ = [
    "IGNORE_INDEX",
    "STATE_FORMAT",
    "Prediction",
    "SegmentFn",
    "LabelledImages",
    "benchmark_prompts",
    "background_index",
    "STAGE1_VARIANTS",
    "Stage1Segmenter",
    "size_filter",
    "BatchResult",
    "evaluate_batch",
    "write_overlays",
    "EvalState",
    "state_key",
    "load_state",
    "save_state",
    "EvalSummary",
    "summarize",
    "write_summary",
    "display_names",
]

IGNORE_INDEX = UNLABELLED
STATE_FORMAT = 1
BACKGROUND_HANDLING: tuple[str, ...] = ("class0", "ignored", "none")

# What the readers raise for a file that is missing, truncated or not an image: the image reader's
# UnreadableImageError; for a label PNG, PIL's errors (UnidentifiedImageError is an OSError) or
# decode_label_png's ValueError.
_UNREADABLE = (UnreadableImageError, OSError, ValueError)


SegmentFn = Callable[[np.ndarray], Prediction]
"""[H, W, 3] uint8 RGB image -> :class:`Prediction` (e.g. a components.segmenter.VocabularySegmenter)."""


class LabelledImages(Protocol):
    """What the loop reads from a benchmark (components.datasets.readers.CanonicalDataset)."""

    def read_image(self, image_id: str) -> np.ndarray: ...

    def read_label(self, image_id: str) -> np.ndarray: ...


# -------------------------------------------------------------------------------------- prompts
SYNONYM_RULES: tuple[str, ...] = ("mean", "max")


def benchmark_prompts(
    class_lines: Sequence[str], meta: Mapping[str, Any], *, synonyms: str = "mean", background_prompts: bool = True
) -> PromptSet:
    """The prompts a benchmark is evaluated with (paper §4.1) and the class each one votes for.

    class_lines: the benchmark's classes.txt lines (synonyms kept); meta: its meta.json. Most
    benchmarks prompt only their own classes; one whose meta lists ``extra_background_classes``
    (PV-21: the COCO-Stuff stuff classes) adds those prompts, every one mapped to background
    (class 0, which its meta must declare with ``"background": "class0"``), unless
    `background_prompts` is False (background then comes from a threshold alone).
    synonyms: "mean" (one prompt per line, its prototype the mean over the line's synonyms) or
    "max" (one prompt per synonym, so a class scores the max over its synonyms: SCLIP's rule).
    """
    if synonyms not in SYNONYM_RULES:
        raise ValueError(f"synonyms must be one of {list(SYNONYM_RULES)}, got {synonyms!r}")
    extra = (meta.get("extra_background_classes") or []) if background_prompts else []
    if not extra:
        prompts = PromptSet(list(class_lines), torch.arange(len(class_lines), dtype=torch.int64))
    else:
        index = background_index(meta)
        if index is None:
            raise ValueError(f"meta.json lists extra background prompts but background is "
                             f"{meta.get('background')!r}, not 'class0'")
        prompts = build_prompt_set(class_lines, extra, background_index=index)
    if synonyms == "max":
        pairs = [(s.strip(), c) for line, c in zip(prompts.names, prompts.class_map.tolist(), strict=True)
                 for s in line.split(",") if s.strip()]
        prompts = PromptSet([s for s, _ in pairs], torch.tensor([c for _, c in pairs], dtype=torch.int64))
    return prompts


def background_index(meta: Mapping[str, Any]) -> int | None:
    """Class index of background when the benchmark scores it (meta background "class0": 0), else
    None ("ignored": background pixels are 255; "none": there is no background)."""
    handling = meta.get("background")
    if handling not in BACKGROUND_HANDLING:
        raise ValueError(f"meta.json background must be one of {list(BACKGROUND_HANDLING)}, got {handling!r}")
    return 0 if handling == "class0" else None


class Stage1Segmenter:
    """Stage 1's pseudo label map of one image as a prediction, to score it (paper Table 2).

    variant: "stage1_1" | "stage1_2" | "semi". clip_model / clip_mean / clip_std / clip_image_size:
    the CLIP of Stage 1; sam: SAM; prototypes: [K', D] prompt prototypes; class_map: [K'] int64
    prompt -> dataset class; num_classes: C; settings: Stage 1's settings (params.yaml ``label``).
    Only the steps the variant needs run (Stage 1.1 alone skips the automatic masks). The label
    map (SAM frame) is resized to the image by nearest sampling; unlabelled pixels (255) become
    class C, an extra "unlabelled" column of the confusion matrix (``summarize(...,
    unlabelled_column=True)``), so they count as misses.
    """

    def __init__(
        self,
        *,
        variant: str,
        clip_model: nn.Module,
        clip_mean: Sequence[float],
        clip_std: Sequence[float],
        clip_image_size: int,
        sam: Sam,
        prototypes: Tensor,
        class_map: Tensor,
        num_classes: int,
        settings: Stage1Settings,
    ) -> None:
        if variant not in STAGE1_VARIANTS:
            raise ValueError(f"unknown Stage 1 variant {variant!r}; supported: {list(STAGE1_VARIANTS)}")
        if prototypes.ndim != 2 or class_map.shape != (prototypes.shape[0],):
            raise ValueError(
                f"prototypes must be [K, D] and class_map [K]; got {tuple(prototypes.shape)} and "
                f"{tuple(class_map.shape)}"
            )
        if prototypes.shape[0] > IGNORE_INDEX:
            raise ValueError(f"{prototypes.shape[0]} prompts; Stage 1's label maps are 8-bit (255 = unlabelled), "
                             f"so at most {IGNORE_INDEX}")
        self.variant = variant
        self.clip_model, self.clip_image_size = clip_model, clip_image_size
        self.clip_mean, self.clip_std = tuple(clip_mean), tuple(clip_std)
        self.sam, self.prototypes, self.settings = sam, prototypes, settings
        self.num_classes = num_classes
        # prompt index -> dataset class, and 255 (unlabelled) -> the extra column C
        lookup = torch.full((256,), num_classes, dtype=torch.int64)
        lookup[: class_map.shape[0]] = class_map.cpu()
        self.lookup = lookup

    @torch.no_grad()
    def label(self, image: np.ndarray, image_classes: Sequence[int] | None = None) -> Tensor:
        """The variant's pseudo label map in the SAM frame: [s, s] uint8 prompt index, 255 = unlabelled."""
        variant = "stage1_2" if self.variant == "stage1_2" else "stage1_1"  # semi: Stage 1.1 with labels
        result = label_image(
            image, clip_model=self.clip_model, clip_mean=self.clip_mean, clip_std=self.clip_std,
            clip_image_size=self.clip_image_size, sam=self.sam, prototypes=self.prototypes, settings=self.settings,
            image_classes=list(image_classes) if image_classes is not None else None, variants=(variant,),
        )
        detail = result.stage1_2_detail if variant == "stage1_2" else result.stage1_1_detail
        return detail.label

    def __call__(self, image: np.ndarray, image_classes: Sequence[int] | None = None) -> Prediction:
        """[H, W, 3] uint8 RGB -> Prediction(base=[H, W] int64 in [0, C], C = unlabelled, refined=None).

        image_classes: the dataset classes present (ground truth), required by "semi" and refused
        by the others (which detect presence with CLIP).
        """
        if (self.variant == "semi") != (image_classes is not None):
            raise ValueError(f"variant {self.variant!r}: image_classes must be given exactly for 'semi'")
        label = self.label(image, image_classes)
        height, width = image.shape[:2]
        resized = F.interpolate(label[None, None].float(), size=(height, width), mode="nearest-exact")[0, 0]
        return Prediction(self.lookup[resized.long().cpu()], None)


# ------------------------------------------------------------------------------------- the loop
class BatchResult(NamedTuple):
    """What one batch of images adds to the evaluation: plain types, cheap to send between workers."""

    done: list[str]
    """ids scored."""
    skipped: dict[str, str]
    """id -> why it could not be read (left out of the metric)."""
    confusion: dict[str, list[list[int]]]
    """variant ("base", "refined") -> [C, C] confusion counts, rows = ground truth."""


def _check_variants(variants: Sequence[str]) -> None:
    unknown = [v for v in variants if v not in Prediction._fields]
    if unknown or not variants:
        raise ValueError(f"variants must be a non-empty subset of {Prediction._fields}, got {list(variants)}")


def _variant_maps(prediction: Prediction, variants: Sequence[str], image_id: str) -> dict[str, Tensor]:
    maps = {}
    for variant in variants:
        pred = getattr(prediction, variant)
        if pred is None:
            raise ValueError(f"the segmenter returned no {variant!r} prediction for {image_id!r}")
        maps[variant] = pred.cpu()
    return maps


def _overlay(overlay_dir: str | Path, image_id: str, image: np.ndarray, label: np.ndarray,
             maps: Mapping[str, Tensor], class_names: Sequence[str]) -> Path:
    predictions = {v: m.numpy().astype(np.uint8) for v, m in maps.items()}
    return write_overlay(Path(overlay_dir) / f"{image_id}.png", image, label, predictions, class_names)


def _image_classes(label: np.ndarray) -> list[int]:
    """Classes present in a [H, W] uint8 ground truth (255 = ignore left out), ascending."""
    present = np.unique(label)
    return [int(c) for c in present if c != IGNORE_INDEX]


def _pair_problem(image: np.ndarray, label: np.ndarray, num_classes: int) -> str:
    """Why an (image, label) pair cannot be scored, or ''."""
    if image.shape[:2] != label.shape:
        return f"the image is {image.shape[:2]} but its label is {label.shape}"
    wild = np.unique(label[(label >= num_classes) & (label != IGNORE_INDEX)])
    if wild.size:
        return (f"the label has values {wild[:8].tolist()} outside the benchmark's {num_classes} classes "
                f"(0..{num_classes - 1}, {IGNORE_INDEX} = ignore)")
    return ""


def evaluate_batch(
    dataset: LabelledImages,
    ids: Sequence[str],
    *,
    segment: SegmentFn,
    num_classes: int,
    variants: Sequence[str],
    class_names: Sequence[str] = (),
    overlay_ids: Sequence[str] = (),
    overlay_dir: str | Path | None = None,
    image_level_labels: bool = False,
) -> BatchResult:
    """Score `segment` on the images `ids` of `dataset`.

    variants: the Prediction fields scored ("base", and "refined" when the segmenter refines).
    image_level_labels: call ``segment(image, image_classes=...)`` with the classes present in the
    ground truth (the semi-supervised Stage 1.1 of Table 2); otherwise ``segment(image)``.
    A pair that cannot be scored is recorded in ``skipped`` with the reason and left out: an image
    or label that cannot be read, an image and label of different sizes, a label with values
    >= num_classes (other than 255). For ids in
    `overlay_ids`, an overlay picture (image | ground truth | each variant, legend from
    `class_names`) is written to ``overlay_dir/<id>.png`` from the same prediction.
    """
    _check_variants(variants)
    if overlay_ids and overlay_dir is None:
        raise ValueError("overlay_ids given without an overlay_dir")
    metrics = {v: MeanIoU(num_classes, ignore_index=IGNORE_INDEX) for v in variants}
    done: list[str] = []
    skipped: dict[str, str] = {}
    wanted_overlays = set(overlay_ids)
    for image_id in ids:
        try:
            image = dataset.read_image(image_id)
            label = dataset.read_label(image_id)
        except _UNREADABLE as err:
            skipped[image_id] = f"{type(err).__name__}: {err}"
            continue
        problem = _pair_problem(image, label, num_classes)
        if problem:
            skipped[image_id] = problem
            continue
        prediction = segment(image, image_classes=_image_classes(label)) if image_level_labels else segment(image)
        maps = _variant_maps(prediction, variants, image_id)
        target = torch.from_numpy(label)
        for variant, pred in maps.items():
            metrics[variant].update(pred, target)
        done.append(image_id)
        if image_id in wanted_overlays:
            _overlay(overlay_dir, image_id, image, label, maps, class_names)  # type: ignore[arg-type]
    return BatchResult(done=done, skipped=skipped, confusion={v: m.confusion.cpu().tolist() for v, m in metrics.items()})


def write_overlays(
    dataset: LabelledImages,
    ids: Sequence[str],
    *,
    segment: SegmentFn,
    variants: Sequence[str],
    class_names: Sequence[str],
    overlay_dir: str | Path,
    image_level_labels: bool = False,
) -> list[Path]:
    """Overlay pictures of `ids` on their own (e.g. those a resumed run scored before, whose
    pictures are gone): ``overlay_dir/<id>.png`` each. Unreadable images raise."""
    _check_variants(variants)
    paths = []
    for image_id in ids:
        image, label = dataset.read_image(image_id), dataset.read_label(image_id)
        prediction = segment(image, image_classes=_image_classes(label)) if image_level_labels else segment(image)
        maps = _variant_maps(prediction, variants, image_id)
        paths.append(_overlay(overlay_dir, image_id, image, label, maps, class_names))
    return paths


# ------------------------------------------------------------------------------------ the state
@dataclass
class EvalState:
    """Dataset-level confusion matrices so far, and which images they hold.

    confusion: variant -> [C, C] int64 (rows = ground truth); done: ids scored, in the order they
    were added; skipped: id -> why it could not be read.
    """

    key: str
    confusion: dict[str, Tensor]
    done: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)

    @classmethod
    def fresh(cls, key: str, num_classes: int, variants: Sequence[str]) -> EvalState:
        """An empty state: zero confusion matrices for each variant."""
        return cls(key, {v: torch.zeros(num_classes, num_classes, dtype=torch.int64) for v in variants})

    def covered(self) -> set[str]:
        """ids already handled (scored or found unreadable)."""
        return set(self.done) | set(self.skipped)

    def add(self, result: BatchResult) -> None:
        """Merge a batch's counts and ids into the state."""
        if set(result.confusion) != set(self.confusion):
            raise ValueError(f"batch has variants {sorted(result.confusion)}, the state {sorted(self.confusion)}")
        overlap = self.covered() & (set(result.done) | set(result.skipped))
        if overlap:
            raise ValueError(f"images counted twice: {sorted(overlap)[:5]}")
        for variant, counts in result.confusion.items():
            self.confusion[variant] += torch.tensor(counts, dtype=torch.int64)
        self.done.extend(result.done)
        self.skipped.update(result.skipped)


def state_key(model_sha256: str, settings: Mapping[str, Any]) -> str:
    """sha256 of the model file's hash and the (JSON-serialisable) settings that change results."""
    text = json.dumps({"model": model_sha256, "settings": settings}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def save_state(path: str | Path, state: EvalState) -> None:
    """Write the state atomically (one torch.save of plain types; loads with weights_only=True)."""
    payload = {
        "format": STATE_FORMAT,
        "key": state.key,
        "confusion": {v: c.cpu() for v, c in state.confusion.items()},
        "done": list(state.done),
        "skipped": dict(state.skipped),
    }
    buf = io.BytesIO()
    torch.save(payload, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_state(path: str | Path, key: str, num_classes: int, variants: Sequence[str]) -> EvalState:
    """The saved state when it exists and has this `key` (same model and settings); else a fresh one."""
    path = Path(path)
    if not path.exists():
        return EvalState.fresh(key, num_classes, variants)
    saved = torch.load(path, map_location="cpu", weights_only=True)
    if saved.get("format") != STATE_FORMAT or saved.get("key") != key:
        return EvalState.fresh(key, num_classes, variants)
    confusion = saved["confusion"]
    shapes_ok = all(c.shape == (num_classes, num_classes) for c in confusion.values())
    if set(confusion) != set(variants) or not shapes_ok:
        raise ValueError(f"{path} has the key of this run but other variants or classes: delete it and rerun")
    return EvalState(key, dict(confusion), list(saved["done"]), dict(saved["skipped"]))


# ---------------------------------------------------------------------------------- the summary
class EvalSummary(NamedTuple):
    """metrics: {"mIoU_base": 41.23, "mAcc_base", "aAcc_base", [..._refined], "images", "skipped"}
    (percent, 2 decimals; images = scored, skipped = unreadable); per_class: one row per class
    {"class": name, "IoU_<variant>": float (NaN when undefined), "Acc_<variant>": float}."""

    metrics: dict[str, float | int]
    per_class: list[dict[str, Any]]


def display_names(class_lines: Sequence[str]) -> list[str]:
    """The protocol's name of each class: the first of a line's comma-separated synonyms."""
    return [line.split(",")[0].strip() for line in class_lines]


def _nanmean(values: Sequence[float]) -> float:
    defined = [v for v in values if not math.isnan(v)]
    return sum(defined) / len(defined) if defined else math.nan


def summarize(state: EvalState, class_names: Sequence[str], *, unlabelled_column: bool = False) -> EvalSummary:
    """Dataset-level metrics of every variant (``MeanIoU.compute``), rounded to 2 decimals.

    unlabelled_column: the confusion matrices have one column more than `class_names`, the
    prediction "unlabelled" (Stage 1's 255 pixels): it counts as a miss of the ground-truth class
    (in IoU's FN and Acc's denominator) but is no class of its own, so it is left out of the means
    and of the per-class rows. Raises ValueError when no image was scored.
    """
    if not state.done:
        raise ValueError(f"no image was scored ({len(state.skipped)} could not be read)")
    metrics: dict[str, float | int] = {}
    num_scored = len(class_names)
    rows = [{"class": name} for name in class_names]
    for variant, confusion in state.confusion.items():
        size = confusion.shape[0]
        if size != num_scored + int(unlabelled_column):
            raise ValueError(f"{num_scored} class names for a {size}-class confusion matrix "
                             f"(unlabelled_column={unlabelled_column})")
        meter = MeanIoU(size, ignore_index=IGNORE_INDEX)
        meter.load_state_dict({"num_classes": size, "ignore_index": IGNORE_INDEX, "confusion": confusion})
        result = meter.compute()
        class_iou, class_acc = result["IoU"][:num_scored], result["Acc"][:num_scored]
        result.update(mIoU=_nanmean(class_iou), mAcc=_nanmean(class_acc))
        for name in ("mIoU", "mAcc", "aAcc"):
            metrics[f"{name}_{variant}"] = round(result[name], 2)
        for row, iou, acc in zip(rows, class_iou, class_acc, strict=True):
            row[f"IoU_{variant}"] = round(iou, 2)
            row[f"Acc_{variant}"] = round(acc, 2)
    metrics["images"] = len(state.done)
    metrics["skipped"] = len(state.skipped)
    return EvalSummary(metrics, rows)


def _csv_cell(value: Any) -> Any:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.2f}"
    return value


def write_summary(summary: EvalSummary, metrics_path: str | Path, per_class_path: str | Path) -> None:
    """metrics JSON (the DVC metrics file) and the per-class CSV (NaN written as "nan"), atomically."""
    atomic_write_json(metrics_path, summary.metrics)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(summary.per_class[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: _csv_cell(v) for k, v in row.items()} for row in summary.per_class)
    atomic_write_text(per_class_path, buf.getvalue())
