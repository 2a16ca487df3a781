"""FMbSeg Stage 2 (refined), paper §3.4: every SAM automatic mask takes the majority class of the
base prediction inside it and is painted over the base map (`refine_with_masks`). Painting itself
is components/labelmaps.py's (shared with Stage 1).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from components.labelmaps import (
    MaskStack,
    area_desc_order,
    last_painted,
    stack_masks,
)

__all__ = ["refine_with_masks", "size_filter"]


def _majority_labels(masks: Tensor, base: Tensor, num_classes: int) -> Tensor:
    """Majority class of `base` inside each mask, ties to the smallest class id. [M] int64.

    masks: [M, H, W] bool; base: [H, W] int64 in [0, num_classes). One bincount over
    (mask index * K + class) of every covered pixel. An empty mask gets class 0 (it paints nothing).
    """
    count = masks.shape[0]
    covered = masks.flatten(1).nonzero()
    keys = covered[:, 0] * num_classes + base.flatten()[covered[:, 1]]
    votes = torch.bincount(keys, minlength=count * num_classes).reshape(count, num_classes)
    return votes.argmax(dim=1)


def refine_with_masks(base: Tensor, masks: MaskStack, num_classes: int) -> Tensor:
    """FMbSeg Stage 2 (refined), paper §3.4.

    base: [H, W] integer base prediction in [0, num_classes); masks: SAM automatic masks, [M, H, W]
    bool (or a sequence of [H, W] bool). Each mask takes the majority class of `base` inside it
    (ties: smallest class id) and is painted over `base`, larger masks first so smaller ones end on
    top; pixels no mask covers keep their base label. Returns [H, W] int64.
    """
    if base.dim() != 2 or base.dtype.is_floating_point or base.dtype == torch.bool:
        raise ValueError(f"base must be an [H, W] integer tensor, got {tuple(base.shape)} {base.dtype}")
    base = base.long()
    if base.numel() and (int(base.min()) < 0 or int(base.max()) >= num_classes):
        raise ValueError(
            f"base values must be in [0, {num_classes}), got [{int(base.min())}, {int(base.max())}]"
        )
    stack = stack_masks(masks, tuple(base.shape), base.device)
    if stack.shape[0] == 0:
        return base.clone()
    labels = _majority_labels(stack, base, num_classes)
    winner = last_painted(stack, area_desc_order(stack))
    return torch.where(winner >= 0, labels[winner.clamp(min=0)], base)


def size_filter(records: Sequence[Mapping[str, Any]], image_area: int, min_area_frac: float,
                max_area_frac: float) -> list[Mapping[str, Any]]:
    """Automatic-mask records whose area is within [min_area_frac, max_area_frac] of the image."""
    low, high = min_area_frac * image_area, max_area_frac * image_area
    return [r for r in records if low <= r["area"] <= high]
