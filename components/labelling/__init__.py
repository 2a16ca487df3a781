"""FMbSeg Stage 1: pseudo labels from CLIP + SAM (paper §3.2, appendix §1), the pipeline over a
shard of images, their sharded storage, resumable shard planning, and the Stage 1.1 / 1.2 balance
of the training index.

The names below load on first use, so that components.labelling.settings (plain values, what
components/config/ builds on) is importable without torch.
"""

from __future__ import annotations

from components.lazy import lazy_exports

_WHERE = {
    "INDEX_COLUMNS": "balance",
    "AmgMask": "stage1",
    "AmgSettings": "settings",
    "GroundTruth": "shard",
    "ImageEntry": "store",
    "LabelPlan": "plan",
    "MaskLabels": "detect",
    "MaskSource": "plan",
    "PlannedShard": "plan",
    "PreparedImage": "stage1",
    "Presence": "detect",
    "PseudoLabels": "store",
    "ShardRecord": "store",
    "Stage1Result": "stage1",
    "Stage1Settings": "settings",
    "balance_index": "balance",
    "class_index_map": "detect",
    "crop_classes": "detect",
    "detect_present": "detect",
    "image_level_labels": "detect",
    "label_image": "stage1",
    "label_masks": "detect",
    "label_shard": "shard",
    "list_inputs": "shard",
    "mask_coverage": "detect",
    "mask_mean_features": "detect",
    "patch_centres_xy": "detect",
    "plan_shards": "plan",
    "presence_from_image_labels": "detect",
    "prompt_patches": "detect",
    "settings_hash": "plan",
}
__all__ = sorted(_WHERE)

__getattr__ = lazy_exports(__name__, _WHERE)
