"""The Stage 1 shard pipeline without Prefect, on the miniature CLIP and SAM: decoding ahead in
order, a shard written with its record, unusable images reported, kept masks reused instead of
generated, and image-level labels read from a ground truth."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from components.io import encode_label_png
from components.labelling.plan import MaskSource
from components.labelling.shard import GroundTruth, ground_truth_classes, label_shard
from components.labelling.stage1 import AmgSettings, Stage1Settings
from components.labelling.store import ImageEntry, read_records, shard_paths
from components.models.clip_dense import prototypes as text_prototypes
from components.models.registry import build_clip, build_sam

VOCABULARY = ["road", "sky, clouds", "tree", "car", "person"]
SETTINGS = Stage1Settings(
    grid=2, dense_mode="fmbseg", min_crops=0, top_k_points=3, sam_size=64, label_size=48,
    amg=AmgSettings(points_per_side=4, points_per_batch=64, pred_iou_thresh=0.0, stability_score_thresh=0.0,
                    stability_score_offset=1.0, box_nms_thresh=0.95, min_mask_region_area=0,
                    min_area_frac=0.0, max_area_frac=1.0),
    crop_batch=4,
)


@pytest.fixture(scope="module")
def models() -> dict:
    clip = build_clip("mini-clip", device="cpu")
    protos = text_prototypes(clip.model, clip.tokenizer, VOCABULARY)
    return {"clip": clip, "sam": build_sam("mini-sam", device="cpu"), "prototypes": protos}


def _images(folder: Path) -> list[ImageEntry]:
    """Three decodable JPEGs and one truncated file, as the plan hands them to a shard."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    entries = []
    for k in range(3):
        path = folder / f"img{k}.jpg"
        Image.fromarray(rng.integers(0, 256, (40 + 8 * k, 56, 3), dtype=np.uint8)).save(path)
        entries.append(ImageEntry(f"img{k}", path.as_posix(), f"sha{k}"))
    (folder / "broken.jpg").write_bytes((folder / "img0.jpg").read_bytes()[:200])
    entries.insert(1, ImageEntry("broken", (folder / "broken.jpg").as_posix(), "shab"))
    return entries


def _shard(models: dict, root: Path, shard_id: str, images: list[ImageEntry], **kw: object) -> dict:
    return label_shard(root, shard_id, images, clip=models["clip"], sam=models["sam"],
                       prototypes=models["prototypes"], settings=SETTINGS, vocabulary=VOCABULARY,
                       settings_hash="s", mask_settings_hash="m", **kw)


def test_a_shard_is_written_with_its_record_and_relabelled_from_its_kept_masks(models: dict, tmp_path: Path) -> None:
    images = _images(tmp_path / "imgs")
    root = tmp_path / "store"
    report = _shard(models, root, "first", images, num_workers=2)
    assert (report["shard_id"], report["labelled"], report["skipped"], report["reused_masks"]) == ("first", 3, 1, 0)
    assert report["timings"]["amg"] > 0 and report["timings"]["io"] > 0
    (record,) = read_records(root)
    assert record.images == images and record.rows == {"img0": 0, "img1": 1, "img2": 2}
    assert [s["image_id"] for s in record.skipped] == ["broken"] and "broken.jpg" in record.skipped[0]["path"]
    first = pq.read_table(shard_paths(root, "first")["labels"]).to_pylist()
    assert [(r["height"], r["width"]) for r in first] == [(40, 56), (48, 56), (56, 56)]
    assert all(r["amg_masks"] for r in first)

    # the same images with their masks from the first shard: no mask generator, the same masks and Stage 1.2
    sources = {e.image_id: MaskSource("first", record.rows[e.image_id]) for e in images if e.image_id in record.rows}
    again = _shard(models, root, "second", images, mask_sources=sources)
    assert again["reused_masks"] == 3 and "amg" not in again["timings"]
    second = pq.read_table(shard_paths(root, "second")["labels"]).to_pylist()
    assert [(r["amg_masks"], r["stage1_2"]) for r in second] == [(r["amg_masks"], r["stage1_2"]) for r in first]


def test_image_level_labels_come_from_the_ground_truth_and_an_image_without_one_is_skipped(
    models: dict, tmp_path: Path
) -> None:
    images = [e for e in _images(tmp_path / "imgs") if e.image_id != "broken"]
    gt = tmp_path / "gt"
    (gt / "labels" / "val").mkdir(parents=True)
    label = np.full((40, 56), 255, dtype=np.uint8)
    label[:, :20], label[:, 30:] = 0, 1  # dataset classes 0 and 1
    (gt / "labels" / "val" / "img0.png").write_bytes(encode_label_png(label))
    (gt / "labels" / "val" / "img2.png").write_bytes(encode_label_png(np.ones((56, 56), dtype=np.uint8)))
    index_map = torch.tensor([3, 4])  # dataset class -> vocabulary index: car, person
    assert ground_truth_classes(str(gt), "img0", index_map) == [3, 4]
    assert ground_truth_classes(str(gt), "img1", index_map) is None

    root = tmp_path / "store"
    report = _shard(models, root, "gt", images, ground_truth=GroundTruth(str(gt), index_map))
    assert (report["labelled"], report["skipped"]) == (2, 1)
    (record,) = read_records(root)
    assert record.skipped == [{"image_id": "img1", "path": images[1].path,
                               "reason": f"no ground-truth label for image-level presence in {gt}"}]
    detections = pq.read_table(shard_paths(root, "gt")["detections"]).to_pylist()
    assert sorted((d["image_id"], d["class_id"]) for d in detections) == [("img0", 3), ("img0", 4), ("img2", 4)]
