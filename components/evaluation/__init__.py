"""Evaluation math: inference over any encoder, SAM-mask refinement and label painting, mIoU."""

from components.evaluation.inference import (
    PromptSet,
    build_prompt_set,
    labels_from_logits,
    patch_logits,
    predict_base,
    predict_logits,
    predict_logits_batch,
    resize_short_side,
    sliding_window_logits,
    sliding_window_logits_batch,
)
from components.evaluation.metrics import MeanIoU
from components.evaluation.refine import PAINT_ORDERS, paint_by_score, paint_masks, refine_with_masks

__all__ = [
    "PAINT_ORDERS",
    "MeanIoU",
    "PromptSet",
    "build_prompt_set",
    "labels_from_logits",
    "paint_by_score",
    "paint_masks",
    "patch_logits",
    "predict_base",
    "predict_logits",
    "predict_logits_batch",
    "refine_with_masks",
    "resize_short_side",
    "sliding_window_logits",
    "sliding_window_logits_batch",
]
