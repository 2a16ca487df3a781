"""Student encoder patch features (the aligner's input, paper §3.3): DINOv2, DINOv2 with registers,
DINOv3 ViT -- one interface over the transformers classes."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from transformers import Dinov2Model, Dinov2WithRegistersModel, DINOv3ViTModel

from components.models.preprocess import resize_normalize
from components.models.registry import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["StudentModel", "STUDENT_MODELS", "prefix_tokens", "patch_features", "dino_preprocess"]

StudentModel = Dinov2Model | Dinov2WithRegistersModel | DINOv3ViTModel
STUDENT_MODELS: tuple[type[torch.nn.Module], ...] = (Dinov2Model, Dinov2WithRegistersModel, DINOv3ViTModel)


def prefix_tokens(model: StudentModel) -> int:
    """Tokens ahead of the patch tokens in the output: the class token and the register tokens
    (1 for DINOv2, 1 + 4 for DINOv2 with registers and DINOv3)."""
    return 1 + int(getattr(model.config, "num_register_tokens", 0) or 0)


def patch_features(model: StudentModel, pixels: torch.Tensor) -> torch.Tensor:
    """Final layer-normed patch tokens of the student, class and register tokens dropped.

    pixels: [B, 3, H, W] float, normalised with the spec's mean/std, H and W divisible by the
    patch size p (DINOv2 interpolates its position table; DINOv3's rotary positions take any grid).
    Returns [B, H/p, W/p, C] (C = hidden size), row-major over the patch grid.
    """
    if not isinstance(model, STUDENT_MODELS):
        names = ", ".join(cls.__name__ for cls in STUDENT_MODELS)
        raise TypeError(f"expected a student encoder ({names}), got {type(model).__name__}")
    patch = model.config.patch_size
    if pixels.ndim != 4 or pixels.shape[1] != 3:
        raise ValueError(f"pixels must be [B, 3, H, W], got {tuple(pixels.shape)}")
    batch, _, height, width = pixels.shape
    if height % patch or width % patch:
        raise ValueError(
            f"pixel height and width must be divisible by the patch size {patch}, got {height}x{width}"
        )
    tokens = model(pixel_values=pixels).last_hidden_state
    return tokens[:, prefix_tokens(model):].reshape(batch, height // patch, width // patch, tokens.shape[-1])


def dino_preprocess(
    images: np.ndarray | torch.Tensor,
    size: int | tuple[int, int],
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> torch.Tensor:
    """Student pixels: [B, H, W, 3] or [H, W, 3] uint8 RGB -> [B, 3, h, w] float (bicubic resize to
    ``size`` = side or (h, w), which :func:`patch_features` needs divisible by the spec's patch;
    the spec's mean/std, ImageNet's by default)."""
    return resize_normalize(images, size, mean, std)
