"""Exporting a Stage 1 store as an ordinary segmentation dataset: PNG label maps and COCO JSON.

Layout of an export folder OUT for a store (``PseudoLabels``) and its variants (``stage1_1``,
``stage1_2``):

- ``OUT/<variant>/<image id>.png``: the variant's label map at the image's original size (the
  store keeps ``label.label_size`` squares; they are resized by pixel-centre nearest sampling, as
  Stage 1 resizes its own maps), 8-bit grayscale, class index into ``OUT/classes.txt``, 255 = no
  class (16-bit with 65535 for a vocabulary of more than 255 classes). The image id is the image's path under its folder without extension, so the folder mirrors
  the image folder's tree.
- ``OUT/<variant>.json``: the same labels as a COCO file that ``pycocotools.coco.COCO`` loads:
  ``images`` (id 1..N in image-id order, ``file_name`` = the image's path under its folder,
  ``height``, ``width``), ``categories`` (``id`` = class index + 1, COCO ids start at 1; ``name`` =
  the first name of the class line) and one annotation **per class per image** (the COCO-Stuff
  convention for semantic labels: a class's pixels in one image form one annotation, even when
  they are several regions), with compressed RLE ``segmentation``, ``area``, ``bbox`` (x, y, w, h)
  and ``iscrowd`` 0. ``COCO.annToMask`` of an image's annotations gives back its label map exactly.
- ``OUT/classes.txt``: the store's vocabulary, one class per line (synonyms kept).

Every file is written atomically. A variant's folder is written in full under a temporary name and
then swapped in, so a rerun never leaves label maps of images that left the store; its COCO file is
written after the swap. Because the swap replaces the folder as a whole, the caller first checks
that OUT holds nothing at these paths that fmbseg did not write (:func:`export_outputs` with
components.outputs), and the store's reader has refused image ids that would leave OUT.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from pycocotools import mask as mask_utils

from components.datasets.registry import display_name
from components.io import (
    MAX_LABEL_CLASSES,
    atomic_write_bytes,
    atomic_write_text,
    decode_label_png,
    encode_label_png,
    swap_in,
    unlabelled_of,
)
from components.labelling.store import TEACHER_VARIANT, VARIANTS, PseudoLabels

__all__ = [
    "CLASSES_FILE",
    "ExportSummary",
    "check_variants",
    "resize_nearest",
    "coco_annotations",
    "store_vocabulary",
    "write_classes",
    "export_outputs",
    "export_variant",
]

CLASSES_FILE = "classes.txt"


class ExportSummary(NamedTuple):
    """What one variant's export wrote: images (label maps), annotations (COCO), the paths."""

    variant: str
    images: int
    annotations: int
    labels_dir: str
    coco_json: str


def check_variants(variants: Sequence[str]) -> list[str]:
    """The variants to export, validated (``both`` = stage1_1 and stage1_2; stage1_sam3 from a
    store labelled with a concept teacher); raises ValueError naming the supported ones."""
    known = (*VARIANTS, TEACHER_VARIANT)
    if not variants:
        raise ValueError(f"no variant given; supported: {', '.join(known)}, both")
    chosen: list[str] = []
    for variant in variants:
        names = list(VARIANTS) if variant == "both" else [variant]
        for name in names:
            if name not in known:
                raise ValueError(f"unknown variant {variant!r}; supported: {', '.join(known)}, both")
            if name not in chosen:
                chosen.append(name)
    return chosen


def resize_nearest(label: np.ndarray, height: int, width: int) -> np.ndarray:
    """[h, w] label map -> [height, width] by pixel-centre nearest sampling (torch's
    ``nearest-exact``): output pixel i takes input pixel floor((i + 0.5) * h / height)."""
    if label.shape == (height, width):
        return label
    rows = np.minimum(((np.arange(height) + 0.5) * label.shape[0] / height).astype(np.int64), label.shape[0] - 1)
    cols = np.minimum(((np.arange(width) + 0.5) * label.shape[1] / width).astype(np.int64), label.shape[1] - 1)
    return label[rows[:, None], cols[None, :]]


def coco_annotations(label: np.ndarray, image_id: int, first_id: int) -> list[dict[str, Any]]:
    """One COCO annotation per class present in ``label`` ([H, W] uint8 with 255 = none, or uint16 with
    65535), ids from
    ``first_id``: compressed RLE (counts as a string), area, bbox [x, y, w, h], category id = class
    index + 1, iscrowd 0."""
    annotations = []
    none = unlabelled_of(label)
    for k in np.unique(label).tolist():
        if k == none:
            continue
        rle = mask_utils.encode(np.asfortranarray((label == k).astype(np.uint8)))
        annotations.append({
            "id": first_id + len(annotations),
            "image_id": image_id,
            "category_id": int(k) + 1,
            "segmentation": {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")},
            "area": int(mask_utils.area(rle)),
            "bbox": [float(v) for v in mask_utils.toBbox(rle)],
            "iscrowd": 0,
        })
    return annotations


def store_vocabulary(labels: PseudoLabels) -> list[str]:
    """The store's class lines; raises ValueError for more than a 16-bit label map holds."""
    vocabulary = labels.vocabulary
    if len(vocabulary) > MAX_LABEL_CLASSES:
        raise ValueError(
            f"{labels.root} has {len(vocabulary)} classes; Stage 1 label maps are at most 16-bit (65535 = unlabelled), "
            f"so a store holds at most {MAX_LABEL_CLASSES}"
        )
    return vocabulary


def write_classes(labels: PseudoLabels, out_dir: str | os.PathLike[str]) -> Path:
    """``out_dir/classes.txt``: the store's vocabulary, one class per line; returns its path."""
    path = Path(out_dir) / CLASSES_FILE
    atomic_write_text(path, "".join(f"{line}\n" for line in store_vocabulary(labels)))
    return path


def export_outputs(labels: PseudoLabels, variants: Sequence[str]) -> tuple[list[str], list[str]]:
    """(files, folders) an export of ``variants`` writes under its output folder: the files
    (relative paths) and the variant folders it replaces as a whole."""
    files = [CLASSES_FILE]
    for variant in variants:
        files.append(f"{variant}.json")
        files.extend(f"{variant}/{image_id}.png" for image_id in labels.image_ids)
    return files, list(variants)


def export_variant(labels: PseudoLabels, out_dir: str | os.PathLike[str], variant: str, *,
                   on_image: Callable[[int], None] | None = None) -> ExportSummary:
    """Write ``out_dir/<variant>/`` (label maps at the original sizes) and ``out_dir/<variant>.json``
    (COCO) for every image of the store, reading one shard at a time (this module's docstring);
    on_image(1) as each label map is written (progress)."""
    check_variants([variant])
    if not labels.has_variant(variant):
        raise ValueError(f"{labels.root} holds no {variant} maps: label with models.teacher set (e.g. sam3)")
    vocabulary = store_vocabulary(labels)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for leftover in [*out.glob(f".{variant}.partial-*"), *out.glob(f".{variant}.old-*")]:  # of a killed run
        shutil.rmtree(leftover, ignore_errors=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{variant}.partial-", dir=out))
    suffixes = dict(zip(labels.index["image_id"], (Path(p).suffix for p in labels.index["image_path"]), strict=True))
    coco_ids = {image_id: i + 1 for i, image_id in enumerate(labels.image_ids)}
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    try:
        for shard in labels.iter_shards(columns=["image_id", "height", "width", variant]):
            for row in shard.itertuples(index=False):
                image_id, height, width = row.image_id, int(row.height), int(row.width)
                label = resize_nearest(decode_label_png(getattr(row, variant)), height, width)
                atomic_write_bytes(partial / f"{image_id}.png", encode_label_png(label, palette=True))
                coco_id = coco_ids[image_id]
                images.append({"id": coco_id, "file_name": f"{image_id}{suffixes[image_id]}",
                               "height": height, "width": width})
                annotations.extend(coco_annotations(label, coco_id, len(annotations) + 1))
                if on_image is not None:
                    on_image(1)
        swap_in(partial, out / variant)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    images.sort(key=lambda im: im["id"])
    coco = {
        "info": {"description": f"fmbseg {variant} pseudo labels of {labels.root}"},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": k + 1, "name": display_name(line)} for k, line in enumerate(vocabulary)],
    }
    coco_path = out / f"{variant}.json"
    atomic_write_text(coco_path, json.dumps(coco, separators=(",", ":")) + "\n")  # compact: large at scale
    return ExportSummary(variant, len(images), len(annotations), (out / variant).as_posix(), coco_path.as_posix())
