"""Stage 1 math on hand-made inputs with planted structure, checked exactly or against loops."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from components.labelling.detect import (
    class_index_map,
    crop_classes,
    detect_present,
    image_level_labels,
    label_masks,
    mask_coverage,
    mask_mean_features,
    patch_centres_xy,
    presence_from_class_labels,
    presence_from_image_labels,
    prompt_patches,
)


def _onehot_prototypes(k: int, d: int) -> torch.Tensor:
    return torch.eye(k, d)


def test_crop_classes_matches_a_loop_over_crops_and_classes() -> None:
    torch.manual_seed(0)
    crops, protos = torch.randn(9, 6), torch.randn(5, 6)
    expected = []
    for c in range(9):
        sims = [float(torch.dot(crops[c], protos[k]) / (crops[c].norm() * protos[k].norm())) for k in range(5)]
        expected.append(max(range(5), key=lambda k: sims[k]))
    assert crop_classes(crops, protos).tolist() == expected


def test_crop_classes_is_scale_invariant_cosine_not_dot_product() -> None:
    protos = torch.tensor([[1.0, 0.0], [10.0, 10.0]])  # class 1 has the larger norm
    crops = torch.tensor([[1.0, 0.1]])  # but class 0 is the closer direction
    assert crop_classes(crops, protos).tolist() == [0]


def test_detect_present_thresholds_crop_votes() -> None:
    votes = torch.tensor([3, 3, 1, 0, 3, 1, 7, 3, 2, 2, 2, 3, 3, 3, 4, 4])  # 16 crops
    # the paper (§3.2.1, appendix 1.1.3): present when it wins MORE THAN T crops (T = 1)
    t1 = detect_present(votes, num_classes=10, min_crops=1)
    assert t1.classes.tolist() == [1, 2, 3, 4]
    assert t1.crops_won.tolist() == [2, 3, 7, 2]
    t0 = detect_present(votes, num_classes=10, min_crops=0)  # any crop won
    assert t0.classes.tolist() == [0, 1, 2, 3, 4, 7]
    assert t0.crops_won.tolist() == [1, 2, 3, 7, 2, 1]
    assert detect_present(votes, num_classes=10, min_crops=2).classes.tolist() == [2, 3]
    with pytest.raises(ValueError, match="min_crops"):
        detect_present(votes, num_classes=10, min_crops=-1)


def test_presence_from_image_labels_ignores_the_threshold() -> None:
    votes = torch.tensor([0, 0, 0, 1])
    found = presence_from_image_labels(votes, [4, 1, 4], num_classes=5)
    assert found.classes.tolist() == [1, 4]
    assert found.crops_won.tolist() == [1, 0]
    with pytest.raises(ValueError, match=r"\[0, 5\)"):
        presence_from_image_labels(votes, [5], num_classes=5)


def test_presence_from_class_labels_matches_a_loop_over_classes_and_prompts() -> None:
    torch.manual_seed(1)
    crops, protos = torch.randn(9, 6), torch.randn(12, 6)
    prompt_classes = torch.tensor([0, 1, 2, 3, 0, 0, 0, 0, 4, 0, 0, 1])  # classes 0 and 1: several prompts
    cos = [[float(torch.dot(crops[c], protos[k]) / (crops[c].norm() * protos[k].norm())) for k in range(12)]
           for c in range(9)]
    wins = [0] * 12
    for c in range(9):
        wins[max(range(12), key=lambda k: cos[c][k])] += 1
    for labels in ([0, 2], [1, 3, 4], [0, 1, 2, 3, 4], []):
        expected = []
        for cls in labels:
            prompts = [k for k in range(12) if int(prompt_classes[k]) == cls]
            winners = [k for k in prompts if wins[k] > 0]
            expected += winners or [max(prompts, key=lambda k: max(cos[c][k] for c in range(9)))]
        found = presence_from_class_labels(crops, protos, labels, prompt_classes)
        assert found.classes.tolist() == sorted(expected)
        assert found.crops_won.tolist() == [wins[k] for k in sorted(expected)]


def test_top_points_land_in_the_planted_hot_region() -> None:
    torch.manual_seed(0)
    h, w, d = 12, 16, 8
    protos = _onehot_prototypes(3, d)
    patches = torch.randn(h, w, d) * 0.1
    patches[..., 3] += 1.0  # background points elsewhere
    hot = [(2, 10), (2, 11), (3, 10), (3, 11), (4, 11)]  # class 1 region: five patches
    for r, c in hot:
        patches[r, c, 1] += 5.0
    rows_cols = prompt_patches(patches, protos[[1]], k=5)
    assert rows_cols.shape == (1, 5, 2)
    assert {tuple(rc) for rc in rows_cols[0].tolist()} == set(hot)
    xy = patch_centres_xy(rows_cols, (h, w), 96)
    for (x, y), (r, c) in zip(xy[0].tolist(), rows_cols[0].tolist(), strict=True):
        # the point is inside patch (r, c) of the SAM frame, at its centre
        assert c * 96 / w < x < (c + 1) * 96 / w and r * 96 / h < y < (r + 1) * 96 / h
        assert x == pytest.approx((c + 0.5) * 6.0) and y == pytest.approx((r + 0.5) * 8.0)


def test_prompt_patches_matches_a_loop_and_orders_best_first() -> None:
    torch.manual_seed(1)
    patches, protos = torch.randn(5, 7, 4), torch.randn(2, 4)
    got = prompt_patches(patches, protos, k=3)
    for k in range(2):
        sims = {(r, c): float(F.cosine_similarity(patches[r, c], protos[k], dim=0)) for r in range(5) for c in range(7)}
        ranked = sorted(sims, key=lambda rc: -sims[rc])[:3]
        assert [tuple(rc) for rc in got[k].tolist()] == ranked
    with pytest.raises(ValueError, match="top_k_points"):
        prompt_patches(patches, protos, k=36)


def test_patch_centres_follow_the_formula_on_a_non_square_grid() -> None:
    rows_cols = torch.tensor([[0, 0], [95, 95], [3, 7]])
    xy = patch_centres_xy(rows_cols, (96, 96), 518)
    for (x, y), (r, c) in zip(xy.tolist(), rows_cols.tolist(), strict=True):
        assert x == pytest.approx((c + 0.5) * 518 / 96) and y == pytest.approx((r + 0.5) * 518 / 96)
    xy = patch_centres_xy(torch.tensor([[1, 2]]), (4, 8), 64)
    assert xy.tolist() == [[2.5 * 8, 1.5 * 16]]


def _coverage_loop(mask: torch.Tensor, h: int, w: int) -> torch.Tensor:
    big_h, big_w = mask.shape
    out = torch.zeros(h, w)
    for i in range(h):
        r0, r1 = math.floor(i * big_h / h), math.ceil((i + 1) * big_h / h)
        for j in range(w):
            c0, c1 = math.floor(j * big_w / w), math.ceil((j + 1) * big_w / w)
            out[i, j] = mask[r0:r1, c0:c1].float().mean()
    return out


@pytest.mark.parametrize("size, grid", [((64, 64), (8, 8)), ((37, 50), (6, 7))])
def test_mask_coverage_matches_area_bins(size: tuple[int, int], grid: tuple[int, int]) -> None:
    torch.manual_seed(2)
    masks = torch.rand(3, *size) > 0.6
    got = mask_coverage(masks, grid)
    for m in range(3):
        torch.testing.assert_close(got[m], _coverage_loop(masks[m], *grid))


def test_mean_features_match_a_loop_and_weight_partial_cells() -> None:
    torch.manual_seed(3)
    h, w, d = 4, 5, 6
    patches = torch.randn(h, w, d)
    coverage = torch.rand(3, h, w) * (torch.rand(3, h, w) > 0.5)
    got = mask_mean_features(coverage, patches)
    for m in range(3):
        num, den = torch.zeros(d), 0.0
        for i in range(h):
            for j in range(w):
                num += coverage[m, i, j] * patches[i, j]
                den += float(coverage[m, i, j])
        torch.testing.assert_close(got[m], num / den)


def test_a_mask_between_patch_centres_still_gets_its_weighted_mean() -> None:
    patches = torch.zeros(2, 2, 3)
    patches[0, 0] = torch.tensor([1.0, 0.0, 0.0])
    patches[0, 1] = torch.tensor([0.0, 1.0, 0.0])
    mask = torch.zeros(1, 8, 8, dtype=torch.bool)
    mask[0, 0, 3:5] = True  # two pixels straddling the border of cells (0,0) and (0,1), no centre
    mean = mask_mean_features(mask_coverage(mask, (2, 2)), patches)
    torch.testing.assert_close(mean[0], torch.tensor([0.5, 0.5, 0.0]))


def test_label_masks_picks_among_present_classes_only() -> None:
    protos = _onehot_prototypes(4, 4)
    means = torch.tensor([[0.1, 0.2, 0.9, 0.0], [0.0, 0.6, 0.0, 0.5], [0.0, 0.0, 0.0, 1.0]])
    got = label_masks(means, protos, torch.tensor([1, 3]))
    # mask 0 is closest to class 2, which is absent: it goes to the closest present class, 1
    assert got.labels.tolist() == [1, 1, 3]
    assert got.scores[2].item() == pytest.approx(1.0)
    for m in range(3):
        sims = {k: float(F.cosine_similarity(means[m], protos[k], dim=0)) for k in (1, 3)}
        assert got.scores[m].item() == pytest.approx(max(sims.values()))
    with pytest.raises(ValueError, match="at least one present class"):
        label_masks(means, protos, torch.tensor([], dtype=torch.int64))


def test_ground_truth_classes_map_to_the_vocabulary_by_first_name() -> None:
    vocabulary = ["person, man", "Car", "tree, trees", "sky"]
    index_map = class_index_map(["sky", "person", "car"], vocabulary)
    assert index_map.tolist() == [3, 0, 1]
    label = torch.tensor([[0, 0, 255], [2, 2, 255]], dtype=torch.uint8)
    assert image_level_labels(label, index_map) == [1, 3]
    with pytest.raises(ValueError, match="not in the vocabulary.*'boat'"):
        class_index_map(["boat"], vocabulary)
    with pytest.raises(ValueError, match="beyond"):
        image_level_labels(torch.tensor([[5]], dtype=torch.uint8), index_map)
