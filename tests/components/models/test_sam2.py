"""Sam2Image on the miniature SAM 2.1 (transformers Sam2Model, seeded random weights): one encoder
pass, point prompts equal to Sam2Model's own forward, automatic masks equal to transformers'
mask-generation pipeline, and the records Stage 1 stores."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import Sam2Model

from components.models.masks import MaskImage, PointMask, embed_image
from components.models.registry import build_sam
from components.models.sam2 import Sam2Image, sam2_processor


@pytest.fixture(scope="module")
def sam2() -> Sam2Model:
    return build_sam("mini-sam2.1")


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    """Non-square, so the per-axis prompt scaling and the resize back are exercised."""
    return np.random.default_rng(0).integers(0, 256, (96, 128, 3), dtype=np.uint8)


def _own_forward(model: Sam2Model, image: np.ndarray, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """transformers' documented route: processor -> Sam2Model(pixel_values, points) -> post_process_masks.
    Returns [C, 3, H, W] bool masks and [C, 3] predicted IoUs."""
    processor = sam2_processor(model)
    inputs = processor(images=image, input_points=[points.tolist()], input_labels=[np.ones(points.shape[:2], int).tolist()],
                       return_tensors="pt")
    with torch.no_grad():
        out = model(**inputs, multimask_output=True)
    masks = processor.post_process_masks(out.pred_masks, inputs["original_sizes"])[0]
    return masks.numpy(), out.iou_scores[0].numpy()


def test_one_encoder_pass_per_image(sam2, image):
    calls = []
    handle = sam2.vision_encoder.register_forward_hook(lambda module, args, out: calls.append(1))
    try:
        embedded = embed_image(sam2, image)
        embedded.masks_from_points(np.array([[10.0, 20.0], [60.0, 40.0]]))
        embedded.masks_from_point_sets(np.array([[[100.0, 80.0]], [[5.0, 5.0]]]))
        embedded.automatic_masks(points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0)
    finally:
        handle.remove()
    assert len(calls) == 1
    assert isinstance(embedded, Sam2Image) and isinstance(embedded, MaskImage)


def test_point_sets_equal_sam2_forward(sam2, image):
    """Stage 1.1's batched call (5 classes x 4 points): each set's mask is the best of Sam2Model's
    3 multimask outputs by predicted IoU, as its own forward on the pixels decodes it."""
    points = np.random.default_rng(1).uniform([0, 0], [127, 95], size=(5, 4, 2)).astype(np.float32)
    result = embed_image(sam2, image).masks_from_point_sets(torch.as_tensor(points))
    assert result.masks.shape == (5, 96, 128) and result.masks.dtype == torch.bool
    assert result.scores.shape == (5,) and result.scores.dtype == torch.float32
    masks, ious = _own_forward(sam2, image, points)
    best = ious.argmax(axis=1)
    assert len(set(best.tolist())) > 1 or len(set(ious.round(3).flatten().tolist())) > 3  # not a constant model
    np.testing.assert_array_equal(result.masks.numpy(), masks[np.arange(5), best])
    np.testing.assert_allclose(result.scores.numpy(), ious[np.arange(5), best], atol=1e-6)
    assert 0 < result.masks.float().mean() < 1


def test_masks_from_points_is_one_set(sam2, image):
    embedded = embed_image(sam2, image)
    points = np.array([[10.0, 20.0], [60.5, 40.0], [127.0, 95.0]])
    single = embedded.masks_from_points(points)
    assert isinstance(single, PointMask) and single.mask.shape == (96, 128) and single.mask.dtype == np.bool_
    batched = embedded.masks_from_point_sets(points[None])
    np.testing.assert_array_equal(single.mask, batched.masks[0].numpy())
    assert single.score == float(batched.scores[0])
    empty = embedded.masks_from_point_sets(np.zeros((0, 5, 2)))
    assert empty.masks.shape == (0, 96, 128) and empty.scores.shape == (0,)


def test_bad_input(sam2, image):
    with pytest.raises(ValueError, match="uint8"):
        Sam2Image(sam2, image.astype(np.float32))
    embedded = Sam2Image(sam2, image)
    with pytest.raises(ValueError, match=r"\[P, 2\]"):
        embedded.masks_from_points(np.zeros((0, 2)))
    with pytest.raises(ValueError, match="crop_n_layers"):
        embedded.automatic_masks(crop_n_layers=1)


# Random weights predict masks of most of the image with IoUs spread over (0, 1): these settings
# keep about half the candidates at each filter and, with no box NMS, dozens of masks.
AMG = dict(points_per_side=8, points_per_batch=16, pred_iou_thresh=0.6, stability_score_thresh=0.5,
           stability_score_offset=0.5, box_nms_thresh=1.0)


@pytest.mark.parametrize("box_nms_thresh", [1.0, 0.7])
def test_automatic_masks_equal_the_mask_generation_pipeline(sam2, box_nms_thresh):
    """transformers' pipeline("mask-generation") supports Sam2Model: on a square image (its point
    scaling assumes the longest side) and the same settings, it keeps the same masks, in the same
    order, with the same predicted IoUs and boxes."""
    from PIL import Image
    from transformers import pipeline

    square = np.random.default_rng(3).integers(0, 256, (112, 112, 3), dtype=np.uint8)
    settings = {**AMG, "box_nms_thresh": box_nms_thresh}
    ours = embed_image(sam2, square).automatic_masks(**settings)
    generator = pipeline("mask-generation", model=sam2, image_processor=sam2_processor(sam2).image_processor,
                         device="cpu")
    theirs = generator(
        Image.fromarray(square), points_per_crop=settings["points_per_side"],
        points_per_batch=settings["points_per_batch"], pred_iou_thresh=settings["pred_iou_thresh"],
        stability_score_thresh=settings["stability_score_thresh"],
        stability_score_offset=settings["stability_score_offset"], crops_nms_thresh=box_nms_thresh,
        output_bboxes_mask=True,
    )
    assert len(ours) == len(theirs["masks"]) > 0
    assert len(ours) > 10 or box_nms_thresh < 1.0
    np.testing.assert_array_equal(np.stack([r["segmentation"] for r in ours]),
                                  np.stack([m.numpy() for m in theirs["masks"]]))
    np.testing.assert_allclose([r["predicted_iou"] for r in ours], theirs["scores"].numpy(), atol=1e-6)
    boxes = theirs["bounding_boxes"].numpy()
    assert [r["bbox"] for r in ours] == np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1).tolist()


def test_automatic_mask_records(sam2, image):
    """The records Stage 1 stores: the same fields and formats as SAM v1's, every filter applied."""
    embedded = embed_image(sam2, image)
    records = embedded.automatic_masks(**AMG)
    assert len(records) > 10
    for r in records:
        assert r.keys() == {"segmentation", "area", "bbox", "predicted_iou", "point_coords", "stability_score",
                            "crop_box"}
        assert r["segmentation"].shape == (96, 128) and r["segmentation"].dtype == np.bool_
        assert r["area"] == int(r["segmentation"].sum())
        ys, xs = np.nonzero(r["segmentation"])
        assert r["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min(), ys.max() - ys.min()]
        assert r["predicted_iou"] > AMG["pred_iou_thresh"] and r["stability_score"] >= AMG["stability_score_thresh"]
        assert r["crop_box"] == [0, 0, 128, 96] and len(r["point_coords"]) == 1
    scores = [r["predicted_iou"] for r in records]
    assert scores == sorted(scores, reverse=True)  # box NMS's order
    rles = embedded.automatic_masks(**AMG, output_mode="coco_rle")
    from pycocotools import mask as mask_utils

    for r, rle in zip(records, rles, strict=True):
        np.testing.assert_array_equal(mask_utils.decode({**rle["segmentation"], "counts": rle["segmentation"]["counts"]}),
                                      r["segmentation"])
    assert embedded.automatic_masks(**{**AMG, "pred_iou_thresh": 1.5}) == []


def test_stage1_label_to_store_with_sam2(tmp_path):
    """Stage 1 end to end with the SAM 2.1 miniature as the mask model: a shard labelled (1.1 prompts,
    1.2 automatic masks) and written to the store, then relabelled from its kept masks alone. The
    shard test's images (one of them truncated) and settings, with SAM 2.1 in place of SAM."""
    import pyarrow.parquet as pq

    from components.io import decode_label_png
    from components.labelling.plan import MaskSource
    from components.labelling.store import read_records, shard_paths
    from components.models.clip_dense import prototypes as text_prototypes
    from components.models.registry import build_clip
    from tests.components.labelling import test_shard as shard_test

    clip = build_clip("mini-clip")
    models = {"clip": clip, "sam": build_sam("mini-sam2.1"),
              "prototypes": text_prototypes(clip.model, clip.tokenizer, shard_test.VOCABULARY)}
    images = shard_test._images(tmp_path / "imgs")
    root = tmp_path / "store"
    report = shard_test._shard(models, root, "first", images)
    assert (report["labelled"], report["skipped"]) == (3, 1) and report["timings"]["amg"] > 0
    rows = pq.read_table(shard_paths(root, "first")["labels"]).to_pylist()
    present = set(range(len(shard_test.VOCABULARY)))
    for row in rows:
        assert row["amg_masks"] and row["sam_size"] == shard_test.SETTINGS.sam_size
        assert all(0 < m["predicted_iou"] <= 1 and m["area"] > 0 for m in row["amg_masks"])
        for variant in ("stage1_1", "stage1_2"):
            label = decode_label_png(row[variant])
            assert label.shape == (48, 48) and set(np.unique(label).tolist()) <= present | {255}
        assert (decode_label_png(row["stage1_1"]) != 255).any()  # the prompts painted something
    (record,) = read_records(root)
    sources = {e.image_id: MaskSource("first", record.rows[e.image_id]) for e in images if e.image_id in record.rows}
    again = shard_test._shard(models, root, "second", images, mask_sources=sources)
    assert again["reused_masks"] == 3 and "amg" not in again["timings"]
    second = pq.read_table(shard_paths(root, "second")["labels"]).to_pylist()
    assert [(r["amg_masks"], r["stage1_2"], r["stage1_1"]) for r in second] == [
        (r["amg_masks"], r["stage1_2"], r["stage1_1"]) for r in rows
    ]


def test_fetch_takes_sam2_files_from_the_hub(tmp_path, monkeypatch):
    """`fmbseg weights fetch sam2.1-hiera-large` downloads the hub repo's two files (SAM v1's fetch
    reads a URL that SAM 2.1 specs do not have); the download itself is recorded, not run (offline)."""
    import huggingface_hub

    from components.models.registry import get_spec
    from components.models.weights import fetch_weights

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    calls = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo, **kw: calls.append((repo, kw)))
    fetch_weights([get_spec("sam2.1-hiera-large")], weights_dir=tmp_path / "weights", progress=False)
    assert calls == [("facebook/sam2.1-hiera-large",
                      {"allow_patterns": ["config.json", "model.safetensors"], "cache_dir": tmp_path / "hub"})]
