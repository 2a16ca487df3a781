"""Evaluation math: inference over any encoder, SAM-mask refinement and label painting, mIoU."""

from components.evaluation.inference import (
    PromptSet,
    build_prompt_set,
    labels_from_scores,
    patch_logits,
    predict_logits_batch,
    predict_scores_batch,
    resize_short_side,
    sliding_window_logits_batch,
    upsampled_max,
)
from components.evaluation.metrics import MeanIoU
from components.evaluation.refine import refine_with_masks, size_filter
from components.labelmaps import PAINT_ORDERS, paint_by_score, paint_masks

__all__ = [
    "PAINT_ORDERS",
    "MeanIoU",
    "PromptSet",
    "build_prompt_set",
    "labels_from_scores",
    "paint_by_score",
    "paint_masks",
    "patch_logits",
    "predict_logits_batch",
    "predict_scores_batch",
    "refine_with_masks",
    "resize_short_side",
    "size_filter",
    "sliding_window_logits_batch",
    "upsampled_max",
]
