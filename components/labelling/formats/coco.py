"""COCO files of label maps: RLE (``coco``) or polygons (``coco-polygons``).

Both keep the COCO-Stuff convention of ``fmbseg export``: one annotation per class per image (all of
the class's regions in it), ``category_id`` = class index + 1, ``iscrowd`` 0, ``bbox`` [x, y, w, h]
and ``area`` of the mask. In ``coco-polygons`` the segmentation is a list of polygons, one per
4-connected part of the mask, traced along pixel edges (components.labelling.formats.outline), so
``pycocotools`` rasterises it back to the mask exactly and no vertex lies outside the box. COCO
polygons cannot cut holes: an annotation whose mask has a hole keeps an RLE segmentation instead
(legal COCO with iscrowd 0; pycocotools, CVAT and Detectron2 read it), never a filled-in polygon.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from components.datasets.registry import display_name
from components.io import atomic_write_text, unlabelled_of
from components.labelling.export import coco_annotations
from components.labelling.formats.outline import mask_loops
from components.labelling.formats.source import LabelledImage

__all__ = ["COCO_FILE", "polygon_annotations", "coco_document", "write_coco", "write_coco_polygons"]

COCO_FILE = "annotations.json"
Annotate = Callable[[np.ndarray, int, int], list[dict[str, Any]]]


def polygon_annotations(label: np.ndarray, image_id: int, first_id: int) -> list[dict[str, Any]]:
    """One COCO annotation per class present in ``label`` ([H, W] uint8 with 255 = none, or uint16
    with 65535), ids from ``first_id``: polygons ([[x1, y1, x2, y2, ...], ...] on pixel corners), or
    compressed RLE where the class's mask has a hole (module docstring)."""
    annotations = []
    none = unlabelled_of(label)
    for k in np.unique(label).tolist():
        if k == none:
            continue
        mask = label == k
        rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        loops = mask_loops(mask)
        if any(loop.hole for loop in loops):
            segmentation: Any = {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}
        else:
            segmentation = [loop.points.ravel().astype(float).tolist() for loop in loops]
        annotations.append({
            "id": first_id + len(annotations),
            "image_id": image_id,
            "category_id": int(k) + 1,
            "segmentation": segmentation,
            "area": int(mask_utils.area(rle)),
            "bbox": [float(v) for v in mask_utils.toBbox(rle)],
            "iscrowd": 0,
        })
    return annotations


def coco_document(images: Iterable[LabelledImage], classes: list[str], annotate: Annotate,
                  description: str) -> dict[str, Any]:
    """A COCO dict: images (id 1..N in the given order), their annotations by ``annotate(label,
    image id, first annotation id)``, categories (id = class index + 1, the class line's first name)."""
    records: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for coco_id, image in enumerate(images, start=1):
        records.append({"id": coco_id, "file_name": image.file_name, "height": image.height, "width": image.width})
        annotations.extend(annotate(image.label, coco_id, len(annotations) + 1))
    return {
        "info": {"description": description},
        "images": records,
        "annotations": annotations,
        "categories": [{"id": k + 1, "name": display_name(line)} for k, line in enumerate(classes)],
    }


def _write(out: Path, document: dict[str, Any]) -> dict[str, Any]:
    path = out / COCO_FILE
    atomic_write_text(path, json.dumps(document, separators=(",", ":")) + "\n")
    return {"images": len(document["images"]), "annotations": len(document["annotations"]), "file": COCO_FILE}


def write_coco(images: Iterable[LabelledImage], classes: list[str], out: str | os.PathLike[str],
               description: str) -> dict[str, Any]:
    """``out/annotations.json``: COCO with RLE segmentations (export.coco_annotations)."""
    return _write(Path(out), coco_document(images, classes, coco_annotations, description))


def write_coco_polygons(images: Iterable[LabelledImage], classes: list[str], out: str | os.PathLike[str],
                        description: str) -> dict[str, Any]:
    """``out/annotations.json``: COCO with polygon segmentations (RLE for a mask with a hole)."""
    return _write(Path(out), coco_document(images, classes, polygon_annotations, description))
