"""Corrected label maps that people made in a labelling tool, imported from COCO (``fmbseg
import-labels``), and the label source training reads them through.

A corrections folder (``${paths.corrections}``, next to the Stage 1 store) holds:

- ``corrections.parquet``: one row per corrected image (:data:`CORRECTIONS_SCHEMA`): its id and the
  sha256 of the image it corrects, the corrected map as a PNG ([L, L] like the store's maps, L =
  ``label.label_size``, resized from the image's size by pixel-centre nearest sampling), and what
  produced it: the imported file (kept under ``sources/``) and when. A later import of the same
  image replaces its row.
- ``sources/<sha256 prefix>-<name>.json``: each imported COCO file, as it was imported.

The folder is no part of the Stage 1 store: relabelling (``fmbseg label``, the nightly job) rewrites
the store and never this folder. A correction counts while its image has the content it was made
for (same sha256 in the store's index); `balance` then gives the image its corrected map as its
only training sample, in place of Stage 1's maps (train index variant :data:`CORRECTED`).

COCO input (as CVAT and Label Studio export it): ``images`` are matched to the store by
``file_name`` (the image's path under its image folder, with or without extension, the path the
labelling run saw, or a base name that only one image has); ``categories`` by name (any synonym
of a vocabulary line, case-insensitive). Segmentations are polygons, RLE or uncompressed RLE; a
later annotation paints over an earlier one, pixels under none are unlabelled; a polygon or mask
reaching outside its image is clipped (and reported). An image listed without annotations is not
imported (reported): a tool lists every image of a task, corrected or not.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from pycocotools import mask as mask_utils

from components.datasets.registry import display_name
from components.io import atomic_write_bytes, decode_label_png, encode_label_png, file_sha256, unlabelled_for
from components.labelling.balance import CORRECTED
from components.labelling.export import resize_nearest
from components.labelling.store import PseudoLabels, write_table

__all__ = [
    "CORRECTIONS_FILE",
    "SOURCES_DIR",
    "CORRECTED",
    "CORRECTIONS_SCHEMA",
    "ImportReport",
    "empty_corrections",
    "corrected_maps",
    "import_corrections",
    "Corrections",
    "CorrectedLabels",
]

CORRECTIONS_FILE = "corrections.parquet"
SOURCES_DIR = "sources"
CORRECTIONS_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("sha256", pa.string()),  # of the image file the correction was made for
        (CORRECTED, pa.binary()),  # PNG, [L, L] uint8 (255 = unlabelled) or uint16 (65535)
        ("source", pa.string()),  # the imported file, relative to the corrections folder
        ("imported_at", pa.string()),  # UTC, ISO 8601
    ]
)


class ImportReport(NamedTuple):
    """What an import did: images (ids imported), clipped (annotations cut to their image, as
    "file_name: annotation id"), unannotated (file names listed without annotations), source."""

    images: list[str]
    clipped: list[str]
    unannotated: list[str]
    source: str


def _match_images(coco_images: list[dict[str, Any]], labels: PseudoLabels) -> dict[int, str]:
    """COCO image id -> store image id; raises ValueError naming every image that matches none."""
    index = labels.index
    by_name: dict[str, str] = {}
    for image_id, path in zip(index["image_id"], index["image_path"], strict=True):
        by_name[f"{image_id}{PurePosixPath(path).suffix}"] = image_id
        by_name[image_id] = image_id
        by_name[PurePosixPath(path).as_posix()] = image_id
    base_names: dict[str, list[str]] = {}
    for image_id, path in zip(index["image_id"], index["image_path"], strict=True):
        for base in (PurePosixPath(path).name, PurePosixPath(path).stem):
            base_names.setdefault(base, []).append(image_id)
    matched, missing = {}, []
    for image in coco_images:
        name = PurePosixPath(str(image.get("file_name", "")).replace("\\", "/")).as_posix()
        found = by_name.get(name) or by_name.get(str(PurePosixPath(name).with_suffix("")))
        if found is None and len(base_names.get(PurePosixPath(name).name, [])) == 1:
            found = base_names[PurePosixPath(name).name][0]
        if found is None:
            missing.append(f"id {image.get('id')} {name!r}")
        else:
            matched[int(image["id"])] = found
    if missing:
        raise ValueError(f"{len(missing)} image(s) of the file match no image in {labels.root}: "
                         f"{', '.join(missing[:20])}{' ...' if len(missing) > 20 else ''}; nothing imported")
    return matched


def _class_of(categories: list[dict[str, Any]], vocabulary: Sequence[str]) -> dict[int, int]:
    """COCO category id -> class index; raises ValueError listing the categories not in the vocabulary."""
    names = {}
    for k, line in enumerate(vocabulary):
        for name in line.split(","):
            names.setdefault(name.strip().lower(), k)
    out, unknown = {}, []
    for category in categories:
        k = names.get(str(category.get("name", "")).strip().lower())
        if k is None:
            unknown.append(str(category.get("name")))
        else:
            out[int(category["id"])] = k
    if unknown:
        raise ValueError(f"classes not in the store's vocabulary: {', '.join(unknown)}; nothing imported "
                         f"(the vocabulary: {', '.join(display_name(line) for line in vocabulary)})")
    return out


def _mask(segmentation: Any, height: int, width: int) -> tuple[np.ndarray, bool]:
    """[height, width] bool mask of a COCO segmentation, and whether any of it lay outside the image."""
    if isinstance(segmentation, list):  # polygons [[x1, y1, ...], ...]
        polygons = [np.asarray(p, np.float64) for p in segmentation if len(p) >= 6]
        outside = any(((p[0::2] < 0) | (p[0::2] > width) | (p[1::2] < 0) | (p[1::2] > height)).any() for p in polygons)
        if not polygons:
            return np.zeros((height, width), bool), outside
        clipped = [np.stack([np.clip(p[0::2], 0, width), np.clip(p[1::2], 0, height)], 1).ravel().tolist()
                   for p in polygons]
        rle = mask_utils.merge(mask_utils.frPyObjects(clipped, height, width))
        return mask_utils.decode(rle).astype(bool), outside
    if not isinstance(segmentation, dict) or "counts" not in segmentation or "size" not in segmentation:
        raise ValueError(f"a segmentation must be polygons or RLE ({{'size', 'counts'}}), got {str(segmentation)[:80]}")
    h, w = (int(v) for v in segmentation["size"])
    rle = mask_utils.frPyObjects(segmentation, h, w) if isinstance(segmentation["counts"], list) else {
        "size": [h, w], "counts": segmentation["counts"].encode() if isinstance(segmentation["counts"], str)
        else segmentation["counts"]}
    full = mask_utils.decode(rle).astype(bool)
    mask = np.zeros((height, width), bool)
    mask[: min(h, height), : min(w, width)] = full[:height, :width]
    return mask, bool(full[height:, :].any() or full[:, width:].any())


def corrected_maps(coco: dict[str, Any], labels: PseudoLabels) -> tuple[dict[str, np.ndarray], list[str], list[str]]:
    """The corrected label maps of a COCO dict, by store image id ([H, W] at each image's size in
    the store, uint8 with 255 = unlabelled or uint16 with 65535), and the clipped and unannotated
    lists of :class:`ImportReport`. Raises ValueError (nothing imported) for images or annotations
    matching nothing, categories not in the vocabulary, or sizes that differ from the store's."""
    for key in ("images", "annotations", "categories"):
        if not isinstance(coco.get(key), list):
            raise ValueError(f"not a COCO file: no {key!r} list")
    matched = _match_images(coco["images"], labels)
    classes = _class_of(coco["categories"], labels.vocabulary)
    strays = sorted({str(a.get("image_id")) for a in coco["annotations"] if a.get("image_id") not in matched})
    if strays:
        raise ValueError(f"annotations refer to image ids the file does not list: {', '.join(strays[:20])}; "
                         "nothing imported")
    sizes = {row.image_id: (int(row.height), int(row.width))
             for shard in labels.iter_shards(columns=["image_id", "height", "width"]) for row in shard.itertuples()}
    wrong = [f"{im['file_name']!r} is {im.get('height')}x{im.get('width')}, the store's image "
             f"{'x'.join(map(str, sizes[matched[int(im['id'])]]))}" for im in coco["images"]
             if (im.get("height"), im.get("width")) != sizes[matched[int(im["id"])]]]
    if wrong:
        raise ValueError(f"image sizes differ from the store's: {'; '.join(wrong[:10])}; nothing imported")
    none = unlabelled_for(len(labels.vocabulary))
    dtype = np.uint8 if none == 255 else np.uint16
    names = {int(im["id"]): str(im["file_name"]) for im in coco["images"]}
    maps: dict[str, np.ndarray] = {}
    clipped = []
    for ann in coco["annotations"]:
        coco_id = int(ann["image_id"])
        image_id = matched[coco_id]
        height, width = sizes[image_id]
        mask, outside = _mask(ann.get("segmentation"), height, width)
        if outside:
            clipped.append(f"{names[coco_id]}: annotation {ann.get('id')}")
        label = maps.setdefault(image_id, np.full((height, width), none, dtype))
        label[mask] = classes[int(ann["category_id"])]
    unannotated = sorted(names[i] for i in names if matched[i] not in maps)
    return maps, clipped, unannotated


def empty_corrections(root: str | os.PathLike[str]) -> Path:
    """Write an empty corrections file into ``root`` (replacing any); returns its path."""
    path = Path(root) / CORRECTIONS_FILE
    write_table(path, CORRECTIONS_SCHEMA.empty_table())
    return path


def import_corrections(coco_path: str | os.PathLike[str], labels: PseudoLabels,
                       root: str | os.PathLike[str]) -> ImportReport:
    """Import a COCO file of corrected masks into the corrections folder ``root`` (module docstring):
    all its images or, on any error, none."""
    coco_path, root = Path(coco_path), Path(root)
    try:
        coco = json.loads(coco_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read {coco_path} as JSON: {err}") from None
    if not isinstance(coco, dict):
        raise ValueError(f"{coco_path} is not a COCO file (not a JSON object)")
    maps, clipped, unannotated = corrected_maps(coco, labels)
    sha_of = dict(zip(labels.index["image_id"], labels.index["sha256"], strict=True))
    source = f"{SOURCES_DIR}/{file_sha256(coco_path)[:16]}-{coco_path.name}"
    atomic_write_bytes(root / source, coco_path.read_bytes())
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    rows = []
    for image_id, label in sorted(maps.items()):
        side = labels.read(image_id, "stage1_1").shape[0]  # the store's label_size
        rows.append({"image_id": image_id, "sha256": sha_of[image_id],
                     CORRECTED: encode_label_png(resize_nearest(label, side, side)),
                     "source": source, "imported_at": now})
    kept = Corrections(root).table
    kept = kept.loc[~kept["image_id"].isin(list(maps))]
    table = pa.concat_tables([pa.Table.from_pandas(kept, schema=CORRECTIONS_SCHEMA, preserve_index=False),
                              pa.Table.from_pylist(rows, schema=CORRECTIONS_SCHEMA)])
    write_table(root / CORRECTIONS_FILE, table.sort_by("image_id"))
    return ImportReport(sorted(maps), clipped, unannotated, source)


class Corrections:
    """Reader of a corrections folder (an absent one holds none)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        path = self.root / CORRECTIONS_FILE
        table = pq.read_table(path) if path.exists() else CORRECTIONS_SCHEMA.empty_table()
        self.table: pd.DataFrame = table.to_pandas()

    def current(self, labels: PseudoLabels) -> pd.DataFrame:
        """Rows (image_id, shard = the corrections file, row) of the corrections whose image is in the
        store with the content it was corrected for."""
        store = set(zip(labels.index["image_id"], labels.index["sha256"], strict=True))
        rows = [(image_id, (self.root / CORRECTIONS_FILE).as_posix(), row)
                for row, (image_id, sha) in enumerate(zip(self.table["image_id"], self.table["sha256"], strict=True))
                if (image_id, sha) in store]
        return pd.DataFrame(rows, columns=["image_id", "shard", "row"]).astype({"row": "int64"})

    def read(self, image_id: str) -> np.ndarray:
        """The corrected map of one image: [L, L] uint8 (255 = unlabelled) or uint16 (65535)."""
        hits = np.flatnonzero(self.table["image_id"].to_numpy() == image_id)
        if not len(hits):
            raise KeyError(f"no correction of image id {image_id!r} in {self.root}")
        return decode_label_png(self.table[CORRECTED].iloc[int(hits[0])])


class CorrectedLabels:
    """The label source of training: ``read(image_id, "corrected")`` from the corrections, any other
    variant from the Stage 1 store (components.aligner.data.LabelSource)."""

    def __init__(self, labels: PseudoLabels, corrections: Corrections) -> None:
        self.labels = labels
        self.corrections = corrections
        self.vocabulary = labels.vocabulary

    def read(self, image_id: str, variant: str) -> np.ndarray:
        """[L, L] label map of one image (uint8, 255 = unlabelled, or uint16, 65535)."""
        if variant == CORRECTED:
            return self.corrections.read(image_id)
        return self.labels.read(image_id, variant)
