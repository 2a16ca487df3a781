"""Pool pixel pseudo labels to the patch grid of the image encoder (docs/design.md §3: majority vote per patch)."""

from __future__ import annotations

import torch

__all__ = ["pool_labels"]


def pool_labels(
    label_map: torch.Tensor,
    grid: tuple[int, int],
    ignore_index: int = 255,
    num_classes: int | None = None,
) -> torch.Tensor:
    """Majority vote of each patch's labelled pixels.

    label_map: [H, W] or [B, H, W] integer tensor (uint8 in our label files), ``ignore_index`` =
    unlabelled. grid: (h, w) patch grid. Pixel (y, x) belongs to patch (y*h//H, x*w//W), so H and W
    need not be multiples of h and w. A patch takes the most frequent class among its labelled
    pixels (ties -> smallest class id) and ``ignore_index`` where none is labelled.
    num_classes: labels must lie in [0, num_classes); inferred as max label + 1 when None.
    Returns [h, w] or [B, h, w] int64.
    """
    if label_map.ndim not in (2, 3):
        raise ValueError(f"label_map must be [H, W] or [B, H, W]; got shape {tuple(label_map.shape)}")
    if label_map.dtype.is_floating_point or label_map.dtype.is_complex or label_map.dtype == torch.bool:
        raise ValueError(f"label_map must be an integer tensor; got {label_map.dtype}")
    h, w = grid
    if h < 1 or w < 1:
        raise ValueError(f"grid must be two positive ints (h, w); got {grid}")
    maps = label_map.long().reshape(-1, *label_map.shape[-2:])  # [B, H, W]
    batch, height, width = maps.shape
    valid = maps != ignore_index
    labels = maps[valid]
    if labels.numel() and int(labels.min()) < 0:
        raise ValueError(
            f"labels must be >= 0 or equal ignore_index={ignore_index}; found {int(labels.min())}"
        )
    if num_classes is None:
        num_classes = int(labels.max()) + 1 if labels.numel() else 1
    elif labels.numel() and int(labels.max()) >= num_classes:
        raise ValueError(
            f"labels must lie in [0, {num_classes}) or equal ignore_index; found {int(labels.max())}"
        )
    if 0 <= ignore_index < num_classes:
        raise ValueError(f"ignore_index={ignore_index} collides with a class id in [0, {num_classes})")

    device = maps.device
    row = torch.arange(height, device=device) * h // height  # [H] patch row of each pixel row
    col = torch.arange(width, device=device) * w // width  # [W]
    image = torch.arange(batch, device=device)[:, None, None]
    patch = (image * h + row[None, :, None]) * w + col[None, None, :]  # [B, H, W] flat patch index
    counts = torch.bincount(patch[valid] * num_classes + labels, minlength=batch * h * w * num_classes)
    counts = counts.view(batch, h, w, num_classes)
    best = counts.argmax(dim=-1)  # first maximum = smallest class id among ties
    pooled = torch.where(counts.amax(dim=-1) > 0, best, ignore_index)
    return pooled.reshape(*label_map.shape[:-2], h, w)
