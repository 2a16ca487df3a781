"""FMbSeg Stage 1 on one image: CLIP presence, Stage 1.1 (SAM prompted by CLIP), Stage 1.2 (SAM's
automatic masks labelled by CLIP). Paper §3.2 and appendix §1; decisions in docs/design.md §4.

Frames (all squares, the aspect ratio is not kept):
- CLIP sees the image resized (bicubic) to G·S × G·S and tiled into G² crops; their patches
  stitch into an [h, w] = [G·S/p, G·S/p] dense map (96 × 96 for ViT-L/14-336 at G = 4).
- SAM sees the image resized to ``sam_size`` (518 in the paper): one encoder pass serves both
  stages; point prompts and masks live in this frame.
- Label maps are painted in the SAM frame and resized to ``label_size`` by pixel-centre nearest
  sampling ("nearest-exact"), which equals resizing every mask that way before painting.

The per-image steps are separate functions (each with its own test); :func:`label_image` is the
one sequence of them, timed step by step, that every caller runs.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Literal, NamedTuple

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from PIL import Image
from pycocotools import mask as mask_utils
from torch import Tensor

from components.io import unlabelled_for
from components.labelling.detect import (
    Presence,
    crop_classes,
    detect_present,
    label_masks,
    mask_coverage,
    mask_mean_features,
    patch_centres_xy,
    presence_from_class_labels,
    presence_from_image_labels,
    prompt_patches,
)
from components.labelling.settings import AmgSettings, Stage1Settings
from components.labelmaps import as_label_array, label_tensor_dtype, paint_by_score, paint_masks
from components.models.clip_dense import DenseFeatures, clip_preprocess, tiled_features
from components.models.masks import MaskImage, MaskModel, embed_image, masks_to_coco_rle
from components.models.registry import autocast_context

__all__ = [
    "AmgSettings",
    "Stage1Settings",
    "PreparedImage",
    "AmgMask",
    "Stage11Result",
    "Stage12Result",
    "Stage1Result",
    "prepare_image",
    "clip_features",
    "presence",
    "embed_sam",
    "stage1_1",
    "automatic_masks",
    "decode_masks",
    "stage1_2",
    "resize_label",
    "stage1_result",
    "label_image",
    "STEP_KEYS",
    "timed",
]


class PreparedImage(NamedTuple):
    """An image in both model frames.

    clip_pixels: [3, G·S, G·S] float32, CLIP-normalised; sam_image: [sam_size, sam_size, 3] uint8
    RGB; height, width: the original size.
    """

    clip_pixels: Tensor
    sam_image: np.ndarray
    height: int
    width: int


class AmgMask(NamedTuple):
    """One automatic mask: COCO compressed RLE counts of a [sam_size, sam_size] mask, SAM's predicted
    IoU and stability score, and its area in SAM-frame pixels."""

    counts: bytes
    predicted_iou: float
    stability_score: float
    area: int


class Stage11Result(NamedTuple):
    """label: [sam_size, sam_size] label map (components.labelmaps: uint8 with 255 = unlabelled up to
    255 prompts, else int32 with 65535); for the K' present classes:
    points_xy [K', k, 2] float32 SAM-frame prompts, scores [K'] SAM predicted IoU, area_frac [K']."""

    label: Tensor
    points_xy: Tensor
    scores: Tensor
    area_frac: Tensor


class Stage12Result(NamedTuple):
    """label: [sam_size, sam_size] uint8; per automatic mask: labels [M] int64 (-1 = dropped by the
    size filter or no present class) and scores [M] float32 cosine (NaN where dropped)."""

    label: Tensor
    mask_labels: Tensor
    mask_scores: Tensor


class Stage1Result(NamedTuple):
    """Everything Stage 1 produces for one image.

    stage1_1, stage1_2: [label_size, label_size] label maps, uint8 with 255 = unlabelled (uint16
    with 65535 for a vocabulary of more than 255 prompts).
    presence: the present classes and their crop wins; stage1_1_detail / stage1_2_detail: the
    per-class and per-mask records; amg_masks: the automatic masks (before the size filter).
    """

    stage1_1: np.ndarray
    stage1_2: np.ndarray
    presence: Presence
    stage1_1_detail: Stage11Result
    stage1_2_detail: Stage12Result
    amg_masks: list[AmgMask]


def prepare_image(
    image_rgb: np.ndarray, *, clip_side: int, mean: tuple[float, ...], std: tuple[float, ...], sam_size: int
) -> PreparedImage:
    """Resize one [H, W, 3] uint8 RGB image into the CLIP frame (bicubic, ``clip_side`` = G·S) and
    the SAM frame (bicubic, ``sam_size``)."""
    if image_rgb.ndim != 3 or image_rgb.shape[2] != 3 or image_rgb.dtype != np.uint8:
        raise ValueError(f"image must be [H, W, 3] uint8 RGB, got {image_rgb.shape} {image_rgb.dtype}")
    clip_pixels = clip_preprocess(np.require(image_rgb, requirements="W"), clip_side, mean, std)[0]
    sam_image = np.asarray(Image.fromarray(image_rgb).resize((sam_size, sam_size), Image.Resampling.BICUBIC))
    return PreparedImage(clip_pixels, sam_image, int(image_rgb.shape[0]), int(image_rgb.shape[1]))


@torch.inference_mode()
def clip_features(model: open_clip.CLIP, clip_pixels: Tensor, *, grid: int, mode: str, crop_batch: int) -> DenseFeatures:
    """One CLIP vision pass over the G² crops (``crop_batch`` per forward): crop CLS embeddings
    [G², D] and the stitched dense map [h, w, D] (appendix §1.1.2)."""
    device = model.visual.conv1.weight.device
    return tiled_features(model, clip_pixels.to(device), grid, mode, batch_size=crop_batch)


def presence(
    crop_embeddings: Tensor,
    prototypes: Tensor,
    *,
    min_crops: int,
    image_classes: list[int] | None = None,
    prompt_classes: Tensor | None = None,
) -> Presence:
    """Classes taken as present: CLIP crop votes with threshold T (``image_classes`` None), or the
    image-level labels (semi-supervised variant, no threshold). Appendix §1.1.3. With
    ``prompt_classes`` ([K] class of each prompt), ``image_classes`` are classes and each names
    its prompts by :func:`presence_from_class_labels`."""
    prototypes = prototypes.to(crop_embeddings.device)
    if image_classes is not None and prompt_classes is not None:
        return presence_from_class_labels(crop_embeddings, prototypes, image_classes, prompt_classes)
    votes = crop_classes(crop_embeddings, prototypes)
    if image_classes is None:
        return detect_present(votes, prototypes.shape[0], min_crops)
    return presence_from_image_labels(votes, image_classes, prototypes.shape[0])


def embed_sam(sam: MaskModel, sam_image: np.ndarray) -> MaskImage:
    """The mask model's one image-encoder pass for this image (both stages reuse it)."""
    return embed_image(sam, sam_image)


def stage1_1(
    sam_image: MaskImage, patches: Tensor, prototypes: Tensor, found: Presence, *, top_k_points: int
) -> Stage11Result:
    """Stage 1.1 (paper §3.2.1, appendix §1.1.4): per present class, the centres of the
    ``top_k_points`` patches most similar to its prototype prompt SAM (all classes in one batched
    decoder call); of the 3 multimask outputs the one with the highest predicted IoU is kept;
    overlaps go to the higher predicted IoU. Prompts and the label map are in the SAM frame (the
    image resized to the ``sam_size`` square of `sam_image`), not in original-image coordinates."""
    size = sam_image.size
    if size[0] != size[1]:
        raise ValueError(f"the SAM frame must be square, got {size}")
    h, w, _ = patches.shape
    rows_cols = prompt_patches(patches, prototypes.to(patches.device)[found.classes.to(patches.device)], top_k_points)
    points = patch_centres_xy(rows_cols, (h, w), size[0]).cpu()
    decoded = sam_image.masks_from_point_sets(points)  # all classes in one prompt-decoder call
    fill = unlabelled_for(prototypes.shape[0])
    label = paint_by_score(decoded.masks, found.classes.cpu(), decoded.scores, size, fill=fill)
    area_frac = decoded.masks.flatten(1).float().mean(dim=1)
    return Stage11Result(label, points, decoded.scores, area_frac)


def automatic_masks(sam_image: MaskImage, amg: AmgSettings) -> tuple[list[AmgMask], Tensor]:
    """SAM's automatic masks from the image's one embedding: their records, with COCO RLE counts
    (kept for relabelling), and the masks themselves, [M, s, s] bool (Stage 1.2 reads them without
    decoding the RLEs again)."""
    records = sam_image.automatic_masks(**amg.generator_args(), output_mode="binary_mask")
    size = sam_image.size
    masks = np.stack([r["segmentation"] for r in records]) if records else np.zeros((0, *size), dtype=bool)
    amg_masks = [
        AmgMask(counts=rle["counts"], predicted_iou=float(r["predicted_iou"]),
                stability_score=float(r["stability_score"]), area=int(r["area"]))
        for r, rle in zip(records, masks_to_coco_rle(masks), strict=True)
    ]
    return amg_masks, torch.from_numpy(masks)


def decode_masks(masks: list[AmgMask], size: int) -> Tensor:
    """COCO RLE masks of a ``size`` × ``size`` frame -> [M, size, size] bool."""
    if not masks:
        return torch.zeros(0, size, size, dtype=torch.bool)
    decoded = mask_utils.decode([{"size": [size, size], "counts": m.counts} for m in masks])
    return torch.from_numpy(np.ascontiguousarray(decoded.transpose(2, 0, 1))).bool()


def stage1_2(
    masks: Tensor,
    patches: Tensor,
    prototypes: Tensor,
    found: Presence,
    *,
    min_area_frac: float,
    max_area_frac: float,
) -> Stage12Result:
    """Stage 1.2 (paper §3.2.2, appendix §1.2): automatic masks within the size filter take the
    present class whose prototype is most similar to their coverage-weighted mean dense CLIP
    feature; painted larger first, smaller on top.

    masks: [M, s, s] bool in the SAM frame; patches: [h, w, D] dense CLIP map.
    """
    count, height, width = masks.shape
    area_frac = masks.flatten(1).float().mean(dim=1)
    keep = (area_frac >= min_area_frac) & (area_frac <= max_area_frac)
    mask_labels = torch.full((count,), -1, dtype=torch.int64)
    mask_scores = torch.full((count,), float("nan"), dtype=torch.float32)
    fill = unlabelled_for(prototypes.shape[0])
    if found.classes.numel() == 0 or not bool(keep.any()):
        return Stage12Result(torch.full((height, width), fill, dtype=label_tensor_dtype(fill)), mask_labels, mask_scores)
    kept = masks[keep]
    device = patches.device
    coverage = mask_coverage(kept.to(device), tuple(patches.shape[:2]))
    labelled = label_masks(mask_mean_features(coverage, patches), prototypes.to(device), found.classes.to(device))
    mask_labels[keep] = labelled.labels.cpu()
    mask_scores[keep] = labelled.scores.float().cpu()
    label = paint_masks(kept, labelled.labels.cpu(), (height, width), fill=fill, order="area_desc")
    return Stage12Result(label, mask_labels, mask_scores)


def resize_label(label: Tensor, size: int) -> np.ndarray:
    """[H, W] label map (uint8, or int32 holding 16-bit values) -> [size, size] uint8 / uint16 array
    by pixel-centre nearest sampling."""
    if tuple(label.shape) != (size, size):
        label = F.interpolate(label[None, None].float(), size=(size, size), mode="nearest-exact")[0, 0].to(label.dtype)
    return as_label_array(label)


def stage1_result(
    found: Presence, s11: Stage11Result, s12: Stage12Result, amg_masks: list[AmgMask], *, label_size: int
) -> Stage1Result:
    """Assemble one image's :class:`Stage1Result`, label maps resized to ``label_size``."""
    return Stage1Result(
        stage1_1=resize_label(s11.label, label_size),
        stage1_2=resize_label(s12.label, label_size),
        presence=found,
        stage1_1_detail=s11,
        stage1_2_detail=s12,
        amg_masks=amg_masks,
    )


STEP_KEYS: tuple[str, ...] = ("io", "clip", "labelling", "sam_encoder", "prompts", "amg")
"""Where :func:`label_image` adds each step's seconds (the label summary's "seconds/image" rows)."""


@contextlib.contextmanager
def timed(seconds: dict[str, float] | None, key: str) -> Iterator[None]:
    """Add the wall time of the block to ``seconds[key]`` (nothing when ``seconds`` is None)."""
    if seconds is None:
        yield
        return
    start = time.perf_counter()
    try:
        yield
    finally:
        seconds[key] = seconds.get(key, 0.0) + time.perf_counter() - start


def _unlabelled_map(size: int, num_prompts: int, device: torch.device) -> Tensor:
    fill = unlabelled_for(num_prompts)
    return torch.full((size, size), fill, dtype=label_tensor_dtype(fill), device=device)


def _skipped_stage1_1(size: int, num_prompts: int, device: torch.device) -> Stage11Result:
    return Stage11Result(_unlabelled_map(size, num_prompts, device), torch.zeros(0, 0, 2), torch.zeros(0), torch.zeros(0))


def _skipped_stage1_2(size: int, num_prompts: int, device: torch.device) -> Stage12Result:
    return Stage12Result(_unlabelled_map(size, num_prompts, device), torch.zeros(0, dtype=torch.int64), torch.zeros(0))


def label_image(
    image_rgb: np.ndarray,
    *,
    clip_model: open_clip.CLIP,
    clip_mean: tuple[float, ...],
    clip_std: tuple[float, ...],
    clip_image_size: int,
    sam: MaskModel,
    prototypes: Tensor,
    settings: Stage1Settings,
    image_classes: list[int] | None = None,
    prompt_classes: Tensor | None = None,
    kept_masks: list[AmgMask] | None = None,
    variants: tuple[str, ...] = ("stage1_1", "stage1_2"),
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32",
    seconds: dict[str, float] | None = None,
) -> Stage1Result:
    """FMbSeg Stage 1 on one image: both pseudo label maps and what produced them. The one place
    the per-image sequence is written: the shard pipeline (components/labelling/shard.py: the label
    stage and bench/label.py) and Stage 1's evaluation (Stage1Segmenter) call it.

    image_rgb: [H, W, 3] uint8 RGB; prototypes: [K, D] text prototypes of the vocabulary;
    clip_image_size: S (the CLIP spec's input side); image_classes: image-level labels (vocabulary
    indices) for the semi-supervised variant, None to detect with CLIP; prompt_classes: [K] the
    class of each prompt, when image_classes name classes that own several prompts (PV-21's
    background: :func:`presence_from_class_labels`); kept_masks: automatic
    masks of an earlier run with the same SAM settings (skips the mask generator). variants: the
    maps to make; a map left out is all unlabelled with empty details, and its work is skipped (Stage 1.1
    alone runs no automatic mask generator, Stage 1.2 alone no point prompts). dtype: autocast of
    the model forwards (on a GPU). seconds: when given, each step's wall time is added under
    :data:`STEP_KEYS` ("io": resizing and assembling; "labelling": presence and mask labelling).
    """
    unknown = set(variants) - {"stage1_1", "stage1_2"}
    if unknown or not variants:
        raise ValueError(f"variants must be some of stage1_1, stage1_2; got {variants}")
    device = next(clip_model.parameters()).device
    with timed(seconds, "io"):
        prepared = prepare_image(image_rgb, clip_side=settings.grid * clip_image_size, mean=clip_mean, std=clip_std,
                                 sam_size=settings.sam_size)
    with timed(seconds, "clip"), autocast_context(device, dtype):
        features = clip_features(clip_model, prepared.clip_pixels, grid=settings.grid, mode=settings.dense_mode,
                                 crop_batch=settings.crop_batch)
    with timed(seconds, "labelling"):
        found = presence(features.cls, prototypes, min_crops=settings.min_crops, image_classes=image_classes,
                         prompt_classes=prompt_classes)
    with autocast_context(device, dtype):
        with timed(seconds, "sam_encoder"):
            embedded = embed_sam(sam, prepared.sam_image)
        s11 = _skipped_stage1_1(settings.sam_size, prototypes.shape[0], device)
        if "stage1_1" in variants:
            with timed(seconds, "prompts"):
                s11 = stage1_1(embedded, features.patches, prototypes, found, top_k_points=settings.top_k_points)
        s12, amg = _skipped_stage1_2(settings.sam_size, prototypes.shape[0], device), kept_masks or []
        if "stage1_2" in variants:
            if kept_masks is None:
                with timed(seconds, "amg"):
                    amg, masks = automatic_masks(embedded, settings.amg)
            with timed(seconds, "labelling"):
                if kept_masks is not None:
                    masks = decode_masks(kept_masks, settings.sam_size)
                s12 = stage1_2(masks, features.patches, prototypes, found,
                               **settings.amg.size_filter())
    with timed(seconds, "io"):
        return stage1_result(found, s11, s12, amg, label_size=settings.label_size)
