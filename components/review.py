"""Reviewing a Stage 1 store image by image, the least trustworthy pseudo labels first.

The per-image confidence is the **agreement of the two Stage 1 variants**: of the pixels that both
Stage 1.1 (SAM prompted by CLIP's points) and Stage 1.2 (SAM's automatic masks labelled by CLIP)
label, the share on which they give the same class. The two variants reach a pixel's class by
different routes, so where they disagree at least one of them is wrong; an image on which they
overlap nowhere has nothing that corroborates its labels and gets confidence 0. Images are shown
in increasing confidence (ties by image id), so the worst come first.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from components.datasets.registry import display_name
from components.io import unlabelled_of
from components.labelling.export import resize_nearest
from components.labelling.store import DETECTIONS_FILE, VARIANTS, PseudoLabels
from components.overlay import overlay_picture

__all__ = ["VARIANT_TITLES", "ReviewItem", "stage1_agreement", "review_order", "image_detections",
           "review_picture", "read_store_image"]

VARIANT_TITLES = {"stage1_1": "Stage 1.1", "stage1_2": "Stage 1.2"}
DETECTION_COLUMNS = ["class_id", "class_name", "crops_won", "sam_score", "mask_area_frac"]


class ReviewItem(NamedTuple):
    """One image of the review: its id, its path as the labelling run saw it, its confidence."""

    image_id: str
    image_path: str
    confidence: float


def stage1_agreement(stage1_1: np.ndarray, stage1_2: np.ndarray) -> float:
    """The confidence of one image's pseudo labels: the share of the pixels labelled by both maps
    on which they agree (0.0 when no pixel is labelled by both).

    stage1_1, stage1_2: [L, L] uint8 (255 = unlabelled) or uint16 (65535) maps of the same shape.
    """
    if stage1_1.shape != stage1_2.shape or stage1_1.dtype != stage1_2.dtype:
        raise ValueError(f"the two maps must have one shape and dtype, got {stage1_1.shape} {stage1_1.dtype} "
                         f"and {stage1_2.shape} {stage1_2.dtype}")
    none = unlabelled_of(stage1_1)
    both = (stage1_1 != none) & (stage1_2 != none)
    overlap = int(both.sum())
    if overlap == 0:
        return 0.0
    return int((both & (stage1_1 == stage1_2)).sum()) / overlap


def review_order(labels: PseudoLabels) -> list[ReviewItem]:
    """Every image of the store with its :func:`stage1_agreement`, worst first (ties by image id).
    Reads the store one shard at a time."""
    from components.io import decode_label_png

    items = []
    for frame in labels.iter_shards(columns=["image_id", "image_path", *VARIANTS]):
        for row in frame.itertuples(index=False):
            maps = [decode_label_png(getattr(row, v)) for v in VARIANTS]
            items.append(ReviewItem(row.image_id, row.image_path, stage1_agreement(*maps)))
    return sorted(items, key=lambda item: (item.confidence, item.image_id))


def image_detections(labels: PseudoLabels, image_id: str) -> list[dict[str, Any]]:
    """The classes Stage 1 detected in one image, by class id: class_id, class_name, crops_won,
    sam_score (predicted IoU of the Stage 1.1 mask), mask_area_frac."""
    table = pq.read_table(labels.root / DETECTIONS_FILE, columns=["image_id", *DETECTION_COLUMNS],
                          filters=[("image_id", "==", image_id)])
    rows = table.select(DETECTION_COLUMNS).to_pylist()
    return sorted(rows, key=lambda r: r["class_id"])


def review_picture(labels: PseudoLabels, image_id: str, image: np.ndarray | None, *,
                   panel_height: int = 320) -> Image.Image:
    """The image and each Stage 1 variant's map over it, side by side, with a legend.

    image: [H, W, 3] uint8 RGB (the maps are resized to it, nearest), or None when the file is gone
    (the maps are drawn over mid-grey at their own [L, L] size).
    """
    maps = {VARIANT_TITLES[v]: labels.read(image_id, v) for v in VARIANTS}
    if image is None:
        side = next(iter(maps.values())).shape
        image = np.full((*side, 3), 128, dtype=np.uint8)
    height, width = image.shape[:2]
    maps = {title: resize_nearest(m, height, width) for title, m in maps.items()}
    names = [display_name(line) for line in labels.vocabulary]
    return overlay_picture(image, None, maps, names, panel_height=panel_height)


def read_store_image(image_path: str) -> np.ndarray | None:
    """The image a store row names ([H, W, 3] uint8 RGB, EXIF applied), its path relative to the
    working directory as the labelling run saw it; None when it is gone or unreadable."""
    from components.datasets.readers import UnreadableImageError, read_image_rgb

    try:
        return read_image_rgb(Path(image_path))
    except UnreadableImageError:
        return None
