"""Every converter on its synthetic twin: label values, ignore handling and class counts, checked
pixel by pixel against a naive reference built from the planted regions and the published class
lists (not from the converters' lookup tables)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from components.datasets.convert import (
    CITYSCAPES_ID_TO_TRAINID,
    CONTEXT59_CATEGORY_IDS,
    apply_lut,
    cocostuff_lut,
    convert_benchmark,
)
from components.datasets.download import download_source
from components.datasets.readers import CanonicalDataset
from components.datasets.registry import BENCHMARKS, class_file_path, get_benchmark, read_class_file
from components.io import label_dtype, unlabelled_for, voc_colour_map
from demoworld.synthetic import (
    synthetic_scenes,
    write_synthetic_benchmark,
    write_synthetic_source,
    write_synthetic_unlabelled,
)
from tests import REPO_ROOT

# COCO-Stuff labels.txt (github.com/nightrome/cocostuff), index = value in the stuffthingmaps
# (COCO id - 1); 255 is 'unlabeled'. Spaces inside a name are written "_". The reference the
# CS-171 / CO-80 / COCO-Object checks use.
COCOSTUFF_NAMES = [
    n.replace("_", " ")
    for n in (
        "person bicycle car motorcycle airplane bus train truck boat traffic_light fire_hydrant street_sign "
        "stop_sign parking_meter bench bird cat dog horse sheep cow elephant bear zebra giraffe hat backpack "
        "umbrella shoe eye_glasses handbag tie suitcase frisbee skis snowboard sports_ball kite baseball_bat "
        "baseball_glove skateboard surfboard tennis_racket bottle plate wine_glass cup fork knife spoon bowl "
        "banana apple sandwich orange broccoli carrot hot_dog pizza donut cake chair couch potted_plant bed "
        "mirror dining_table window desk toilet door tv laptop mouse remote keyboard cell_phone microwave "
        "oven toaster sink refrigerator blender book clock vase scissors teddy_bear hair_drier toothbrush "
        "hair_brush banner blanket branch bridge building-other bush cabinet cage cardboard carpet "
        "ceiling-other ceiling-tile cloth clothes clouds counter cupboard curtain desk-stuff dirt door-stuff "
        "fence floor-marble floor-other floor-stone floor-tile floor-wood flower fog food-other fruit "
        "furniture-other grass gravel ground-other hill house leaves light mat metal mirror-stuff moss "
        "mountain mud napkin net paper pavement pillow plant-other plastic platform playingfield railing "
        "railroad river road rock roof rug salad sand sea shelf sky-other skyscraper snow solid-other stairs "
        "stone straw structural-other table tent textile-other towel tree vegetable wall-brick wall-concrete "
        "wall-other wall-panel wall-stone wall-tile wall-wood water-other waterdrops window-blind "
        "window-other wood "
    ).split()
]
# mmseg's PascalContext59 converter mapping (unsorted, as published), background 0 dropped.
MMSEG_CONTEXT_MAPPING = [
    2, 259, 260, 415, 324, 9, 258, 144, 18, 19, 22, 23, 397, 25, 284, 158, 159, 416, 33, 162, 420, 454, 295, 296,
    427, 44, 45, 46, 308, 59, 440, 445, 31, 232, 65, 354, 424, 68, 326, 72, 458, 34, 207, 80, 355, 85, 347, 220,
    349, 360, 98, 187, 104, 105, 366, 189, 368, 113, 115,
]  # fmt: skip
# Cityscapes label names by labelId 0..33 (cityscapesscripts/helpers/labels.py).
CITYSCAPES_NAMES = [
    "unlabeled", "ego vehicle", "rectification border", "out of roi", "static", "dynamic", "ground", "road",
    "sidewalk", "parking", "rail track", "building", "wall", "fence", "guard rail", "bridge", "tunnel", "pole",
    "polegroup", "traffic light", "traffic sign", "vegetation", "terrain", "sky", "person", "rider", "car",
    "truck", "bus", "caravan", "trailer", "train", "motorcycle", "bicycle",
]  # fmt: skip
# A few PASCAL Context category ids (459-class labels.txt) and their names.
CONTEXT_NAMES = {2: "aeroplane", 9: "bag", 284: "person", 360: "sky", 458: "wood"}


ADE847_IDS = json.loads((REPO_ROOT / "components" / "datasets" / "ade847_ids.json").read_text())


def first_names(class_file: str) -> list[str]:
    return [line.split(",")[0].strip() for line in read_class_file(class_file_path(class_file))]


def all_names(line: str) -> list[str]:
    return [n.strip() for n in line.split(",")]


def test_reference_list_is_the_182_cocostuff_names():
    assert (
        len(COCOSTUFF_NAMES) == 182
        and COCOSTUFF_NAMES[11] == "street sign"
        and COCOSTUFF_NAMES[181] == "wood"
    )


def _reference_label(name: str, raw: np.ndarray) -> np.ndarray:
    """Naive per-pixel mapping of a raw label map, by class names."""
    out = np.full(raw.shape, -1, dtype=np.int64)
    cs171 = first_names("cocostuff171")
    coco80 = first_names("coco80")
    city19 = first_names("cityscapes19")
    for y in range(raw.shape[0]):
        for x in range(raw.shape[1]):
            v = int(raw[y, x])
            if name in ("cs171", "co80", "coco_object"):
                coco_name = None if v == 255 else COCOSTUFF_NAMES[v]
                if name == "cs171":
                    out[y, x] = 255 if coco_name is None else cs171.index(coco_name)
                elif name == "co80":
                    out[y, x] = coco80.index(coco_name) if coco_name in coco80 else 255
                else:
                    out[y, x] = coco80.index(coco_name) + 1 if coco_name in coco80 else 0
            elif name == "pv21":
                out[y, x] = v
            elif name == "pv20":
                out[y, x] = 255 if v in (0, 255) else v - 1
            elif name == "pc59":
                out[y, x] = sorted(MMSEG_CONTEXT_MAPPING).index(v) if v in MMSEG_CONTEXT_MAPPING else 255
            elif name == "pc60":  # background 0 is every pixel none of the 59 classes covers
                out[y, x] = sorted(MMSEG_CONTEXT_MAPPING).index(v) + 1 if v in MMSEG_CONTEXT_MAPPING else 0
            elif name == "cityscapes":
                city_name = CITYSCAPES_NAMES[v]
                out[y, x] = city19.index(city_name) if city_name in city19 else 255
            elif name == "ade20k":
                out[y, x] = 255 if v == 0 else v - 1
            elif name == "pc459":  # LabelMap value k = labels.txt line k; 0 unlabelled
                out[y, x] = 65535 if v == 0 else v - 1
            elif name == "ade847":  # MaskFormer's id of each ADE-847 class, in label order
                out[y, x] = ADE847_IDS.index(v) if v in ADE847_IDS else 65535
    return out


LABELLED = [b for b, spec in BENCHMARKS.items() if spec.labelled]


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synthetic")
    for name in BENCHMARKS:
        write_synthetic_benchmark(name, root, num_images=4, seed=3)
    return root


@pytest.mark.parametrize("name", LABELLED)
def test_converter_matches_the_planted_regions(synthetic_root, name):
    spec = BENCHMARKS[name]
    ds = CanonicalDataset(synthetic_root / "datasets" / name, spec.split)
    label_source = {
        "pv21": "voc2012",
        "pv20": "voc2012",
        "pc59": "context_json",
        "pc60": "context_json",
        "cityscapes": "cityscapes_gtfine",
    }
    scenes = synthetic_scenes(label_source.get(name, spec.sources[-1]), num_images=4, seed=3)
    evaluated = [s for s in scenes if s.split == spec.source_split]
    assert len(evaluated) == 4 and len(scenes) == 5  # the twin also holds a scene of another split
    assert ds.ids == sorted(s.id for s in evaluated)
    for scene in evaluated:
        got = ds.read_label(scene.id)
        assert got.dtype == label_dtype(spec.num_classes) and got.shape == scene.raw_label.shape
        np.testing.assert_array_equal(got, _reference_label(name, scene.raw_label))
        assert ds.read_image(scene.id).shape == (*scene.raw_label.shape, 3)
    values = set(np.unique(np.stack([ds.read_label(i) for i in ds.ids])).tolist())
    assert values <= set(range(spec.num_classes)) | {unlabelled_for(spec.num_classes)}
    assert len(ds.classes) == spec.num_classes
    assert ds.meta["num_classes"] == spec.num_classes and ds.meta["num_images"] == 4
    assert ds.meta["background"] == spec.background and ds.meta["reduce_zero_label"] == spec.reduce_zero_label
    assert all(src["synthetic"] for src in ds.meta["sources"].values())


def test_cs171_edge_ids_around_the_gaps(synthetic_root):
    # Scene 0 plants person (0), stop sign (12, right after the street-sign gap), toothbrush (89),
    # banner (91, first stuff), wood (181, last) and unlabelled (255).
    lut = cocostuff_lut("cs171")
    assert [int(lut[v]) for v in (0, 10, 12, 89, 91, 181, 255)] == [0, 10, 11, 79, 80, 170, 255]
    scene = next(s for s in synthetic_scenes("cocostuff_maps", num_images=4, seed=3) if s.split == "val2017")
    got = CanonicalDataset(synthetic_root / "datasets" / "cs171", "val").read_label(scene.id)
    last = scene.regions[-1]  # painted last: nothing covers it
    y0, x0, y1, x1 = last.box
    assert np.all(got[y0:y1, x0:x1] == {255: 255}.get(last.raw_value, lut[last.raw_value]))


@pytest.mark.parametrize("target", ["cs171", "co80", "coco_object"])
def test_unused_cocostuff_ids_are_rejected(target):
    raw = np.array([[0, 11]], dtype=np.uint8)  # 11 = street sign, never annotated
    with pytest.raises(ValueError, match=r"unexpected raw label values \[11\]"):
        apply_lut(raw, cocostuff_lut(target), what="x.png")


def test_class_files_have_the_protocol_sizes_and_orders():
    cs171 = first_names("cocostuff171")
    assert cs171 == [
        n for i, n in enumerate(COCOSTUFF_NAMES) if i not in (11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90)
    ]
    assert first_names("coco80") == cs171[:80]
    assert (
        read_class_file(class_file_path("cocostuff_stuff"))
        == read_class_file(class_file_path("cocostuff171"))[80:]
    )
    assert first_names("coco_object") == ["background", *cs171[:80]]
    assert read_class_file(class_file_path("voc20")) == read_class_file(class_file_path("voc21"))[1:]
    assert len(read_class_file(class_file_path("voc21"))) == 21
    context = read_class_file(class_file_path("context59"))
    assert len(context) == 59 and sorted(MMSEG_CONTEXT_MAPPING) == list(CONTEXT59_CATEGORY_IDS)
    # Context's classes follow the sorted category ids, which is alphabetical order of the dataset's
    # names; every line keeps that name among its synonyms (last one).
    last = [all_names(line)[-1] for line in context]
    assert last == sorted(last)
    for cid, name in CONTEXT_NAMES.items():
        assert name in all_names(context[CONTEXT59_CATEGORY_IDS.index(cid)]) or (name, cid) == (
            "aeroplane",
            2,
        )
    assert all_names(context[0]) == ["airplane", "aeroplane"]
    assert read_class_file(class_file_path("context60")) == ["background", *context]
    ade = first_names("ade150")
    assert len(ade) == 150 and ade[0] == "wall" and ade[12] == "person" and ade[149] == "flag"
    assert first_names("cityscapes19") == [
        "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
        "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
    ]  # fmt: skip


def test_cityscapes_table_matches_cityscapesscripts():
    from cityscapesscripts.helpers.labels import labels

    reference = {
        label.id: 255 if label.trainId in (-1, 255) else label.trainId for label in labels if label.id >= 0
    }
    assert CITYSCAPES_ID_TO_TRAINID == reference
    assert [label.name for label in sorted(labels, key=lambda lb: lb.id) if label.id >= 0] == CITYSCAPES_NAMES


def test_voc_twin_is_a_palette_png_with_boundaries(synthetic_root):
    path = next(
        (synthetic_root / "raw" / "voc2012" / "VOCdevkit" / "VOC2012" / "SegmentationClass").glob("*.png")
    )
    with Image.open(path) as im:
        assert im.mode == "P"
        assert np.array_equal(np.array(im.getpalette()[:768]).reshape(256, 3), voc_colour_map())
        assert 255 in np.asarray(im)
    assert voc_colour_map()[255].tolist() == [224, 224, 192] and voc_colour_map()[1].tolist() == [128, 0, 0]


def test_pv21_meta_names_the_extra_background_prompts(synthetic_root):
    meta = CanonicalDataset(synthetic_root / "datasets" / "pv21", "val").meta
    assert len(meta["extra_background_classes"]) == 91 and meta["extra_background_classes"][-1] == "wood"
    assert (
        CanonicalDataset(synthetic_root / "datasets" / "pv20", "val").meta["extra_background_classes"] is None
    )


def test_unlabelled_training_set_has_no_labels(synthetic_root):
    ds = CanonicalDataset(synthetic_root / "datasets" / "coco_train", "train")
    assert len(ds) == 4 and not ds.has_labels and len(ds.classes) == 171
    assert not (synthetic_root / "datasets" / "coco_train" / "labels").exists()
    with pytest.raises(FileNotFoundError, match="unlabelled"):
        ds.label_path(ds.ids[0])


def test_image_folder_conversion_finds_nested_images(tmp_path):
    # the unlabelled training set (coco_train) is any folder of images, found recursively
    photos = tmp_path / "raw" / "coco_train2017" / "train2017"
    write_synthetic_unlabelled(photos, num_images=2, seed=1)
    write_synthetic_unlabelled(photos / "trip", num_images=1, seed=2)
    (photos / "notes.txt").write_text("not an image")
    out = convert_benchmark("coco_train", raw_dirs={"coco_train2017": photos.parent}, out_dir=tmp_path / "ds")
    ds = CanonicalDataset(out, "train")
    assert ds.ids == ["img_00000", "img_00001", "trip__img_00000"]
    assert ds.classes == read_class_file(class_file_path("cocostuff171")) and ds.meta["labelled"] is False


def test_limit_expect_count_and_atomic_replacement(tmp_path):
    raw = {"ade20k": write_synthetic_source("ade20k", tmp_path / "raw" / "ade20k", num_images=3)}
    out = tmp_path / "datasets" / "ade20k"
    convert_benchmark("ade20k", raw_dirs=raw, out_dir=out, limit=2)
    assert (
        len(CanonicalDataset(out, "val")) == 2 and json.loads((out / "meta.json").read_text())["limit"] == 2
    )
    with pytest.raises(ValueError, match="full split has 2000"):
        convert_benchmark("ade20k", raw_dirs=raw, out_dir=out, expect_count=2000)
    assert len(CanonicalDataset(out, "val")) == 2  # the failed run left the previous output intact
    convert_benchmark("ade20k", raw_dirs=raw, out_dir=out, expect_count=3)
    assert len(CanonicalDataset(out, "val")) == 3
    assert sorted(p.name for p in out.parent.iterdir()) == ["ade20k"]  # no temporary trees left


def test_damaged_label_file_is_reported_with_its_name(tmp_path):
    root = write_synthetic_source("ade20k", tmp_path / "raw" / "ade20k", num_images=1)
    label = next((root / "ADEChallengeData2016" / "annotations" / "validation").glob("*.png"))
    Image.fromarray(np.full((4, 4), 200, dtype=np.uint8)).save(label)
    with pytest.raises(ValueError, match=rf"{label.name}.*\[200\]"):
        convert_benchmark("ade20k", raw_dirs={"ade20k": root}, out_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_local_roots_are_used_in_place(tmp_path):
    # what the download stage runs for a source with datasets.<source>.root: download_source, then convert
    user = tmp_path / "user"
    write_synthetic_source("voc2012", user / "voc", num_images=2)
    raw, lock = tmp_path / "data" / "raw", tmp_path / "data" / "downloads.lock.json"
    root = download_source("voc2012", raw_dir=raw, lock_file=lock, local_root=user / "voc" / "VOCdevkit" / "VOC2012",
                           progress=False)
    out = convert_benchmark("pv20", raw_dirs={"voc2012": root}, out_dir=tmp_path / "data" / "datasets" / "pv20",
                            limit=2)
    assert out == tmp_path / "data" / "datasets" / "pv20" and len(CanonicalDataset(out, "val")) == 2
    assert not raw.exists()  # nothing downloaded or copied
    root = download_source("voc2012", raw_dir=raw, lock_file=lock, local_root=user / "voc", progress=False)
    with pytest.raises(ValueError, match="full split has 1449"):  # a full run insists on the published size
        convert_benchmark("pv20", raw_dirs={"voc2012": root}, out_dir=tmp_path / "data" / "datasets" / "pv20",
                          expect_count=get_benchmark("pv20").expected_images)


@pytest.mark.parametrize(
    ("name", "planted"),
    [("pc459", {0, 283, 457, 458, 65535}), ("ade847", {0, 255, 300, 846, 65535})],
)
def test_16_bit_benchmarks_keep_labels_past_255_and_ignore_65535(synthetic_root, name, planted):
    # PC-459 plants accordion (label 0), person (283), wood (457), wool (458) and unlabelled
    # pixels; ADE-847 its first, 256th ("pier", 255: an 8-bit map would read it as ignore),
    # 301st and last class and indices outside the 847.
    ds = CanonicalDataset(synthetic_root / "datasets" / name, "val")
    labels = [ds.read_label(i) for i in ds.ids]
    assert all(label.dtype == np.uint16 for label in labels)
    assert planted <= set(np.unique(np.stack(labels)).tolist())
    assert ds.meta["ignore_index"] == 65535
    with Image.open(ds.label_path(ds.ids[0])) as im:
        assert im.mode.startswith("I;16")  # a 16-bit grayscale PNG
