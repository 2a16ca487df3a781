"""`fmbseg export --format coco|coco-polygons|yolo-seg|label-studio`: each format read back by its own
reader (pycocotools, a polygon rasteriser, Label Studio's converter) gives the label maps back."""

from __future__ import annotations

import json
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import yaml
from label_studio_converter.brush import decode_rle
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from scipy import ndimage
from typer.testing import CliRunner

from components.io import encode_label_png
from components.labelling.formats.outline import bridged_polygons, mask_loops
from components.labelling.formats.source import LabelledImage, predict_images, store_images
from components.labelling.store import PseudoLabels
from components.predictions import CLASSES_FILE, PREDICTIONS_FILE, mask_rle
from flows.cli import app
from flows.export import export_format_flow
from tests.components.labelling.test_export import VOCABULARY, _env, _write_store


def _rasterise(polygons: list[list[float]], height: int, width: int) -> np.ndarray:
    """The pixels (edge convention) inside the polygons: pycocotools' rasteriser, the COCO reference."""
    if not polygons:
        return np.zeros((height, width), bool)
    return mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))).astype(bool)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def _maps(size: int = 24) -> tuple[np.ndarray, np.ndarray]:
    """Two [size, size] maps with what breaks exports: a class in several parts, a ring (a hole with
    an island of another class in it), one-pixel lines, pixels touching only at a corner, 255 holes."""
    a = np.full((size, size), 255, np.uint8)
    a[2:6, 2:8] = 0
    a[10:14, 15:20] = 0  # class 0 in two parts
    a[8:20, 2:12] = 1
    a[11:16, 5:9] = 255  # class 1: a ring around a hole ...
    a[13, 6] = 2  # ... with an island of class 2 in it
    a[0, :] = 2  # a one-pixel line
    a[20, 20] = a[21, 21] = a[22, 20] = 2  # corner-touching pixels
    b = np.random.default_rng(0).choice(np.array([0, 1, 2, 255], np.uint8), size=(size, size))
    return a, b


@pytest.fixture
def store(tmp_path: Path) -> PseudoLabels:
    a, b = _maps()
    return _write_store(tmp_path / "store", {"a": (a, b), "b": (b, a), "sub/c": (a.T.copy(), b)})


def test_outlines_rasterise_back_to_the_mask_exactly() -> None:
    rng = np.random.default_rng(1)
    for _ in range(200):
        height, width = (int(v) for v in rng.integers(1, 25, 2))
        mask = rng.random((height, width)) < rng.random()
        loops = mask_loops(mask)
        even_odd = np.zeros_like(mask)
        for loop in loops:
            even_odd ^= _rasterise([loop.points.ravel().astype(float).tolist()], height, width)
        assert np.array_equal(even_odd, mask)
        outers = [loop for loop in loops if not loop.hole]
        assert len(outers) == ndimage.label(mask)[1]  # one outer loop per 4-connected part
        polygons = bridged_polygons(mask)
        assert len(polygons) == len(outers)
        union = np.zeros_like(mask)
        for polygon in polygons:
            union |= _rasterise([polygon.ravel().astype(float).tolist()], height, width)
        assert np.array_equal(union, mask)


def _class_masks(image: LabelledImage) -> dict[int, np.ndarray]:
    return {k: image.label == k for k in np.unique(image.label).tolist() if k != 255}


def test_coco_polygons_keep_every_part_and_holes_as_rle(store: PseudoLabels, tmp_path: Path,
                                                        prefect_harness: str) -> None:
    export_format_flow("coco-polygons", str(tmp_path / "out"), store=str(store.root))
    for variant in ("stage1_1", "stage1_2"):
        coco = COCO(tmp_path / "out" / variant / "annotations.json")
        assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == ["sky", "grass", "car"]
        expected = {im.file_name: im for im in store_images(store, variant)}
        holes = polygons = 0
        for record in coco.loadImgs(coco.getImgIds()):
            image = expected[record["file_name"]]
            masks = _class_masks(image)
            anns = coco.loadAnns(coco.getAnnIds(imgIds=[record["id"]]))
            assert sorted(a["category_id"] - 1 for a in anns) == sorted(masks)
            for ann in anns:
                mask = masks[ann["category_id"] - 1]
                assert _iou(coco.annToMask(ann).astype(bool), mask) >= 0.98
                x, y, w, h = ann["bbox"]
                if isinstance(ann["segmentation"], dict):  # RLE: only for a mask with a hole
                    assert any(loop.hole for loop in mask_loops(mask))
                    holes += 1
                    continue
                polygons += 1
                assert len(ann["segmentation"]) == ndimage.label(mask)[1]  # every part kept
                for polygon in ann["segmentation"]:
                    xs, ys = np.array(polygon[0::2]), np.array(polygon[1::2])
                    assert xs.min() >= x and xs.max() <= x + w and ys.min() >= y and ys.max() <= y + h
        assert polygons and (holes or variant == "stage1_2")


def test_yolo_seg_lines_rasterise_back_to_the_masks(store: PseudoLabels, tmp_path: Path,
                                                    prefect_harness: str) -> None:
    out = tmp_path / "yolo"
    export_format_flow("yolo-seg", str(out), store=str(store.root), variant="stage1_1")
    folder = out / "stage1_1"
    data = yaml.safe_load((folder / "data.yaml").read_text())
    assert data["names"] == {0: "sky", 1: "grass", 2: "car"} and data["train"] == "images"
    for image in store_images(store, "stage1_1"):
        stem = image.file_name.rsplit(".", 1)[0]
        decoded: dict[int, np.ndarray] = {}
        for line in (folder / "labels" / f"{stem}.txt").read_text().splitlines():
            k, *coords = line.split()
            xy = np.array(coords, float).reshape(-1, 2) * [image.width, image.height]
            assert (xy >= 0).all() and (xy <= [image.width, image.height]).all()
            part = _rasterise([xy.ravel().tolist()], image.height, image.width)
            decoded[int(k)] = decoded.get(int(k), np.zeros_like(part)) | part
        masks = _class_masks(image)
        assert sorted(decoded) == sorted(masks)
        for k, mask in masks.items():
            assert _iou(decoded[k], mask) >= 0.98


def test_label_studio_brush_rle_decodes_exactly_with_label_studios_converter(store: PseudoLabels, tmp_path: Path,
                                                                             prefect_harness: str) -> None:
    out = tmp_path / "ls"
    export_format_flow("label-studio", str(out), store=str(store.root), variant="stage1_2")
    folder = out / "stage1_2"
    config = ET.fromstring((folder / "labelling_config.xml").read_text())
    brush = config.find("BrushLabels")
    assert [label.get("value") for label in brush] == ["sky", "grass", "car"]
    assert config.find("Image").get("value") == "$image"
    tasks = json.loads((folder / "tasks.json").read_text())
    expected = {im.file_name: im for im in store_images(store, "stage1_2")}
    assert sorted(t["data"]["file_name"] for t in tasks) == sorted(expected)
    for task in tasks:
        image = expected[task["data"]["file_name"]]
        assert task["data"]["image"] == f"/data/local-files/?d={image.path}"
        regions = task["predictions"][0]["result"]
        masks = {VOCABULARY.index(next(c for c in VOCABULARY if c.startswith(r["value"]["brushlabels"][0]))):
                 r for r in regions}
        assert sorted(masks) == sorted(_class_masks(image))
        for k, region in masks.items():
            assert region["from_name"] == brush.get("name") and region["to_name"] == brush.get("toName")
            assert (region["original_height"], region["original_width"]) == (image.height, image.width)
            rgba = decode_rle(region["value"]["rle"]).reshape(image.height, image.width, 4)
            assert _iou(rgba[..., 3] > 0, image.label == k) == 1.0


def _write_predict_folder(folder: Path) -> dict[str, np.ndarray]:
    """A folder in `fmbseg predict`'s output format (components.predictions) with two images."""
    a, b = _maps()
    maps = {"x.png": a[:20, :17], "deep/y.png": b}
    folder.mkdir()
    (folder / CLASSES_FILE).write_text("".join(f"{c}\n" for c in VOCABULARY))
    lines = []
    for output, label in maps.items():
        (folder / output).parent.mkdir(parents=True, exist_ok=True)
        (folder / output).write_bytes(encode_label_png(label))
        present = [{"index": k, "name": VOCABULARY[k].split(",")[0], "share": 0.0, "score": 0.0,
                    "rle": mask_rle(label == k)} for k in np.unique(label).tolist() if k != 255]
        lines.append(json.dumps({"source": f"photos/{output[:-4]}.jpg", "output": output, "sha256": "0",
                                 "width": label.shape[1], "height": label.shape[0], "classes": present}))
    (folder / PREDICTIONS_FILE).write_text("\n".join(lines) + "\n")
    return {f"{output[:-4]}.jpg": label for output, label in maps.items()}


def test_coco_rle_from_a_predict_folder_decodes_exactly(tmp_path: Path, prefect_harness: str) -> None:
    """`fmbseg export --predictions DIR` as a user runs it: a real process, in a folder without params.yaml."""
    maps = _write_predict_folder(tmp_path / "pred")
    assert {im.file_name: im.path for im in predict_images(tmp_path / "pred")} == {
        "x.jpg": "photos/x.jpg", "deep/y.jpg": "photos/deep/y.jpg"}
    done = subprocess.run([sys.executable, "-m", "flows.cli", "export", "--predictions", "pred", "--out", "c"],
                          cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    coco = COCO(tmp_path / "c" / "predictions" / "annotations.json")
    for record in coco.loadImgs(coco.getImgIds()):
        label = maps[record["file_name"]]
        for ann in coco.loadAnns(coco.getAnnIds(imgIds=[record["id"]])):
            assert _iou(coco.annToMask(ann).astype(bool), label == ann["category_id"] - 1) == 1.0


def test_a_users_files_are_never_replaced_even_with_overwrite(store: PseudoLabels, tmp_path: Path,
                                                              prefect_harness: str) -> None:
    out = tmp_path / "out"
    (out / "stage1_1").mkdir(parents=True)
    (out / "stage1_1" / "mine.txt").write_text("a user's file")
    args = ["export", "--format", "yolo-seg", "--store", str(store.root), "--out", str(out)]
    refused = CliRunner().invoke(app, args)
    assert refused.exit_code == 2
    assert "not empty" in refused.output and len(refused.output.strip().splitlines()) == 1
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == ["stage1_1", "stage1_1/mine.txt"]
    # --overwrite lets fmbseg write next to the user's files, never replace a folder that holds one
    refused = CliRunner().invoke(app, [*args, "--overwrite"])
    assert refused.exit_code == 2 and "stage1_1/mine.txt" in refused.output, refused.output
    assert len(refused.output.strip().splitlines()) == 1
    assert (out / "stage1_1" / "mine.txt").read_text() == "a user's file"
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == ["stage1_1", "stage1_1/mine.txt"]
    (out / "stage1_1" / "mine.txt").rename(out / "mine.txt")  # moved aside: next to the export, kept
    export_format_flow("yolo-seg", str(out), store=str(store.root), overwrite=True)
    assert (out / "mine.txt").read_text() == "a user's file" and (out / "stage1_2" / "data.yaml").exists()
    # a rerun into fmbseg's own folder replaces its own files without --overwrite
    export_format_flow("yolo-seg", str(out), store=str(store.root))
    assert (out / "stage1_1" / "data.yaml").exists() and (out / "mine.txt").exists()
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == [".fmbseg-outputs.json"]


@pytest.mark.parametrize(("extra", "message"), [
    (["--format", "pascal"], "unknown format 'pascal'; supported: coco, coco-polygons, yolo-seg, label-studio"),
    (["--format", "yolo-seg", "--predictions", "nowhere"], "not a `fmbseg predict` output folder"),
    (["--format", "yolo-seg", "--variant", "s3"], "unknown variant 's3'"),
])
def test_format_user_errors_exit_2_before_writing(extra: list[str], message: str, store: PseudoLabels,
                                                  tmp_path: Path) -> None:
    args = ["export", "--out", str(tmp_path / "o"), *extra]
    if "--predictions" not in extra:
        args += ["--store", str(store.root)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert message in result.output and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()
