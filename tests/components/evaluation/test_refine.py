"""Mask painting (Stage 1.1 / 1.2 pseudo labels) and Stage 2 refinement against naive loops."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from components.evaluation.refine import refine_with_masks
from components.labelmaps import paint_by_score, paint_masks

H, W = 12, 10


def random_masks(seed: int, count: int = 9) -> np.ndarray:
    """[M, H, W] bool: overlapping rectangles, two of equal area, and one empty mask."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((count, H, W), dtype=bool)
    for m in range(count - 3):
        y0, x0 = rng.integers(0, H - 2), rng.integers(0, W - 2)
        y1, x1 = rng.integers(y0 + 1, H + 1), rng.integers(x0 + 1, W + 1)
        masks[m, y0:y1, x0:x1] = True
    masks[count - 3, 1:4, 2:5] = True  # 9 pixels
    masks[count - 2, 2:5, 3:6] = True  # 9 pixels, overlapping the previous one: an area tie
    rng.shuffle(masks)
    return masks


def naive_paint(masks: np.ndarray, labels: list[int], order: list[int], fill: int) -> np.ndarray:
    out = np.full((H, W), fill, dtype=np.uint8)
    for m in order:
        out[masks[m]] = labels[m]
    return out


def area_desc(masks: np.ndarray) -> list[int]:
    areas = [int(m.sum()) for m in masks]
    return sorted(range(len(masks)), key=lambda m: -areas[m])  # stable: equal areas keep input order


@pytest.mark.parametrize("count", [9, 300])  # paint ranks in 8 bits; past 255 masks in 16 bits
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("order", ["area_desc", "given"])
def test_paint_masks_matches_loop(seed: int, order: str, count: int) -> None:
    masks = random_masks(seed, count)
    labels = [int(v) for v in np.random.default_rng(seed + 10).integers(0, 30, len(masks))]
    paint_order = area_desc(masks) if order == "area_desc" else list(range(len(masks)))
    want = naive_paint(masks, labels, paint_order, fill=255)
    for as_input in (masks, list(masks), torch.from_numpy(masks)):
        got = paint_masks(as_input, labels, (H, W), order=order)
        assert got.dtype == torch.uint8 and got.shape == (H, W)
        assert np.array_equal(got.numpy(), want)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_paint_by_score_matches_loop(seed: int) -> None:
    masks = random_masks(seed)
    rng = np.random.default_rng(seed + 20)
    labels = [int(v) for v in rng.integers(0, 30, len(masks))]
    scores = [float(v) for v in rng.choice([0.5, 0.7, 0.9, 0.95], len(masks))]  # with ties
    order = sorted(range(len(masks)), key=lambda m: scores[m])  # higher score painted later
    want = naive_paint(masks, labels, order, fill=7)
    got = paint_by_score(masks, labels, torch.tensor(scores), (H, W), fill=7)
    assert np.array_equal(got.numpy(), want)


def test_two_overlapping_masks_higher_score_wins() -> None:
    masks = torch.zeros(2, 4, 4, dtype=torch.bool)
    masks[0, 0:3, 0:3] = True
    masks[1, 1:4, 1:4] = True
    high_first = paint_by_score(masks, [1, 2], [0.9, 0.5], (4, 4))
    assert high_first.tolist() == [
        [1, 1, 1, 255],
        [1, 1, 1, 2],
        [1, 1, 1, 2],
        [255, 2, 2, 2],
    ]
    high_second = paint_by_score(masks, [1, 2], [0.5, 0.9], (4, 4))
    assert high_second[1:3, 1:3].tolist() == [[2, 2], [2, 2]]


def test_nested_masks_small_on_top() -> None:
    small = torch.zeros(4, 4, dtype=torch.bool)
    small[1:3, 1:3] = True
    big = torch.ones(4, 4, dtype=torch.bool)
    got = paint_masks([small, big], [2, 1], (4, 4))
    assert got.tolist() == [[1, 1, 1, 1], [1, 2, 2, 1], [1, 2, 2, 1], [1, 1, 1, 1]]
    assert paint_masks([small, big], [2, 1], (4, 4), order="given").tolist() == [[1] * 4] * 4


def test_paint_edge_cases_and_errors() -> None:
    assert torch.equal(paint_masks([], [], (3, 2), fill=9), torch.full((3, 2), 9, dtype=torch.uint8))
    masks = np.ones((1, 3, 2), dtype=bool)
    with pytest.raises(ValueError, match="unknown paint order"):
        paint_masks(masks, [1], (3, 2), order="score")
    with pytest.raises(ValueError, match="must be bool"):
        paint_masks(masks.astype(np.uint8), [1], (3, 2))
    with pytest.raises(ValueError, match=r"\[M, 4, 2\]"):
        paint_masks(masks, [1], (4, 2))
    with pytest.raises(ValueError, match="one entry per mask"):
        paint_masks(masks, [1, 2], (3, 2))
    with pytest.raises(ValueError, match=r"\[0, 255\]"):
        paint_masks(masks, [300], (3, 2))
    with pytest.raises(ValueError, match="fill must be"):
        paint_masks(masks, [1], (3, 2), fill=70000)


@pytest.mark.parametrize("seed", [0, 1])
def test_16_bit_paint_matches_the_8_bit_paint_of_the_same_masks(seed: int) -> None:
    """A vocabulary past 255 classes paints with fill 65535 into an int32 map: the same winners as
    the 8-bit paint, labels up to 65534 kept, and :func:`as_label_array` stores it as uint16."""
    from components.labelmaps import as_label_array

    masks = random_masks(seed)
    labels = list(range(1, len(masks) + 1))
    scores = np.random.default_rng(seed).random(len(masks)).astype(np.float32)
    for paint, kw in ((paint_masks, {"order": "area_desc"}), (paint_by_score, {"scores": scores})):
        narrow = paint(masks, labels, shape=(H, W), **kw).numpy()
        wide = paint(masks, [label + 300 for label in labels], shape=(H, W), fill=65535, **kw)
        assert wide.dtype == torch.int32
        stored = as_label_array(wide)
        assert stored.dtype == np.uint16
        np.testing.assert_array_equal(stored, np.where(narrow == 255, 65535, narrow.astype(np.uint16) + 300))


def naive_refine(base: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Majority vote by counting pixels one by one; paint larger masks first in a loop."""
    labels = []
    for mask in masks:
        votes = Counter(int(base[i, j]) for i in range(H) for j in range(W) if mask[i, j])
        best = max(votes.values(), default=0)
        labels.append(min((c for c, n in votes.items() if n == best), default=0))
    out = base.copy()
    for m in area_desc(masks):
        out[masks[m]] = labels[m]
    return out


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_refine_matches_loop(seed: int) -> None:
    masks = random_masks(seed)
    base = np.random.default_rng(seed + 30).integers(0, 4, (H, W))
    want = naive_refine(base, masks)
    got = refine_with_masks(torch.from_numpy(base), list(masks), num_classes=4)
    assert got.dtype == torch.int64
    assert np.array_equal(got.numpy(), want)


def test_refine_by_hand() -> None:
    base = torch.tensor(
        [
            [0, 0, 1, 1],
            [0, 2, 2, 1],
            [3, 2, 2, 1],
            [3, 3, 1, 1],
        ]
    )
    masks = torch.zeros(3, 4, 4, dtype=torch.bool)
    masks[0, 0:3, 0:3] = True  # votes 0: 3, 1: 1, 2: 4, 3: 1 -> 2
    masks[1, 1:3, 1:3] = True  # all 2 -> 2
    masks[2, 0:2, 2:4] = True  # votes 1: 3, 2: 1 -> 1; same area as mask 1 and later: on top at (1, 2)
    got = refine_with_masks(base, masks, num_classes=4)
    assert got.tolist() == [
        [2, 2, 1, 1],
        [2, 2, 1, 1],
        [2, 2, 2, 1],
        [3, 3, 1, 1],
    ]
    tie = torch.zeros(1, 4, 4, dtype=torch.bool)
    tie[0, 2, 0:2] = True  # base 3 and 2: a 1-1 tie goes to the smallest class id
    assert refine_with_masks(base, tie, num_classes=4)[2, 0:2].tolist() == [2, 2]


def test_refine_without_masks_and_errors() -> None:
    base = torch.randint(0, 3, (H, W), generator=torch.Generator().manual_seed(0))
    assert torch.equal(refine_with_masks(base, [], num_classes=3), base)
    with pytest.raises(ValueError, match=r"base values must be in \[0, 2\)"):
        refine_with_masks(base, [], num_classes=2)
    with pytest.raises(ValueError, match="integer"):
        refine_with_masks(base.float(), [], num_classes=3)


def test_refinement_with_sam2_masks(tmp_path) -> None:
    """A checkpoint whose inference spec names the SAM 2.1 miniature refines with Sam2Model's automatic
    masks, through the same mask interface as SAM v1: the refined map is the base with those masks
    painted by majority."""
    import dataclasses

    from transformers import Sam2Model

    from components.segmenter import Segmenter
    from tests.mini_checkpoint import MINI_INFERENCE, write_mini_checkpoint

    inference = dataclasses.replace(
        MINI_INFERENCE, amg=dataclasses.replace(MINI_INFERENCE.amg, pred_iou_thresh=0.3, stability_score_offset=0.5))
    segmenter = Segmenter.from_checkpoint(
        write_mini_checkpoint(tmp_path / "aligner.pt", inference=dataclasses.replace(inference, sam="mini-sam2.1")),
        device="cpu",
    )
    assert isinstance(segmenter.load_sam(), Sam2Model)
    image = np.random.default_rng(5).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    masks = segmenter.masks(image)
    assert masks.shape[1:] == (48, 64) and masks.dtype == torch.bool and masks.shape[0] > 0
    vocab = segmenter.vocabulary(["sky", "grass", "car"])
    prediction = segmenter.predict(image, vocab, refine=True)
    torch.testing.assert_close(prediction.refined, refine_with_masks(prediction.base, masks, 3))
