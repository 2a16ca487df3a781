"""DINOv2 patch features (the aligner's input, paper §3.3)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from transformers import Dinov2Model, Dinov2WithRegistersModel

from components.models.preprocess import resize_normalize
from components.models.registry import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["patch_features", "dino_preprocess"]


def patch_features(model: Dinov2Model | Dinov2WithRegistersModel, pixels: torch.Tensor) -> torch.Tensor:
    """Final layer-normed patch tokens of DINOv2, CLS and register tokens dropped.

    pixels: [B, 3, H, W] float, ImageNet-normalised, H and W divisible by the patch size (14).
    Returns [B, H/14, W/14, C] (C = hidden size), row-major over the patch grid.
    """
    if not isinstance(model, (Dinov2Model, Dinov2WithRegistersModel)):
        raise TypeError(f"expected a Dinov2Model or Dinov2WithRegistersModel, got {type(model).__name__}")
    patch = model.config.patch_size
    if pixels.ndim != 4 or pixels.shape[1] != 3:
        raise ValueError(f"pixels must be [B, 3, H, W], got {tuple(pixels.shape)}")
    batch, _, height, width = pixels.shape
    if height % patch or width % patch:
        raise ValueError(
            f"pixel height and width must be divisible by the patch size {patch}, got {height}x{width}"
        )
    tokens = model(pixel_values=pixels).last_hidden_state
    prefix = 1 + getattr(model.config, "num_register_tokens", 0)
    return tokens[:, prefix:].reshape(batch, height // patch, width // patch, tokens.shape[-1])


def dino_preprocess(
    images: np.ndarray | torch.Tensor,
    size: int | tuple[int, int] = 518,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> torch.Tensor:
    """DINOv2 pixels: [B, H, W, 3] or [H, W, 3] uint8 RGB -> [B, 3, h, w] float (bicubic resize to
    ``size`` = side or (h, w), each divisible by 14; ImageNet mean/std by default)."""
    height, width = (size, size) if isinstance(size, int) else size
    if height % 14 or width % 14:
        raise ValueError(f"DINOv2 input sides must be divisible by 14, got {height}x{width}")
    return resize_normalize(images, (height, width), mean, std)
