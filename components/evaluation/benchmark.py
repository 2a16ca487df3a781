"""Scoring a segmenter on a canonical benchmark (paper §4), resumable per batch of images.

The pieces, in the order the evaluate stages string them together:

- components/evaluation/prompts.py: the prompts of a benchmark and the class each votes for
  (PV-21 adds the COCO-Stuff stuff classes, all mapped to background; paper §4.1).
- FMbSeg Stage 2 itself is ``components.segmenter.Segmenter`` (the one inference path that
  predict and the MLflow model run too); the loop scores it fixed to a benchmark's prompts
  (``VocabularySegmenter``).
- components/evaluation/stage1.py: Stage 1's pseudo label map of one image, to score it (Table 2).
- :func:`evaluate_batch`: a batch of image ids -> partial confusion matrices (small, plain lists),
  the ids scored, the ids that could not be read (reported, left out of the metric); overlay
  pictures for the chosen ids. A segmenter is any callable ``[H, W, 3] uint8 -> Prediction``.
- :class:`EvalState`: the dataset-level confusion matrices and the ids done so far, saved
  atomically after each batch (:func:`save_state`) under a key of the model and settings
  (:func:`state_key`); a rerun with the same key skips what is done, any other key starts over.
- components/evaluation/summary.py: the metrics (mIoU / mAcc / aAcc per variant, from one
  dataset-level confusion matrix) and the per-class table.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import numpy as np
import torch
from torch import Tensor

from components.datasets.readers import UnreadableImageError
from components.evaluation.inference import Prediction
from components.evaluation.metrics import MeanIoU
from components.io import UNLABELLED, atomic_write_bytes, unlabelled_of
from components.overlay import write_overlay

__all__ = [
    "IGNORE_INDEX",
    "IGNORED_TARGET",
    "STATE_FORMAT",
    "SegmentFn",
    "LabelledImages",
    "BatchResult",
    "evaluate_batch",
    "write_overlays",
    "EvalState",
    "state_key",
    "load_state",
    "save_state",
]

IGNORE_INDEX = UNLABELLED
IGNORED_TARGET = -1
"""The metric's ignore value: a ground truth's own (255 in 8-bit maps, 65535 in 16-bit ones) becomes
-1, which no confusion matrix of any size has as a class."""
STATE_FORMAT = 1

# What the readers raise for a file that is missing, truncated or not an image: the image reader's
# UnreadableImageError; for a label PNG, PIL's errors (UnidentifiedImageError is an OSError) or
# decode_label_png's ValueError.
_UNREADABLE = (UnreadableImageError, OSError, ValueError)


SegmentFn = Callable[[np.ndarray], "Prediction | Mapping[str, Tensor]"]
"""[H, W, 3] uint8 RGB image -> :class:`Prediction` (e.g. a components.segmenter.VocabularySegmenter)."""


class LabelledImages(Protocol):
    """What the loop reads from a benchmark (components.datasets.readers.CanonicalDataset)."""

    def read_image(self, image_id: str) -> np.ndarray: ...

    def read_label(self, image_id: str) -> np.ndarray: ...


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
    if not variants or len(set(variants)) != len(variants):
        raise ValueError(f"variants must be distinct names, at least one; got {list(variants)}")


def _variant_maps(prediction: Prediction | Mapping[str, Tensor], variants: Sequence[str], image_id: str) -> dict[str, Tensor]:
    """The scored variants' maps of one prediction: the fields of a Prediction ("base", "refined"),
    or the entries of a mapping (Stage1Segmenter's "stage1_1", "stage1_2", "semi")."""
    maps = {}
    for variant in variants:
        pred = prediction.get(variant) if isinstance(prediction, Mapping) else getattr(prediction, variant, None)
        if pred is None:
            raise ValueError(f"the segmenter returned no {variant!r} prediction for {image_id!r}")
        maps[variant] = pred.cpu()
    return maps


def _overlay(overlay_dir: str | Path, image_id: str, image: np.ndarray, label: np.ndarray,
             maps: Mapping[str, Tensor], class_names: Sequence[str]) -> Path:
    predictions = {v: m.numpy().astype(label.dtype) for v, m in maps.items()}
    return write_overlay(Path(overlay_dir) / f"{image_id}.png", image, label, predictions, class_names)


def _image_classes(label: np.ndarray) -> list[int]:
    """Classes present in a [H, W] ground truth (its ignore value, 255 or 65535, left out), ascending."""
    present = np.unique(label)
    return [int(c) for c in present if c != unlabelled_of(label)]


def _pair_problem(image: np.ndarray, label: np.ndarray, num_classes: int) -> str:
    """Why an (image, label) pair cannot be scored, or ''."""
    if image.shape[:2] != label.shape:
        return f"the image is {image.shape[:2]} but its label is {label.shape}"
    ignore = unlabelled_of(label)
    wild = np.unique(label[(label >= num_classes) & (label != ignore)])
    if wild.size:
        return (f"the label has values {wild[:8].tolist()} outside the benchmark's {num_classes} classes "
                f"(0..{num_classes - 1}, {ignore} = ignore)")
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
    on_image: Callable[[int], None] | None = None,
) -> BatchResult:
    """Score `segment` on the images `ids` of `dataset`; on_image(1) as each is scored or
    skipped (progress).

    variants: the predictions scored: Prediction fields ("base", and "refined" when the segmenter
    refines), or the keys of the mapping `segment` returns (Stage 1's variants).
    image_level_labels: call ``segment(image, image_classes=...)`` with the classes present in the
    ground truth (the semi-supervised Stage 1.1 of Table 2); otherwise ``segment(image)``.
    A pair that cannot be scored is recorded in ``skipped`` with the reason and left out: an image
    or label that cannot be read, an image and label of different sizes, a label with values
    >= num_classes (other than the ignore value: 255, or 65535 in the 16-bit maps of more than 255
    classes), a label of the wrong width. For ids in
    `overlay_ids`, an overlay picture (image | ground truth | each variant, legend from
    `class_names`) is written to ``overlay_dir/<id>.png`` from the same prediction.
    """
    _check_variants(variants)
    if overlay_ids and overlay_dir is None:
        raise ValueError("overlay_ids given without an overlay_dir")
    metrics = {v: MeanIoU(num_classes, ignore_index=IGNORED_TARGET) for v in variants}
    done: list[str] = []
    skipped: dict[str, str] = {}
    wanted_overlays = set(overlay_ids)
    for image_id in ids:
        try:
            image = dataset.read_image(image_id)
            label = dataset.read_label(image_id)
        except _UNREADABLE as err:
            skipped[image_id] = f"{type(err).__name__}: {err}"
        else:
            problem = _pair_problem(image, label, num_classes)
            if problem:
                skipped[image_id] = problem
            else:
                prediction = (segment(image, image_classes=_image_classes(label)) if image_level_labels
                              else segment(image))
                maps = _variant_maps(prediction, variants, image_id)
                target = torch.from_numpy(np.where(label == unlabelled_of(label), IGNORED_TARGET,
                                                   label.astype(np.int64)))
                for variant, pred in maps.items():
                    metrics[variant].update(pred, target)
                done.append(image_id)
                if image_id in wanted_overlays:
                    _overlay(overlay_dir, image_id, image, label, maps, class_names)  # type: ignore[arg-type]
        if on_image is not None:
            on_image(1)
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
