"""Stage 1.1 / 1.2 on one image: planted masks checked exactly, and the whole pipeline on the
miniature CLIP and SAM."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from components.io import UNLABELLED as IGNORE
from components.labelling.detect import Presence
from components.labelling.stage1 import (
    AmgMask,
    AmgSettings,
    Stage1Settings,
    automatic_masks,
    decode_masks,
    label_image,
    resize_label,
    stage1_1,
    stage1_2,
)
from components.models.clip_dense import prototypes as text_prototypes
from components.models.registry import build_clip, build_sam
from components.models.sam import PointMask, PointMasks, SamImage


class PlantedSam:
    """Stands in for SamImage with planted answers: the mask for a prompt set is chosen by where its
    first point lies (left / right half of the frame), so the test knows which class gets which."""

    def __init__(self, size: int, left: PointMask, right: PointMask) -> None:
        self.size = (size, size)
        self._left, self._right = left, right
        self.prompts: list[np.ndarray] = []

    def masks_from_point_sets(self, points: torch.Tensor) -> PointMasks:
        chosen = []
        for prompt_set in points:
            self.prompts.append(prompt_set.numpy())
            chosen.append(self._left if float(prompt_set[0, 0]) < self.size[1] / 2 else self._right)
        masks = torch.as_tensor(np.stack([c.mask for c in chosen])) if chosen else torch.zeros(0, *self.size).bool()
        return PointMasks(masks, torch.tensor([c.score for c in chosen], dtype=torch.float32))


def _box(size: int, r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
    mask = np.zeros((size, size), dtype=bool)
    mask[r0:r1, c0:c1] = True
    return mask


def _two_class_patches(h: int = 4, w: int = 4, d: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense map: left half is class 0's direction, right half class 1's; prototypes one-hot."""
    patches = torch.zeros(h, w, d)
    patches[:, : w // 2, 0] = 1.0
    patches[:, w // 2 :, 1] = 1.0
    return patches, torch.eye(d)


def test_stage1_1_overlap_goes_to_the_higher_sam_score() -> None:
    size = 16
    patches, protos = _two_class_patches()
    left = PointMask(_box(size, 0, 12, 0, 10), 0.9)  # class 0, high score
    right = PointMask(_box(size, 4, 16, 6, 16), 0.4)  # class 1, overlaps columns 6..9
    sam = PlantedSam(size, left, right)
    found = Presence(torch.tensor([0, 1]), torch.tensor([8, 8]))
    out = stage1_1(sam, patches, protos, found, top_k_points=3)
    expected = np.full((size, size), IGNORE, dtype=np.uint8)
    expected[right.mask] = 1
    expected[left.mask] = 0  # the higher score wins the overlap
    np.testing.assert_array_equal(out.label.numpy(), expected)
    assert out.scores.tolist() == pytest.approx([0.9, 0.4])
    assert out.area_frac.tolist() == pytest.approx([120 / 256, 120 / 256])
    # the prompts of class 0 are left-half patch centres, those of class 1 right-half ones
    assert out.points_xy.shape == (2, 3, 2)
    assert (out.points_xy[0, :, 0] < size / 2).all() and (out.points_xy[1, :, 0] > size / 2).all()

    swapped = PlantedSam(size, PointMask(left.mask, 0.3), PointMask(right.mask, 0.8))
    out = stage1_1(swapped, patches, protos, found, top_k_points=3)
    expected = np.full((size, size), IGNORE, dtype=np.uint8)
    expected[left.mask] = 0
    expected[right.mask] = 1
    np.testing.assert_array_equal(out.label.numpy(), expected)


def test_stage1_1_with_no_present_class_is_all_unlabelled() -> None:
    patches, protos = _two_class_patches()
    sam = PlantedSam(8, PointMask(_box(8, 0, 8, 0, 8), 1.0), PointMask(_box(8, 0, 8, 0, 8), 1.0))
    out = stage1_1(sam, patches, protos, Presence(torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64)),
                   top_k_points=2)
    assert (out.label == IGNORE).all() and sam.prompts == []


def test_stage1_2_paints_larger_masks_first_and_labels_by_mean_feature() -> None:
    size = 16
    patches, protos = _two_class_patches()
    big_right = _box(size, 0, 16, 8, 16)  # class 1 region, 128 px
    small_left = _box(size, 2, 6, 2, 6)  # class 0 region, 16 px
    straddling = _box(size, 8, 12, 4, 16)  # 48 px, 1/3 left: mean feature closer to class 1
    masks = torch.from_numpy(np.stack([small_left, big_right, straddling]))
    found = Presence(torch.tensor([0, 1]), torch.tensor([1, 1]))
    out = stage1_2(masks, patches, protos, found, min_area_frac=0.0, max_area_frac=1.0)
    assert out.mask_labels.tolist() == [0, 1, 1]
    expected = np.full((size, size), IGNORE, dtype=np.uint8)
    for mask, label in sorted(zip([small_left, big_right, straddling], [0, 1, 1], strict=True), key=lambda ml: -ml[0].sum()):
        expected[mask] = label  # larger first, smaller on top
    np.testing.assert_array_equal(out.label.numpy(), expected)

    # a small class-0 mask inside a big class-1 mask stays visible on top of it
    inner = _box(size, 4, 8, 10, 12)
    patches_inner = patches.clone()
    patches_inner[1, 2:, :] = torch.tensor([1.0, 0.0, 0.0])  # row 1 of the right half looks like class 0
    out = stage1_2(torch.from_numpy(np.stack([inner, big_right])), patches_inner, protos, found,
                   min_area_frac=0.0, max_area_frac=1.0)
    assert out.mask_labels.tolist() == [0, 1]
    assert (out.label.numpy()[inner] == 0).all()
    assert (out.label.numpy()[big_right & ~inner] == 1).all()


def test_stage1_2_size_filter_and_absent_classes() -> None:
    size = 16
    patches, protos = _two_class_patches()
    tiny = _box(size, 0, 1, 0, 2)  # 2 px = 0.0078 of the image
    whole = np.ones((size, size), dtype=bool)
    mid = _box(size, 0, 8, 0, 8)
    masks = torch.from_numpy(np.stack([tiny, whole, mid]))
    found = Presence(torch.tensor([0, 1]), torch.tensor([1, 1]))
    out = stage1_2(masks, patches, protos, found, min_area_frac=0.01, max_area_frac=0.95)
    assert out.mask_labels.tolist() == [-1, -1, 0]
    assert np.isnan(out.mask_scores[0].item()) and np.isnan(out.mask_scores[1].item())
    assert (out.label.numpy()[mid] == 0).all() and (out.label.numpy()[~mid] == IGNORE).all()
    none = Presence(torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64))
    out = stage1_2(masks, patches, protos, none, min_area_frac=0.0, max_area_frac=1.0)
    assert (out.label == IGNORE).all() and out.mask_labels.tolist() == [-1, -1, -1]


def test_rle_masks_decode_to_the_encoded_masks() -> None:
    rng = np.random.default_rng(0)
    masks = rng.random((3, 20, 20)) > 0.5
    encoded = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
    amg = [AmgMask(e["counts"], 0.9, 0.95, int(m.sum())) for e, m in zip(encoded, masks, strict=True)]
    np.testing.assert_array_equal(decode_masks(amg, 20).numpy(), masks)
    assert decode_masks([], 20).shape == (0, 20, 20)


def test_resize_label_samples_pixel_centres() -> None:
    label = torch.tensor([[0, 1], [2, 255]], dtype=torch.uint8)
    np.testing.assert_array_equal(resize_label(label, 4), np.kron(label.numpy(), np.ones((2, 2), dtype=np.uint8)))
    big = torch.arange(36, dtype=torch.uint8).reshape(6, 6)
    got = resize_label(big, 3)
    np.testing.assert_array_equal(got, big.numpy()[1::2, 1::2])  # centres of 2x2 blocks: index 2i+1 (floor of 2i+1)


@pytest.fixture(scope="module")
def mini_models() -> dict:
    clip = build_clip("mini-clip", device="cpu")
    sam = build_sam("mini-sam", device="cpu")
    protos = text_prototypes(clip.model, clip.tokenizer, ["road", "sky, clouds", "tree", "car", "person"])
    return {"clip": clip, "sam": sam, "prototypes": protos}


def _settings(**over: object) -> Stage1Settings:
    base = dict(
        grid=2, dense_mode="fmbseg", min_crops=1, top_k_points=5, sam_size=64, label_size=48,
        amg=AmgSettings(points_per_side=6, points_per_batch=64, pred_iou_thresh=0.0, stability_score_thresh=0.0,
                        stability_score_offset=1.0, box_nms_thresh=0.95, min_mask_region_area=0,
                        min_area_frac=0.0, max_area_frac=1.0),
        crop_batch=4,
    )
    base.update(over)
    return Stage1Settings(**base)


def _label(models: dict, image: np.ndarray, settings: Stage1Settings, **kw: object):
    clip = models["clip"]
    return label_image(
        image, clip_model=clip.model, clip_mean=clip.spec.mean, clip_std=clip.spec.std,
        clip_image_size=clip.spec.image_size, sam=models["sam"], prototypes=models["prototypes"],
        settings=settings, **kw,
    )


def test_label_image_end_to_end_on_miniature_models(mini_models: dict) -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)
    settings = _settings(min_crops=0)
    result = _label(mini_models, image, settings)
    assert result.stage1_1.shape == (48, 48) and result.stage1_1.dtype == np.uint8
    assert result.stage1_2.shape == (48, 48) and result.stage1_2.dtype == np.uint8
    present = set(result.presence.classes.tolist())
    assert present and int(result.presence.crops_won.sum()) == settings.grid**2  # T = 0: every crop's class
    strict = _label(mini_models, image, _settings(min_crops=1)).presence  # T = 1: more than one crop won
    won = dict(zip(result.presence.classes.tolist(), result.presence.crops_won.tolist(), strict=True))
    assert set(strict.classes.tolist()) == {c for c, n in won.items() if n > 1}
    assert set(np.unique(result.stage1_1).tolist()) <= present | {IGNORE}
    assert set(np.unique(result.stage1_2).tolist()) <= present | {IGNORE}
    assert result.stage1_1_detail.points_xy.shape == (len(present), 5, 2)
    assert len(result.amg_masks) == len(result.stage1_2_detail.mask_labels) > 0
    assert all(isinstance(m.counts, bytes) for m in result.amg_masks)

    # relabelling from the kept masks gives the same maps without the mask generator
    again = _label(mini_models, image, settings, kept_masks=result.amg_masks)
    np.testing.assert_array_equal(again.stage1_2, result.stage1_2)
    np.testing.assert_array_equal(again.stage1_1, result.stage1_1)

    # semi-supervised: the image-level labels replace detection
    semi = _label(mini_models, image, settings, image_classes=[4, 2])
    assert semi.presence.classes.tolist() == [2, 4]
    assert set(np.unique(semi.stage1_1).tolist()) <= {2, 4, IGNORE}


def test_automatic_masks_keep_the_masks_their_rles_decode_to(mini_models: dict) -> None:
    """Stage 1.2 reads the generator's masks as they are; the kept RLEs decode to the same masks and
    equal the generator's own COCO RLE records."""
    image = np.random.default_rng(2).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    embedded = SamImage(mini_models["sam"], image)
    amg_settings = _settings().amg
    amg, masks = automatic_masks(embedded, amg_settings)
    assert len(amg) > 0 and masks.shape == (len(amg), 64, 64) and masks.dtype == torch.bool
    np.testing.assert_array_equal(decode_masks(amg, 64).numpy(), masks.numpy())
    records = embedded.automatic_masks(**amg_settings.generator_args(), output_mode="coco_rle")
    assert [m.counts for m in amg] == [r["segmentation"]["counts"].encode() for r in records]
    assert [(m.area, m.predicted_iou, m.stability_score) for m in amg] == [
        (r["area"], r["predicted_iou"], r["stability_score"]) for r in records
    ]
    none, empty = automatic_masks(embedded, replace(amg_settings, pred_iou_thresh=1.5))
    assert none == [] and empty.shape == (0, 64, 64)


def test_label_image_writes_16_bit_maps_past_255_prompts(mini_models: dict) -> None:
    """A 300-prompt vocabulary (the five classes last, at 295..299): both maps are uint16 with 65535 =
    unlabelled, and every labelled pixel names a present prompt, whatever its index."""
    rng = np.random.default_rng(1)
    fillers = torch.nn.functional.normalize(torch.from_numpy(rng.standard_normal((295, mini_models["prototypes"].shape[1]))).float(), dim=1)
    wide = {**mini_models, "prototypes": torch.cat([fillers, mini_models["prototypes"]])}
    image = rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)
    result = _label(wide, image, _settings(min_crops=0))
    present = set(result.presence.classes.tolist())
    assert present and max(present) < 300
    for label in (result.stage1_1, result.stage1_2):
        assert label.dtype == np.uint16 and label.shape == (48, 48)
        assert set(np.unique(label).tolist()) <= present | {65535}
    semi = _label(wide, image, _settings(), image_classes=[297, 299])
    assert set(np.unique(semi.stage1_1).tolist()) <= {297, 299, 65535} and (semi.stage1_1 != 65535).any()


def test_label_image_with_a_threshold_no_class_is_present(mini_models: dict) -> None:
    image = np.full((40, 40, 3), 120, dtype=np.uint8)
    result = _label(mini_models, image, _settings(min_crops=4))  # 4 crops can never give more than 4 wins
    assert result.presence.classes.numel() == 0
    assert (result.stage1_1 == IGNORE).all() and (result.stage1_2 == IGNORE).all()
    assert len(result.amg_masks) > 0  # kept for a later relabel all the same
