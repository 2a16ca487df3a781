"""Synthetic twins: small datasets in each source's raw on-disk format, for tests and the demo.

Every scene is a background fill plus a few labelled rectangles (later ones painted over earlier
ones), in the source's own raw label space (COCO-Stuff ids, VOC indices with 255 boundaries,
Context category ids, Cityscapes labelIds, ADE indices, ADE20K-full object indices). The
converters, readers and every later
stage run on them unchanged. ``synthetic_scenes`` is the pure, seeded plan: the tests read the
planted regions from it and check converted labels pixel by pixel.

Regions are painted with the demo world's look of their class (demoworld/world.py), so
"car" looks the same in every twin and the world stand-in models see the twins' classes. Pixels no
class describes (COCO's unlabelled 255, Context's unannotated 0, ADE's "other") look like the
world's void; VOC's background is painted as two COCO-Stuff stuff classes (sky over grass, wall
over floor...), which PV-21's background prompts name.

Sources that share images (COCO val2017 images and the stuffthingmaps, VOC 2010 images, the
Context JSON and the full Context LabelMaps, Cityscapes leftImg8bit and gtFine) share one plan, so
images and labels agree. Context scenes also plant classes outside the 59: the JSON (59 classes,
as the real one) leaves them unannotated, the full LabelMaps keep them (PC-459).
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.io
from PIL import Image
from pycocotools import mask as mask_utils

from components.datasets.convert import (
    CITYSCAPES_ID_TO_TRAINID,
    COCOSTUFF_NUM_RAW,
    COCOSTUFF_UNUSED_IDS,
    CONTEXT59_CATEGORY_IDS,
    ade847_object_ids,
    convert_benchmark,
)
from components.datasets.download import STAMP_NAME
from components.datasets.extract import atomic_directory
from components.datasets.registry import class_file_path, get_benchmark, get_source, read_class_file
from components.io import voc_colour_map
from demoworld.world import VOID, paint

__all__ = [
    "PlantedRegion",
    "SyntheticScene",
    "SYNTHETIC_SOURCES",
    "synthetic_scenes",
    "write_synthetic_source",
    "write_synthetic_benchmark",
    "write_synthetic_unlabelled",
]

# source -> the family whose plan it draws (sources sharing a family share images and ids)
_FAMILY: dict[str, str] = {
    "coco_train2017": "coco_train",
    "coco_val2017": "coco",
    "cocostuff_maps": "coco",
    "voc2012": "voc",
    "voc2010": "context",
    "context_json": "context",
    "context_full": "context",
    "cityscapes_leftimg": "cityscapes",
    "cityscapes_gtfine": "cityscapes",
    "ade20k": "ade20k",
    "ade20k_full": "ade_full",
}
SYNTHETIC_SOURCES: tuple[str, ...] = tuple(_FAMILY)

_COCO_USED = [i for i in range(COCOSTUFF_NUM_RAW) if i not in COCOSTUFF_UNUSED_IDS]
_COCO_THINGS = [i for i in _COCO_USED if i < 91]
_COCO_STUFF = [i for i in _COCO_USED if i >= 91]
_CITY_THINGS = range(24, 34)


@dataclass(frozen=True)
class PlantedRegion:
    """One painted rectangle: raw label value and box (y0, x0, y1, x1), end-exclusive."""

    raw_value: int
    box: tuple[int, int, int, int]


@dataclass(frozen=True)
class SyntheticScene:
    """One planted scene.

    split: the source's split name ("val2017", "val", "validation", "train", ...).
    regions: painting order; the first covers the whole image (the fill).
    raw_label: [H, W] int64, the raw label map as the source stores it (VOC: with 255 boundaries;
        Context: category ids, 0 where nothing is annotated).
    image: [H, W, 3] uint8 RGB, colour by region plus seeded noise.
    """

    id: str
    split: str
    regions: tuple[PlantedRegion, ...]
    raw_label: np.ndarray
    image: np.ndarray


def _rng(family: str, seed: int) -> np.random.Generator:
    digest = hashlib.sha256(f"{family}:{seed}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def _random_box(
    rng: np.random.Generator, size: tuple[int, int], min_side: int = 10
) -> tuple[int, int, int, int]:
    h, w = size
    bh = int(rng.integers(min_side, max(min_side + 1, h // 2)))
    bw = int(rng.integers(min_side, max(min_side + 1, w // 2)))
    y0 = int(rng.integers(0, h - bh + 1))
    x0 = int(rng.integers(0, w - bw + 1))
    return (y0, x0, y0 + bh, x0 + bw)


# Cityscapes labelIds outside the 19 evaluated classes (cityscapesscripts.helpers.labels names).
_CITY_OTHER_NAMES = {
    0: "unlabeled", 1: "ego vehicle", 2: "rectification border", 3: "out of roi", 4: "static",
    5: "dynamic", 6: "ground", 9: "parking", 10: "rail track", 14: "guard rail", 15: "bridge",
    16: "tunnel", 18: "polegroup", 29: "caravan", 30: "trailer",
}  # fmt: skip
BACKGROUND = -1  # VOC's background: painted as stuff classes, labelled 0
_ADE_SCENES = ("urban/street", "home_or_hotel/bedroom")  # ADE20K-full's scene folders


@functools.cache
def _lines(name: str) -> list[str]:
    return read_class_file(class_file_path(name))


def _class_name(family: str, value: int) -> str:
    """The class line a raw label value of ``family`` means (VOID where none)."""
    if family in ("coco", "coco_train"):
        if value == 255:
            return VOID
        return _lines("cocostuff171")[_COCO_USED.index(value)]
    if family == "voc":
        return _lines("voc21")[value]
    if family == "context":
        if value == 0:
            return VOID
        if value in CONTEXT59_CATEGORY_IDS:
            return _lines("context59")[CONTEXT59_CATEGORY_IDS.index(value)]
        return _lines("context459")[value - 1]
    if family == "cityscapes":
        train_id = CITYSCAPES_ID_TO_TRAINID[value]
        return _CITY_OTHER_NAMES[value] if train_id == 255 else _lines("cityscapes19")[train_id]
    if family == "ade20k":
        return VOID if value == 0 else _lines("ade150")[value - 1]
    if family == "ade_full":
        ids = ade847_object_ids()
        if value == 0:
            return VOID
        return _lines("ade847")[ids.index(value)] if value in ids else f"ade20k object {value}"
    raise ValueError(f"no synthetic plan for {family!r}")


# VOC backgrounds: pairs of COCO-Stuff stuff classes, top over bottom
_BACKDROPS: tuple[tuple[str, str], ...] = (
    ("sky-other, sky", "grass"), ("wall-other, wall", "floor-other, floor"), ("sky-other, sky", "sea"),
    ("tree", "dirt"), ("wall-brick", "pavement"), ("building-other, building", "road"),
    ("curtain", "carpet"), ("sky-other, sky", "sand"), ("wall-wood", "floor-wood"), ("fence", "grass"),
)  # fmt: skip


def _paint(
    rng: np.random.Generator,
    size: tuple[int, int],
    fill: int,
    values: list[int],
    *,
    family: str,
    voc_boundaries: bool = False,
) -> tuple[tuple[PlantedRegion, ...], np.ndarray, np.ndarray]:
    h, w = size
    regions = [PlantedRegion(fill, (0, 0, h, w))]
    label = np.full((h, w), fill, dtype=np.int64)
    colour_map = np.full((h, w), fill, dtype=np.int64)
    for value in values:
        box = _random_box(rng, size)
        regions.append(PlantedRegion(value, box))
        y0, x0, y1, x1 = box
        label[y0:y1, x0:x1] = value
        colour_map[y0:y1, x0:x1] = value
        if voc_boundaries:  # VOC marks a one-pixel band along object outlines as 255 ("void")
            label[y0, x0:x1] = label[y1 - 1, x0:x1] = 255
            label[y0:y1, x0] = label[y0:y1, x1 - 1] = 255
    if family == "voc":  # background: a backdrop of two stuff classes split at a random row
        top, bottom = _BACKDROPS[int(rng.integers(len(_BACKDROPS)))]
        split = int(rng.integers(h // 4, 3 * h // 4 + 1))
        background = colour_map == 0
        colour_map[background] = BACKGROUND
        colour_map[:split][background[:split]] = BACKGROUND - 1
        names = {BACKGROUND - 1: top, BACKGROUND: bottom}
    else:
        names = {}
    values_here = np.unique(colour_map)
    index = np.searchsorted(values_here, colour_map)
    region_names = [names[v] if v in names else _class_name(family, v) for v in values_here.tolist()]
    image = paint(index, region_names, rng)
    return tuple(regions), label, image


def _values(rng: np.random.Generator, pool: list[int], k: int, forced: list[int]) -> list[int]:
    picks = [int(v) for v in rng.choice(pool, size=k, replace=True)]
    return forced + picks[len(forced) :] if len(forced) < k else forced


def _plan(family: str, rng: np.random.Generator, n: int, size: tuple[int, int]) -> list[SyntheticScene]:
    scenes = []
    if family in ("coco", "coco_train"):
        split = "val2017" if family == "coco" else "train2017"
        ids = sorted(int(i) for i in rng.choice(np.arange(1, 581_930), size=n + 1, replace=False))
        for k, num in enumerate(ids):
            # Scene 0 holds the edge cases: first thing, a thing right after a gap (stop sign),
            # the last thing, first and last stuff, and unlabelled pixels.
            forced = [[0, 12, 89, 91, 181, 255], [255], [], []][k % 4]
            fill = int(rng.choice(_COCO_STUFF))
            values = _values(rng, _COCO_THINGS + _COCO_STUFF + [255], 4, forced)
            regions, label, image = _paint(rng, size, fill, values, family=family)
            scene_split = split if k < n else ("train2017" if family == "coco" else "val2017")
            scenes.append(SyntheticScene(f"{num:012d}", scene_split, regions, label, image))
    elif family == "voc":
        for k in range(n + 1):
            forced = [[1, 20], [15], [], []][k % 4]
            values = _values(rng, list(range(1, 21)), 3, forced)
            regions, label, image = _paint(rng, size, 0, values, family=family, voc_boundaries=True)
            scenes.append(
                SyntheticScene(f"2007_{100 + k:06d}", "val" if k < n else "train", regions, label, image)
            )
    elif family == "context":
        for k in range(n + 1):
            # Scene 0: first and last of the 59 (2, 458), unannotated 0 and accordion (1, the
            # first of the 459, outside the 59); scene 1: wool (459, the last of the 459).
            forced = [[2, 458, 0, 1], [284, 0, 459], [], []][k % 4]
            pool = list(CONTEXT59_CATEGORY_IDS) + [0]
            values = _values(rng, pool, 4, forced)
            fill = 0 if k % 2 == 0 else int(rng.choice(CONTEXT59_CATEGORY_IDS))
            regions, label, image = _paint(rng, size, fill, values, family=family)
            scenes.append(
                SyntheticScene(f"2008_{200 + k:06d}", "val" if k < n else "train", regions, label, image)
            )
    elif family == "cityscapes":
        cities = ("frankfurt", "lindau", "munster")
        for k in range(n + 1):
            forced = [[0, 33, 9, 26, 23], [1, 24, 25], [], []][k % 4]
            values = _values(rng, list(range(34)), 5, forced)
            regions, label, image = _paint(rng, size, 7, values, family=family)
            city = cities[k % 3] if k < n else "aachen"
            split = "val" if k < n else "train"
            scenes.append(SyntheticScene(f"{city}_{k:06d}_000019", split, regions, label, image))
    elif family in ("ade20k", "ade_full"):  # one layout of ids and splits, two label spaces
        if family == "ade20k":
            pool, fills = list(range(151)), None  # fill: any class 1..150
            edge_cases = [[0, 1, 150], [0, 75]]
        else:
            # ADE-847's first, 256th (label 255, "pier") and last class and unannotated pixels;
            # then an object index outside the 847 beside label 300.
            ids = list(ade847_object_ids())
            outside = [i for i in range(1, 12) if i not in ids][:3]
            pool, fills = ids + outside + [0], ids
            edge_cases = [[ids[0], ids[255], ids[846], 0], [outside[0], ids[300]]]
        for k in range(n + 1):
            forced = [*edge_cases, [], []][k % 4]
            values = _values(rng, pool, 4, forced)
            fill = int(rng.integers(1, 151)) if fills is None else int(rng.choice(fills))
            regions, label, image = _paint(rng, size, fill, values, family=family)
            scene_id = f"ADE_val_{k + 1:08d}" if k < n else "ADE_train_00000001"
            scenes.append(
                SyntheticScene(scene_id, "validation" if k < n else "training", regions, label, image)
            )
    else:
        raise ValueError(f"no synthetic plan for {family!r}")
    return scenes


def synthetic_scenes(
    source_name: str, *, num_images: int = 4, seed: int = 0, size: tuple[int, int] = (96, 128)
) -> list[SyntheticScene]:
    """The seeded plan behind :func:`write_synthetic_source`: ``num_images`` scenes of the evaluated
    split plus one scene of another split (which converters must leave out).

    size: (H, W) of every image.
    """
    if source_name not in _FAMILY:
        raise ValueError(f"no synthetic twin for {source_name!r}; available: {', '.join(SYNTHETIC_SOURCES)}")
    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    family = _FAMILY[source_name]
    return _plan(family, _rng(family, seed), num_images, size)


# ------------------------------------------------------------------------------------- writers
def _save_jpeg(image: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path, format="JPEG", quality=92)


def _save_png(array: np.ndarray, path: Path, *, palette: np.ndarray | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if array.ndim == 2 and array.dtype != np.uint16:
        im = Image.fromarray(array.astype(np.uint8))
        if palette is not None:  # indices kept, mode becomes P (VOC's palette PNGs)
            im.putpalette(palette.reshape(-1).tolist())
    else:
        im = Image.fromarray(array)
    im.save(path, format="PNG")


def _rle(mask: np.ndarray) -> dict[str, object]:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def _write_context_json(scenes: list[SyntheticScene], path: Path) -> None:
    names = [line.split(",")[0].strip() for line in read_class_file(class_file_path("context59"))]
    images, annotations = [], []
    for scene in scenes:
        image_id = int(scene.id.replace("_", ""))  # the Detail API's id: 2008_000200 -> 2008000200
        h, w = scene.raw_label.shape
        images.append(
            {
                "image_id": image_id,
                "file_name": f"{scene.id}.jpg",
                "height": h,
                "width": w,
                "phase": scene.split,
            }
        )
        # A region of raw value 0, or of a class outside the 59 (the JSON holds the 59 only), is a
        # hole: no annotation there. The annotations of earlier regions leave it out; overlaps
        # between annotated regions stay (the later one paints over).
        for i, region in enumerate(scene.regions):
            if region.raw_value not in CONTEXT59_CATEGORY_IDS:
                continue
            mask = np.zeros((h, w), dtype=bool)
            y0, x0, y1, x1 = region.box
            mask[y0:y1, x0:x1] = True
            for later in scene.regions[i + 1 :]:
                if later.raw_value not in CONTEXT59_CATEGORY_IDS:
                    ly0, lx0, ly1, lx1 = later.box
                    mask[ly0:ly1, lx0:lx1] = False
            if not mask.any():
                continue
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": region.raw_value,
                    "segmentation": _rle(mask),
                    "area": int(mask.sum()),
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "iscrowd": 0,
                    "parts": [],
                }
            )
    categories = [
        {"category_id": cid, "name": name, "supercategory": "object", "onlysemantic": 0, "parts": []}
        for cid, name in zip(CONTEXT59_CATEGORY_IDS, names, strict=True)
    ]
    data = {
        "info": {"description": "fmbseg synthetic twin of PASCAL Context trainval_merged.json"},
        "images": images,
        "annos_segmentation": annotations,
        "categories": categories,
        "annos_occlusion": [],
        "annos_boundary": [],
        "parts": [],
    }
    path.write_text(json.dumps(data), encoding="utf-8")


def _write_source_tree(source_name: str, root: Path, scenes: list[SyntheticScene]) -> None:
    if source_name in ("coco_val2017", "coco_train2017"):
        for s in scenes:
            if s.split == ("val2017" if source_name == "coco_val2017" else "train2017"):
                _save_jpeg(s.image, root / s.split / f"{s.id}.jpg")
    elif source_name == "cocostuff_maps":
        for s in scenes:
            _save_png(s.raw_label, root / s.split / f"{s.id}.png")
    elif source_name == "voc2012":
        voc = root / "VOCdevkit" / "VOC2012"
        palette = voc_colour_map(256)
        for s in scenes:
            _save_jpeg(s.image, voc / "JPEGImages" / f"{s.id}.jpg")
            _save_png(s.raw_label, voc / "SegmentationClass" / f"{s.id}.png", palette=palette)
        sets = voc / "ImageSets" / "Segmentation"
        sets.mkdir(parents=True)
        for split in ("train", "val"):
            (sets / f"{split}.txt").write_text("".join(f"{s.id}\n" for s in scenes if s.split == split))
        (sets / "trainval.txt").write_text("".join(f"{s.id}\n" for s in sorted(scenes, key=lambda s: s.id)))
    elif source_name == "voc2010":
        for s in scenes:
            _save_jpeg(s.image, root / "VOCdevkit" / "VOC2010" / "JPEGImages" / f"{s.id}.jpg")
    elif source_name == "context_json":
        _write_context_json(scenes, root / "trainval_merged.json")
    elif source_name == "context_full":  # trainval.tar.gz: one LabelMap .mat per image, labels.txt
        for s in scenes:
            path = root / "trainval" / f"{s.id}.mat"
            path.parent.mkdir(parents=True, exist_ok=True)
            scipy.io.savemat(path, {"LabelMap": s.raw_label.astype(np.uint16)}, do_compression=True)
        names = [line.split(",")[0].strip() for line in _lines("context459")]
        (root / "labels.txt").write_text("".join(f"{i + 1}: {n}\n" for i, n in enumerate(names)))
    elif source_name == "ade20k_full":  # ADE20K_2021_17_01: images/ADE/<split>/<scene>/<name>{.jpg,_seg.png}
        for k, s in enumerate(scenes):
            folder = root / "ADE20K_2021_17_01" / "images" / "ADE" / s.split / _ADE_SCENES[k % 2]
            _save_jpeg(s.image, folder / f"{s.id}.jpg")
            seg = np.zeros((*s.raw_label.shape, 3), dtype=np.uint8)  # R = index / 256 * 10, G = index % 256
            seg[..., 0] = (s.raw_label // 256) * 10
            seg[..., 1] = s.raw_label % 256
            for r, region in enumerate(s.regions):  # B: an instance number per region (not read)
                y0, x0, y1, x1 = region.box
                seg[y0:y1, x0:x1, 2] = r
            _save_png(seg, folder / f"{s.id}_seg.png")
    elif source_name == "cityscapes_leftimg":
        for s in scenes:
            city = s.id.split("_")[0]
            _save_png(s.image, root / "leftImg8bit" / s.split / city / f"{s.id}_leftImg8bit.png")
    elif source_name == "cityscapes_gtfine":
        for s in scenes:
            city = s.id.split("_")[0]
            base = root / "gtFine" / s.split / city / f"{s.id}_gtFine"
            _save_png(s.raw_label, Path(f"{base}_labelIds.png"))
            instances = s.raw_label.astype(np.uint16).copy()
            objects = []
            for k, region in enumerate(s.regions):
                y0, x0, y1, x1 = region.box
                if region.raw_value in _CITY_THINGS:
                    visible = s.raw_label[y0:y1, x0:x1] == region.raw_value
                    instances[y0:y1, x0:x1][visible] = region.raw_value * 1000 + k
                objects.append(
                    {"label": str(region.raw_value), "polygon": [[x0, y0], [x1, y0], [x1, y1], [x0, y1]]}
                )
            _save_png(instances, Path(f"{base}_instanceIds.png"))
            h, w = s.raw_label.shape
            Path(f"{base}_polygons.json").write_text(
                json.dumps({"imgHeight": h, "imgWidth": w, "objects": objects})
            )
    elif source_name == "ade20k":
        ade = root / "ADEChallengeData2016"
        for s in scenes:
            _save_jpeg(s.image, ade / "images" / s.split / f"{s.id}.jpg")
            _save_png(s.raw_label, ade / "annotations" / s.split / f"{s.id}.png")
        names = [line.split(",")[0].strip() for line in read_class_file(class_file_path("ade150"))]
        (ade / "objectInfo150.txt").write_text(
            "Idx\tRatio\tTrain\tVal\tName\n"
            + "".join(f"{i + 1}\t0\t0\t0\t{n}\n" for i, n in enumerate(names))
        )
        (ade / "sceneCategories.txt").write_text("".join(f"{s.id} synthetic\n" for s in scenes))
    else:
        raise ValueError(f"no synthetic twin for {source_name!r}; available: {', '.join(SYNTHETIC_SOURCES)}")


def write_synthetic_source(
    source_name: str, root: Path, *, num_images: int = 4, seed: int = 0, size: tuple[int, int] = (96, 128)
) -> Path:
    """Write the raw twin of ``source_name`` at ``root`` (replaced atomically) and return ``root``.

    ``root`` then stands where the extracted archive would (``raw_dir/<source>``); a stamp marks
    the tree as synthetic, so ``download_source`` accepts it and meta.json records it.
    """
    spec = get_source(source_name)
    scenes = synthetic_scenes(source_name, num_images=num_images, seed=seed, size=size)
    root = Path(root)
    with atomic_directory(root) as tmp:
        _write_source_tree(source_name, tmp, scenes)
        stamp = {
            "source": spec.name,
            "filename": spec.filename,
            "sha256": None,
            "origin": "synthetic",
            "synthetic": True,
        }
        (tmp / STAMP_NAME).write_text(json.dumps(stamp, indent=2, sort_keys=True) + "\n")
    return root


def write_synthetic_benchmark(
    name: str, data_dir: Path, *, num_images: int = 4, seed: int = 0, size: tuple[int, int] = (96, 128)
) -> Path:
    """Write the raw twins of every source of benchmark ``name`` under ``data_dir/raw/`` and convert
    them to ``data_dir/datasets/<name>/``; return the canonical dataset's path."""
    spec = get_benchmark(name)
    data_dir = Path(data_dir)
    raw_dirs = {
        source: write_synthetic_source(
            source, data_dir / "raw" / source, num_images=num_images, seed=seed, size=size
        )
        for source in spec.sources
    }
    return convert_benchmark(
        name, raw_dirs=raw_dirs, out_dir=data_dir / "datasets" / name, expect_count=num_images
    )


def write_synthetic_unlabelled(
    folder: Path, *, num_images: int, seed: int = 0, size: tuple[int, int] = (96, 128)
) -> list[Path]:
    """Write ``num_images`` JPEG scenes (labelled-region look, no labels) into ``folder``; return their paths."""
    scenes = synthetic_scenes("coco_train2017", num_images=num_images, seed=seed, size=size)
    folder = Path(folder)
    paths = []
    for k, scene in enumerate(scenes[:num_images]):
        path = folder / f"img_{k:05d}.jpg"
        _save_jpeg(scene.image, path)
        paths.append(path)
    return paths
