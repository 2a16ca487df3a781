"""Stage 1 with a concept teacher (SAM 3): per-concept outputs -> one label map per image.

The fusion rule (docs/design.md, "SAM 3 teacher"), for prompt i of class c(i):

- presence  p_i = sigmoid(presence logit); prompt i is *present* when p_i >= ``presence``. In the
  semi-supervised form the image's ground-truth classes replace it: p_i = 1 when c(i) is among them,
  else 0. A class's reported presence is the model's, the max over its prompts;
- semantic  S_i(x) = sigmoid(semantic logit), bilinear to the label size;
- instances q of prompt i with score s_q = sigmoid(query logit) * p_i >= ``instance``; mask
  M_q = sigmoid(mask logit) > ``mask`` (bilinear to the label size first, as transformers'
  post-processing does); I_i(x) = max over kept q with M_q(x) of s_q, else 0;
- the score of a present prompt F_i(x) = max(S_i(x), I_i(x)); 0 for an absent one;
- label(x) = c(i*) for the prompt i* with the highest F_i(x), when that is >= ``pixel``, else
  unlabelled (255); of equal scores, the lowest class wins.

S_i makes stuff (sky, grass, wall) come out as regions; I_i paints each kept instance with its
score, so a confident instance wins over a weaker semantic response of another class. Every term
depends on one prompt only, so the rule runs chunk by chunk with a running best (score, class) per
pixel: memory is one chunk's maps plus two [H, W] buffers, whatever the vocabulary's size.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from components.io import unlabelled_for
from components.models.sam3 import ConceptOutputs, Sam3Teacher

__all__ = [
    "ConceptSettings",
    "ConceptResult",
    "ConceptFusion",
    "prompt_scores",
    "fuse_concepts",
    "prompt_order",
    "label_with_teacher",
    "ConceptTeacher",
]

UNLABELLED = 255


@dataclass(frozen=True)
class ConceptSettings:
    """Thresholds and cost bounds of the concept teacher (params.yaml ``label.concepts``).

    prompt: "vocabulary" prompts every class (the presence head decides what is there);
    "detected" prompts only the classes CLIP detects in the image (Stage 1's presence).
    chunk_size: prompts decoded per detector pass (memory grows linearly with it).
    """

    presence: float = 0.5
    instance: float = 0.5
    mask: float = 0.5
    pixel: float = 0.5
    chunk_size: int = 16
    prompt: Literal["vocabulary", "detected"] = "vocabulary"

    def __post_init__(self) -> None:
        for name in ("presence", "instance", "mask", "pixel"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"concepts.{name} must be in [0, 1], got {value}")
        if self.chunk_size < 1:
            raise ValueError(f"concepts.chunk_size must be >= 1, got {self.chunk_size}")


class ConceptResult(NamedTuple):
    """label: [H, W] uint8 (uint16 past 255 classes, as the store's maps), unlabelled (255; 65535
    past 255 classes: :func:`components.io.unlabelled_for`) where nothing passes; presence:
    [K] float, p_c per class (NaN for a class that was not prompted); present: [K] bool."""

    label: np.ndarray
    presence: np.ndarray
    present: np.ndarray


def prompt_scores(
    out: ConceptOutputs, presence: Tensor, size: tuple[int, int], settings: ConceptSettings, group: int = 64
) -> Tensor:
    """F_i(x) of each prompt of a chunk: [C, H, W] float in [0, 1].

    out: the chunk's outputs; presence: [C] float, p_i of each prompt (1 where ground truth says
    the class is there, 0 where it says it is not: the semi-supervised form); size: (H, W) of the
    label map; group: kept instances upsampled at a time (bounds memory to group x H x W).
    """
    semantic = F.interpolate(out.semantic[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
    scores = semantic.sigmoid()
    instance_scores = out.instance_logits.sigmoid() * presence[:, None]  # [C, Q]
    prompt, query = torch.nonzero(instance_scores >= settings.instance, as_tuple=True)
    for start in range(0, int(prompt.numel()), group):
        p, q = prompt[start : start + group], query[start : start + group]
        logits = F.interpolate(out.instance_masks[p, q][None], size=size, mode="bilinear", align_corners=False)[0]
        painted = (logits.sigmoid() > settings.mask) * instance_scores[p, q][:, None, None]
        scores.scatter_reduce_(0, p[:, None, None].expand_as(painted), painted, reduce="amax")
    present = presence >= settings.presence
    return scores * present[:, None, None]


class ConceptFusion:
    """The running per-pixel best of :func:`prompt_scores` over chunks of prompts, fed in
    ascending class order (so a strictly higher score is needed to take a pixel: ties keep the
    lower class)."""

    def __init__(self, num_classes: int, size: tuple[int, int], device: torch.device) -> None:
        self.best = torch.zeros(size, device=device)
        self.label = torch.full(size, unlabelled_for(num_classes), dtype=torch.int64, device=device)
        self.presence = torch.full((num_classes,), -1.0, device=device)

    def add(self, out: ConceptOutputs, prompt_classes: Tensor, presence: Tensor, size: tuple[int, int],
            settings: ConceptSettings) -> None:
        """Fold in one chunk: out for C prompts, prompt_classes [C] long (non-decreasing, and not
        below any earlier chunk's), presence [C] float (see :func:`prompt_scores`)."""
        cls = prompt_classes.to(self.best.device)
        self.presence.scatter_reduce_(0, cls, out.presence.sigmoid().to(self.best.device), reduce="amax")
        top, which = prompt_scores(out, presence, size, settings).max(0)
        better = top > self.best
        self.best = torch.where(better, top, self.best)
        self.label = torch.where(better, cls[which], self.label)

    def result(self, pixel: float, present: Tensor) -> ConceptResult:
        """present: [K] bool over classes."""
        fill = unlabelled_for(self.presence.numel())
        label = torch.where(self.best >= pixel, self.label, torch.full_like(self.label, fill))
        dtype = np.uint8 if fill == UNLABELLED else np.uint16
        presence = torch.where(self.presence < 0, torch.full_like(self.presence, float("nan")), self.presence)
        return ConceptResult(label.cpu().numpy().astype(dtype), presence.cpu().numpy(), present.cpu().numpy())


def fuse_concepts(
    chunks: Iterable[tuple[Tensor, ConceptOutputs]],
    prompt_classes: Tensor,
    num_classes: int,
    size: tuple[int, int],
    settings: ConceptSettings,
    image_classes: Sequence[int] | None = None,
) -> ConceptResult:
    """One label map from per-chunk outputs (the module docstring's rule).

    chunks: (prompt indices [C], outputs) pairs, as :meth:`Sam3Teacher.iter_chunks` yields them
    over prompts in ascending class order (:func:`prompt_order`); prompt_classes: [P] long, the
    class of each prompt of the vocabulary; size: (H, W) of the label map; image_classes: the
    image's ground-truth classes (the semi-supervised form) or None.
    """
    forced = None
    if image_classes is not None:
        forced = torch.zeros(num_classes, dtype=torch.bool)
        forced[list(image_classes)] = True
    fusion: ConceptFusion | None = None
    last = -1
    for index, out in chunks:
        device = out.semantic.device
        if fusion is None:
            fusion = ConceptFusion(num_classes, size, device)
        classes = prompt_classes[index.to(prompt_classes.device)].to(device)
        if classes.numel() and (int(classes[0]) < last or bool((classes.diff() < 0).any())):
            raise ValueError("prompts must come in ascending class order (components.labelling.concepts.prompt_order)")
        last = int(classes[-1])
        if forced is not None:
            presence = forced.to(device)[classes].float()
        else:
            presence = out.presence.sigmoid()
        fusion.add(out, classes, presence, size, settings)
    if fusion is None:
        raise ValueError("fuse_concepts needs at least one chunk of prompts")
    if forced is not None:
        present_classes = forced
    else:
        present_classes = torch.nan_to_num(fusion.presence, nan=0.0) >= settings.presence
    return fusion.result(settings.pixel, present_classes)


def prompt_order(prompt_classes: Tensor, prompted: Tensor | None = None) -> Tensor:
    """Indices of the prompts to decode, in ascending class order (stable): all of them, or those
    whose class is in ``prompted`` ([K] bool, e.g. the classes CLIP detected)."""
    order = torch.argsort(prompt_classes, stable=True)
    if prompted is not None:
        order = order[prompted.to(prompt_classes.device)[prompt_classes[order]]]
    return order


def label_with_teacher(
    teacher: Sam3Teacher,
    image: np.ndarray,
    prompts: Sequence[str],
    prompt_classes: Tensor,
    num_classes: int,
    size: tuple[int, int],
    settings: ConceptSettings,
    *,
    prompted: Tensor | None = None,
    image_classes: Sequence[int] | None = None,
) -> ConceptResult:
    """Stage 1 with the concept teacher on one image: one vision pass, the vocabulary's cached
    text features, the prompts decoded ``settings.chunk_size`` at a time and fused on the fly.

    image: [H, W, 3] uint8 RGB; prompts / prompt_classes: the vocabulary's P prompts and their
    classes ([P] long, into K = num_classes); size: (H, W) of the label map; prompted: [K] bool,
    the classes to prompt (``settings.prompt == "detected"``: those CLIP detected) or None for
    all; image_classes: ground-truth classes (the semi-supervised form). An image on which no
    class is prompted comes back unlabelled.
    """
    order = prompt_order(prompt_classes, prompted)
    if order.numel() == 0:
        fill = unlabelled_for(num_classes)
        label = np.full(size, fill, dtype=np.uint8 if fill == UNLABELLED else np.uint16)
        return ConceptResult(label, np.full(num_classes, np.nan), np.zeros(num_classes, dtype=bool))
    vocabulary = teacher.encode_vocabulary(prompts)
    vision = teacher.encode_image(image)
    chunks = teacher.iter_chunks(vision, vocabulary, order, settings.chunk_size)
    return fuse_concepts(chunks, prompt_classes, num_classes, size, settings, image_classes=image_classes)


class ConceptTeacher(NamedTuple):
    """A run's concept teacher over one vocabulary: the built model (its text features cached in
    it: one text pass per vocabulary), its settings, and the vocabulary as prompts: prompts [P]
    (each line's comma-separated names) and prompt_classes [P] long, the line each belongs to."""

    teacher: Sam3Teacher
    settings: ConceptSettings
    prompts: list[str]
    prompt_classes: Tensor
    num_classes: int

    @classmethod
    def for_vocabulary(cls, teacher: Sam3Teacher, settings: ConceptSettings, vocabulary: Sequence[str]) -> ConceptTeacher:
        """One prompt per name of each vocabulary line ("person, man" -> two prompts of that class)."""
        prompts, owner = [], []
        for k, line in enumerate(vocabulary):
            names = [n.strip() for n in line.split(",") if n.strip()]
            prompts.extend(names)
            owner.extend([k] * len(names))
        return cls(teacher, settings, prompts, torch.tensor(owner, dtype=torch.long), len(vocabulary))

    def label(self, image: np.ndarray, size: tuple[int, int], *, detected: Tensor | None = None,
              image_classes: Sequence[int] | None = None) -> ConceptResult:
        """:func:`label_with_teacher` on one image. detected: the classes Stage 1 took as present
        (prompted under ``prompt: detected``; CLIP's, or the ground truth's); image_classes: the
        ground truth's classes, which replace presence (the semi-supervised form)."""
        prompted = None
        if self.settings.prompt == "detected":
            if detected is None:
                raise ValueError("prompt 'detected' needs the classes Stage 1 detected")
            prompted = torch.zeros(self.num_classes, dtype=torch.bool)
            prompted[detected.cpu().long()] = True
        return label_with_teacher(self.teacher, image, self.prompts, self.prompt_classes, self.num_classes, size,
                                  self.settings, prompted=prompted, image_classes=image_classes)
