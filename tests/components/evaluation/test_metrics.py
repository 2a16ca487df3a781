"""MeanIoU against a naive per-pixel loop (paper's mIoU, docs/design.md §4)."""

from __future__ import annotations

import math

import pytest
import torch

from components.evaluation.metrics import MeanIoU

IGNORE = 255


def naive_metrics(pairs: list[tuple[torch.Tensor, torch.Tensor]], num_classes: int) -> dict:
    """Per-pixel loop: counts TP / FP / FN per class over all images, then the formulas."""
    tp = [0] * num_classes
    fp = [0] * num_classes
    fn = [0] * num_classes
    correct = total = 0
    for pred, target in pairs:
        for p, t in zip(pred.flatten().tolist(), target.flatten().tolist(), strict=True):
            if t == IGNORE:
                continue
            total += 1
            if p == t:
                tp[t] += 1
                correct += 1
            else:
                fn[t] += 1
                fp[p] += 1
    iou, acc = [], []
    for c in range(num_classes):
        union = tp[c] + fp[c] + fn[c]
        iou.append(100.0 * tp[c] / union if union else math.nan)
        acc.append(100.0 * tp[c] / (tp[c] + fn[c]) if tp[c] + fn[c] else math.nan)
    defined_iou = [v for v in iou if not math.isnan(v)]
    defined_acc = [v for v in acc if not math.isnan(v)]
    return {
        "mIoU": sum(defined_iou) / len(defined_iou),
        "mAcc": sum(defined_acc) / len(defined_acc),
        "aAcc": 100.0 * correct / total,
        "IoU": iou,
        "Acc": acc,
    }


def assert_metrics_equal(got: dict, want: dict) -> None:
    assert set(got) == {"mIoU", "mAcc", "aAcc", "IoU", "Acc"}
    for key in ("mIoU", "mAcc", "aAcc"):
        assert isinstance(got[key], float)
        assert got[key] == pytest.approx(want[key], abs=1e-9), key
    for key in ("IoU", "Acc"):
        assert len(got[key]) == len(want[key])
        for g, w in zip(got[key], want[key], strict=True):
            assert (math.isnan(g) and math.isnan(w)) or g == pytest.approx(w, abs=1e-9), (
                key,
                got[key],
                want[key],
            )


def random_pair(
    generator: torch.Generator,
    shape: tuple[int, ...],
    pred_classes: list[int],
    target_classes: list[int],
    ignore_fraction: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    pred = torch.tensor(pred_classes)[torch.randint(len(pred_classes), shape, generator=generator)]
    target = torch.tensor(target_classes)[torch.randint(len(target_classes), shape, generator=generator)]
    target[torch.rand(shape, generator=generator) < ignore_fraction] = IGNORE
    return pred, target


@pytest.mark.parametrize(
    ("pred_classes", "target_classes", "ignore_fraction"),
    [
        ([0, 1, 2, 3, 4], [0, 1, 2, 3, 4], 0.0),  # every class everywhere
        ([0, 1, 2, 3, 4], [0, 1, 2, 3, 4], 0.3),  # with ignore pixels
        ([0, 1, 2], [0, 1, 2, 3, 4], 0.2),  # classes 3, 4 absent from the prediction: IoU 0
        ([0, 1, 2, 3, 4], [0, 2, 4], 0.2),  # classes 1, 3 absent from the target: IoU 0, Acc NaN
        ([0, 1, 3], [0, 1, 3], 0.2),  # classes 2, 4 absent from both: IoU NaN, left out of the mean
    ],
)
def test_matches_naive_loop(
    pred_classes: list[int], target_classes: list[int], ignore_fraction: float
) -> None:
    generator = torch.Generator().manual_seed(0)
    pairs = [random_pair(generator, (7, 9), pred_classes, target_classes, ignore_fraction) for _ in range(3)]
    metric = MeanIoU(num_classes=5)
    for pred, target in pairs:
        metric.update(pred, target)
    want = naive_metrics(pairs, 5)
    assert_metrics_equal(metric.compute(), want)
    absent_both = set(range(5)) - set(pred_classes) - set(target_classes)
    assert {c for c, v in enumerate(metric.compute()["IoU"]) if math.isnan(v)} == absent_both


def test_dataset_level_not_mean_of_images() -> None:
    # Image 1: class 0 perfect on 1 pixel. Image 2: class 0 IoU 1/3 on many pixels.
    pred1, target1 = torch.tensor([[0, 1]]), torch.tensor([[0, 1]])
    pred2, target2 = torch.tensor([[0, 1, 1, 1]]), torch.tensor([[0, 0, 0, 1]])
    metric = MeanIoU(num_classes=2)
    metric.update(pred1, target1)
    metric.update(pred2, target2)
    got = metric.compute()
    # class 0: TP 2, FN 2, FP 0 -> 50 %; class 1: TP 2, FP 2, FN 0 -> 50 %.
    assert got["IoU"] == pytest.approx([50.0, 50.0])
    assert got["Acc"] == pytest.approx([50.0, 100.0])
    assert got["aAcc"] == pytest.approx(100.0 * 4 / 6)
    assert metric.confusion.tolist() == [[2, 2], [0, 2]]  # rows = target, cols = pred


def test_batched_update_equals_per_image() -> None:
    generator = torch.Generator().manual_seed(1)
    pred, target = random_pair(generator, (4, 6, 5), [0, 1, 2], [0, 1, 2], 0.25)
    batched, single = MeanIoU(3), MeanIoU(3)
    batched.update(pred, target)
    for p, t in zip(pred, target, strict=True):
        single.update(p, t)
    assert torch.equal(batched.confusion, single.confusion)
    assert batched.confusion.dtype == torch.int64


def test_co80_ignore_pixels_excluded_whatever_the_prediction() -> None:
    # CO-80: every non-thing pixel is 255 in the ground truth; the prediction there is anything,
    # even a value outside the class range.
    target = torch.tensor([[0, 1, IGNORE], [IGNORE, 1, 0]], dtype=torch.uint8)
    pred = torch.tensor([[0, 1, 200], [79, 0, 0]], dtype=torch.uint8)
    metric = MeanIoU(num_classes=80)
    metric.update(pred, target)
    assert int(metric.confusion.sum()) == 4
    got = metric.compute()
    assert got["IoU"][0] == pytest.approx(100.0 * 2 / 3)
    assert got["IoU"][1] == pytest.approx(50.0)
    assert math.isnan(got["IoU"][79])  # predicted only on an ignored pixel: not counted
    assert got["mIoU"] == pytest.approx((200.0 / 3 + 50.0) / 2)


def test_prediction_out_of_range_on_counted_pixel_is_an_error() -> None:
    metric = MeanIoU(num_classes=3)
    with pytest.raises(ValueError, match="pred has values"):
        metric.update(torch.tensor([[0, 3]]), torch.tensor([[0, 1]]))
    with pytest.raises(ValueError, match="target has values"):
        metric.update(torch.tensor([[0, 1]]), torch.tensor([[0, 7]]))
    with pytest.raises(ValueError, match="integer"):
        metric.update(torch.zeros(2, 2), torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="shapes differ"):
        metric.update(torch.zeros(2, 2, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long))
    assert int(metric.confusion.sum()) == 0  # a failed update adds nothing
    with pytest.raises(ValueError, match="no pixels"):
        metric.compute()


def test_resume_from_saved_state_and_merge(tmp_path) -> None:
    generator = torch.Generator().manual_seed(2)
    pairs = [random_pair(generator, (5, 5), [0, 1, 2, 3], [0, 1, 2, 3], 0.2) for _ in range(4)]
    full = MeanIoU(4)
    for pred, target in pairs:
        full.update(pred, target)

    first = MeanIoU(4)
    for pred, target in pairs[:2]:
        first.update(pred, target)
    torch.save(first.state_dict(), tmp_path / "state.pt")
    resumed = MeanIoU(4)
    resumed.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    for pred, target in pairs[2:]:
        resumed.update(pred, target)
    assert torch.equal(resumed.confusion, full.confusion)

    second = MeanIoU(4)
    for pred, target in pairs[2:]:
        second.update(pred, target)
    first.merge(second)
    assert torch.equal(first.confusion, full.confusion)
    assert_metrics_equal(first.compute(), naive_metrics(pairs, 4))

    with pytest.raises(ValueError, match="incompatible"):
        first.merge(MeanIoU(5))
    with pytest.raises(ValueError, match="incompatible"):
        first.load_state_dict(MeanIoU(4, ignore_index=-1).state_dict())


def test_ignore_index_must_not_be_a_class() -> None:
    with pytest.raises(ValueError, match="collides"):
        MeanIoU(num_classes=300, ignore_index=255)
