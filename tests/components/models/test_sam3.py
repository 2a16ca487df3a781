"""SAM 3 as a concept teacher: cached vision/text features decode as the model's own forward, and
the fusion rule (components/labelling/concepts.py) against a naive per-pixel loop."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import Sam3Config, Sam3Model

import components.models as models_pkg
from components.labelling.concepts import ConceptSettings, fuse_concepts, prompt_order
from components.models.registry import _tokenizer
from components.models.sam3 import SAM3_CONTEXT, ConceptOutputs, Sam3Teacher

CONFIG = Path(models_pkg.__file__).with_name("configs") / "mini-sam3.json"


@pytest.fixture(scope="module")
def teacher() -> Sam3Teacher:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Sam3Model(Sam3Config(**json.loads(CONFIG.read_text()))).eval()
    return Sam3Teacher(model, _tokenizer(SAM3_CONTEXT), image_size=112)


def _image(seed: int = 0, size: tuple[int, int] = (70, 90)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)


def test_decode_with_cached_features_equals_the_models_forward(teacher: Sam3Teacher) -> None:
    prompts = ["sky", "grass", "a red car", "person"]
    image = _image()
    vocabulary = teacher.encode_vocabulary(prompts)
    assert teacher.encode_vocabulary(list(prompts)) is vocabulary  # one text pass per vocabulary
    vision = teacher.encode_image(image)
    chunks = list(teacher.iter_chunks(vision, vocabulary, torch.arange(len(prompts)), chunk_size=3))
    assert [c[0].tolist() for c in chunks] == [[0, 1, 2], [3]]

    ids = teacher.tokenizer(prompts)
    with torch.inference_mode():
        reference = teacher.model(
            pixel_values=teacher.preprocess(image).expand(len(prompts), -1, -1, -1),
            input_ids=ids,
            attention_mask=(ids != 0).long(),
        )
    presence = torch.cat([c[1].presence for c in chunks])
    semantic = torch.cat([c[1].semantic for c in chunks])
    logits = torch.cat([c[1].instance_logits for c in chunks])
    masks = torch.cat([c[1].instance_masks for c in chunks])
    torch.testing.assert_close(presence, reference.presence_logits[:, 0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(semantic, reference.semantic_seg[:, 0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(logits, reference.pred_logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(masks, reference.pred_masks, rtol=1e-4, atol=1e-5)


def test_bad_inputs_are_refused(teacher: Sam3Teacher) -> None:
    with pytest.raises(ValueError, match="at least one prompt"):
        teacher.encode_vocabulary([])
    with pytest.raises(ValueError, match="uint8"):
        teacher.encode_image(np.zeros((8, 8, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="chunk_size"):
        next(teacher.iter_chunks(teacher.encode_image(_image()), teacher.encode_vocabulary(["a"]), torch.arange(1), 0))
    with pytest.raises(ValueError, match="concepts.pixel"):
        ConceptSettings(pixel=1.5)


def _random_outputs(num_prompts: int, queries: int, side: int, seed: int) -> ConceptOutputs:
    g = torch.Generator().manual_seed(seed)
    return ConceptOutputs(
        presence=torch.randn(num_prompts, generator=g) * 2,
        semantic=torch.randn(num_prompts, side, side, generator=g) * 2,
        instance_logits=torch.randn(num_prompts, queries, generator=g) * 2,
        instance_masks=torch.randn(num_prompts, queries, side, side, generator=g) * 3,
    )


def _naive(out: ConceptOutputs, prompt_classes: list[int], num_classes: int, size: tuple[int, int],
           s: ConceptSettings, image_classes: list[int] | None) -> tuple[np.ndarray, np.ndarray]:
    """The fusion rule, one pixel and one prompt at a time."""
    height, width = size
    up = lambda t: F.interpolate(t[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]  # noqa: E731
    semantic = [up(out.semantic[i]).sigmoid() for i in range(len(prompt_classes))]
    masks = [[up(out.instance_masks[i, q]).sigmoid() > s.mask for q in range(out.instance_logits.shape[1])]
             for i in range(len(prompt_classes))]
    label = np.full(size, 255, dtype=np.int64)
    for y in range(height):
        for x in range(width):
            best, best_class = 0.0, 255
            for i, c in enumerate(prompt_classes):
                if image_classes is None:
                    p = float(torch.sigmoid(out.presence[i]))
                else:
                    p = 1.0 if c in image_classes else 0.0
                if p < s.presence:
                    continue
                score = float(semantic[i][y, x])
                for q in range(out.instance_logits.shape[1]):
                    sq = float(torch.sigmoid(out.instance_logits[i, q])) * p
                    if sq >= s.instance and bool(masks[i][q][y, x]):
                        score = max(score, sq)
                if score > best or (score == best and score > 0 and c < best_class):
                    best, best_class = score, c
            if best >= s.pixel:
                label[y, x] = best_class
    presence = np.full(num_classes, np.nan)
    for i, c in enumerate(prompt_classes):
        p = float(torch.sigmoid(out.presence[i]))
        presence[c] = p if np.isnan(presence[c]) else max(presence[c], p)
    return label, presence


@pytest.mark.parametrize("chunk_size", [1, 3, 7])
@pytest.mark.parametrize("semi", [False, True])
def test_fusion_equals_a_naive_per_pixel_loop(chunk_size: int, semi: bool) -> None:
    prompt_classes = [2, 0, 1, 2, 4, 0, 3]  # synonyms: class 0 and 2 have two prompts each
    out = _random_outputs(len(prompt_classes), queries=5, side=6, seed=chunk_size)
    settings = ConceptSettings(presence=0.4, instance=0.3, mask=0.5, pixel=0.55, chunk_size=chunk_size)
    size = (9, 11)
    image_classes = [0, 3] if semi else None
    classes_t = torch.tensor(prompt_classes)
    order = prompt_order(classes_t)
    chunks = []
    for start in range(0, len(order), chunk_size):
        index = order[start : start + chunk_size]
        chunks.append((index, ConceptOutputs(*(t[index] for t in out))))
    result = fuse_concepts(chunks, classes_t, num_classes=6, size=size, settings=settings, image_classes=image_classes)
    label, presence = _naive(out, prompt_classes, 6, size, settings, image_classes)
    np.testing.assert_array_equal(result.label, label)
    np.testing.assert_allclose(result.presence, presence, rtol=1e-6)
    assert result.label.dtype == np.uint8
    if semi:
        assert result.present.tolist() == [True, False, False, True, False, False]


def test_stuff_comes_out_as_a_region_and_an_instance_wins_over_weaker_semantics() -> None:
    side = 8
    semantic = torch.full((2, side, side), -6.0)
    semantic[0, : side // 2] = 4.0  # "sky": top half, no instance at all
    semantic[1, side // 2 :] = 0.5  # "car": a weak semantic response on the bottom half
    logits = torch.full((2, 3), -8.0)
    logits[1, 0] = 6.0  # one confident car instance
    masks = torch.full((2, 3, side, side), -8.0)
    masks[1, 0, side // 2 :, : side // 2] = 8.0  # bottom-left quarter
    out = ConceptOutputs(torch.tensor([5.0, 5.0]), semantic, logits, masks)
    order = torch.arange(2)
    result = fuse_concepts([(order, out)], torch.tensor([0, 1]), 2, (side, side), ConceptSettings(pixel=0.7))
    assert (result.label[: side // 2] == 0).all()  # the stuff class, as a region
    assert (result.label[side // 2 :, : side // 2] == 1).all()  # the instance
    assert (result.label[side // 2 :, side // 2 :] == 255).all()  # sigmoid(0.5) = 0.62 < 0.7: too weak


def test_label_with_teacher_end_to_end_on_the_miniature(teacher: Sam3Teacher) -> None:
    from components.labelling.concepts import label_with_teacher

    prompts = ["background", "sky", "grass", "car", "road"]
    classes = torch.tensor([0, 1, 2, 3, 0])  # "road" prompts background (PV-21's extra background prompts)
    image = _image(3, (50, 64))
    everyone = label_with_teacher(teacher, image, prompts, classes, 4, (50, 64),
                                  ConceptSettings(presence=0.0, pixel=0.0, chunk_size=2))
    assert everyone.label.shape == (50, 64) and everyone.label.dtype == np.uint8
    assert set(np.unique(everyone.label)) <= {0, 1, 2, 3}  # pixel 0: every pixel gets a class
    assert not np.isnan(everyone.presence).any()
    # the same in one chunk, and with only some classes prompted
    whole = label_with_teacher(teacher, image, prompts, classes, 4, (50, 64),
                               ConceptSettings(presence=0.0, pixel=0.0, chunk_size=99))
    np.testing.assert_array_equal(whole.label, everyone.label)
    some = label_with_teacher(teacher, image, prompts, classes, 4, (50, 64),
                              ConceptSettings(presence=0.0, pixel=0.0), prompted=torch.tensor([False, True, False, True]))
    assert set(np.unique(some.label)) <= {1, 3}
    assert np.isnan(some.presence[[0, 2]]).all()
    nothing = label_with_teacher(teacher, image, prompts, classes, 4, (50, 64), ConceptSettings(),
                                 prompted=torch.zeros(4, dtype=torch.bool))
    assert (nothing.label == 255).all() and not nothing.present.any()
