"""The web page's pure parts: the review confidence against a naive loop, the worst-first order of a
real store, the review picture, and the upload check (pixel budget before decoding)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from components.datasets.readers import UnreadableImageError
from components.io import encode_label_png
from components.labelling.store import ImageEntry, PseudoLabels, ShardRecord, merge_outputs, write_shard
from components.review import image_detections, review_order, review_picture, stage1_agreement
from components.segmenter import SegmentResult
from components.tryout import legend_rows, read_upload

VOCABULARY = ["sky", "grass, lawn", "car"]


def naive_agreement(a: np.ndarray, b: np.ndarray, none: int) -> float:
    both = agree = 0
    for y in range(a.shape[0]):
        for x in range(a.shape[1]):
            if a[y, x] != none and b[y, x] != none:
                both += 1
                agree += int(a[y, x] == b[y, x])
    return agree / both if both else 0.0


@pytest.mark.parametrize("dtype,none", [(np.uint8, 255), (np.uint16, 65535)])
def test_agreement_matches_a_naive_loop(dtype, none) -> None:
    rng = np.random.default_rng(0)
    for _ in range(20):
        a = rng.choice([0, 1, 2, none], size=(9, 9)).astype(dtype)
        b = rng.choice([0, 1, 2, none], size=(9, 9)).astype(dtype)
        assert stage1_agreement(a, b) == pytest.approx(naive_agreement(a, b, none))


def test_agreement_edge_cases() -> None:
    full = np.zeros((4, 4), np.uint8)
    empty = np.full((4, 4), 255, np.uint8)
    assert stage1_agreement(full, full) == 1.0
    assert stage1_agreement(full, full + 1) == 0.0
    assert stage1_agreement(full, empty) == 0.0  # nothing corroborates
    with pytest.raises(ValueError, match="one shape and dtype"):
        stage1_agreement(full, np.zeros((4, 5), np.uint8))


def write_store(root: Path, maps: dict[str, tuple[np.ndarray, np.ndarray]], images: Path,
                detections: list[dict] | None = None) -> PseudoLabels:
    """A real Stage 1 store (one shard, merged) of the given [L, L] maps; each image a real PNG file."""
    images.mkdir(parents=True, exist_ok=True)
    entries = []
    for i, image_id in enumerate(maps):
        path = images / f"{image_id}.png"
        Image.fromarray(np.full((24, 32, 3), 40 * i, np.uint8)).save(path)
        entries.append(ImageEntry(image_id, path.as_posix(), f"sha-{image_id}"))
    rows = [{"image_id": e.image_id, "image_path": e.path, "sha256": e.sha256, "height": 24, "width": 32,
             "stage1_1": encode_label_png(maps[e.image_id][0]), "stage1_2": encode_label_png(maps[e.image_id][1]),
             "sam_size": 16, "amg_masks": []} for e in entries]
    record = ShardRecord("s0", "h", "m", entries, rows={e.image_id: k for k, e in enumerate(entries)})
    write_shard(root, record, rows, detections or [])
    merge_outputs(root, entries=entries, done=[record], skipped=[], vocabulary=VOCABULARY)
    return PseudoLabels(root)


def store_maps() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    base = np.zeros((8, 8), np.uint8)
    half = base.copy()
    half[:, 4:] = 2
    none = np.full((8, 8), 255, np.uint8)
    return {"agree": (base, base), "half": (base, half), "apart": (base, none), "quarter": (base, np.where(
        np.arange(8)[None, :] < 2, 1, 0).astype(np.uint8).repeat(8, 0).reshape(8, 8))}


def test_review_order_is_worst_first(tmp_path: Path) -> None:
    labels = write_store(tmp_path / "store", store_maps(), tmp_path / "imgs")
    order = review_order(labels)
    assert [(item.image_id, item.confidence) for item in order] == [
        ("apart", 0.0), ("half", 0.5), ("quarter", 0.75), ("agree", 1.0)]
    assert order[0].image_path == (tmp_path / "imgs" / "apart.png").as_posix()


def test_detections_and_picture_of_one_image(tmp_path: Path) -> None:
    detection = {"image_id": "half", "class_id": 2, "class_name": "car", "crops_won": 3, "points_xy": [[1.0, 2.0]],
                 "sam_score": 0.9, "mask_area_frac": 0.5, "stage1_2_masks": [], "stage1_2_scores": []}
    labels = write_store(tmp_path / "store", store_maps(), tmp_path / "imgs",
                         [detection, {**detection, "class_id": 0, "class_name": "sky"}])
    rows = image_detections(labels, "half")
    assert [(r["class_id"], r["class_name"], r["crops_won"]) for r in rows] == [(0, "sky", 3), (2, "car", 3)]
    assert image_detections(labels, "agree") == []
    image = np.full((24, 32, 3), 200, np.uint8)
    picture = review_picture(labels, "half", image, panel_height=48)
    assert picture.width == 3 * 64 + 2 * 6  # image | Stage 1.1 | Stage 1.2, 64 wide at 48 high
    gone = review_picture(labels, "half", None, panel_height=48)  # maps over grey at their own size
    assert gone.width == 3 * 48 + 2 * 6


def test_upload_check(tmp_path: Path) -> None:
    good = tmp_path / "good.jpg"
    Image.fromarray(np.full((30, 40, 3), 90, np.uint8)).save(good)
    assert read_upload(good).shape == (30, 40, 3)
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    with pytest.raises(UnreadableImageError, match="not an image"):
        read_upload(text)
    with pytest.raises(UnreadableImageError, match="too large to decode safely: 40 x 30 = 1,200 pixels"):
        read_upload(good, max_pixels=1000)


def test_legend_rows_largest_share_first() -> None:
    result = SegmentResult(label_map=np.zeros((2, 2), np.uint8), scores=np.array([0.2, 0.0, 0.7], np.float32),
                           shares=np.array([0.25, 0.0, 0.75], np.float32), present=[0, 2])
    rows = legend_rows(result, ["sky, clouds", "grass", "car"])
    # class k shows in VOC's colour of k + 1: no class is black
    assert [(r["name"], r["colour"], r["share"]) for r in rows] == [("car", "#808000", 0.75), ("sky", "#800000", 0.25)]
