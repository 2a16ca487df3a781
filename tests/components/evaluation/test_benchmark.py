"""The evaluation loop: batches, unreadable images, the resume state, summaries, prompt sets, and the
Stage 2 / Stage 1 segmenters on the miniature models."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch

from components.datasets.readers import CanonicalDataset
from components.evaluation.benchmark import (
    BatchResult,
    EvalState,
    evaluate_batch,
    load_state,
    save_state,
    state_key,
    write_overlays,
)
from components.evaluation.inference import Prediction, predict_logits_batch
from components.evaluation.metrics import MeanIoU
from components.evaluation.prompts import background_index, benchmark_prompts, display_names
from components.evaluation.refine import refine_with_masks, size_filter
from components.evaluation.stage1 import Stage1Segmenter
from components.evaluation.summary import summarize, write_summary
from demoworld.synthetic import write_synthetic_benchmark


# ------------------------------------------------------------------------------------ references
def naive_confusion(pairs, num_classes: int, ignore: int = 255) -> np.ndarray:
    """Pixel by pixel over (prediction, ground truth) pairs, `ignore` in the ground truth skipped."""
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    for pred, target in pairs:
        for p, t in zip(pred.ravel().tolist(), target.ravel().tolist(), strict=True):
            if t != ignore:
                confusion[t, p] += 1
    return confusion


def naive_iou(confusion: np.ndarray, c: int) -> float:
    tp = confusion[c, c]
    union = confusion[c, :].sum() + confusion[:, c].sum() - tp
    return math.nan if union == 0 else 100.0 * tp / union


def shifted(num_classes: int):
    """A segmenter that predicts (truth + 1) mod C as base and the truth itself as refined; it reads
    the truth from a table filled by the test (the loop only ever shows it the image)."""
    truth: dict[bytes, np.ndarray] = {}

    def segment(image: np.ndarray) -> Prediction:
        label = truth[image.tobytes()]
        clean = np.where(label == 255, 0, label).astype(np.int64)
        return Prediction(torch.from_numpy((clean + 1) % num_classes), torch.from_numpy(clean))

    return segment, truth


@pytest.fixture(scope="module")
def pv20(tmp_path_factory):
    root = write_synthetic_benchmark("pv20", tmp_path_factory.mktemp("data"), num_images=3)
    return CanonicalDataset(root, "val")


# ----------------------------------------------------------------------------------------- loop
def test_evaluate_batch_counts_like_a_pixel_loop(pv20, tmp_path):
    segment, truth = shifted(20)
    pairs_base, pairs_refined = [], []
    for i in pv20.ids:
        image, label = pv20.read_image(i), pv20.read_label(i)
        truth[image.tobytes()] = label
        prediction = segment(image)
        pairs_base.append((prediction.base.numpy(), label))
        pairs_refined.append((prediction.refined.numpy(), label))
    result = evaluate_batch(pv20, pv20.ids, segment=segment, num_classes=20, variants=("base", "refined"),
                            class_names=display_names(pv20.classes), overlay_ids=pv20.ids[:1], overlay_dir=tmp_path)
    assert result.done == pv20.ids and result.skipped == {}
    np.testing.assert_array_equal(np.array(result.confusion["base"]), naive_confusion(pairs_base, 20))
    np.testing.assert_array_equal(np.array(result.confusion["refined"]), naive_confusion(pairs_refined, 20))
    assert [p.name for p in tmp_path.iterdir()] == [f"{pv20.ids[0]}.png"]


def test_unreadable_image_is_reported_and_left_out(tmp_path):
    root = write_synthetic_benchmark("pv20", tmp_path, num_images=3)
    data = CanonicalDataset(root, "val")
    segment, truth = shifted(20)
    for i in data.ids:
        image = data.read_image(i)
        truth[image.tobytes()] = data.read_label(i)
    bad = data.ids[1]
    data.image_path(bad).write_bytes(b"this is not a jpeg")
    ticks: list[int] = []
    result = evaluate_batch(data, data.ids, segment=segment, num_classes=20, variants=("base",),
                            on_image=ticks.append)
    assert result.done == [data.ids[0], data.ids[2]]
    assert list(result.skipped) == [bad] and "UnreadableImageError" in result.skipped[bad]
    assert ticks == [1, 1, 1]  # progress: one per image, the skipped one too
    others = evaluate_batch(data, [data.ids[0], data.ids[2]], segment=segment, num_classes=20, variants=("base",))
    assert result.confusion == others.confusion


def test_bad_benchmark_pairs_are_skipped_with_their_id_and_reason(tmp_path):
    """An EXIF-rotated image (its label is not), a label of another size, and a label with values
    >= num_classes: each is reported by id; the others are scored as if the bad ones were absent."""
    from PIL import Image

    root = write_synthetic_benchmark("pv20", tmp_path, num_images=4)
    data = CanonicalDataset(root, "val")
    segment, truth = shifted(20)
    rotated, small, wild = data.ids[1], data.ids[2], data.ids[3]
    with Image.open(data.image_path(rotated)) as im:
        exif = Image.Exif()
        exif[0x0112] = 6  # rotate 90 degrees on display
        im.convert("RGB").save(data.image_path(rotated), format="JPEG", quality=95, exif=exif)
    for i in data.ids:
        truth[data.read_image(i).tobytes()] = data.read_label(i)
    label = data.read_label(small)
    Image.fromarray(label[:-2]).save(data.label_path(small))
    label = data.read_label(wild)
    label[0, :3] = [20, 37, 200]
    Image.fromarray(label).save(data.label_path(wild))
    result = evaluate_batch(data, data.ids, segment=segment, num_classes=20, variants=("base",))
    assert result.done == [data.ids[0], rotated]  # rotation not applied to the image: it still matches
    assert sorted(result.skipped) == [small, wild]
    assert "label" in result.skipped[small] and str(label.shape) in result.skipped[small]
    assert "[20, 37, 200]" in result.skipped[wild] and "20 classes" in result.skipped[wild]


def test_evaluate_batch_rejects_broken_input(pv20, tmp_path):
    def wrong_size(image: np.ndarray) -> Prediction:
        return Prediction(torch.zeros(image.shape[0], image.shape[1] + 1, dtype=torch.int64), None)

    with pytest.raises(ValueError, match="shapes differ"):
        evaluate_batch(pv20, pv20.ids[:1], segment=wrong_size, num_classes=20, variants=("base",))
    with pytest.raises(ValueError, match="no 'refined'"):
        evaluate_batch(pv20, pv20.ids[:1], segment=lambda im: Prediction(torch.zeros(im.shape[:2], dtype=torch.int64),
                                                                          None),
                       num_classes=20, variants=("base", "refined"))
    with pytest.raises(ValueError, match="no 'coarse' prediction"):  # neither a Prediction field nor a key
        evaluate_batch(pv20, pv20.ids[:1], segment=wrong_size, num_classes=20, variants=("coarse",))
    for variants in ((), ("base", "base")):
        with pytest.raises(ValueError, match="distinct names"):
            evaluate_batch(pv20, pv20.ids[:1], segment=wrong_size, num_classes=20, variants=variants)


def test_write_overlays_matches_the_loops_pictures(pv20, tmp_path):
    segment, truth = shifted(20)
    for i in pv20.ids:
        truth[pv20.read_image(i).tobytes()] = pv20.read_label(i)
    names = display_names(pv20.classes)
    evaluate_batch(pv20, pv20.ids[:1], segment=segment, num_classes=20, variants=("base",), class_names=names,
                   overlay_ids=pv20.ids[:1], overlay_dir=tmp_path / "a")
    write_overlays(pv20, pv20.ids[:1], segment=segment, variants=("base",), class_names=names,
                   overlay_dir=tmp_path / "b")
    name = f"{pv20.ids[0]}.png"
    assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


# ---------------------------------------------------------------------------------------- state
def test_state_adds_saves_and_resumes(tmp_path):
    state = EvalState.fresh("k1", 3, ("base",))
    state.add(BatchResult(["a"], {}, {"base": [[1, 0, 0], [0, 2, 0], [0, 0, 0]]}))
    state.add(BatchResult(["b"], {"c": "UnreadableImageError: broken"}, {"base": [[0, 1, 0], [0, 0, 0], [0, 0, 4]]}))
    assert state.covered() == {"a", "b", "c"}
    with pytest.raises(ValueError, match="counted twice"):
        state.add(BatchResult(["a"], {}, {"base": [[0] * 3] * 3}))
    path = tmp_path / "s" / "state.pt"
    save_state(path, state)
    loaded = load_state(path, "k1", 3, ("base",))
    assert loaded.done == ["a", "b"] and loaded.skipped == {"c": "UnreadableImageError: broken"}
    torch.testing.assert_close(loaded.confusion["base"], torch.tensor([[1, 1, 0], [0, 2, 0], [0, 0, 4]]))
    fresh = load_state(path, "another model", 3, ("base",))
    assert fresh.done == [] and int(fresh.confusion["base"].sum()) == 0
    with pytest.raises(ValueError, match="delete it"):
        load_state(path, "k1", 4, ("base",))


def test_state_key_depends_on_model_and_settings():
    key = state_key("abc", {"window": 448, "stride": 224})
    assert key == state_key("abc", {"stride": 224, "window": 448})
    assert key != state_key("abd", {"window": 448, "stride": 224})
    assert key != state_key("abc", {"window": 448, "stride": 112})


# -------------------------------------------------------------------------------------- summary
def test_summarize_matches_mean_iou_and_writes_files(tmp_path):
    confusion = torch.tensor([[5, 1, 0], [2, 3, 0], [0, 0, 0]])
    state = EvalState("k", {"base": confusion, "refined": torch.eye(3, dtype=torch.int64) * 4}, ["a", "b"],
                      {"c": "broken"})
    summary = summarize(state, ["x", "y", "z, zed"])
    meter = MeanIoU(3)
    meter.load_state_dict({"num_classes": 3, "ignore_index": 255, "confusion": confusion})
    reference = meter.compute()
    assert summary.metrics["mIoU_base"] == round(reference["mIoU"], 2)
    assert summary.metrics["aAcc_base"] == round(reference["aAcc"], 2)
    assert summary.metrics["mIoU_refined"] == 100.0 and summary.metrics["images"] == 2
    assert summary.metrics["skipped"] == 1
    assert summary.per_class[1] == {"class": "y", "IoU_base": round(3 / 6 * 100, 2), "Acc_base": 60.0,
                                    "IoU_refined": 100.0, "Acc_refined": 100.0}
    assert math.isnan(summary.per_class[2]["IoU_base"])
    write_summary(summary, tmp_path / "m.json", tmp_path / "m.csv")
    assert json.loads((tmp_path / "m.json").read_text()) == summary.metrics
    rows = list(csv.DictReader((tmp_path / "m.csv").open()))
    assert rows[2] == {"class": "z, zed", "IoU_base": "nan", "Acc_base": "nan", "IoU_refined": "100.00",
                       "Acc_refined": "100.00"}
    assert rows[0]["IoU_base"] == "62.50"


def test_summarize_unlabelled_column_counts_misses_but_no_class():
    # 2 classes + an "unlabelled" prediction column
    confusion = torch.tensor([[4, 1, 3], [0, 2, 2], [0, 0, 0]])
    state = EvalState("k", {"base": confusion}, ["a"])
    summary = summarize(state, ["p", "q"], unlabelled_column=True)
    full = confusion.numpy()
    ious = [naive_iou(full, c) for c in range(2)]
    accs = [100.0 * full[c, c] / full[c].sum() for c in range(2)]
    assert summary.metrics["mIoU_base"] == round(sum(ious) / 2, 2)
    assert summary.metrics["mAcc_base"] == round(sum(accs) / 2, 2)
    assert summary.metrics["aAcc_base"] == round(100.0 * 6 / 12, 2)
    assert [row["class"] for row in summary.per_class] == ["p", "q"]
    with pytest.raises(ValueError, match="3-class"):
        summarize(state, ["p", "q"])
    with pytest.raises(ValueError, match="no image"):
        summarize(EvalState.fresh("k", 2, ("base",)), ["p", "q"])


# -------------------------------------------------------------------------------------- prompts
def test_benchmark_prompts_follow_meta(pv20, tmp_path):
    root = write_synthetic_benchmark("pv21", tmp_path, num_images=1)
    pv21 = CanonicalDataset(root, "val")
    prompts = benchmark_prompts(pv21.classes, pv21.meta)
    stuff = pv21.meta["extra_background_classes"]
    assert len(stuff) == 91  # "table" names a VOC class and goes; "plant-other, plant" keeps "plant-other"
    assert prompts.names[:21] == pv21.classes and len(prompts.names) == 21 + 90
    assert "table" not in prompts.names[21:] and "plant-other" in prompts.names[21:]
    assert prompts.class_map.tolist() == list(range(21)) + [0] * 90
    assert background_index(pv21.meta) == 0
    plain = benchmark_prompts(pv20.classes, pv20.meta)
    assert plain.names == pv20.classes and plain.class_map.tolist() == list(range(20))
    assert background_index(pv20.meta) is None
    with pytest.raises(ValueError, match="class0"):
        benchmark_prompts(pv20.classes, {**pv20.meta, "extra_background_classes": ["sky"]})
    with pytest.raises(ValueError, match="background must be one of"):
        background_index({"background": "sometimes"})


def test_stage1_segmenter_maps_16_bit_prompt_indices_and_their_unlabelled():
    """Past 255 prompts the Stage 1 maps are 16-bit: prompt 299 -> its class, 65535 -> the unlabelled
    column C."""
    from components.labelling.stage1 import AmgSettings, Stage1Settings

    settings = Stage1Settings(
        grid=2, dense_mode="fmbseg", min_crops=1, top_k_points=2, sam_size=64, label_size=64,
        amg=AmgSettings(points_per_side=4, points_per_batch=16, pred_iou_thresh=0.0, stability_score_thresh=0.0,
                        stability_score_offset=1.0, box_nms_thresh=0.7, min_mask_region_area=0,
                        min_area_frac=0.0, max_area_frac=1.0),
        crop_batch=4,
    )
    class_map = torch.arange(300) // 2  # two prompts per class
    segment = Stage1Segmenter(variants=("stage1_1",), clip_model=torch.nn.Identity(), clip_mean=(0.0,) * 3,
                              clip_std=(1.0,) * 3, clip_image_size=32, sam=None,  # type: ignore[arg-type]
                              prototypes=torch.zeros(300, 4), class_map=class_map, num_classes=150, settings=settings)
    assert segment.lookup[torch.tensor([0, 255, 299, 65535])].tolist() == [0, 127, 149, 150]


class _Wide:
    """A 300-class benchmark in memory: 16-bit ground truth with 65535 = ignore."""

    def __init__(self, labels: dict[str, np.ndarray]) -> None:
        self.labels = labels

    def read_image(self, image_id: str) -> np.ndarray:
        return np.full((*self.labels[image_id].shape, 3), int(image_id), dtype=np.uint8)

    def read_label(self, image_id: str) -> np.ndarray:
        return self.labels[image_id]


def test_evaluate_batch_scores_16_bit_ground_truth_like_a_pixel_loop(tmp_path):
    rng = np.random.default_rng(0)
    labels = {str(i): rng.choice([3, 256, 299, 65535], size=(6, 5)).astype(np.uint16) for i in range(3)}
    data = _Wide(labels)

    def segment(image: np.ndarray) -> Prediction:
        truth = labels[str(int(image[0, 0, 0]))].astype(np.int64)
        base = np.where(truth == 65535, 7, np.where(truth == 256, 299, truth))  # 256 read as 299
        return Prediction(torch.from_numpy(base), None)

    result = evaluate_batch(data, list(labels), segment=segment, num_classes=300, variants=("base",),
                            class_names=[f"c{k}" for k in range(300)], overlay_ids=["0"], overlay_dir=tmp_path)
    pairs = [(segment(data.read_image(i)).base.numpy(), labels[i].astype(np.int64)) for i in labels]
    expected = naive_confusion(pairs, 300, ignore=65535)
    np.testing.assert_array_equal(np.array(result.confusion["base"]), expected)
    assert result.done == list(labels) and (tmp_path / "0.png").is_file()
    labels["1"][0, 0] = 300  # past the classes, not the ignore value
    again = evaluate_batch(data, ["1"], segment=segment, num_classes=300, variants=("base",))
    assert "[300]" in again.skipped["1"] and "65535 = ignore" in again.skipped["1"]


def test_size_filter_keeps_areas_in_range():
    records = [{"area": a} for a in (1, 10, 50, 100)]
    assert [r["area"] for r in size_filter(records, 100, 0.05, 0.6)] == [10, 50]
    assert size_filter(records, 100, 0.0, 1.0) == records


# ----------------------------------------------------------------------------------- segmenters
@pytest.fixture(scope="module")
def mini_models():
    from components.models import build_clip, build_dino, build_sam

    return {"dino": build_dino("mini-dino"), "clip": build_clip("mini-clip"), "sam": build_sam("mini-sam")}


def stage2(mini_models, refine: bool):
    from components.aligner.checkpoint import InferenceSpec
    from components.aligner.model import Aligner
    from components.labelling.settings import AmgSettings
    from components.models import get_spec
    from components.segmenter import Segmenter

    torch.manual_seed(0)
    inference = InferenceSpec(
        sam="mini-sam", templates=("a photo of a {}.",), short_side=56, window=56, stride=28,
        amg=AmgSettings(points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0,
                        min_area_frac=0.0, max_area_frac=1.0),
    )
    return Segmenter(
        aligner=Aligner(32, 32, kind="transformer", num_heads=4).eval(),
        dino=mini_models["dino"],
        dino_spec=get_spec("mini-dino"),
        clip=mini_models["clip"],
        inference=inference,
        sam=(lambda: mini_models["sam"]) if refine else None,
    )


def test_stage2_segmenter_base_and_refined(mini_models, tmp_path):
    from components.models import prototypes
    from components.models.dino import patch_features
    from components.models.preprocess import resize_normalize
    from components.segmenter import VocabularySegmenter

    root = write_synthetic_benchmark("pv21", tmp_path, num_images=1)
    data = CanonicalDataset(root, "val")
    image = data.read_image(data.ids[0])
    prompts = benchmark_prompts(data.classes, data.meta)
    segmenter = stage2(mini_models, refine=True)
    vocabulary = segmenter.vocabulary(data.classes, prompts)
    clip = mini_models["clip"]
    torch.testing.assert_close(vocabulary.prototypes, prototypes(clip.model, clip.tokenizer, prompts.names))
    assert segmenter.vocabulary(data.classes, prompts) is vocabulary  # computed once per vocabulary
    segment = VocabularySegmenter(segmenter, vocabulary, refine=True)

    pixels = torch.randn(2, 3, 56, 84)
    feats = patch_features(mini_models["dino"], pixels)
    expected = segmenter.aligner(feats.reshape(2, 24, 32)).reshape(2, 4, 6, 32)
    torch.testing.assert_close(segmenter.encode(pixels), expected)

    prediction = segment(image)
    height, width = image.shape[:2]
    assert prediction.base.shape == (height, width) and prediction.base.dtype == torch.int64
    assert int(prediction.base.max()) < 21  # the stuff prompts all vote for background
    spec = segmenter.dino_spec
    normalised = resize_normalize(torch.from_numpy(image.copy()), (height, width), spec.mean, spec.std)[0]
    logits = predict_logits_batch([normalised], encode_fn=segmenter.encode, prototypes=vocabulary.prototypes, window=56,
                            stride=28, short_side=56)[0]
    torch.testing.assert_close(prediction.base, prompts.class_map[logits.argmax(dim=0)])
    masks = segmenter.masks(image)
    assert masks.dtype == torch.bool and masks.shape[1:] == (height, width)
    torch.testing.assert_close(prediction.refined, refine_with_masks(prediction.base, masks, 21))

    base_only = stage2(mini_models, refine=False)
    assert VocabularySegmenter(base_only, base_only.vocabulary(data.classes, prompts), refine=False)(
        image).refined is None
    with pytest.raises(ValueError, match="no SAM"):
        base_only.masks(image)


def naive_nearest(label: np.ndarray, height: int, width: int) -> np.ndarray:
    """Pixel-centre nearest sampling, one output pixel at a time."""
    out = np.zeros((height, width), dtype=label.dtype)
    for y in range(height):
        for x in range(width):
            sy = min(int((y + 0.5) * label.shape[0] / height), label.shape[0] - 1)
            sx = min(int((x + 0.5) * label.shape[1] / width), label.shape[1] - 1)
            out[y, x] = label[sy, sx]
    return out


def _stage1_segmenter(mini_models, tmp_path, variants):
    from components.labelling.stage1 import AmgSettings, Stage1Settings
    from components.models import prototypes

    root = write_synthetic_benchmark("pv21", tmp_path, num_images=1)
    data = CanonicalDataset(root, "val")
    image, truth = data.read_image(data.ids[0]), data.read_label(data.ids[0])
    prompts = benchmark_prompts(data.classes, data.meta)
    clip = mini_models["clip"]
    settings = Stage1Settings(
        grid=2, dense_mode="fmbseg", min_crops=1, top_k_points=2, sam_size=64, label_size=64,
        amg=AmgSettings(points_per_side=4, points_per_batch=16, pred_iou_thresh=0.0, stability_score_thresh=0.0,
                        stability_score_offset=1.0, box_nms_thresh=0.7, min_mask_region_area=0,
                        min_area_frac=0.0, max_area_frac=1.0),
        crop_batch=4,
    )
    segment = Stage1Segmenter(
        variants=variants, clip_model=clip.model, clip_mean=clip.spec.mean, clip_std=clip.spec.std,
        clip_image_size=clip.spec.image_size, sam=mini_models["sam"],
        prototypes=prototypes(clip.model, clip.tokenizer, prompts.names), class_map=prompts.class_map,
        num_classes=21, settings=settings,
    )
    return segment, image, truth, prompts


@pytest.mark.parametrize("variant", ["stage1_1", "stage1_2", "semi"])
def test_stage1_segmenter_maps_prompts_and_unlabelled(mini_models, tmp_path, variant):
    segment, image, truth, prompts = _stage1_segmenter(mini_models, tmp_path, (variant,))
    classes = sorted(int(c) for c in np.unique(truth) if c != 255) if variant == "semi" else None
    label = segment.label(image, classes)[variant].numpy()
    assert label.shape == (64, 64)
    prediction = segment(image, classes)
    assert list(prediction) == [variant]
    mapping = np.array(prompts.class_map.tolist() + [21] * (256 - len(prompts.names)))
    mapping[255] = 21
    expected = mapping[naive_nearest(label, *image.shape[:2])]
    np.testing.assert_array_equal(prediction[variant].numpy(), expected)
    if variant == "semi":
        # prompts of the labelled classes only (background's may be a stuff prompt: class 0 too)
        assert set(mapping[np.unique(label)].tolist()) <= set(classes) | {21}
        with pytest.raises(ValueError, match="exactly when 'semi'"):
            segment(image)
    else:
        with pytest.raises(ValueError, match="exactly when 'semi'"):
            segment(image, [0])


def test_stage1_segmenter_scores_every_variant_in_one_pass_as_each_alone(mini_models, tmp_path):
    """The three variants from one segmenter (Stage 1.1 and 1.2 from one label_image call) are the
    maps each variant gives alone."""
    variants = ("stage1_1", "stage1_2", "semi")
    together, image, truth, _ = _stage1_segmenter(mini_models, tmp_path / "all", variants)
    classes = sorted(int(c) for c in np.unique(truth) if c != 255)
    maps = together(image, classes)
    assert list(maps) == list(variants)
    for variant in variants:
        alone, *_ = _stage1_segmenter(mini_models, tmp_path / variant, (variant,))
        single = alone(image, classes if variant == "semi" else None)[variant]
        torch.testing.assert_close(maps[variant], single, rtol=0, atol=0)
    with pytest.raises(ValueError, match="distinct Stage 1 variants"):
        _stage1_segmenter(mini_models, tmp_path / "bad", ("stage1_1", "stage1_1"))


