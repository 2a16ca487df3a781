"""Stage 1 math on CLIP features: object presence, SAM point prompts, mask labelling.

Paper §3.2 and appendix §1.1.3-1.1.4, §1.2; decisions in docs/design.md §4. Pure tensor functions, no
model calls: every function here has a loop reference in tests/components/labelling/test_detect.py.

Frames: the dense CLIP map covers the whole image resized to G·S × G·S, stitched to an [h, w]
patch grid; SAM sees the whole image resized to a ``sam_size`` square. Both are resizes of the same
image, so patch (r, c) and SAM pixel (x, y) meet in normalised image coordinates.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "Presence",
    "MaskLabels",
    "crop_classes",
    "detect_present",
    "presence_from_image_labels",
    "presence_from_class_labels",
    "prompt_patches",
    "patch_centres_xy",
    "mask_coverage",
    "mask_mean_features",
    "label_masks",
    "class_index_map",
    "image_level_labels",
]


class Presence(NamedTuple):
    """Classes an image is taken to contain.

    classes: [K'] int64 vocabulary indices, ascending.
    crops_won: [K'] int64, how many crops each of them won (0 is possible for image-level labels).
    """

    classes: Tensor
    crops_won: Tensor


class MaskLabels(NamedTuple):
    """labels: [M] int64 vocabulary indices; scores: [M] float32 cosine of the winning class."""

    labels: Tensor
    scores: Tensor


def crop_classes(crop_embeddings: Tensor, prototypes: Tensor) -> Tensor:
    """Class of each crop: argmax_k cos(cls_c, t_k) (paper §3.2.1, "object presence detection").

    crop_embeddings: [C, D] CLS embeddings of the C crops; prototypes: [K, D] text prototypes.
    Returns [C] int64 vocabulary indices.
    """
    if crop_embeddings.dim() != 2 or prototypes.dim() != 2 or crop_embeddings.shape[1] != prototypes.shape[1]:
        raise ValueError(
            f"need crop embeddings [C, D] and prototypes [K, D], got {tuple(crop_embeddings.shape)} "
            f"and {tuple(prototypes.shape)}"
        )
    sims = F.normalize(crop_embeddings.float(), dim=-1) @ F.normalize(prototypes.float(), dim=-1).T
    return sims.argmax(dim=1)


def detect_present(crop_class: Tensor, num_classes: int, min_crops: int) -> Presence:
    """A class is present when it wins more than T = ``min_crops`` crops (paper §3.2.1 and
    appendix §1.1.3: "more than a predefined number of crops (set to 1)"); T = 0: any crop won.

    crop_class: [C] int64 class of each crop (:func:`crop_classes`). Returns :class:`Presence`.
    """
    if min_crops < 0:
        raise ValueError(f"min_crops (T) must be >= 0, got {min_crops}")
    counts = torch.bincount(crop_class.long(), minlength=num_classes)
    classes = torch.nonzero(counts > min_crops).flatten()
    return Presence(classes, counts[classes])


def presence_from_image_labels(crop_class: Tensor, image_classes: list[int] | Tensor, num_classes: int) -> Presence:
    """Semi-supervised presence: the image-level labels, no threshold (appendix §1.1.3).

    crop_class: [C] int64 (kept to report crops won); image_classes: vocabulary indices.
    """
    classes = torch.unique(torch.as_tensor(image_classes, dtype=torch.int64))
    if classes.numel() and (int(classes.min()) < 0 or int(classes.max()) >= num_classes):
        raise ValueError(f"image-level labels must be in [0, {num_classes}), got {classes.tolist()}")
    counts = torch.bincount(crop_class.long(), minlength=num_classes)
    return Presence(classes, counts[classes])


def presence_from_class_labels(
    crop_embeddings: Tensor, prototypes: Tensor, image_classes: list[int] | Tensor, prompt_classes: Tensor
) -> Presence:
    """Semi-supervised presence when a class has several prompts (PV-21's background: "background"
    and COCO-Stuff's stuff classes): the image-level labels name classes, Stage 1 needs prompts.

    Of a labelled class's prompts, those that win a crop (argmax over every prompt) are present; if
    none does, the one prompt most similar to any crop. A class with one prompt: that prompt, as in
    :func:`presence_from_image_labels`.

    crop_embeddings: [C, D]; prototypes: [K', D] prompt prototypes; image_classes: dataset class
    ids; prompt_classes: [K'] int64 dataset class of each prompt. Returns :class:`Presence` over
    prompt indices.
    """
    sims = F.normalize(crop_embeddings.float(), dim=-1) @ F.normalize(prototypes.float(), dim=-1).T
    votes = sims.argmax(dim=1)
    counts = torch.bincount(votes, minlength=prototypes.shape[0])
    prompt_classes = prompt_classes.to(sims.device)
    labelled = torch.isin(prompt_classes, torch.as_tensor(image_classes, dtype=torch.int64, device=sims.device))
    won = labelled & (counts > 0)
    # per labelled class without a winning prompt: its prompt of highest max-over-crops similarity
    best = sims.max(dim=0).values.masked_fill(~labelled, float("-inf"))
    num_classes = int(prompt_classes.max()) + 1
    class_best = torch.full((num_classes,), float("-inf"), device=sims.device).scatter_reduce(
        0, prompt_classes, best, reduce="amax")
    has_winner = torch.zeros(num_classes, dtype=torch.bool, device=sims.device).index_put_(
        (prompt_classes[won],), torch.tensor(True, device=sims.device))
    fallback = labelled & ~has_winner[prompt_classes] & (best == class_best[prompt_classes])
    chosen = torch.nonzero(won | fallback).flatten()
    return Presence(chosen, counts[chosen])


def prompt_patches(patches: Tensor, prototypes: Tensor, k: int) -> Tensor:
    """The k patches most similar to each class prototype (paper §3.2.1, "pseudo mask generation").

    patches: [h, w, D] dense CLIP map; prototypes: [K', D] prototypes of the present classes.
    Returns [K', k, 2] int64 (row, col) on the patch grid, most similar first.
    """
    h, w, d = patches.shape
    if prototypes.dim() != 2 or prototypes.shape[1] != d:
        raise ValueError(f"prototypes must be [K', {d}], got {tuple(prototypes.shape)}")
    if not 1 <= k <= h * w:
        raise ValueError(f"top_k_points must be in [1, {h * w}] for a {h}x{w} patch grid, got {k}")
    sims = F.normalize(prototypes.float(), dim=-1) @ F.normalize(patches.reshape(h * w, d).float(), dim=-1).T
    flat = sims.topk(k, dim=1).indices
    return torch.stack((flat // w, flat % w), dim=-1)


def patch_centres_xy(rows_cols: Tensor, grid: tuple[int, int], size: int) -> Tensor:
    """Centres of patches in a ``size`` × ``size`` frame as SAM point prompts (appendix §1.1.4).

    rows_cols: [..., 2] int (row, col) on an (h, w) = ``grid`` patch grid. Returns [..., 2] float32
    (x, y) = ((col + 0.5) · size / w, (row + 0.5) · size / h).
    """
    h, w = grid
    rc = rows_cols.float()
    return torch.stack(((rc[..., 1] + 0.5) * (size / w), (rc[..., 0] + 0.5) * (size / h)), dim=-1)


def mask_coverage(masks: Tensor, grid: tuple[int, int]) -> Tensor:
    """Share of each patch cell a mask covers (area interpolation, ``adaptive_avg_pool2d`` bins).

    masks: [M, H, W] bool; grid: (h, w) of the dense CLIP map. Returns [M, h, w] float32 in [0, 1].
    Cell (i, j) averages rows floor(i·H/h) .. ceil((i+1)·H/h) - 1 and the same for columns.
    """
    if masks.dim() != 3:
        raise ValueError(f"masks must be [M, H, W], got {tuple(masks.shape)}")
    if masks.shape[0] == 0:
        return torch.zeros(0, *grid, dtype=torch.float32, device=masks.device)
    return F.adaptive_avg_pool2d(masks.float().unsqueeze(1), grid).squeeze(1)


def mask_mean_features(coverage: Tensor, patches: Tensor) -> Tensor:
    """Mean CLIP feature under each mask, weighted by patch coverage (paper §3.2.2, "mask labelling").

    coverage: [M, h, w] float (:func:`mask_coverage`); patches: [h, w, D].
    Returns [M, D] float32: Σ_p cov_mp f_p / Σ_p cov_mp (zeros for a mask with no coverage).
    One matmul [M, h·w] @ [h·w, D].
    """
    m = coverage.shape[0]
    h, w, d = patches.shape
    if tuple(coverage.shape[1:]) != (h, w):
        raise ValueError(f"coverage must be [M, {h}, {w}] to match the patch grid, got {tuple(coverage.shape)}")
    weights = coverage.reshape(m, h * w).float()
    total = weights.sum(dim=1, keepdim=True)
    return (weights @ patches.reshape(h * w, d).float()) / total.clamp_min(torch.finfo(torch.float32).tiny)


def label_masks(mean_features: Tensor, prototypes: Tensor, classes: Tensor) -> MaskLabels:
    """Each mask takes the present class of highest cos(mean feature, t_k) (paper §3.2.2).

    mean_features: [M, D]; prototypes: [K, D] all prototypes; classes: [K'] int64 present classes
    (K' ≥ 1). Returns :class:`MaskLabels` with vocabulary indices.
    """
    if classes.numel() == 0:
        raise ValueError("label_masks needs at least one present class")
    protos = F.normalize(prototypes[classes].float(), dim=-1)
    sims = F.normalize(mean_features.float(), dim=-1) @ protos.T
    scores, best = sims.max(dim=1)
    return MaskLabels(classes[best], scores)


def class_index_map(source_classes: list[str], vocabulary: list[str]) -> Tensor:
    """Vocabulary index of each class of a ground-truth class list. [K_src] int64.

    Classes match by their first name (the text before the first comma), case-insensitively; a
    ground-truth class missing from the vocabulary is an error that names it.
    """

    def first(name: str) -> str:
        return name.split(",")[0].strip().lower()

    by_name: dict[str, int] = {}
    for k, name in enumerate(vocabulary):
        by_name.setdefault(first(name), k)
    missing = [name for name in source_classes if first(name) not in by_name]
    if missing:
        raise ValueError(f"ground-truth classes not in the vocabulary: {missing}")
    return torch.tensor([by_name[first(name)] for name in source_classes], dtype=torch.int64)


def image_level_labels(label_map: Tensor, index_map: Tensor, ignore: int = 255) -> list[int]:
    """Image-level labels of a ground-truth map: the vocabulary indices of the classes it shows.

    label_map: [H, W] uint8 ground-truth class indices, ``ignore`` = unlabelled; index_map: [K_src]
    int64 from :func:`class_index_map`. Returns sorted vocabulary indices.
    """
    values = torch.unique(label_map.long())
    values = values[values != ignore]
    if values.numel() and int(values.max()) >= index_map.numel():
        raise ValueError(f"ground-truth label {int(values.max())} is beyond its {index_map.numel()} classes")
    return sorted(set(index_map[values].tolist()))
