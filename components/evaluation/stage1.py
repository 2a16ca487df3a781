"""Stage 1's pseudo labels scored as a segmenter (paper Table 2): one image's Stage 1.1, Stage 1.2
and semi-supervised maps from components.labelling.stage1.label_image, one class map per variant."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from segment_anything.modeling import Sam
from torch import Tensor, nn

from components.io import unlabelled_for
from components.labelling.settings import (
    TEACHER_EVAL_VARIANTS,
    TEACHER_VARIANT,
    Stage1Settings,
    stage1_variants,
)
from components.labelling.stage1 import label_image

if TYPE_CHECKING:
    from components.labelling.concepts import ConceptTeacher

__all__ = ["Stage1Segmenter"]


class Stage1Segmenter:
    """Stage 1's pseudo label maps of one image as predictions, to score them (paper Table 2).

    variants: some of "stage1_1", "stage1_2", "semi" (empty: all), all scored from the same image: Stage 1.1 and
    Stage 1.2 come from one label_image call (one CLIP pass, one SAM image embedding, the automatic
    masks only when Stage 1.2 is asked for); "semi" is Stage 1.1 once more with the ground truth's
    image-level labels as presence. clip_model / clip_mean / clip_std / clip_image_size: the CLIP of
    Stage 1; sam: SAM; prototypes: [K', D] prompt prototypes; class_map: [K'] int64 prompt -> dataset
    class; num_classes: C; settings: Stage 1's settings (params.yaml ``label``). Label maps (SAM
    frame) are resized to the image by nearest sampling; unlabelled pixels (255 or 65535) become class C, an
    extra "unlabelled" column of the confusion matrix (``summarize(..., unlabelled_column=True)``),
    so they count as misses.

    teacher: the concept teacher over the K' prompts (each prompt its own class, so its maps share
    the lookup), for the variants "stage1_sam3" (SAM 3's presence, or CLIP's under ``prompt:
    detected``) and "stage1_sam3_semi" (the ground truth's image-level labels as presence); its
    maps are made in the SAM frame.
    """

    def __init__(
        self,
        *,
        variants: Sequence[str],
        clip_model: nn.Module,
        clip_mean: Sequence[float],
        clip_std: Sequence[float],
        clip_image_size: int,
        sam: Sam,
        prototypes: Tensor,
        class_map: Tensor,
        num_classes: int,
        settings: Stage1Settings,
        teacher: ConceptTeacher | None = None,
    ) -> None:
        variants = stage1_variants(variants, teacher=teacher is not None)
        if prototypes.ndim != 2 or class_map.shape != (prototypes.shape[0],):
            raise ValueError(
                f"prototypes must be [K, D] and class_map [K]; got {tuple(prototypes.shape)} and "
                f"{tuple(class_map.shape)}"
            )
        self.variants = variants
        self.clip_model, self.clip_image_size = clip_model, clip_image_size
        self.clip_mean, self.clip_std = tuple(clip_mean), tuple(clip_std)
        self.sam, self.prototypes, self.settings = sam, prototypes, settings
        self.num_classes = num_classes
        self.prompt_classes = class_map.to(torch.int64)  # semi: image labels name classes, of several prompts
        # prompt index -> dataset class, and unlabelled (255, or 65535 past 255 prompts) -> the extra column C
        lookup = torch.full((unlabelled_for(prototypes.shape[0]) + 1,), num_classes, dtype=torch.int64)
        lookup[: class_map.shape[0]] = class_map.cpu()
        self.lookup = lookup
        self.teacher = teacher

    @property
    def needs_image_classes(self) -> bool:
        """Whether calls must pass the ground truth's image-level labels (``semi`` is scored)."""
        return "semi" in self.variants or f"{TEACHER_VARIANT}_semi" in self.variants

    def _label_image(self, image: np.ndarray, maps: tuple[str, ...], image_classes: Sequence[int] | None) -> Any:
        return label_image(
            image, clip_model=self.clip_model, clip_mean=self.clip_mean, clip_std=self.clip_std,
            clip_image_size=self.clip_image_size, sam=self.sam, prototypes=self.prototypes, settings=self.settings,
            image_classes=list(image_classes) if image_classes is not None else None,
            prompt_classes=self.prompt_classes if image_classes is not None else None, variants=maps,
        )

    @torch.no_grad()
    def label(self, image: np.ndarray, image_classes: Sequence[int] | None = None) -> dict[str, Tensor]:
        """Each variant's pseudo label map in the SAM frame: variant -> [s, s] prompt index, 255 =
        unlabelled (uint8; int32 with 65535 past 255 prompts)."""
        labels: dict[str, Tensor] = {}
        detected = tuple(v for v in ("stage1_1", "stage1_2") if v in self.variants)
        result = None
        if detected:
            result = self._label_image(image, detected, None)
            for variant in detected:
                labels[variant] = (result.stage1_1_detail if variant == "stage1_1" else result.stage1_2_detail).label
        if "semi" in self.variants:
            labels["semi"] = self._label_image(image, ("stage1_1",), image_classes).stage1_1_detail.label
        if self.teacher is not None and set(TEACHER_EVAL_VARIANTS) & set(self.variants):
            labels.update(self._teacher_labels(image, image_classes, result))
        return {v: labels[v] for v in self.variants}

    def _teacher_labels(self, image: np.ndarray, image_classes: Sequence[int] | None, result: Any) -> dict[str, Tensor]:
        """The concept teacher's maps (prompt index per pixel, SAM frame) of the variants asked for."""
        assert self.teacher is not None
        size = (self.settings.sam_size, self.settings.sam_size)
        maps = {}
        if TEACHER_VARIANT in self.variants:
            found = None
            if self.teacher.settings.prompt == "detected":  # CLIP's presence, from Stage 1's own pass
                result = result if result is not None else self._label_image(image, ("stage1_1",), None)
                found = result.presence.classes
            maps[TEACHER_VARIANT] = self.teacher.label(image, size, detected=found).label
        if f"{TEACHER_VARIANT}_semi" in self.variants:
            present = set(image_classes or ())
            prompts = [k for k, c in enumerate(self.prompt_classes.tolist()) if c in present]
            maps[f"{TEACHER_VARIANT}_semi"] = self.teacher.label(
                image, size, detected=torch.tensor(prompts, dtype=torch.long), image_classes=prompts).label
        return {v: torch.from_numpy(m.astype(np.int32) if m.dtype != np.uint8 else m) for v, m in maps.items()}

    def __call__(self, image: np.ndarray, image_classes: Sequence[int] | None = None) -> dict[str, Tensor]:
        """[H, W, 3] uint8 RGB -> variant -> [H, W] int64 class map in [0, C] (C = unlabelled).

        image_classes: the dataset classes present (ground truth), required when "semi" is scored
        and refused otherwise (the other variants detect presence with CLIP).
        """
        if self.needs_image_classes != (image_classes is not None):
            raise ValueError(f"variants {list(self.variants)}: image_classes must be given exactly when 'semi' is scored")
        height, width = image.shape[:2]
        out = {}
        for variant, label in self.label(image, image_classes).items():
            resized = F.interpolate(label[None, None].float(), size=(height, width), mode="nearest-exact")[0, 0]
            out[variant] = self.lookup[resized.long().cpu()]
        return out
