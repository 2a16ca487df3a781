"""Painting labelled masks into label maps: the ground floor of labelling and evaluation, which
both paint.

A map's "no class" value is the ``fill`` it is painted with (components.io.unlabelled_for: 255 for
vocabularies up to 255 classes, 65535 beyond), and the fill sets the tensor's dtype: uint8 for 255,
int32 holding 16-bit values for 65535 (torch's uint16 lacks the ops the stages use);
:func:`as_label_array` gives the uint8 / uint16 array the files store.

- Stage 1.1 (docs/design.md §4): overlapping SAM masks go to the mask with the higher SAM score
  (`paint_by_score`).
- Stage 1.2: masks painted larger first, smaller on top (`paint_masks`, order "area_desc").
- Stage 2 (refined) paints its majority-voted masks the same way (components/evaluation/refine.py).

Painting in a sequence and keeping, at each pixel, the label of the last-painted covering mask are
the same thing; the functions compute the latter in one pass instead of looping over masks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from components.io import UNLABELLED, UNLABELLED_16

__all__ = ["MaskStack", "PaintOrder", "PAINT_ORDERS", "paint_masks", "paint_by_score", "stack_masks",
           "last_painted", "area_desc_order", "label_tensor_dtype", "as_label_array"]


MaskStack = Tensor | np.ndarray | Sequence[Tensor | np.ndarray]
"""Masks as a [M, H, W] bool tensor/array or a sequence of M [H, W] bool tensors/arrays."""

PaintOrder = Literal["area_desc", "given"]
PAINT_ORDERS: tuple[str, ...] = ("area_desc", "given")


def stack_masks(masks: MaskStack, shape: tuple[int, int], device: torch.device) -> Tensor:
    """[M, H, W] bool tensor on `device`; raises ValueError on another dtype or spatial size."""
    if isinstance(masks, (Tensor, np.ndarray)):
        stack = torch.as_tensor(masks)
    elif len(masks) == 0:
        stack = torch.zeros(0, *shape, dtype=torch.bool)
    else:
        stack = torch.stack([torch.as_tensor(m).to(device) for m in masks])
    if stack.dtype != torch.bool:
        raise ValueError(f"masks must be bool, got {stack.dtype}")
    if stack.dim() != 3 or tuple(stack.shape[1:]) != tuple(shape):
        raise ValueError(f"masks must be [M, {shape[0]}, {shape[1]}], got {tuple(stack.shape)}")
    return stack.to(device)


def _device_of(masks: MaskStack) -> torch.device:
    """Where the masks are: a tensor's (or a sequence's first tensor's) device, else CPU."""
    if isinstance(masks, Tensor):
        return masks.device
    if not isinstance(masks, np.ndarray) and len(masks) and isinstance(masks[0], Tensor):
        return masks[0].device
    return torch.device("cpu")


def _per_mask_vector(values: Tensor | np.ndarray | Sequence[int], count: int, name: str) -> Tensor:
    vector = torch.as_tensor(values)
    if vector.dim() != 1 or vector.shape[0] != count:
        raise ValueError(f"{name} must have one entry per mask ({count}), got shape {tuple(vector.shape)}")
    return vector


def last_painted(masks: Tensor, paint_order: Tensor) -> Tensor:
    """Index of the mask painted last among those covering each pixel.

    masks: [M, H, W] bool; paint_order: [M] int64 permutation, paint_order[0] painted first.
    Returns [H, W] int64 mask index into `masks`, -1 where no mask covers the pixel.
    """
    count, height, width = masks.shape
    if count == 0:
        return torch.full((height, width), -1, dtype=torch.int64, device=masks.device)
    # Each mask carries its paint rank (1 = painted first); the largest rank covering a pixel is
    # the last painted, and 0 is "no mask". One max over the stack: an arg-max along the mask
    # dimension costs 10-30 times as much on CPU.
    dtype = torch.uint8 if count <= 255 else torch.int16 if count <= 32767 else torch.int32
    paint_order = paint_order.to(masks.device)
    ranks = torch.empty(count, dtype=dtype, device=masks.device)
    ranks[paint_order] = torch.arange(1, count + 1, dtype=dtype, device=masks.device)
    top = (masks.to(dtype) * ranks[:, None, None]).amax(dim=0).long()
    return torch.where(top > 0, paint_order[(top - 1).clamp(min=0)], torch.full_like(top, -1))


def area_desc_order(masks: Tensor) -> Tensor:
    """Paint order larger masks first; equal areas keep their given order. [M] int64."""
    area = masks.flatten(1).sum(dim=1)
    return torch.argsort(area, descending=True, stable=True)


def label_tensor_dtype(fill: int) -> torch.dtype:
    """The tensor dtype of a label map whose "no class" value is ``fill``: uint8 for 8-bit maps
    (fill <= 255), int32 for 16-bit ones."""
    if not 0 <= fill <= UNLABELLED_16:
        raise ValueError(f"fill must be in [0, {UNLABELLED_16}], got {fill}")
    return torch.uint8 if fill <= UNLABELLED else torch.int32


def as_label_array(label: Tensor) -> np.ndarray:
    """A label-map tensor as the array files store: uint8 stays uint8, a wider one becomes uint16."""
    array = label.cpu().numpy()
    return array if array.dtype == np.uint8 else array.astype(np.uint16)


def _paint(winner: Tensor, labels: Tensor, fill: int) -> Tensor:
    """[H, W] label map (dtype of :func:`label_tensor_dtype`): labels[winner], `fill` where winner is -1."""
    dtype = label_tensor_dtype(fill)
    top = UNLABELLED if dtype == torch.uint8 else UNLABELLED_16
    filled = torch.full(winner.shape, fill, dtype=dtype, device=winner.device)
    if labels.numel() == 0:
        return filled
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise ValueError(f"labels must be integers, got {labels.dtype}")
    if int(labels.min()) < 0 or int(labels.max()) > top:
        raise ValueError(
            f"labels must be in [0, {top}] for a map filled with {fill}, got [{int(labels.min())}, {int(labels.max())}]"
        )
    labels = labels.to(device=winner.device, dtype=dtype)
    return torch.where(winner >= 0, labels[winner.clamp(min=0)], filled)


def paint_masks(
    masks: MaskStack,
    labels: Tensor | np.ndarray | Sequence[int],
    shape: tuple[int, int],
    *,
    fill: int = UNLABELLED,
    order: PaintOrder = "area_desc",
) -> Tensor:
    """Label map from labelled masks, later-painted masks on top.

    masks: [M, H, W] bool (or a sequence of [H, W] bool); labels: [M] ints in [0, fill's range];
    shape: (H, W). order "area_desc" (Stage 1.2): larger masks painted first, so at each pixel the
    smallest covering mask wins (equal areas: the one later in the input); "given": painted in input
    order, the last covering mask wins. Returns [H, W] on the masks' device (CPU for numpy input),
    uint8 for fill 255, int32 for fill 65535, `fill` where no mask covers.
    """
    device = _device_of(masks)
    stack = stack_masks(masks, shape, device)
    labels = _per_mask_vector(labels, stack.shape[0], "labels")
    if order == "area_desc":
        paint_order = area_desc_order(stack)
    elif order == "given":
        paint_order = torch.arange(stack.shape[0], device=device)
    else:
        raise ValueError(f"unknown paint order {order!r}; supported: {PAINT_ORDERS}")
    return _paint(last_painted(stack, paint_order), labels, fill)


def paint_by_score(
    masks: MaskStack,
    labels: Tensor | np.ndarray | Sequence[int],
    scores: Tensor | np.ndarray | Sequence[float],
    shape: tuple[int, int],
    *,
    fill: int = UNLABELLED,
) -> Tensor:
    """Label map where overlapping masks go to the higher score (Stage 1.1: SAM predicted IoU).

    masks: [M, H, W] bool (or a sequence of [H, W] bool); labels: [M] ints in [0, fill's range];
    scores: [M] floats (equal scores: the mask later in the input wins); shape: (H, W). Returns
    [H, W] (dtype as :func:`paint_masks`), `fill` where no mask covers.
    """
    device = _device_of(masks)
    stack = stack_masks(masks, shape, device)
    labels = _per_mask_vector(labels, stack.shape[0], "labels")
    scores = _per_mask_vector(scores, stack.shape[0], "scores").to(device)
    paint_order = torch.argsort(scores, stable=True)
    return _paint(last_painted(stack, paint_order), labels, fill)
