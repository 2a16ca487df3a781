"""Image tensors for the models: uint8 RGB pictures -> resized, normalised float pixels."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["resize_normalize"]


def resize_normalize(
    images: np.ndarray | torch.Tensor,
    size: int | tuple[int, int],
    mean: Sequence[float],
    std: Sequence[float],
) -> torch.Tensor:
    """Resize (bicubic, antialiased, no crop: the aspect ratio is not kept) and normalise.

    images: [B, H, W, 3] or [H, W, 3] uint8 RGB (numpy or torch, any device).
    size: output side S, or (height, width).
    mean / std: per-channel statistics of pixels in [0, 1].
    Returns [B, 3, height, width] float32 on the input's device: ((resized / 255) - mean) / std.
    """
    if isinstance(images, np.ndarray) and not images.flags.writeable:
        images = images.copy()  # torch refuses to wrap read-only memory (e.g. a decoded, cached image)
    pixels = torch.as_tensor(images)
    if pixels.dtype != torch.uint8 or pixels.ndim not in (3, 4) or pixels.shape[-1] != 3:
        raise ValueError(
            f"images must be [B, H, W, 3] or [H, W, 3] uint8 RGB, got shape {tuple(pixels.shape)} "
            f"dtype {pixels.dtype}"
        )
    if pixels.ndim == 3:
        pixels = pixels[None]
    height, width = (size, size) if isinstance(size, int) else size
    x = pixels.permute(0, 3, 1, 2).float().div_(255.0)
    if x.shape[-2:] != (height, width):
        x = F.interpolate(x, size=(height, width), mode="bicubic", align_corners=False, antialias=True)
        x = x.clamp_(0.0, 1.0)
    mean_t = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - mean_t) / std_t
