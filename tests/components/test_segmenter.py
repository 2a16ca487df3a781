"""The Segmenter (components/segmenter.py) built from a checkpoint alone, on the miniature models:
any vocabulary, arrays and PIL images, batches equal to single images, odd and small image sizes,
scores against a naive reference, absent weights."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from components.aligner.checkpoint import load_aligner
from components.evaluation.refine import refine_with_masks
from components.models import MissingWeightsError
from components.segmenter import Segmenter
from tests.mini_checkpoint import MINI_INFERENCE, write_mini_checkpoint

NEW_VOCABULARY = ["sky, clouds", "grass", "car", "bicycle"]  # none of them in the training vocabulary


def picture(height: int, width: int, seed: int = 0) -> np.ndarray:
    """[H, W, 3] uint8: smooth colour regions, so that predictions vary over the image."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(4, 5, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((width, height), Image.BILINEAR))


def test_built_from_the_checkpoint_alone(segmenter, checkpoint):
    assert segmenter.inference == MINI_INFERENCE
    assert segmenter.dino_spec.name == "mini-dino" and segmenter.clip.spec.name == "mini-clip"
    loaded = Segmenter.from_checkpoint(load_aligner(checkpoint), device="cpu")
    image = picture(40, 60)
    np.testing.assert_array_equal(loaded.segment(image, NEW_VOCABULARY).label_map,
                                  segmenter.segment(image, NEW_VOCABULARY).label_map)


def test_any_vocabulary_at_the_original_size(segmenter):
    image = picture(45, 70)
    result = segmenter.segment(image, NEW_VOCABULARY)
    assert result.label_map.shape == (45, 70) and result.label_map.dtype == np.uint8
    assert int(result.label_map.max()) < len(NEW_VOCABULARY)
    assert result.scores.shape == (4,) and result.scores.dtype == np.float32
    assert result.shares.dtype == np.float32 and result.shares.sum() == pytest.approx(1.0)
    assert result.present == sorted(int(c) for c in np.unique(result.label_map))
    assert segmenter.vocabulary(NEW_VOCABULARY) is segmenter.vocabulary(NEW_VOCABULARY)  # prototypes cached

    # scores: per class, the mean over its base pixels of the best cosine -- by hand
    vocab = segmenter.vocabulary(NEW_VOCABULARY)
    logits = segmenter.base_logits([image], vocab)[0]
    best, label = logits.max(dim=0)
    for k in range(4):
        pixels = best[label == k]
        want = float(pixels.mean()) if pixels.numel() else 0.0
        assert float(result.scores[k]) == pytest.approx(want, abs=1e-5)
    np.testing.assert_array_equal(result.label_map, label.numpy().astype(np.uint8))


def test_pil_images_follow_exif_and_mode(segmenter):
    image = picture(30, 50)
    rotated = Image.fromarray(np.ascontiguousarray(np.rot90(image, k=-1)))  # stored turned, EXIF turns it back
    exif = rotated.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display": the displayed picture is 30 x 50 again
    buf = __import__("io").BytesIO()
    rotated.save(buf, format="PNG", exif=exif)
    with Image.open(buf) as opened:
        got = segmenter.segment(opened, NEW_VOCABULARY)
    assert got.label_map.shape == (30, 50)
    gray = Image.fromarray(image[..., 0])  # mode L
    assert segmenter.segment(gray, NEW_VOCABULARY).label_map.shape == (30, 50)
    with pytest.raises(ValueError, match=r"\[H, W, 3\] uint8"):
        segmenter.segment(image[..., 0], NEW_VOCABULARY)


def test_a_batch_equals_single_images(segmenter):
    images = [picture(40, 60, 1), picture(56, 56, 2), picture(70, 30, 3), picture(40, 60, 4)]
    batch = segmenter.segment_batch(images, NEW_VOCABULARY)
    for image, result in zip(images, batch, strict=True):
        alone = segmenter.segment(image, NEW_VOCABULARY)
        np.testing.assert_array_equal(result.label_map, alone.label_map)
        np.testing.assert_allclose(result.scores, alone.scores, atol=1e-6)


@pytest.mark.parametrize(
    ("height", "width", "short_side", "window"),
    [
        (45, 61, None, 56),  # short_side null: windows of 45 x 56, not multiples of 14 (VOC's 375 x 500)
        (60, 54, 40, 56),  # a short side below the window: one 44 x 40 window (500 x 450 at 336)
        (9, 13, 56, 56),  # a tiny image, upscaled
        (20, 30, None, 56),  # an image smaller than one window, kept at its size
        (3, 200, 20, 28),  # extreme aspect ratio
    ],
)
def test_odd_and_small_sizes(segmenter, height, width, short_side, window):
    protocol = dataclasses.replace(MINI_INFERENCE, short_side=short_side, window=window, stride=window // 2)
    odd = Segmenter(aligner=segmenter.aligner, dino=segmenter.dino, dino_spec=segmenter.dino_spec,
                    clip=segmenter.clip, inference=protocol)
    result = odd.segment(picture(height, width), NEW_VOCABULARY)
    assert result.label_map.shape == (height, width)


def test_refined_paints_sam_masks_over_the_base(segmenter):
    image = picture(48, 64, 5)
    vocab = segmenter.vocabulary(NEW_VOCABULARY)
    prediction = segmenter.predict(image, vocab, refine=True)
    torch.testing.assert_close(prediction.refined, refine_with_masks(prediction.base, segmenter.masks(image), 4))
    result = segmenter.segment(image, NEW_VOCABULARY, refine=True)
    np.testing.assert_array_equal(result.label_map, prediction.refined.numpy().astype(np.uint8))


def test_more_than_255_classes_give_uint16(segmenter):
    classes = [f"thing number {i}" for i in range(300)]
    result = segmenter.segment(picture(28, 28), classes)
    assert result.label_map.dtype == np.uint16 and result.scores.shape == (300,)
    assert int(result.label_map.max()) < 300


def test_bad_vocabularies_are_refused(segmenter):
    with pytest.raises(ValueError, match="empty name"):
        segmenter.segment(picture(28, 28), ["sky", " , "])
    with pytest.raises(ValueError, match="1 to 65535 classes"):
        segmenter.segment(picture(28, 28), [])


def test_absent_weights_give_missing_weights_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    path = write_mini_checkpoint(tmp_path / "real.pt", encoder_spec="dinov2_vitb14")
    with pytest.raises(MissingWeightsError, match="fmbseg weights"):
        Segmenter.from_checkpoint(path, device="cpu", weights_dir=str(tmp_path / "weights"))
