"""Dataset-level metrics of an evaluation (mIoU / mAcc / aAcc per variant, from one confusion
matrix) and the per-class table, written as the evaluate stage's DVC metrics."""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

from components.evaluation.benchmark import IGNORED_TARGET, EvalState
from components.evaluation.metrics import MeanIoU
from components.io import atomic_write_json, atomic_write_text

__all__ = ["EvalSummary", "summarize", "write_summary"]


class EvalSummary(NamedTuple):
    """metrics: {"mIoU_base": 41.23, "mAcc_base", "aAcc_base", [..._refined], "images", "skipped"}
    (percent, 2 decimals; images = scored, skipped = unreadable); per_class: one row per class
    {"class": name, "IoU_<variant>": float (NaN when undefined), "Acc_<variant>": float}."""

    metrics: dict[str, float | int]
    per_class: list[dict[str, Any]]


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
        meter = MeanIoU(size, ignore_index=IGNORED_TARGET)
        meter.load_state_dict({"num_classes": size, "ignore_index": IGNORED_TARGET, "confusion": confusion})
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
