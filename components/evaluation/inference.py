"""Zero-shot inference for FMbSeg Stage 2 (base), as pure functions over callables.

Paper §3.4 "Pixelwise Segmentation": patch logits are the cosine similarities between the aligned
patch embeddings and the text prototypes, interpolated to the original image size, then argmax.
The evaluation protocol follows TCL / mmseg (docs/design.md §4): resize to short side 448, sliding
window 448 / stride 224 with overlapping window logits averaged, no post-processing. A window
whose side is no multiple of the encoder's patch (any short side below the window, or none) is
zero-padded to the patch grid and its logits cropped back, as SCLIP's slide inference does.

Nothing here knows which encoder produced the embeddings: `encode_fn` / `logits_fn` are callables.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

MAX_LONG_SIDE = 2048  # the long edge of mmseg's keep-ratio test scale (2048, short_side)


def resize_short_side(image: Tensor, short_side: int, *, max_long_side: int = MAX_LONG_SIDE) -> Tensor:
    """Bilinear resize so that the shorter side is `short_side`, keeping the aspect ratio, unless
    the long side would then pass `max_long_side` (it is capped there instead: mmcv's keep-ratio
    rescale to (max_long_side, short_side), which also bounds the memory of extreme aspect ratios).

    image: [3, H, W] float (any value range) or [H, W, 3] uint8 (HWC, as images load from disk);
    the result has the same layout and dtype. The long side becomes round(long * scale) with
    scale = min(short_side / short, max_long_side / long) (mmcv's rescale rounding; a side never
    drops below 1). Bilinear with align_corners=False and no antialiasing, like the cv2 resize of
    the mmseg test pipeline.
    """
    if short_side < 1:
        raise ValueError(f"short_side must be >= 1, got {short_side}")
    if image.dim() == 3 and image.shape[0] == 3 and image.dtype.is_floating_point:
        chw = image
    elif image.dim() == 3 and image.shape[-1] == 3 and image.dtype == torch.uint8:
        chw = image.permute(2, 0, 1).float()
    else:
        raise ValueError(
            f"image must be [3, H, W] float or [H, W, 3] uint8, got shape {tuple(image.shape)} {image.dtype}"
        )
    h, w = chw.shape[-2:]
    scale = min(short_side / min(h, w), max_long_side / max(h, w))
    size = (max(int(h * scale + 0.5), 1), max(int(w * scale + 0.5), 1))
    resized = F.interpolate(chw[None], size=size, mode="bilinear", align_corners=False)[0]
    if image.dtype == torch.uint8:
        return resized.round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).contiguous()
    return resized


def _window_starts(size: int, window: int, stride: int) -> list[int]:
    """Start offsets of the windows along one axis (mmseg slide_inference): every `stride`, the last
    window moved back so that it ends on the border; a single window at 0 when size <= window."""
    count = max(size - window + stride - 1, 0) // stride + 1
    return [max(min(i * stride, size - window), 0) for i in range(count)]


def _round_up(size: int, multiple: int) -> int:
    return -(-size // multiple) * multiple


@torch.no_grad()
def sliding_window_logits_batch(
    images: Sequence[Tensor],
    logits_fn: Callable[[Tensor], Tensor],
    *,
    window: int,
    stride: int,
    num_classes: int,
    batch_size: int = 8,
    pad_to: int = 1,
) -> list[Tensor]:
    """Sliding-window dense logits of several images, averaged where windows overlap.

    images: [3, H_i, W_i] float each (sizes may differ). logits_fn: [B, 3, h, w] -> [B, K, h', w']
    (K = num_classes; any h', w', e.g. the patch grid). Windows are window x window, placed every
    `stride` pixels, with the last window in each direction snapped to the image border (mmseg slide
    inference); along an axis where the image is smaller than `window`, a single window spans the
    whole axis, so the windows of an image are min(window, H) x min(window, W). Each window is
    zero-padded on the bottom and right to a multiple of `pad_to` (the encoder's patch size, so that
    any image size and short side work; SCLIP's slide inference pads the same way), and windows of
    the same padded size -- of one image or of several -- run through `logits_fn` together, in
    chunks of `batch_size`, in the order of the images. Each window's logits are upsampled
    bilinearly (align_corners=False) to the padded size, cropped to the window and summed into
    their image; every pixel is divided by the number of windows that cover it. Returns one
    [K, H_i, W_i] float32 per image, on its device. Runs without gradients.
    """
    if window < 1 or stride < 1 or batch_size < 1 or num_classes < 1 or pad_to < 1:
        raise ValueError(
            f"window, stride, batch_size, num_classes and pad_to must be >= 1, got {window}, {stride}, "
            f"{batch_size}, {num_classes}, {pad_to}"
        )
    if stride > window:
        raise ValueError(f"stride {stride} > window {window} would leave pixels that no window covers")
    groups: dict[tuple[int, int], list[tuple[int, int, int]]] = {}  # padded size -> (image, y, x)
    sums, counts, sizes = [], [], []
    for index, image in enumerate(images):
        if image.dim() != 3 or image.shape[0] != 3 or not image.dtype.is_floating_point:
            raise ValueError(f"image must be [3, H, W] float, got shape {tuple(image.shape)} {image.dtype}")
        _, height, width = image.shape
        win = (min(window, height), min(window, width))
        sizes.append(win)
        padded = (_round_up(win[0], pad_to), _round_up(win[1], pad_to))
        groups.setdefault(padded, []).extend(
            (index, y, x) for y in _window_starts(height, window, stride) for x in _window_starts(width, window, stride)
        )
        sums.append(torch.zeros(num_classes, height, width, dtype=torch.float32, device=image.device))
        counts.append(torch.zeros(1, height, width, dtype=torch.float32, device=image.device))
    for (pad_h, pad_w), boxes in groups.items():
        for start in range(0, len(boxes), batch_size):
            chunk = boxes[start : start + batch_size]
            crops = []
            for index, y, x in chunk:
                win_h, win_w = sizes[index]
                crop = images[index][:, y : y + win_h, x : x + win_w]
                if (win_h, win_w) != (pad_h, pad_w):
                    crop = F.pad(crop, (0, pad_w - win_w, 0, pad_h - win_h))
                crops.append(crop.to(images[chunk[0][0]].device))
            out = logits_fn(torch.stack(crops))
            if out.dim() != 4 or tuple(out.shape[:2]) != (len(chunk), num_classes):
                raise ValueError(
                    f"logits_fn must return [B={len(chunk)}, K={num_classes}, h, w], got {tuple(out.shape)}"
                )
            out = out.float()
            if tuple(out.shape[-2:]) != (pad_h, pad_w):
                out = F.interpolate(out, size=(pad_h, pad_w), mode="bilinear", align_corners=False)
            for (index, y, x), window_logits in zip(chunk, out, strict=True):
                win_h, win_w = sizes[index]
                sums[index][:, y : y + win_h, x : x + win_w] += window_logits[:, :win_h, :win_w].to(sums[index].device)
                counts[index][:, y : y + win_h, x : x + win_w] += 1
    return [total / count for total, count in zip(sums, counts, strict=True)]


def patch_logits(z: Tensor, prototypes: Tensor) -> Tensor:
    """Cosine similarity of every patch embedding with every text prototype (paper §3.4).

    z: [B, h, w, D] patch embeddings in text space; prototypes: [K, D]. Both are L2-normalised over
    D. Returns [B, K, h, w] float32 in [-1, 1].
    """
    if z.dim() != 4 or prototypes.dim() != 2 or z.shape[-1] != prototypes.shape[-1]:
        raise ValueError(
            f"expected z [B, h, w, D] and prototypes [K, D], got {tuple(z.shape)} and {tuple(prototypes.shape)}"
        )
    z = F.normalize(z.float(), dim=-1)
    t = F.normalize(prototypes.float(), dim=-1)
    return torch.einsum("bhwd,kd->bkhw", z, t)


def _resized_logits(
    images: Sequence[Tensor],
    *,
    encode_fn: Callable[[Tensor], Tensor],
    prototypes: Tensor,
    window: int,
    stride: int,
    short_side: int | None,
    batch_size: int,
    pad_to: int,
) -> list[Tensor]:
    """The sliding-window logits of every image at its resized size: [K, h_i, w_i] float32 each."""
    for image in images:
        if image.dim() != 3 or image.shape[0] != 3 or not image.dtype.is_floating_point:
            raise ValueError(f"image must be [3, H, W] float, got shape {tuple(image.shape)} {image.dtype}")
    resized = [resize_short_side(image, short_side) if short_side is not None else image for image in images]
    return sliding_window_logits_batch(
        resized,
        lambda crops: patch_logits(encode_fn(crops), prototypes),
        window=window,
        stride=stride,
        num_classes=prototypes.shape[0],
        batch_size=batch_size,
        pad_to=pad_to,
    )


def predict_logits_batch(
    images: Sequence[Tensor],
    *,
    encode_fn: Callable[[Tensor], Tensor],
    prototypes: Tensor,
    window: int,
    stride: int,
    short_side: int | None,
    batch_size: int = 8,
    pad_to: int = 1,
) -> list[Tensor]:
    """FMbSeg Stage 2 (base) logits of several images, each at its original size.

    images: [3, H_i, W_i] float each, normalised as `encode_fn` expects. encode_fn: pixels
    [B, 3, h, w] -> patch embeddings [B, h/p, w/p, D] already in text space (e.g. DINOv2 + aligner).
    prototypes: [K, D] text prototypes. Each image is resized to `short_side` (None: kept as is),
    cut into sliding windows padded to a multiple of `pad_to` (`sliding_window_logits_batch`, the
    windows of all images batched together), each window scored by `patch_logits`, and the
    averaged logits are resized bilinearly (align_corners=False) back to H_i x W_i. Returns one
    [K, H_i, W_i] float32 of cosine similarities per image.
    """
    logits = _resized_logits(images, encode_fn=encode_fn, prototypes=prototypes, window=window, stride=stride,
                             short_side=short_side, batch_size=batch_size, pad_to=pad_to)
    out = []
    for image, image_logits in zip(images, logits, strict=True):
        size = tuple(image.shape[-2:])
        if tuple(image_logits.shape[-2:]) != size:
            image_logits = F.interpolate(image_logits[None], size=size, mode="bilinear", align_corners=False)[0]
        out.append(image_logits)
    return out


def upsampled_max(
    logits: Tensor, size: tuple[int, int], *, max_elements: int = 1 << 25, logit_scale: float | None = None
) -> tuple[Tensor, Tensor]:
    """Max over K of [K, h, w] logits resized bilinearly (align_corners=False) to `size` = (H, W).

    The same values as resizing all K maps, then ``max(dim=0)`` (ties: the lower index), computed a
    chunk of maps at a time so that a resized chunk holds at most `max_elements` values (one chunk
    for an ordinary image; a 12-megapixel photo and 171 classes at once would be 8 GB). Returns
    ([H, W] float32 score, [H, W] int64 index). With `logit_scale` s the score is the winner's
    probability under softmax(s · logits) over the K resized maps (SCLIP's background rule), from a
    running log-sum-exp; the index is the same.
    """
    if logits.dim() != 3 or max_elements < 1:
        raise ValueError(f"logits must be [K, h, w] and max_elements >= 1, got {tuple(logits.shape)}, {max_elements}")
    chunk = max(1, max_elements // (size[0] * size[1]))
    best: Tensor | None = None
    index: Tensor | None = None
    log_total: Tensor | None = None
    for start in range(0, logits.shape[0], chunk):
        part = logits[start : start + chunk]
        if tuple(part.shape[-2:]) != tuple(size):
            part = F.interpolate(part[None], size=size, mode="bilinear", align_corners=False)[0]
        if logit_scale is not None:
            chunk_total = torch.logsumexp(logit_scale * part.float(), dim=0)
            log_total = chunk_total if log_total is None else torch.logaddexp(log_total, chunk_total)
        score, which = part.max(dim=0)
        if best is None or index is None:
            best, index = score, which
        else:
            better = score > best  # strictly: a tie keeps the earlier (lower) index, as max does
            best = torch.where(better, score, best)
            index = torch.where(better, which + start, index)
    assert best is not None and index is not None
    if logit_scale is not None:
        assert log_total is not None
        best = torch.exp(logit_scale * best.float() - log_total)
    return best, index


def predict_scores_batch(
    images: Sequence[Tensor],
    *,
    encode_fn: Callable[[Tensor], Tensor],
    prototypes: Tensor,
    window: int,
    stride: int,
    short_side: int | None,
    batch_size: int = 8,
    pad_to: int = 1,
    max_elements: int = 1 << 25,
    logit_scale: float | None = None,
) -> list[tuple[Tensor, Tensor]]:
    """:func:`predict_logits_batch` followed by the max over prompts, without holding [K, H, W] at
    the original size (:func:`upsampled_max`): one ([H_i, W_i] float32 best cosine, or with
    `logit_scale` its softmax probability, [H_i, W_i] int64 prompt index) per image."""
    logits = _resized_logits(images, encode_fn=encode_fn, prototypes=prototypes, window=window, stride=stride,
                             short_side=short_side, batch_size=batch_size, pad_to=pad_to)
    return [upsampled_max(image_logits, tuple(image.shape[-2:]), max_elements=max_elements, logit_scale=logit_scale)
            for image, image_logits in zip(images, logits, strict=True)]


def labels_from_scores(
    score: Tensor,
    prompt: Tensor,
    *,
    class_map: Tensor | None = None,
    bg_threshold: float | None = None,
    background_index: int | None = None,
) -> Tensor:
    """Per-pixel class from the winning prompt of every pixel.

    score / prompt: [H, W] highest prompt logit and its prompt index (of K prompts). class_map [K]
    int64 maps prompt index -> output class (e.g. PV-21's stuff prompts -> background, see
    `build_prompt_set`); None: class = prompt index. With `bg_threshold`, pixels whose score is
    below it get `background_index` (an output class index; required then): cosine similarities
    from `predict_logits_batch`. Returns [H, W] int64.
    """
    if class_map is None:
        labels = prompt
    else:
        if class_map.dim() != 1 or class_map.dtype != torch.int64:
            raise ValueError(f"class_map must be [K] int64, got {tuple(class_map.shape)} {class_map.dtype}")
        labels = class_map.to(prompt.device)[prompt]
    if bg_threshold is not None:
        if background_index is None:
            raise ValueError("bg_threshold needs background_index (the output class of background)")
        labels = torch.where(score < bg_threshold, torch.full_like(labels, background_index), labels)
    elif background_index is not None:
        raise ValueError("background_index is only used with bg_threshold; pass both or neither")
    return labels


class Prediction(NamedTuple):
    """A segmenter's output for one image: [H, W] int64 class maps at the image's size (the base
    prediction, and the SAM-refined one or None)."""

    base: Tensor
    refined: Tensor | None


class PromptSet(NamedTuple):
    """Prompts to encode and, for each, the output class it votes for."""

    names: list[str]
    """[K'] prompt class names: the dataset's classes, then the extra background prompts."""
    class_map: Tensor
    """[K'] int64: prompt index -> dataset class index."""


def _synonyms(line: str) -> list[str]:
    """A class line's comma-separated synonyms, stripped ("plant-other, plant" -> both)."""
    return [s.strip() for s in line.split(",") if s.strip()]


def build_prompt_set(
    class_names: Sequence[str], extra_background: Sequence[str] | None, background_index: int
) -> PromptSet:
    """Dataset classes plus extra prompts that all mean background.

    For PV-21 (paper §4.1): class_names = the 21 classes with "background" at `background_index`,
    extra_background = the COCO-Stuff stuff classes; every stuff prompt maps to `background_index`.
    A synonym that names a dataset class is never a background prompt (compared per synonym, case
    aside): a background line loses those synonyms ("plant-other, plant" -> "plant-other", since
    VOC has "plant, potted plant") and a line left with none is dropped ("table"), else the same
    text prompt would vote for the class and for background at once.
    Returns names = class_names + the remaining background lines and class_map = [0, ..., C-1, b,
    ..., b]. A name that appears twice raises ValueError (its prompts would tie).
    """
    class_names = list(class_names)
    if not 0 <= background_index < len(class_names):
        raise ValueError(f"background_index {background_index} outside [0, {len(class_names)})")
    taken = {s.lower() for line in class_names for s in _synonyms(line)}
    extra = []
    for line in extra_background if extra_background is not None else []:
        kept = [s for s in _synonyms(line) if s.lower() not in taken]
        if kept:
            extra.append(", ".join(kept))
    names = class_names + extra
    duplicates = sorted(name for name, count in Counter(names).items() if count > 1)
    if duplicates:
        raise ValueError(f"prompt names appear more than once: {duplicates}")
    class_map = torch.cat(
        [
            torch.arange(len(class_names), dtype=torch.int64),
            torch.full((len(extra),), background_index, dtype=torch.int64),
        ]
    )
    return PromptSet(names=names, class_map=class_map)
