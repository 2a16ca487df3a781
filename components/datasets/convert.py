"""Raw benchmark formats -> the canonical layout (docs/design.md §3), with the published label conventions.

Every converter lists the samples of its split (image path + a function that yields the canonical
label) and one writer builds ``images/<split>/``, ``labels/<split>/`` (uint8 PNG with 255 = ignore;
uint16 PNG with 65535 = ignore past 255 classes, components.io), ``classes.txt`` and ``meta.json``
in a temporary directory that replaces ``out_dir`` when complete.

Label conventions (the ones TCL / mmseg evaluate with):
- COCO-Stuff stuffthingmaps hold 0-indexed COCO ids: things 0..90 (11 ids without annotations),
  stuff 91..181, 255 unlabelled. CS-171: the 171 used ids -> 0..170 in id order; CO-80: the 80
  things -> 0..79, everything else 255; COCO-Object: background 0 + things 1..80, stuff and
  unlabelled -> 0.
- VOC SegmentationClass palette PNGs: 0 background, 1..20 classes, 255 object boundaries.
  PV-21 keeps them; PV-20 reduces the zero label (0 -> 255, k -> k-1).
- PASCAL Context: class masks painted from trainval_merged.json in annotation order (later
  annotations over earlier, as the Detail API's getMask does); the 59 category ids -> 0..58 in
  sorted id order; unannotated pixels -> 255 (PC-59) or the scored background class 0, the 59
  classes -> 1..59 (PC-60).
- PASCAL Context full (PC-459, CAT-Seg / SAN / ODISE): trainval.tar.gz's ``trainval/<id>.mat``
  ``LabelMap`` (uint16, 0 unlabelled, 1..459 = labels.txt) -> 0 -> 65535, k -> k-1; the images of
  the Detail JSON's val phase, as PC-59 / PC-60.
- ADE20K full (ADE-847, MaskFormer's prepare_ade20k_full_sem_seg): ``<name>_seg.png`` decodes to
  the object index (R / 10) * 256 + G; the 847 indices of ade847_ids.json -> 0..846 in that order,
  every other index (unannotated 0 included) -> 65535. The field also shrinks images whose sides
  both exceed 512 to a short side of 512 before scoring; not reproduced (labels are scored at the
  annotation's own resolution, like every other benchmark here).
- Cityscapes gtFine labelIds -> the 19 trainIds of cityscapesscripts; other ids -> 255.
- ADE20K: 0 ('other') -> 255, k -> k-1.
Values outside a format's range raise an error naming the file: they mean a wrong or damaged file.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import shutil
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import numpy as np
import scipy.io
from PIL import Image
from pycocotools import mask as mask_utils
from tqdm.auto import tqdm

from components.datasets.download import read_stamp
from components.datasets.extract import atomic_directory
from components.datasets.readers import list_images
from components.datasets.registry import (
    BenchmarkSpec,
    class_file_path,
    get_benchmark,
    read_class_file,
)
from components.io import UNLABELLED, UNLABELLED_16, encode_label_png, unlabelled_for

__all__ = [
    "IGNORE_INDEX",
    "COCOSTUFF_UNUSED_IDS",
    "CONTEXT59_CATEGORY_IDS",
    "CONTEXT459_NUM_CLASSES",
    "ade847_object_ids",
    "CITYSCAPES_ID_TO_TRAINID",
    "LinkMode",
    "Sample",
    "CONVERTERS",
    "apply_lut",
    "cocostuff_lut",
    "voc_lut",
    "ade20k_lut",
    "cityscapes_lut",
    "context_lut",
    "context_class_mask",
    "context_full_lut",
    "ade_full_lut",
    "ade_full_object_index",
    "convert_benchmark",
]

IGNORE_INDEX = UNLABELLED
# COCO ids (0-indexed, as stored in stuffthingmaps) of the 11 thing classes COCO never annotated:
# street sign, hat, shoe, eye glasses, plate, mirror, window, desk, door, blender, hair brush.
COCOSTUFF_UNUSED_IDS: tuple[int, ...] = (11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90)
COCOSTUFF_NUM_RAW = 182  # raw ids 0..181
COCOSTUFF_FIRST_STUFF = 91
# Category ids (PASCAL Context's 459-class numbering) of the 59 classes, sorted: index = class.
CONTEXT59_CATEGORY_IDS: tuple[int, ...] = (
    2, 9, 18, 19, 22, 23, 25, 31, 33, 34, 44, 45, 46, 59, 65, 68, 72, 80, 85, 98, 104, 105, 113, 115,
    144, 158, 159, 162, 187, 189, 207, 220, 232, 258, 259, 260, 284, 295, 296, 308, 324, 326, 347,
    349, 354, 355, 360, 366, 368, 397, 415, 416, 420, 424, 427, 440, 445, 454, 458,
)  # fmt: skip
CONTEXT459_NUM_CLASSES = 459  # PASCAL Context's full labels.txt: values 1..459 of a LabelMap
# Cityscapes labelIds 0..33 -> trainIds (cityscapesscripts.helpers.labels); 255 = ignored.
CITYSCAPES_ID_TO_TRAINID: dict[int, int] = {
    0: 255, 1: 255, 2: 255, 3: 255, 4: 255, 5: 255, 6: 255, 7: 0, 8: 1, 9: 255, 10: 255, 11: 2,
    12: 3, 13: 4, 14: 255, 15: 255, 16: 255, 17: 5, 18: 255, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10,
    24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 29: 255, 30: 255, 31: 16, 32: 17, 33: 18,
}  # fmt: skip

LinkMode = Literal["copy", "hardlink", "symlink"]
_INVALID = -1


# ------------------------------------------------------------------------------ label mappings
def apply_lut(raw: np.ndarray, lut: np.ndarray, *, what: str) -> np.ndarray:
    """Map a raw label map through ``lut`` (int, -1 = value not allowed) -> [H, W] uint8, or
    uint16 where the LUT maps to values past 255 (a 16-bit benchmark: 65535 = ignore).

    raw: [H, W] non-negative integer label map. Raises ValueError naming ``what`` and the
    offending values when a value is out of the LUT or marked not allowed.
    """
    if raw.ndim != 2:
        raise ValueError(f"{what}: a label map must be [H, W], got shape {raw.shape}")
    if raw.dtype == np.uint8 and len(lut) >= 256:  # the common case (PNG maps): a plain gather
        mapped = lut[raw]
        bad = mapped == _INVALID
    else:
        raw = raw.astype(np.int64, copy=False)
        bad = (raw < 0) | (raw >= len(lut))
        mapped = np.full(raw.shape, _INVALID, dtype=np.int64)
        mapped[~bad] = lut[raw[~bad]]
        bad |= mapped == _INVALID
    if bad.any():
        values = sorted(set(np.unique(raw[bad]).tolist()))[:20]
        raise ValueError(
            f"{what}: unexpected raw label values {values}; the file is not in the expected format"
        )
    return mapped.astype(np.uint8 if int(lut.max()) <= UNLABELLED else np.uint16)


def cocostuff_lut(target: Literal["cs171", "co80", "coco_object"]) -> np.ndarray:
    """256-entry LUT from COCO-Stuff stuffthingmap values to ``target`` labels (-1 = never valid)."""
    used = [i for i in range(COCOSTUFF_NUM_RAW) if i not in COCOSTUFF_UNUSED_IDS]
    lut = np.full(256, _INVALID, dtype=np.int64)
    if target == "cs171":
        lut[used] = np.arange(len(used))
        lut[255] = IGNORE_INDEX
    elif target == "co80":
        things = [i for i in used if i < COCOSTUFF_FIRST_STUFF]
        lut[used] = IGNORE_INDEX
        lut[things] = np.arange(len(things))
        lut[255] = IGNORE_INDEX
    elif target == "coco_object":
        things = [i for i in used if i < COCOSTUFF_FIRST_STUFF]
        lut[used] = 0
        lut[things] = np.arange(1, len(things) + 1)
        lut[255] = 0
    else:
        raise ValueError(f"unknown COCO-Stuff target {target!r}; supported: cs171, co80, coco_object")
    return lut


def voc_lut(*, with_background: bool) -> np.ndarray:
    """VOC SegmentationClass indices -> PV-21 (with_background) or PV-20 labels."""
    lut = np.full(256, _INVALID, dtype=np.int64)
    lut[255] = IGNORE_INDEX
    if with_background:
        lut[:21] = np.arange(21)
    else:
        lut[0] = IGNORE_INDEX
        lut[1:21] = np.arange(20)
    return lut


def ade20k_lut() -> np.ndarray:
    """ADEChallengeData2016 annotations (0 other, 1..150) -> reduce-zero-label (0 -> 255, k -> k-1)."""
    lut = np.full(256, _INVALID, dtype=np.int64)
    lut[0] = IGNORE_INDEX
    lut[1:151] = np.arange(150)
    return lut


def cityscapes_lut() -> np.ndarray:
    """gtFine labelIds (0..33) -> trainIds (0..18, 255)."""
    lut = np.full(256, _INVALID, dtype=np.int64)
    for label_id, train_id in CITYSCAPES_ID_TO_TRAINID.items():
        lut[label_id] = train_id
    return lut


def context_lut(*, with_background: bool = False) -> np.ndarray:
    """Context category ids (0 = not annotated) -> the 59 classes in sorted id order.

    PC-59: 0 -> 255, ids -> 0..58. PC-60 (with_background): 0 is the scored background class 0,
    ids -> 1..59 (mmseg PascalContextDataset).
    """
    lut = np.full(max(CONTEXT59_CATEGORY_IDS) + 1, _INVALID, dtype=np.int64)
    first = 1 if with_background else 0
    lut[0] = 0 if with_background else IGNORE_INDEX
    lut[list(CONTEXT59_CATEGORY_IDS)] = np.arange(first, first + len(CONTEXT59_CATEGORY_IDS))
    return lut


def context_full_lut() -> np.ndarray:
    """PASCAL Context full LabelMap values (0 unlabelled, 1..459) -> PC-459 labels: 0 -> 65535, k -> k-1."""
    lut = np.full(CONTEXT459_NUM_CLASSES + 1, UNLABELLED_16, dtype=np.int64)
    lut[1:] = np.arange(CONTEXT459_NUM_CLASSES)
    return lut


@functools.cache
def ade847_object_ids() -> tuple[int, ...]:
    """The ADE20K-full object index of each ADE-847 class, in label order (MaskFormer's
    ADE20K_SEM_SEG_FULL_CATEGORIES ``id`` fields, shipped as ade847_ids.json)."""
    path = resources.files("components.datasets") / "ade847_ids.json"
    ids = tuple(int(i) for i in json.loads(path.read_text(encoding="utf-8")))
    if len(ids) != 847 or len(set(ids)) != 847:
        raise AssertionError(f"{path} must hold 847 distinct object indices, got {len(ids)}")
    return ids


# (R / 10) * 256 + G with R, G in 0..255: object indices 0..25 * 256 + 255
_ADE_FULL_MAX_INDEX = (255 // 10) * 256 + 255


def ade_full_lut() -> np.ndarray:
    """ADE20K-full object indices -> ADE-847 labels (0..846); every other index -> 65535."""
    lut = np.full(_ADE_FULL_MAX_INDEX + 1, UNLABELLED_16, dtype=np.int64)
    lut[list(ade847_object_ids())] = np.arange(847)
    return lut


def ade_full_object_index(seg: np.ndarray) -> np.ndarray:
    """An ADE20K-full ``_seg.png`` ([H, W, 3] uint8 RGB) -> [H, W] int64 object index
    (R / 10) * 256 + G, 0 where nothing is annotated (ADE20K's utils_ade20k.loadAde20K)."""
    if seg.ndim != 3 or seg.shape[2] < 3:
        raise ValueError(f"an ADE20K _seg.png is RGB, got shape {seg.shape}")
    r, g = seg[..., 0].astype(np.int64), seg[..., 1].astype(np.int64)
    return (r // 10) * 256 + g


def context_class_mask(annotations: list[dict[str, Any]], height: int, width: int) -> np.ndarray:
    """The Detail API's class mask: [H, W] int64 category id, 0 where nothing is annotated.

    annotations: the image's entries of ``annos_segmentation`` in file order, each with a COCO RLE
    ``segmentation`` and a ``category_id``; later entries paint over earlier ones.
    """
    out = np.zeros((height, width), dtype=np.int64)
    for ann in annotations:
        rle = dict(ann["segmentation"])
        if isinstance(rle.get("counts"), str):
            rle["counts"] = rle["counts"].encode("ascii")
        m = mask_utils.decode(rle)
        if m.shape != (height, width):
            raise ValueError(
                f"annotation {ann.get('id')} of image {ann.get('image_id')} has a {m.shape} mask, "
                f"the image is {(height, width)}"
            )
        out[m.astype(bool)] = int(ann["category_id"])
    return out


# ----------------------------------------------------------------------------------- samples
@dataclass(frozen=True)
class Sample:
    """One image of a split: its id, source image file, and how to get its canonical label."""

    id: str
    image: Path
    label: Callable[[], np.ndarray] | None


def _png_indices(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        if im.mode not in ("L", "P"):
            raise ValueError(f"{path}: expected a single-channel (L or P) label PNG, got mode {im.mode}")
        return np.asarray(im)


def _lut_label(path: Path, lut: np.ndarray) -> Callable[[], np.ndarray]:
    return lambda: apply_lut(_png_indices(path), lut, what=str(path))


def _require_dir(path: Path, hint: str) -> Path:
    if not path.is_dir():
        raise FileNotFoundError(f"missing {path}: {hint}")
    return path


def _coco_samples(
    raw_dirs: Mapping[str, Path], target: Literal["cs171", "co80", "coco_object"]
) -> list[Sample]:
    maps = _require_dir(
        raw_dirs["cocostuff_maps"] / "val2017", "stuffthingmaps_trainval2017.zip not extracted"
    )
    images = _require_dir(raw_dirs["coco_val2017"] / "val2017", "val2017.zip not extracted")
    lut = cocostuff_lut(target)
    samples = []
    for label_path in sorted(maps.glob("*.png")):
        image = images / f"{label_path.stem}.jpg"
        if not image.exists():
            raise FileNotFoundError(f"{label_path.name} has no image {image}")
        samples.append(Sample(label_path.stem, image, _lut_label(label_path, lut)))
    return samples


def _voc_samples(raw_dirs: Mapping[str, Path], *, with_background: bool) -> list[Sample]:
    voc = raw_dirs["voc2012"] / "VOCdevkit" / "VOC2012"
    split_file = voc / "ImageSets" / "Segmentation" / "val.txt"
    if not split_file.exists():
        raise FileNotFoundError(f"missing {split_file}: VOCtrainval_11-May-2012.tar not extracted")
    lut = voc_lut(with_background=with_background)
    samples = []
    for image_id in split_file.read_text().split():
        label = voc / "SegmentationClass" / f"{image_id}.png"
        image = voc / "JPEGImages" / f"{image_id}.jpg"
        for path in (label, image):
            if not path.exists():
                raise FileNotFoundError(f"{split_file} lists {image_id} but {path} is missing")
        samples.append(Sample(image_id, image, _lut_label(label, lut)))
    return samples


def _context_val(raw_dirs: Mapping[str, Path]) -> tuple[Path, dict[str, Any], list[tuple[dict[str, Any], Path]]]:
    """The Detail JSON, its data, and (entry, image path) of every image of its val phase: the one
    image list of PC-59, PC-60 and PC-459."""
    json_path = raw_dirs["context_json"] / "trainval_merged.json"
    images = _require_dir(
        raw_dirs["voc2010"] / "VOCdevkit" / "VOC2010" / "JPEGImages",
        "VOCtrainval_03-May-2010.tar not extracted",
    )
    with open(json_path, encoding="utf-8") as f:
        data = json.load(f)
    val = []
    for img in sorted(data["images"], key=lambda i: i["file_name"]):
        if img["phase"] != "val":
            continue
        image = images / img["file_name"]
        if not image.exists():
            raise FileNotFoundError(f"{json_path.name} lists {img['file_name']} but {image} is missing")
        val.append((img, image))
    return json_path, data, val


def _context_samples(raw_dirs: Mapping[str, Path], *, with_background: bool) -> list[Sample]:
    json_path, data, val = _context_val(raw_dirs)
    per_image: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for ann in data["annos_segmentation"]:
        per_image[ann["image_id"]].append(ann)
    lut = context_lut(with_background=with_background)
    samples = []
    for img, image in val:
        anns = per_image.get(img["image_id"], [])

        def label(anns: list[dict[str, Any]] = anns, img: dict[str, Any] = img) -> np.ndarray:
            mask = context_class_mask(anns, img["height"], img["width"])
            return apply_lut(mask, lut, what=f"{json_path.name} image {img['file_name']}")

        samples.append(Sample(Path(img["file_name"]).stem, image, label))
    return samples


def _context_full_samples(raw_dirs: Mapping[str, Path]) -> list[Sample]:
    mats = _require_dir(raw_dirs["context_full"] / "trainval", "trainval.tar.gz not extracted")
    _, _, val = _context_val(raw_dirs)
    lut = context_full_lut()
    samples = []
    for img, image in val:
        mat = mats / f"{Path(img['file_name']).stem}.mat"
        if not mat.exists():
            raise FileNotFoundError(f"{img['file_name']} is in the val phase but {mat} is missing")

        def label(mat: Path = mat, img: dict[str, Any] = img) -> np.ndarray:
            raw = scipy.io.loadmat(mat)["LabelMap"]
            if raw.shape != (img["height"], img["width"]):
                raise ValueError(f"{mat}: a {raw.shape} LabelMap, the image is {(img['height'], img['width'])}")
            return apply_lut(raw, lut, what=str(mat))

        samples.append(Sample(Path(img["file_name"]).stem, image, label))
    return samples


_CITYSCAPES_LABEL = re.compile(r"^(?P<id>[a-z_]+_\d{6}_\d{6})_gtFine_labelIds\.png$")


def _cityscapes_samples(raw_dirs: Mapping[str, Path]) -> list[Sample]:
    gt = _require_dir(
        raw_dirs["cityscapes_gtfine"] / "gtFine" / "val", "gtFine_trainvaltest.zip not extracted"
    )
    left = _require_dir(
        raw_dirs["cityscapes_leftimg"] / "leftImg8bit" / "val", "leftImg8bit_trainvaltest.zip not extracted"
    )
    lut = cityscapes_lut()
    samples = []
    for label_path in sorted(gt.glob("*/*_gtFine_labelIds.png")):
        match = _CITYSCAPES_LABEL.match(label_path.name)
        if match is None:
            raise ValueError(f"unexpected Cityscapes file name {label_path}")
        image_id = match["id"]
        image = left / label_path.parent.name / f"{image_id}_leftImg8bit.png"
        if not image.exists():
            raise FileNotFoundError(f"{label_path.name} has no image {image}")
        samples.append(Sample(image_id, image, _lut_label(label_path, lut)))
    return samples


def _ade20k_samples(raw_dirs: Mapping[str, Path]) -> list[Sample]:
    root = raw_dirs["ade20k"] / "ADEChallengeData2016"
    annotations = _require_dir(root / "annotations" / "validation", "ADEChallengeData2016.zip not extracted")
    lut = ade20k_lut()
    samples = []
    for label_path in sorted(annotations.glob("*.png")):
        image = root / "images" / "validation" / f"{label_path.stem}.jpg"
        if not image.exists():
            raise FileNotFoundError(f"{label_path.name} has no image {image}")
        samples.append(Sample(label_path.stem, image, _lut_label(label_path, lut)))
    return samples


def _ade_full_label(path: Path, lut: np.ndarray) -> np.ndarray:
    with Image.open(path) as im:
        if im.mode != "RGB":
            raise ValueError(f"{path}: an ADE20K _seg.png is RGB, got mode {im.mode}")
        seg = np.asarray(im)
    return apply_lut(ade_full_object_index(seg), lut, what=str(path))


def _ade_full_samples(raw_dirs: Mapping[str, Path]) -> list[Sample]:
    root = _require_dir(
        raw_dirs["ade20k_full"] / "ADE20K_2021_17_01" / "images" / "ADE" / "validation",
        "ADE20K_2021_17_01.zip not extracted",
    )
    lut = ade_full_lut()
    samples = []
    for image in sorted(root.glob("**/ADE_val_*.jpg")):
        seg = image.with_name(f"{image.stem}_seg.png")
        if not seg.exists():
            raise FileNotFoundError(f"{image} has no annotation {seg}")
        samples.append(Sample(image.stem, image, functools.partial(_ade_full_label, seg, lut)))
    return samples


def _image_folder_samples(folder: Path) -> list[Sample]:
    samples: dict[str, Sample] = {}
    for path in list_images(folder):
        image_id = "__".join(path.relative_to(folder).with_suffix("").parts)
        if image_id in samples:
            raise ValueError(f"{path} and {samples[image_id].image} would share the id {image_id!r}")
        samples[image_id] = Sample(image_id, path, None)
    return list(samples.values())


Converter = Callable[[BenchmarkSpec, Mapping[str, Path]], list[Sample]]

CONVERTERS: dict[str, Converter] = {
    "cocostuff171": lambda spec, raw: _coco_samples(raw, "cs171"),
    "coco_thing80": lambda spec, raw: _coco_samples(raw, "co80"),
    "coco_object": lambda spec, raw: _coco_samples(raw, "coco_object"),
    "voc": lambda spec, raw: _voc_samples(raw, with_background=spec.background == "class0"),
    "context": lambda spec, raw: _context_samples(raw, with_background=spec.background == "class0"),
    "cityscapes": lambda spec, raw: _cityscapes_samples(raw),
    "ade20k": lambda spec, raw: _ade20k_samples(raw),
    "context_full": lambda spec, raw: _context_full_samples(raw),
    "ade_full": lambda spec, raw: _ade_full_samples(raw),
    "unlabelled": lambda spec, raw: _image_folder_samples(
        _require_dir(raw[spec.sources[0]] / spec.source_split, f"{spec.sources[0]} not extracted")
    ),
}


# ------------------------------------------------------------------------------------- writer
def _place(src: Path, dst: Path, mode: LinkMode) -> None:
    if mode == "copy":
        shutil.copyfile(src, dst)
    elif mode == "hardlink":
        os.link(src, dst)
    elif mode == "symlink":
        os.symlink(src.resolve(), dst)
    else:
        raise ValueError(f"unknown link mode {mode!r}; supported: copy, hardlink, symlink")


def _write_layout(
    samples: list[Sample],
    *,
    out_dir: Path,
    split: str,
    class_lines: list[str],
    meta: dict[str, Any],
    link_mode: LinkMode,
    expect_count: int | None,
    progress: bool,
) -> Path:
    if expect_count is not None and len(samples) != expect_count:
        raise ValueError(
            f"found {len(samples)} images for {out_dir.name}, the full split has {expect_count}: "
            "the source is incomplete or not the expected release"
        )
    if not samples:
        raise ValueError(f"no images found for {out_dir.name}")
    with atomic_directory(out_dir) as tmp:
        image_dir = tmp / "images" / split
        image_dir.mkdir(parents=True)
        labelled = samples[0].label is not None
        if labelled:
            label_dir = tmp / "labels" / split
            label_dir.mkdir(parents=True)
        ids = hashlib.sha256()
        for sample in tqdm(samples, desc=f"convert {out_dir.name}", unit="img", disable=not progress):
            _place(sample.image, image_dir / f"{sample.id}{sample.image.suffix}", link_mode)
            if sample.label is not None:
                (label_dir / f"{sample.id}.png").write_bytes(encode_label_png(sample.label()))
            ids.update(sample.id.encode() + b"\n")
        (tmp / "classes.txt").write_text("\n".join(class_lines) + "\n", encoding="utf-8")
        meta = {**meta, "num_images": len(samples), "image_ids_sha256": ids.hexdigest(), "format_version": 1}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return out_dir


def _source_record(raw_dir: Path) -> dict[str, Any]:
    stamp = read_stamp(raw_dir) or {}
    return {
        "root": str(raw_dir),
        "archive_sha256": stamp.get("sha256"),
        "synthetic": bool(stamp.get("synthetic")),
    }


def convert_benchmark(
    name: str,
    *,
    raw_dirs: Mapping[str, Path],
    out_dir: Path,
    limit: int | None = None,
    expect_count: int | None = None,
    link_mode: LinkMode = "copy",
    progress: bool = False,
) -> Path:
    """Write benchmark ``name`` in the canonical layout at ``out_dir`` (replaced atomically).

    raw_dirs: {source name: directory holding that source's extracted layout} for every source of
        the benchmark (what ``download_source`` returns).
    limit: keep the first ``limit`` images in id order (quick runs); meta.json records it.
    expect_count: fail (writing nothing) unless the split has exactly this many images.
    link_mode: how images enter the layout: copy (default), hardlink or symlink.
    Labels: [H, W] uint8 PNG, 255 = ignore (uint16, 65535 = ignore, past 255 classes), conventions
    of the module docstring.
    """
    spec = get_benchmark(name)
    raw_dirs = {source: Path(path) for source, path in raw_dirs.items()}
    missing = [s for s in spec.sources if s not in raw_dirs]
    if missing:
        raise ValueError(f"{name} needs the sources {list(spec.sources)}; raw_dirs lacks {missing}")
    samples = sorted(CONVERTERS[spec.converter](spec, raw_dirs), key=lambda s: s.id)
    if limit is not None:
        samples = samples[:limit]
    extra = spec.extra_background_class_file
    meta = {
        "benchmark": spec.name,
        "display_name": spec.display_name,
        "split": spec.split,
        "source_split": spec.source_split,
        "labelled": spec.labelled,
        "num_classes": spec.num_classes,
        "ignore_index": unlabelled_for(spec.num_classes),
        "background": spec.background,
        "reduce_zero_label": spec.reduce_zero_label,
        "class_file": spec.class_file,
        "extra_background_classes": None if extra is None else read_class_file(class_file_path(extra)),
        "protocol": spec.protocol,
        "limit": limit,
        "sources": {s: _source_record(raw_dirs[s]) for s in spec.sources},
    }
    class_lines = read_class_file(class_file_path(spec.class_file))
    if len(class_lines) != spec.num_classes:
        raise AssertionError(
            f"class file {spec.class_file} has {len(class_lines)} lines, {name} needs {spec.num_classes}"
        )
    return _write_layout(
        samples,
        out_dir=Path(out_dir),
        split=spec.split,
        class_lines=class_lines,
        meta=meta,
        link_mode=link_mode,
        expect_count=None if limit is not None else expect_count,
        progress=progress,
    )
