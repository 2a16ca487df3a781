"""Frozen student-encoder patch features of image files (the aligner's input x_i, paper §3.3).

Images are decoded and resized by a pool of threads running ahead of the forward passes (a bounded
queue: memory stays at a few batches whatever the number of images), and the model sees
``batch_size`` images per forward. The image is resized to ``image_size`` × ``image_size`` without
cropping, as Stage 1 resizes it for its square label maps, so patch (r, c) and label-map pixel
block (r, c) cover the same part of the image.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from components.datasets.readers import read_image_rgb
from components.io import fs_path
from components.models.dino import StudentModel, dino_preprocess, patch_features
from components.models.registry import autocast_context
from components.prefetch import batched, prefetch

__all__ = ["load_pixels", "PixelSource", "DinoEncoder", "encode_images"]

def load_pixels(
    path: str | os.PathLike[str], image_size: int, mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """One image file -> [3, S, S] float32 student input (S = image_size, normalised by mean/std)."""
    return dino_preprocess(read_image_rgb(path), image_size, mean, std)[0]


class PixelSource:
    """Training inputs without a feature cache: ``sample(image_id, image_path)`` -> ``{"pixels":
    [3, S, S] float32}`` (path relative to ``project_root``); the trainer encodes them per batch."""

    def __init__(
        self, project_root: str | os.PathLike[str], *, image_size: int, mean: Sequence[float], std: Sequence[float]
    ) -> None:
        self.project_root = Path(project_root)
        self.image_size = image_size
        self.mean = tuple(mean)
        self.std = tuple(std)

    def sample(self, image_id: str, image_path: str) -> dict[str, torch.Tensor]:
        return {"pixels": load_pixels(self.project_root / fs_path(image_path), self.image_size, self.mean, self.std)}


class DinoEncoder:
    """pixels [B, 3, S, S] float -> patch features [B, S/p, S/p, C] float (p: the student's patch),
    frozen, no gradient.

    Runs under autocast with ``dtype`` on cuda (fp32 on the CPU).
    """

    def __init__(
        self, model: StudentModel, *, device: torch.device,
        dtype: Literal["fp32", "bf16", "fp16"],
    ) -> None:
        self.model = model
        self.device = device
        self.dtype = dtype

    @property
    def embed_dim(self) -> int:
        """C, the hidden size."""
        return int(self.model.config.hidden_size)

    @property
    def patch_size(self) -> int:
        return int(self.model.config.patch_size)

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), autocast_context(self.device, self.dtype):  # no_grad: outputs feed training
            return patch_features(self.model, pixels.to(self.device, non_blocking=True))


def encode_images(
    encoder: DinoEncoder,
    paths: Sequence[str | os.PathLike[str]],
    *,
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    batch_size: int,
    num_workers: int,
) -> Iterator[np.ndarray]:
    """Features of ``paths`` in order, one [b, S/p, S/p, C] float16 array per batch (b ≤ batch_size).

    Decoding runs in ``num_workers`` threads up to two batches ahead of the forwards.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    pin = encoder.device.type == "cuda"
    pixels = prefetch(
        lambda p: load_pixels(Path(p), image_size, mean, std), paths, num_workers=num_workers, depth=2 * batch_size
    )
    for batch in batched(pixels, batch_size):
        stacked = torch.stack(batch)
        features = encoder(stacked.pin_memory() if pin else stacked)
        yield features.to(torch.float16).cpu().numpy()
