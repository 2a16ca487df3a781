"""Stage 2 training samples: patch features (or pixels) of an image + its pooled pseudo labels.

One sample per train-index row (``balance``'s output): an image's Stage 1.1 map and, for a share of
the images, its Stage 1.2 map are separate samples that share the image's features. Labels are
pooled from the label map to the encoder's patch grid by majority vote over each patch's pixels
(``ignore_index`` where none is labelled; paper §3.3 "pseudo label assignment").
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from components.aligner.pooling import pool_labels
from components.io import unlabelled_for

__all__ = ["InputSource", "LabelSource", "AlignerSamples"]

SAMPLE_COLUMNS: tuple[str, ...] = ("image_id", "image_path", "variant")


class InputSource(Protocol):
    """Where an image's encoder input comes from: a feature cache (``{"features": [h, w, C]}``) or
    the image itself (``{"pixels": [3, S, S]}``)."""

    def sample(self, image_id: str, image_path: str) -> dict[str, torch.Tensor]: ...


class LabelSource(Protocol):
    """Pseudo label maps: ``read(image_id, variant)`` -> [L, L] uint8 with 255 = unlabelled, or uint16
    with 65535 for a vocabulary of more than 255 classes (components.io.unlabelled_for)."""

    def read(self, image_id: str, variant: str) -> np.ndarray: ...


class AlignerSamples(Dataset):
    """``samples[i]`` -> ``{"features" | "pixels": ..., "labels": [h, w] int64}``.

    samples: train index rows (columns image_id, image_path, variant). grid: (h, w) patch grid of
    the encoder input. num_classes: K; labels outside [0, K) other than ``ignore_index`` are an error;
    ``ignore_index`` None: the unlabelled value of a K-class map (255, or 65535 beyond 255 classes).
    """

    def __init__(
        self,
        samples: pd.DataFrame,
        *,
        inputs: InputSource,
        labels: LabelSource,
        grid: tuple[int, int],
        num_classes: int,
        ignore_index: int | None = None,
    ) -> None:
        missing = [c for c in SAMPLE_COLUMNS if c not in samples.columns]
        if missing:
            raise ValueError(f"the train index lacks columns {missing}; it needs {list(SAMPLE_COLUMNS)}")
        self._rows = samples.loc[:, list(SAMPLE_COLUMNS)].astype(str).to_numpy()
        self.inputs = inputs
        self.labels = labels
        self.grid = grid
        self.num_classes = num_classes
        self.ignore_index = unlabelled_for(num_classes) if ignore_index is None else ignore_index

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        image_id, image_path, variant = self._rows[i]
        label_map = torch.from_numpy(self.labels.read(image_id, variant).astype(np.int64))
        pooled = pool_labels(label_map, self.grid, self.ignore_index, num_classes=self.num_classes)
        return {**self.inputs.sample(image_id, image_path), "labels": pooled}
