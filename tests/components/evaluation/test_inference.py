"""Sliding-window inference, patch logits, prompt sets (docs/design.md §4 evaluation protocol)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from components.datasets.registry import class_file_path, read_class_file
from components.evaluation.inference import (
    build_prompt_set,
    labels_from_scores,
    patch_logits,
    predict_logits_batch,
    predict_scores_batch,
    resize_short_side,
    sliding_window_logits_batch,
)


def coordinate_image(height: int, width: int) -> torch.Tensor:
    """[3, H, W] float: channel 0 = row index, channel 1 = column index, channel 2 = 1."""
    rows = torch.arange(height, dtype=torch.float32)[:, None].expand(height, width)
    cols = torch.arange(width, dtype=torch.float32)[None, :].expand(height, width)
    return torch.stack([rows, cols, torch.ones(height, width)])


def pooled_logits_fn(num_classes: int, seed: int = 0):
    """A position-dependent logits_fn at half resolution: 2x2 average pool, then a fixed 1x1 map."""
    weight = torch.randn(num_classes, 3, generator=torch.Generator().manual_seed(seed))

    def logits_fn(crops: torch.Tensor) -> torch.Tensor:
        pooled = F.avg_pool2d(crops, 2, ceil_mode=True)
        return torch.einsum("kc,bchw->bkhw", weight, pooled) + pooled[:, :1].square()

    return logits_fn


def counting(logits_fn, batches: list[int]):
    """Wraps logits_fn, appending each batch size it is called with to `batches`."""

    def counting_fn(crops: torch.Tensor) -> torch.Tensor:
        batches.append(crops.shape[0])
        return logits_fn(crops)

    return counting_fn


def naive_window_starts(size: int, window: int, stride: int) -> list[int]:
    """mmseg slide_inference, literally."""
    starts = []
    for idx in range(max(size - window + stride - 1, 0) // stride + 1):
        end = min(idx * stride + window, size)
        starts.append(max(end - window, 0))
    return starts


def naive_sliding(image: torch.Tensor, logits_fn, window: int, stride: int) -> torch.Tensor:
    """Per-pixel loop: mean over the covering windows of that window's upsampled logit."""
    _, height, width = image.shape
    win_h, win_w = min(window, height), min(window, width)
    windows = []
    for y in naive_window_starts(height, window, stride):
        for x in naive_window_starts(width, window, stride):
            out = logits_fn(image[None, :, y : y + win_h, x : x + win_w])
            up = F.interpolate(out, size=(win_h, win_w), mode="bilinear", align_corners=False)[0]
            windows.append((y, x, up))
    result = torch.zeros(windows[0][2].shape[0], height, width)
    for i in range(height):
        for j in range(width):
            values = [
                up[:, i - y, j - x] for y, x, up in windows if y <= i < y + win_h and x <= j < x + win_w
            ]
            result[:, i, j] = torch.stack(values).mean(dim=0)
    return result


def test_resize_short_side_shapes_and_dtypes() -> None:
    chw = torch.rand(3, 6, 9)
    out = resize_short_side(chw, 4)
    assert out.shape == (3, 4, 6) and out.dtype == torch.float32
    assert torch.allclose(out, F.interpolate(chw[None], size=(4, 6), mode="bilinear", align_corners=False)[0])

    hwc = torch.randint(0, 256, (9, 6, 3), dtype=torch.uint8)
    out = resize_short_side(hwc, 4)
    assert out.shape == (6, 4, 3) and out.dtype == torch.uint8
    as_float = resize_short_side(hwc.permute(2, 0, 1).float(), 4)
    assert torch.equal(out, as_float.round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0))

    assert resize_short_side(torch.rand(3, 7, 5), 448).shape == (3, 627, 448)  # 7 * 448 / 5 = 627.2
    # An extreme aspect ratio: the long side is capped (mmseg's keep-ratio scale (2048, short)),
    # so a 1x4000 image no longer becomes 448x1792000.
    assert resize_short_side(torch.zeros(1, 4000, 3, dtype=torch.uint8), 448).shape == (1, 2048, 3)
    assert resize_short_side(torch.rand(3, 8, 4000), 448, max_long_side=1000).shape == (3, 2, 1000)
    with pytest.raises(ValueError, match=r"\[3, H, W\] float or \[H, W, 3\] uint8"):
        resize_short_side(torch.rand(4, 4, 3), 4)


def test_window_positions_snap_to_border_and_small_axes() -> None:
    seen: list[tuple[int, int, int, int]] = []

    def recording_fn(crops: torch.Tensor) -> torch.Tensor:
        for crop in crops:
            seen.append((int(crop[0, 0, 0]), int(crop[1, 0, 0]), crop.shape[1], crop.shape[2]))
        return crops[:, :1]

    sliding_window_logits_batch([coordinate_image(5, 7)], recording_fn, window=4, stride=3, num_classes=1)
    assert seen == [(0, 0, 4, 4), (0, 3, 4, 4), (1, 0, 4, 4), (1, 3, 4, 4)]

    seen.clear()  # height 3 < window 4: one window of height 3 along that axis
    sliding_window_logits_batch([coordinate_image(3, 10)], recording_fn, window=4, stride=2, num_classes=1)
    assert seen == [(0, 0, 3, 4), (0, 2, 3, 4), (0, 4, 3, 4), (0, 6, 3, 4)]


@pytest.mark.parametrize("window", [8, 16])
def test_window_covering_image_equals_whole_image_inference(window: int) -> None:
    image = torch.randn(3, 8, 8, generator=torch.Generator().manual_seed(0))
    logits_fn = pooled_logits_fn(4)
    got = sliding_window_logits_batch([image], logits_fn, window=window, stride=4, num_classes=4)[0]
    want = F.interpolate(logits_fn(image[None]), size=(8, 8), mode="bilinear", align_corners=False)[0]
    assert torch.allclose(got, want, atol=1e-6)


def test_overlapping_windows_average_by_hand() -> None:
    # Windows start at columns 0 and 2; each outputs its start column everywhere.
    def start_column(crops: torch.Tensor) -> torch.Tensor:
        return crops[:, 1:2, :1, :1].amin(dim=(2, 3), keepdim=True).expand(-1, 1, 2, 2)

    got = sliding_window_logits_batch([coordinate_image(4, 6)], start_column, window=4, stride=2, num_classes=1)[0]
    assert got.shape == (1, 4, 6)
    assert torch.equal(got[0], torch.tensor([[0.0, 0.0, 1.0, 1.0, 2.0, 2.0]]).expand(4, 6))


@pytest.mark.parametrize(
    ("height", "width", "window", "stride"), [(9, 13, 6, 4), (5, 11, 8, 3), (10, 10, 4, 4)]
)
def test_sliding_window_matches_naive_loop(height: int, width: int, window: int, stride: int) -> None:
    image = torch.randn(3, height, width, generator=torch.Generator().manual_seed(1))
    logits_fn = pooled_logits_fn(3, seed=2)
    want = naive_sliding(image, logits_fn, window, stride)
    for batch_size in (1, 2, 8):
        batches: list[int] = []
        got = sliding_window_logits_batch(
            [image],
            counting(logits_fn, batches),
            window=window,
            stride=stride,
            num_classes=3,
            batch_size=batch_size,
        )[0]
        assert torch.allclose(got, want, atol=1e-5)
        assert max(batches) <= batch_size
        assert sum(batches) == len(naive_window_starts(height, window, stride)) * len(
            naive_window_starts(width, window, stride)
        )


def test_sliding_window_errors() -> None:
    image = torch.rand(3, 8, 8)
    with pytest.raises(ValueError, match="leave pixels"):
        sliding_window_logits_batch([image], pooled_logits_fn(2), window=4, stride=5, num_classes=2)[0]
    with pytest.raises(ValueError, match="logits_fn must return"):
        sliding_window_logits_batch([image], pooled_logits_fn(2), window=4, stride=4, num_classes=3)[0]


def test_patch_logits_is_cosine_similarity() -> None:
    generator = torch.Generator().manual_seed(3)
    z = torch.randn(2, 3, 4, 5, generator=generator)
    prototypes = torch.randn(6, 5, generator=generator) * 7.0
    got = patch_logits(z, prototypes)
    assert got.shape == (2, 6, 3, 4)
    for b in range(2):
        for k in range(6):
            for i in range(3):
                for j in range(4):
                    v, t = z[b, i, j], prototypes[k]
                    want = float(v @ t) / (float(v.norm()) * float(t.norm()))
                    assert float(got[b, k, i, j]) == pytest.approx(want, abs=1e-5)


def make_encoder(patch: int, dim: int):
    """encode_fn: [B, 3, h, w] -> [B, h/p, w/p, D] (patch average, then a fixed linear map)."""
    weight = torch.randn(3, dim, generator=torch.Generator().manual_seed(4))

    def encode_fn(pixels: torch.Tensor) -> torch.Tensor:
        per_image_mean = pixels.mean(dim=(1, 2, 3))[:, None, None, None]
        return F.avg_pool2d(pixels, patch).permute(0, 2, 3, 1) @ weight + per_image_mean

    return encode_fn


def test_predict_logits_composes_resize_window_and_upsample() -> None:
    image = torch.randn(3, 10, 15, generator=torch.Generator().manual_seed(5))
    prototypes = torch.randn(4, 6, generator=torch.Generator().manual_seed(6))
    encode_fn = make_encoder(patch=2, dim=6)
    got = predict_logits_batch(
        [image], encode_fn=encode_fn, prototypes=prototypes, window=8, stride=4, short_side=8, batch_size=2
    )[0]
    assert got.shape == (4, 10, 15)

    resized = F.interpolate(image[None], size=(8, 12), mode="bilinear", align_corners=False)[0]
    small = naive_sliding(resized, lambda crops: patch_logits(encode_fn(crops), prototypes), 8, 4)
    want = F.interpolate(small[None], size=(10, 15), mode="bilinear", align_corners=False)[0]
    assert torch.allclose(got, want, atol=1e-5)

    # the base prediction as the Segmenter makes it: the best prompt per pixel, then its class
    score, prompt = predict_scores_batch(
        [image], encode_fn=encode_fn, prototypes=prototypes, window=8, stride=4, short_side=8, batch_size=2
    )[0]
    labels = labels_from_scores(score, prompt)
    assert labels.dtype == torch.int64 and labels.shape == (10, 15)
    assert torch.equal(labels, got.argmax(dim=0))


def test_predict_logits_without_resize_one_window() -> None:
    image = torch.randn(3, 8, 12, generator=torch.Generator().manual_seed(7))
    prototypes = torch.randn(3, 5, generator=torch.Generator().manual_seed(8))
    encode_fn = make_encoder(patch=4, dim=5)
    got = predict_logits_batch(
        [image], encode_fn=encode_fn, prototypes=prototypes, window=12, stride=6, short_side=None
    )[0]
    want = F.interpolate(
        patch_logits(encode_fn(image[None]), prototypes), size=(8, 12), mode="bilinear", align_corners=False
    )[0]
    assert torch.allclose(got, want, atol=1e-6)


def test_pv21_stuff_prompts_map_to_background() -> None:
    classes = ["background", "aeroplane", "bicycle"]
    prompts = build_prompt_set(classes, ["sky", "grass"], background_index=0)
    assert prompts.names == ["background", "aeroplane", "bicycle", "sky", "grass"]
    assert prompts.class_map.dtype == torch.int64
    assert prompts.class_map.tolist() == [0, 1, 2, 0, 0]
    names, class_map = prompts  # also unpacks like the (names, class_map) pair
    assert names == prompts.names and class_map is prompts.class_map

    # Pixel winners, one per pixel: prompt 3 (sky), 1 (aeroplane), 4 (grass), 2 (bicycle), 0.
    winners = torch.tensor([[3, 1, 4, 2, 0]])
    logits = F.one_hot(winners, 5).permute(2, 0, 1).float() + 0.1 * torch.rand(5, 1, 5)
    labels = labels_from_scores(*logits.max(dim=0), class_map=prompts.class_map)
    assert labels.tolist() == [[0, 1, 0, 2, 0]]
    assert labels_from_scores(*logits.max(dim=0)).tolist() == winners.tolist()  # no map: prompt index


def test_build_prompt_set_errors_and_no_extra() -> None:
    plain = build_prompt_set(["a", "b"], None, background_index=0)
    assert plain.names == ["a", "b"] and plain.class_map.tolist() == [0, 1]
    with pytest.raises(ValueError, match="more than once"):
        build_prompt_set(["background", "sky", "sky"], None, background_index=0)
    with pytest.raises(ValueError, match="outside"):
        build_prompt_set(["a", "b"], ["c"], background_index=2)


def test_background_prompts_never_name_a_foreground_class() -> None:
    # Per synonym, case and spaces aside: a background line loses the synonyms a class already
    # has, and a line left with none is dropped, so no prompt serves a class and background at once.
    prompts = build_prompt_set(
        ["background", "table, dining table", "plant, potted plant"],
        ["sky", "Table", "plant-other, plant", " dining table , desk"],
        background_index=0,
    )
    assert prompts.names == ["background", "table, dining table", "plant, potted plant", "sky", "plant-other",
                             "desk"]
    assert prompts.class_map.tolist() == [0, 1, 2, 0, 0, 0]


def test_pv21_shipped_background_prompts_are_disjoint_from_its_classes() -> None:
    voc21 = read_class_file(class_file_path("voc21"))
    stuff = read_class_file(class_file_path("cocostuff_stuff"))
    prompts = build_prompt_set(voc21, stuff, background_index=0)

    def synonyms(lines):
        return {s.strip().lower() for line in lines for s in line.split(",")}

    background = prompts.names[len(voc21):]
    assert prompts.names[:len(voc21)] == voc21
    assert not synonyms(background) & synonyms(voc21)
    assert "table" not in background and "plant-other" in background  # "plant-other, plant" keeps its own name
    assert synonyms(background) == synonyms(stuff) - {"table", "plant"}
    assert prompts.class_map.tolist() == list(range(21)) + [0] * len(background)


def test_background_threshold() -> None:
    logits = torch.tensor([[[0.9, 0.1, 0.05]], [[0.2, 0.3, 0.01]], [[0.1, 0.25, 0.02]]])  # [K=3, 1, 3]
    class_map = torch.tensor([0, 1, 2])
    got = labels_from_scores(*logits.max(dim=0), class_map=class_map, bg_threshold=0.28, background_index=0)
    # maxima 0.9 (class 0), 0.3 (class 1), 0.05 (class 0, below threshold -> background 0).
    assert got.tolist() == [[0, 1, 0]]
    got = labels_from_scores(*logits.max(dim=0), bg_threshold=0.5, background_index=2)
    assert got.tolist() == [[0, 2, 2]]
    with pytest.raises(ValueError, match="needs background_index"):
        labels_from_scores(*logits.max(dim=0), bg_threshold=0.5)
    with pytest.raises(ValueError, match="class_map must be"):
        labels_from_scores(*logits.max(dim=0), class_map=torch.tensor([[0, 1, 2]]))


# ------------------------------------------- windows whose side is not a multiple of the patch size
def strict_encoder(patch: int, dim: int):
    """make_encoder, but refusing pixels whose sides are not multiples of the patch (as DINOv2 does)."""
    encode = make_encoder(patch, dim)

    def encode_fn(pixels: torch.Tensor) -> torch.Tensor:
        if pixels.shape[-2] % patch or pixels.shape[-1] % patch:
            raise ValueError(f"sides must be divisible by {patch}, got {tuple(pixels.shape[-2:])}")
        return encode(pixels)

    return encode_fn


def naive_padded(image: torch.Tensor, logits_fn, window: int, stride: int, multiple: int) -> torch.Tensor:
    """naive_sliding, each window zero-padded on the bottom and right to a multiple of `multiple`,
    its logits upsampled to the padded size and cropped back to the window (SCLIP / mmseg style)."""

    def padded_fn(crops: torch.Tensor) -> torch.Tensor:
        h, w = crops.shape[-2:]
        ph, pw = -(-h // multiple) * multiple, -(-w // multiple) * multiple
        out = logits_fn(F.pad(crops, (0, pw - w, 0, ph - h)))
        return F.interpolate(out, size=(ph, pw), mode="bilinear", align_corners=False)[:, :, :h, :w]

    return naive_sliding(image, padded_fn, window, stride)


@pytest.mark.parametrize(
    ("height", "width", "short_side", "window", "stride"),
    [
        (15, 20, None, 16, 8),  # short_side null: a 375x500 VOC image at window 448, scaled down
        (20, 18, 13, 16, 8),  # a short side below the window: 500x450 at 336 -> a 373x336 window
        (7, 9, 12, 16, 8),  # a small image, upscaled to a side that is no multiple of the patch
        (5, 6, None, 16, 8),  # an image smaller than one window, kept at its size
        (21, 35, None, 12, 8),  # odd sides larger than the window, window a multiple of the patch
    ],
)
def test_windows_of_any_size_are_padded_to_the_patch_grid(height, width, short_side, window, stride) -> None:
    image = torch.randn(3, height, width, generator=torch.Generator().manual_seed(9))
    prototypes = torch.randn(3, 5, generator=torch.Generator().manual_seed(10))
    encode_fn = strict_encoder(patch=4, dim=5)
    got = predict_logits_batch([image], encode_fn=encode_fn, prototypes=prototypes, window=window, stride=stride,
                         short_side=short_side, pad_to=4)[0]
    assert got.shape == (3, height, width)
    resized = image if short_side is None else resize_short_side(image, short_side)
    small = naive_padded(resized, lambda crops: patch_logits(encode_fn(crops), prototypes), window, stride, 4)
    want = F.interpolate(small[None], size=(height, width), mode="bilinear", align_corners=False)[0]
    assert torch.allclose(got, want, atol=1e-5)


def test_padding_changes_nothing_on_the_patch_grid() -> None:
    image = torch.randn(3, 16, 24, generator=torch.Generator().manual_seed(11))
    prototypes = torch.randn(3, 5, generator=torch.Generator().manual_seed(12))
    encode_fn = strict_encoder(patch=4, dim=5)
    plain = predict_logits_batch([image], encode_fn=encode_fn, prototypes=prototypes, window=16, stride=8, short_side=None)[0]
    padded = predict_logits_batch([image], encode_fn=encode_fn, prototypes=prototypes, window=16, stride=8,
                            short_side=None, pad_to=4)[0]
    assert torch.equal(plain, padded)


def test_a_batch_of_images_equals_one_image_at_a_time() -> None:
    from components.evaluation.inference import predict_logits_batch

    generator = torch.Generator().manual_seed(13)
    images = [torch.randn(3, h, w, generator=generator) for h, w in ((15, 20), (16, 16), (9, 30), (15, 20))]
    prototypes = torch.randn(3, 5, generator=torch.Generator().manual_seed(14))
    batches: list[int] = []
    encode_fn = strict_encoder(patch=4, dim=5)
    counted = counting(encode_fn, batches)
    got = predict_logits_batch(images, encode_fn=counted, prototypes=prototypes, window=12, stride=8,
                               short_side=12, batch_size=8, pad_to=4)
    for image, logits in zip(images, got, strict=True):
        alone = predict_logits_batch([image], encode_fn=encode_fn, prototypes=prototypes, window=12, stride=8,
                               short_side=12, pad_to=4)[0]
        assert torch.allclose(logits, alone, atol=1e-6)
    assert max(batches) <= 8 and len(batches) < len(images) * 2  # windows of several images share forwards


@pytest.mark.parametrize("chunk", [1, 3, 16])  # maps per chunk
def test_upsampled_max_equals_resize_then_max(chunk: int) -> None:
    from components.evaluation.inference import upsampled_max

    logits = torch.randn(7, 5, 6, generator=torch.Generator().manual_seed(15))
    logits[4] = logits[2]  # a tie: the lower index wins, as with max
    full = F.interpolate(logits[None], size=(13, 17), mode="bilinear", align_corners=False)[0]
    want_score, want_index = full.max(dim=0)
    score, index = upsampled_max(logits, (13, 17), max_elements=chunk * 13 * 17)
    assert torch.equal(score, want_score) and torch.equal(index, want_index)


@pytest.mark.parametrize("chunk", [1, 3, 16])
def test_upsampled_max_gives_the_winners_softmax_probability_with_a_logit_scale(chunk: int) -> None:
    # SCLIP's background rule: softmax(logit_scale * cosine) over the prompts at full size, the
    # winner's probability compared with the threshold.
    from components.evaluation.inference import upsampled_max

    logits = torch.rand(7, 5, 6, generator=torch.Generator().manual_seed(16)) * 2 - 1
    full = F.interpolate(logits[None], size=(13, 17), mode="bilinear", align_corners=False)[0]
    probs = torch.softmax(50.0 * full, dim=0)
    want_prob, want_index = probs.max(dim=0)
    prob, index = upsampled_max(logits, (13, 17), max_elements=chunk * 13 * 17, logit_scale=50.0)
    assert torch.equal(index, want_index) and torch.allclose(prob, want_prob, atol=1e-6)


def test_max_synonyms_prompt_each_synonym_for_its_class() -> None:
    from components.evaluation.prompts import benchmark_prompts

    meta = {"background": "class0", "extra_background_classes": ["sky, clouds", "plant-other, plant"]}
    classes = ["background", "plant, potted plant", "person"]
    mean = benchmark_prompts(classes, meta)
    assert mean.names == classes + ["sky, clouds", "plant-other"]
    top = benchmark_prompts(classes, meta, synonyms="max")
    assert top.names == ["background", "plant", "potted plant", "person", "sky", "clouds", "plant-other"]
    assert top.class_map.tolist() == [0, 1, 1, 2, 0, 0, 0]
    alone = benchmark_prompts(classes, meta, background_prompts=False)  # background by threshold alone
    assert alone.names == classes and alone.class_map.tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="synonyms must be one of"):
        benchmark_prompts(classes, meta, synonyms="min")
