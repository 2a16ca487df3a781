"""FMbSeg Stage 1: pseudo labels from CLIP + SAM (paper §3.2, appendix §1), the pipeline over a
shard of images, their sharded storage, resumable shard planning, and the Stage 1.1 / 1.2 balance
of the training index."""

from components.labelling.balance import INDEX_COLUMNS, balance_index
from components.labelling.detect import (
    MaskLabels,
    Presence,
    class_index_map,
    crop_classes,
    detect_present,
    image_level_labels,
    label_masks,
    mask_coverage,
    mask_mean_features,
    patch_centres_xy,
    presence_from_image_labels,
    prompt_patches,
)
from components.labelling.plan import LabelPlan, MaskSource, PlannedShard, plan_shards, settings_hash
from components.labelling.shard import GroundTruth, label_shard, list_inputs
from components.labelling.stage1 import (
    AmgMask,
    AmgSettings,
    PreparedImage,
    Stage1Result,
    Stage1Settings,
    label_image,
)
from components.labelling.store import ImageEntry, PseudoLabels, ShardRecord

__all__ = [
    "INDEX_COLUMNS",
    "AmgMask",
    "AmgSettings",
    "GroundTruth",
    "ImageEntry",
    "LabelPlan",
    "MaskLabels",
    "MaskSource",
    "PlannedShard",
    "PreparedImage",
    "Presence",
    "PseudoLabels",
    "ShardRecord",
    "Stage1Result",
    "Stage1Settings",
    "balance_index",
    "class_index_map",
    "crop_classes",
    "detect_present",
    "image_level_labels",
    "label_image",
    "label_masks",
    "label_shard",
    "list_inputs",
    "mask_coverage",
    "mask_mean_features",
    "patch_centres_xy",
    "plan_shards",
    "presence_from_image_labels",
    "prompt_patches",
    "settings_hash",
]
