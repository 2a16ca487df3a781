"""Stage 1's pseudo labels scored as a segmenter (paper Table 2): one image's Stage 1.1, Stage 1.2
or semi-supervised map from components.labelling.stage1.label_image, as a Prediction."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from segment_anything.modeling import Sam
from torch import Tensor, nn

from components.evaluation.paper_numbers import STAGE1_VARIANTS
from components.io import MAX_UINT8_CLASSES
from components.labelling.stage1 import Stage1Settings, label_image
from components.segmenter import Prediction

__all__ = ["Stage1Segmenter"]


class Stage1Segmenter:
    """Stage 1's pseudo label map of one image as a prediction, to score it (paper Table 2).

    variant: "stage1_1" | "stage1_2" | "semi". clip_model / clip_mean / clip_std / clip_image_size:
    the CLIP of Stage 1; sam: SAM; prototypes: [K', D] prompt prototypes; class_map: [K'] int64
    prompt -> dataset class; num_classes: C; settings: Stage 1's settings (params.yaml ``label``).
    Only the steps the variant needs run (Stage 1.1 alone skips the automatic masks). The label
    map (SAM frame) is resized to the image by nearest sampling; unlabelled pixels (255) become
    class C, an extra "unlabelled" column of the confusion matrix (``summarize(...,
    unlabelled_column=True)``), so they count as misses.
    """

    def __init__(
        self,
        *,
        variant: str,
        clip_model: nn.Module,
        clip_mean: Sequence[float],
        clip_std: Sequence[float],
        clip_image_size: int,
        sam: Sam,
        prototypes: Tensor,
        class_map: Tensor,
        num_classes: int,
        settings: Stage1Settings,
    ) -> None:
        if variant not in STAGE1_VARIANTS:
            raise ValueError(f"unknown Stage 1 variant {variant!r}; supported: {list(STAGE1_VARIANTS)}")
        if prototypes.ndim != 2 or class_map.shape != (prototypes.shape[0],):
            raise ValueError(
                f"prototypes must be [K, D] and class_map [K]; got {tuple(prototypes.shape)} and "
                f"{tuple(class_map.shape)}"
            )
        if prototypes.shape[0] > MAX_UINT8_CLASSES:
            raise ValueError(f"{prototypes.shape[0]} prompts; Stage 1's label maps are 8-bit (255 = unlabelled), "
                             f"so at most {MAX_UINT8_CLASSES}")
        self.variant = variant
        self.clip_model, self.clip_image_size = clip_model, clip_image_size
        self.clip_mean, self.clip_std = tuple(clip_mean), tuple(clip_std)
        self.sam, self.prototypes, self.settings = sam, prototypes, settings
        self.num_classes = num_classes
        self.prompt_classes = class_map.to(torch.int64)  # semi: image labels name classes, of several prompts
        # prompt index -> dataset class, and 255 (unlabelled) -> the extra column C
        lookup = torch.full((256,), num_classes, dtype=torch.int64)
        lookup[: class_map.shape[0]] = class_map.cpu()
        self.lookup = lookup

    @torch.no_grad()
    def label(self, image: np.ndarray, image_classes: Sequence[int] | None = None) -> Tensor:
        """The variant's pseudo label map in the SAM frame: [s, s] uint8 prompt index, 255 = unlabelled."""
        variant = "stage1_2" if self.variant == "stage1_2" else "stage1_1"  # semi: Stage 1.1 with labels
        result = label_image(
            image, clip_model=self.clip_model, clip_mean=self.clip_mean, clip_std=self.clip_std,
            clip_image_size=self.clip_image_size, sam=self.sam, prototypes=self.prototypes, settings=self.settings,
            image_classes=list(image_classes) if image_classes is not None else None,
            prompt_classes=self.prompt_classes if image_classes is not None else None, variants=(variant,),
        )
        detail = result.stage1_2_detail if variant == "stage1_2" else result.stage1_1_detail
        return detail.label

    def __call__(self, image: np.ndarray, image_classes: Sequence[int] | None = None) -> Prediction:
        """[H, W, 3] uint8 RGB -> Prediction(base=[H, W] int64 in [0, C], C = unlabelled, refined=None).

        image_classes: the dataset classes present (ground truth), required by "semi" and refused
        by the others (which detect presence with CLIP).
        """
        if (self.variant == "semi") != (image_classes is not None):
            raise ValueError(f"variant {self.variant!r}: image_classes must be given exactly for 'semi'")
        label = self.label(image, image_classes)
        height, width = image.shape[:2]
        resized = F.interpolate(label[None, None].float(), size=(height, width), mode="nearest-exact")[0, 0]
        return Prediction(self.lookup[resized.long().cpu()], None)
