"""Dataset-level segmentation metrics (mIoU, mAcc, aAcc) from one confusion matrix.

The evaluation protocol (docs/design.md §4, TCL/mmseg): every image of a benchmark adds to a single
[C, C] confusion matrix; per-class IoU = TP / (TP + FP + FN) is taken over the whole dataset, and a
class whose union is 0 (absent from both ground truth and prediction) has IoU NaN and is left out
of the mean.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor


class MeanIoU:
    """Accumulates a dataset-level confusion matrix and computes mIoU / mAcc / aAcc.

    `confusion` is [C, C] int64, rows = ground-truth class, columns = predicted class. It lives on
    `device`; with `device=None` it moves to the device of the first `update`'s inputs (so counting
    happens where the predictions are), and stays there.

    Evaluation resumes by saving `state_dict()` after a batch of images and calling
    `load_state_dict` (or `merge` with a metric rebuilt from it) in the next process.
    """

    def __init__(self, num_classes: int, ignore_index: int = 255, device: torch.device | str | None = None):
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if 0 <= ignore_index < num_classes:
            raise ValueError(f"ignore_index {ignore_index} collides with a class index in [0, {num_classes})")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self._device_fixed = device is not None
        self.confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    @property
    def device(self) -> torch.device:
        return self.confusion.device

    def reset(self) -> None:
        """Zero the confusion matrix (same device)."""
        self.confusion.zero_()

    def update(self, pred: Tensor, target: Tensor) -> None:
        """Add one image or a batch to the confusion matrix.

        pred: [H, W] or [B, H, W] integer class indices in [0, num_classes).
        target: same shape, integer class indices; `ignore_index` marks pixels left out (their
        prediction may be anything). Any other target value outside [0, num_classes), or a
        prediction outside it on a non-ignored pixel, raises ValueError.
        """
        if pred.shape != target.shape:
            raise ValueError(f"pred and target shapes differ: {tuple(pred.shape)} vs {tuple(target.shape)}")
        if pred.dim() not in (2, 3):
            raise ValueError(f"expected [H, W] or [B, H, W] label maps, got shape {tuple(pred.shape)}")
        for name, t in (("pred", pred), ("target", target)):
            if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
                raise ValueError(f"{name} must be an integer tensor, got {t.dtype}")
        if pred.device != target.device:
            raise ValueError(f"pred is on {pred.device} but target is on {target.device}")
        if not self._device_fixed:
            # The matrix (with any merged or loaded counts) follows the first inputs' device.
            self.confusion = self.confusion.to(pred.device)
            self._device_fixed = True

        c = self.num_classes
        pred = pred.reshape(-1).long()
        target = target.reshape(-1).long()
        valid = target != self.ignore_index
        pred, target = pred[valid], target[valid]
        if target.numel() == 0:
            return
        bad_target = (target < 0) | (target >= c)
        if bool(bad_target.any()):
            values = torch.unique(target[bad_target]).tolist()[:10]
            raise ValueError(
                f"target has values {values} outside [0, {c}) that are not ignore_index={self.ignore_index}"
            )
        bad_pred = (pred < 0) | (pred >= c)
        if bool(bad_pred.any()):
            values = torch.unique(pred[bad_pred]).tolist()[:10]
            raise ValueError(f"pred has values {values} outside [0, {c}) on non-ignored pixels")
        counts = torch.bincount(target * c + pred, minlength=c * c).reshape(c, c)
        self.confusion += counts.to(self.confusion.device)

    def merge(self, other: MeanIoU) -> None:
        """Add another metric's confusion matrix (e.g. from a resumed or parallel shard) to this one."""
        self._check_compatible(other.num_classes, other.ignore_index)
        self.confusion += other.confusion.to(self.confusion.device)

    def state_dict(self) -> dict[str, Any]:
        """{"num_classes": int, "ignore_index": int, "confusion": [C, C] int64 CPU tensor}."""
        return {
            "num_classes": self.num_classes,
            "ignore_index": self.ignore_index,
            "confusion": self.confusion.detach().cpu().clone(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Replace the confusion matrix with a saved one (same num_classes and ignore_index)."""
        self._check_compatible(int(state["num_classes"]), int(state["ignore_index"]))
        confusion = state["confusion"]
        c = self.num_classes
        if confusion.shape != (c, c) or confusion.dtype != torch.int64:
            raise ValueError(
                f"saved confusion must be [{c}, {c}] int64, got {tuple(confusion.shape)} {confusion.dtype}"
            )
        self.confusion = confusion.to(self.confusion.device).clone()

    def compute(self) -> dict[str, Any]:
        """Metrics in percent.

        Returns {"mIoU": float, "mAcc": float, "aAcc": float, "IoU": list[float] (C), "Acc":
        list[float] (C)}. IoU_c = TP / (TP + FP + FN), NaN when the union is 0; Acc_c = TP / (TP + FN),
        NaN when class c has no ground-truth pixel; the means skip NaN (NaN when every class is NaN);
        aAcc = sum TP / number of counted pixels. Raises ValueError if no pixel was counted.
        """
        conf = self.confusion.double()
        total = conf.sum()
        if total.item() == 0:
            raise ValueError("no pixels were counted: call update() with non-ignored targets first")
        tp = conf.diagonal()
        gt = conf.sum(dim=1)
        predicted = conf.sum(dim=0)
        union = gt + predicted - tp
        nan = torch.full_like(tp, math.nan)
        iou = torch.where(union > 0, tp / union.clamp(min=1), nan) * 100.0
        acc = torch.where(gt > 0, tp / gt.clamp(min=1), nan) * 100.0
        return {
            "mIoU": _nanmean(iou),
            "mAcc": _nanmean(acc),
            "aAcc": float(tp.sum() / total * 100.0),
            "IoU": iou.tolist(),
            "Acc": acc.tolist(),
        }

    def _check_compatible(self, num_classes: int, ignore_index: int) -> None:
        if (num_classes, ignore_index) != (self.num_classes, self.ignore_index):
            raise ValueError(
                f"incompatible metric: num_classes={num_classes}, ignore_index={ignore_index}; "
                f"this one has num_classes={self.num_classes}, ignore_index={self.ignore_index}"
            )


def _nanmean(values: Tensor) -> float:
    defined = values[~values.isnan()]
    return float(defined.mean()) if defined.numel() else math.nan
