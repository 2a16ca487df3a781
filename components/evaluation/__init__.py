"""Evaluation math: inference over any encoder, SAM-mask refinement and label painting, mIoU.

The names below load on first use, so that a light module of the package (the overlay picture)
imports without torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "MeanIoU": "components.evaluation.metrics",
    "PAINT_ORDERS": "components.labelmaps",
    "PromptSet": "components.evaluation.inference",
    "build_prompt_set": "components.evaluation.inference",
    "labels_from_logits": "components.evaluation.inference",
    "labels_from_scores": "components.evaluation.inference",
    "paint_by_score": "components.labelmaps",
    "paint_masks": "components.labelmaps",
    "patch_logits": "components.evaluation.inference",
    "predict_base": "components.evaluation.inference",
    "predict_logits": "components.evaluation.inference",
    "predict_logits_batch": "components.evaluation.inference",
    "predict_scores_batch": "components.evaluation.inference",
    "refine_with_masks": "components.evaluation.refine",
    "resize_short_side": "components.evaluation.inference",
    "sliding_window_logits": "components.evaluation.inference",
    "sliding_window_logits_batch": "components.evaluation.inference",
    "upsampled_max": "components.evaluation.inference",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_WHERE[name]), name)
