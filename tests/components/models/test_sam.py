"""SamImage on the miniature SAM: one encoder pass, stock-identical automatic masks, point prompts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from segment_anything import SamAutomaticMaskGenerator, SamPredictor
from segment_anything.utils.amg import batched_mask_to_box

from components.models.registry import build_sam
from components.models.sam import PointMask, SamImage, mask_boxes

# Random weights predict low IoUs (about -0.02 … 0.1) and small logits: these settings keep some
# candidates and drop others at every filter.
AMG = dict(
    points_per_side=8,
    points_per_batch=16,
    pred_iou_thresh=0.05,
    stability_score_thresh=0.6,
    stability_score_offset=0.01,
    box_nms_thresh=1.0,
)



@pytest.fixture(scope="module")
def sam():
    return build_sam("mini-sam")


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (96, 128, 3), dtype=np.uint8)


def _records_equal(ours: list[dict], stock: list[dict]) -> None:
    assert len(ours) == len(stock)
    for a, b in zip(ours, stock, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            if isinstance(a[key], np.ndarray):
                np.testing.assert_array_equal(a[key], b[key])
            else:
                assert a[key] == b[key], key


def test_one_encoder_pass_per_image(sam, image):
    calls = []
    handle = sam.image_encoder.register_forward_hook(lambda module, args, out: calls.append(out.shape))
    try:
        embedded = SamImage(sam, image)
        embedded.masks_from_points(np.array([[10.0, 20.0], [60.0, 40.0]]))
        embedded.masks_from_points(torch.tensor([[100.0, 80.0]]))
        embedded.automatic_masks(**AMG)
        embedded.automatic_masks(**{**AMG, "output_mode": "coco_rle"})
    finally:
        handle.remove()
    assert len(calls) == 1


def test_masks_from_points_shape_and_stock_choice(sam, image):
    embedded = SamImage(sam, image)
    points = np.array([[10.0, 20.0], [60.5, 40.0], [127.0, 95.0]])
    result = embedded.masks_from_points(points)
    assert isinstance(result, PointMask)
    assert result.mask.shape == (96, 128) and result.mask.dtype == np.bool_
    assert isinstance(result.score, float)
    predictor = SamPredictor(sam)
    predictor.set_image(image)
    masks, scores, _ = predictor.predict(point_coords=points, point_labels=np.ones(3), multimask_output=True)
    best = int(np.argmax(scores))
    np.testing.assert_array_equal(result.mask, masks[best])
    assert result.score == pytest.approx(float(scores[best]), abs=1e-6)


def test_batched_point_sets_equal_one_decoder_call_per_set(sam, image):
    """Stage 1.1's batched call (5 classes x 5 points) gives the stock per-set masks and scores."""
    points = np.random.default_rng(1).uniform([0, 0], [127, 95], size=(5, 5, 2))
    batched = SamImage(sam, image).masks_from_point_sets(torch.as_tensor(points, dtype=torch.float32))
    assert batched.masks.shape == (5, 96, 128) and batched.masks.dtype == torch.bool
    assert batched.scores.shape == (5,) and batched.scores.dtype == torch.float32
    predictor = SamPredictor(sam)
    predictor.set_image(image)
    for c, prompt_set in enumerate(torch.as_tensor(points, dtype=torch.float32).double().numpy()):
        masks, scores, _ = predictor.predict(point_coords=prompt_set, point_labels=np.ones(5), multimask_output=True)
        best = int(np.argmax(scores))
        np.testing.assert_array_equal(batched.masks[c].numpy(), masks[best])
        assert float(batched.scores[c]) == pytest.approx(float(scores[best]), abs=1e-6)
    empty = SamImage(sam, image).masks_from_point_sets(np.zeros((0, 5, 2)))
    assert empty.masks.shape == (0, 96, 128) and empty.scores.shape == (0,)


@pytest.mark.parametrize("points_per_batch", [16, 64])  # four batches; one batch (taken as it is, not copied)
@pytest.mark.parametrize("output_mode", ["binary_mask", "coco_rle", "uncompressed_rle"])
def test_automatic_masks_equal_stock_generator(sam, image, output_mode, points_per_batch):
    settings = {**AMG, "points_per_batch": points_per_batch}
    ours = SamImage(sam, image).automatic_masks(**settings, output_mode=output_mode)
    stock = SamAutomaticMaskGenerator(sam, **settings, output_mode=output_mode).generate(image)
    assert len(ours) > 0
    _records_equal(ours, stock)


@pytest.mark.parametrize("output_mode", ["binary_mask", "coco_rle"])
def test_automatic_masks_with_small_region_cleanup_equal_stock_generator(sam, image, output_mode):
    """min_mask_region_area > 0 takes the stock clean-up (OpenCV) on run-length encoded masks."""
    pytest.importorskip("cv2")
    settings = {**AMG, "min_mask_region_area": 20, "output_mode": output_mode}
    ours = SamImage(sam, image).automatic_masks(**settings)
    stock = SamAutomaticMaskGenerator(sam, **settings).generate(image)
    assert len(ours) > 0
    _records_equal(ours, stock)


def test_automatic_masks_none_kept_equal_stock_generator(sam, image):
    settings = {**AMG, "pred_iou_thresh": 1.5}
    assert SamImage(sam, image).automatic_masks(**settings) == []
    assert SamAutomaticMaskGenerator(sam, **settings).generate(image) == []


def test_automatic_masks_upsample_only_iou_survivors(sam, image, monkeypatch):
    import components.models.sam as sam_module

    embedded = SamImage(sam, image)
    upsampled = []
    real = sam_module._postprocess_masks

    def counting(model, masks, input_size, original_size):
        upsampled.append(masks.shape[0] * masks.shape[1])
        return real(model, masks, input_size, original_size)

    monkeypatch.setattr(sam_module, "_postprocess_masks", counting)
    records = embedded.automatic_masks(**AMG)
    monkeypatch.undo()
    predictor = SamPredictor(sam)
    predictor.set_image(image)
    grid = (np.arange(8) + 0.5) / 8
    points = np.stack(np.meshgrid(grid * 128, grid * 96), axis=-1).reshape(-1, 2)
    _, iou, _ = predictor.predict_torch(
        torch.as_tensor(predictor.transform.apply_coords(points, (96, 128)), dtype=torch.float)[:, None],
        torch.ones(64, 1, dtype=torch.int),
        multimask_output=True,
    )
    survivors = int((iou > AMG["pred_iou_thresh"]).sum())
    assert 0 < len(records) <= survivors < iou.numel()
    assert sum(upsampled) == survivors


def test_automatic_mask_records(sam, image):
    records = SamImage(sam, image).automatic_masks(**AMG)
    for r in records:
        assert r["segmentation"].shape == (96, 128) and r["segmentation"].dtype == np.bool_
        assert r["area"] == int(r["segmentation"].sum())
        assert len(r["bbox"]) == 4 and r["predicted_iou"] > AMG["pred_iou_thresh"]
        assert r["stability_score"] >= AMG["stability_score_thresh"]
        assert r["crop_box"] == [0, 0, 128, 96]
        assert len(r["point_coords"]) == 1 and len(r["point_coords"][0]) == 2


def test_bad_input(sam, image):
    with pytest.raises(ValueError, match="uint8"):
        SamImage(sam, image.astype(np.float32))
    with pytest.raises(ValueError, match=r"\[H, W, 3\]"):
        SamImage(sam, image[..., 0])
    embedded = SamImage(sam, image)
    with pytest.raises(ValueError, match="crop_n_layers"):
        embedded.automatic_masks(crop_n_layers=1)
    with pytest.raises(ValueError, match="binary_mask, uncompressed_rle, coco_rle"):
        embedded.automatic_masks(output_mode="polygon")
    with pytest.raises(ValueError, match=r"\[P, 2\]"):
        embedded.masks_from_points(np.zeros((0, 2)))


def test_mask_boxes_equal_stock_boxes():
    generator = torch.Generator().manual_seed(0)
    masks = torch.rand(12, 9, 13, generator=generator) > 0.8
    masks[0] = False  # empty
    masks[1] = False
    masks[1, 4, 7] = True  # one pixel
    masks[2] = True  # full
    masks[3, :, 0] = True  # touches the edges only
    masks[3, 8, :] = True
    ours, stock = mask_boxes(masks), batched_mask_to_box(masks)
    assert ours.dtype == stock.dtype and torch.equal(ours, stock)
    empty = torch.zeros(0, 9, 13, dtype=torch.bool)
    assert torch.equal(mask_boxes(empty), batched_mask_to_box(empty))


def test_embed_image_picks_the_mask_image_by_model_class(sam, image):
    from components.models.masks import MaskImage, embed_image

    embedded = embed_image(sam, image)
    assert isinstance(embedded, SamImage) and isinstance(embedded, MaskImage)
    with pytest.raises(TypeError, match="not a mask model; supported: Sam"):
        embed_image(torch.nn.Linear(2, 2), image)
