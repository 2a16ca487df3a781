"""The settings of Stage 1, declared once: plain values, importable without torch.

components/config/schemas.py builds params.yaml's ``label`` section on these names (the same Literal
alias), and flows/common.py ``stage1_settings`` fills :class:`Stage1Settings` from it by field
name; flows pass these objects to their tasks as they are.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

from components.models.dense_modes import DENSE_MODES, DenseMode

__all__ = ["DenseMode", "DENSE_MODES", "AmgSettings", "AMG_GENERATOR_FIELDS", "Stage1Settings", "MASK_FIELDS", "LABEL_FIELDS",
           "UNCOUNTED_FIELDS", "STAGE1_VARIANTS", "TEACHER_VARIANT",
           "LABEL_VARIANTS", "TEACHER_EVAL_VARIANTS", "stage1_variants"]

STAGE1_VARIANTS: tuple[str, ...] = ("stage1_1", "stage1_2", "semi")
"""The Stage 1 label maps that evaluation scores (the paper's Table 2 rows): Stage 1.1, Stage 1.2,
and Stage 1.1 with image-level labels from the ground truth instead of CLIP's presence detection
(semi-supervised)."""
TEACHER_VARIANT = "stage1_sam3"  # the concept teacher's maps (components/labelling/concepts.py; models.teacher)
LABEL_VARIANTS: tuple[str, ...] = ("stage1_1", "stage1_2", TEACHER_VARIANT)  # the maps a Stage 1 store can hold
TEACHER_EVAL_VARIANTS: tuple[str, ...] = (TEACHER_VARIANT, f"{TEACHER_VARIANT}_semi")
"""The concept teacher's rows of evaluate-stage1 (with ``models.teacher``): its map with SAM 3's
presence (or CLIP's, under ``prompt: detected``), and with the ground truth's image-level labels."""


def stage1_variants(variants: Sequence[str] | None, teacher: bool = False) -> tuple[str, ...]:
    """The Stage 1 variants to score, checked (None or empty: all of :data:`STAGE1_VARIANTS`, and
    of :data:`TEACHER_EVAL_VARIANTS` with a ``teacher``); ValueError naming the known ones. The one
    check: the flow runs it before any model loads, the segmenter on its own input."""
    known = STAGE1_VARIANTS + (TEACHER_EVAL_VARIANTS if teacher else ())
    chosen = tuple(variants or known)
    if any(v not in known for v in chosen) or len(set(chosen)) != len(chosen):
        hint = "" if teacher else f" ({', '.join(TEACHER_EVAL_VARIANTS)} need models.teacher)"
        raise ValueError(f"{list(chosen)}: expected distinct Stage 1 variants among {', '.join(known)}{hint}")
    return chosen


@dataclass(frozen=True, kw_only=True)
class AmgSettings:
    """The automatic masks' settings, one shape wherever they are used (params.yaml's ``amg``
    sections are components.config.AmgConfig, field for field; Stage 1.2; the refinement of
    Stage 2's inference spec): SamAutomaticMaskGenerator's settings (its defaults; crop_n_layers
    is always 0: one embedding per image), then the size filter (paper appendix 1.2): masks
    between ``min_area_frac`` and ``max_area_frac`` of the image area are kept."""

    points_per_side: int = 32
    points_per_batch: int = 64
    pred_iou_thresh: float = 0.88
    stability_score_thresh: float = 0.95
    stability_score_offset: float = 1.0
    box_nms_thresh: float = 0.7
    min_mask_region_area: int = 0
    min_area_frac: float
    max_area_frac: float

    @classmethod
    def of(cls, amg: Any) -> AmgSettings:
        """From an object with the same fields (an ``amg`` section: components.config.AmgConfig)."""
        return cls(**{f.name: getattr(amg, f.name) for f in fields(cls)})

    def generator_args(self) -> dict[str, Any]:
        """The mask generator's keyword arguments (MaskImage.automatic_masks, SamAutomaticMaskGenerator)."""
        return {name: getattr(self, name) for name in AMG_GENERATOR_FIELDS}

    def size_filter(self) -> dict[str, float]:
        """``{"min_area_frac", "max_area_frac"}``: the shares of the image area a kept mask lies between."""
        return {"min_area_frac": self.min_area_frac, "max_area_frac": self.max_area_frac}


AMG_GENERATOR_FIELDS: tuple[str, ...] = ("points_per_side", "points_per_batch", "pred_iou_thresh",
                                         "stability_score_thresh", "stability_score_offset", "box_nms_thresh",
                                         "min_mask_region_area")


@dataclass(frozen=True)
class Stage1Settings:
    """Every number of Stage 1 (params.yaml ``label``), as plain values.

    grid: G; dense_mode: CLIP last-block mode; min_crops: T; top_k_points: prompts per class;
    sam_size: SAM frame side; label_size: label map side; amg: generator settings and the Stage
    1.2 size filter; crop_batch: CLIP crops per forward.
    """

    grid: int
    dense_mode: DenseMode
    min_crops: int
    top_k_points: int
    sam_size: int
    label_size: int
    amg: AmgSettings
    crop_batch: int

    def mask_side(self) -> dict[str, Any]:
        """The settings SAM's automatic masks depend on (with the SAM spec, the mask hash): the
        SAM frame's side and the generator's settings."""
        return {"sam_size": self.sam_size, "amg": self.amg.generator_args()}

    def label_side(self) -> dict[str, Any]:
        """The settings that only change how masks are prompted, labelled and painted:
        :data:`LABEL_FIELDS` and the size filter."""
        return {**{name: getattr(self, name) for name in LABEL_FIELDS}, **self.amg.size_filter()}

    def counted(self) -> dict[str, Any]:
        """Every setting a label depends on (:meth:`mask_side` and :meth:`label_side`)."""
        return {**self.mask_side(), **self.label_side()}


# What a label depends on, field by field (the resume keys hash these); a new field of
# Stage1Settings belongs to one of the three (tests/test_label_flow.py checks).
MASK_FIELDS: tuple[str, ...] = ("sam_size", "amg")  # amg: its generator's settings; its size filter labels
LABEL_FIELDS: tuple[str, ...] = ("grid", "dense_mode", "min_crops", "top_k_points", "label_size")
UNCOUNTED_FIELDS: tuple[str, ...] = ("crop_batch",)  # CLIP crops per forward: speed, not labels
