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

