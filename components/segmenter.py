"""The trained model as a product: FMbSeg Stage 2 inference for any vocabulary (paper §3.4).

:class:`Segmenter` is the one Stage 2 inference path: ``evaluate`` scores it, ``fmbseg predict``
and the MLflow model run it. Built from the self-describing checkpoint alone
(:meth:`Segmenter.from_checkpoint`: DINOv2, CLIP, SAM and the window protocol are recorded in it),
it segments one image or a batch for any list of class names:

- base: DINOv2 patch features of sliding windows (``components.evaluation.inference``, windows
  of all images of a batch sharing forwards) -> aligner -> cosine to the text prototypes ->
  bilinear to the image size -> argmax;
- refined: SAM's automatic masks of the image (one encoder pass), each painted over the base map
  with the majority base class inside it (``components.evaluation.refine``).

Text prototypes are computed once per vocabulary (CLIP spec, templates, prompts) and cached.
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from segment_anything.modeling import Sam
from torch import Tensor, nn

from components.aligner.checkpoint import InferenceSpec, LoadedAligner, load_aligner, refuse_other_student
from components.evaluation.inference import (
    Prediction,
    PromptSet,
    labels_from_scores,
    predict_logits_batch,
    predict_scores_batch,
    resize_short_side,
)
from components.evaluation.refine import refine_with_masks, size_filter
from components.io import label_dtype, unlabelled_for
from components.models.clip_dense import prototypes as text_prototypes
from components.models.dino import patch_features
from components.models.masks import embed_image
from components.models.preprocess import resize_normalize
from components.models.registry import (
    ClipBundle,
    autocast_context,
    build_clip,
    build_dino,
    build_sam,
    get_spec,
    resolve_device,
)
from components.models.specs import ModelSpec

__all__ = [
    "Vocabulary",
    "SegmentResult",
    "Segmenter",
    "VocabularySegmenter",
    "no_class_index",
]

ImageInput = np.ndarray | Image.Image
"""[H, W, 3] uint8 RGB array, or a PIL image (EXIF orientation applied, converted to RGB)."""


class SegmentResult(NamedTuple):
    """One image segmented with a vocabulary of K classes.

    label_map: [H, W] at the image's original size, class index into the vocabulary; uint8 with
    255 = no class, or uint16 with 65535 = no class when K > 255 (the refined map when refine was
    asked for). scores: [K] float32, per class the mean, over the pixels of the base prediction of
    that class, of their cosine similarity to the class's best-matching prompt prototype (in
    [-1, 1]; 0 for a class without pixels). shares: [K] float32, each class's share of the pixels
    of ``label_map``. present: the class indices with at least one pixel in ``label_map``,
    ascending.
    """

    label_map: np.ndarray
    scores: np.ndarray
    shares: np.ndarray
    present: list[int]


@dataclass(frozen=True)
class Vocabulary:
    """Output classes and the prompts that vote for them, with their text prototypes.

    classes: K class lines (comma-separated synonyms allowed: "person, man"); prompts: K' prompt
    lines (the classes, then e.g. PV-21's extra background prompts); class_map: [K'] int64 prompt
    -> class; prototypes: [K', D] float32 L2-normalised text prototypes on the model's device.
    """

    classes: tuple[str, ...]
    prompts: tuple[str, ...]
    class_map: Tensor
    prototypes: Tensor

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def no_class_index(num_classes: int) -> int:
    """The label of "no class" in a label map of `num_classes` classes: 255 (uint8) up to 255
    classes, else 65535 (uint16)."""
    return unlabelled_for(num_classes)


def _as_rgb(image: ImageInput) -> np.ndarray:
    """[H, W, 3] uint8 RGB from an array (checked) or a PIL image (EXIF applied, converted)."""
    if isinstance(image, Image.Image):
        return np.array(ImageOps.exif_transpose(image).convert("RGB"), dtype=np.uint8)
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        shape = getattr(image, "shape", None)
        raise ValueError(f"image must be [H, W, 3] uint8 RGB or a PIL image, got {type(image).__name__} {shape} "
                         f"{getattr(image, 'dtype', '')}")
    return image


def _as_tensor(image: np.ndarray) -> Tensor:
    """A tensor view of the image (copied only when numpy marks it read-only, as PIL's arrays are)."""
    return torch.from_numpy(np.require(image, requirements="W"))


class Segmenter:
    """FMbSeg Stage 2 (paper §3.4) for any vocabulary: base and SAM-refined label maps.

    aligner: the trained alignment module M ([B, N, C] -> [B, N, D]); dino: the frozen DINOv2 of
    its features and dino_spec its registry spec (pixel statistics, patch size); clip: the frozen
    CLIP whose text encoder makes the prototypes; inference: templates, window protocol, SAM spec
    and automatic-mask settings (the checkpoint's, or the evaluation's); sam: a zero-argument
    builder of that SAM, called once, on the first refined prediction (None: base only);
    device: where the models are; dtype: "fp32" | "bf16" | "fp16" autocast of the model forwards
    (on CUDA; the CPU runs fp32); window_batch: sliding windows per encoder forward (a memory knob).
    """

    def __init__(
        self,
        *,
        aligner: nn.Module,
        dino: nn.Module,
        dino_spec: ModelSpec,
        clip: ClipBundle,
        inference: InferenceSpec,
        sam: Callable[[], Sam] | None = None,
        device: str | torch.device = "cpu",
        dtype: str = "fp32",
        window_batch: int = 16,
    ) -> None:
        if window_batch < 1:
            raise ValueError(f"window_batch must be >= 1, got {window_batch}")
        autocast_context("cpu", dtype)  # an unknown dtype fails here, not at the first image
        self.aligner, self.dino, self.dino_spec, self.clip = aligner, dino, dino_spec, clip
        self.inference = inference
        self.device = torch.device(device)
        self.dtype = dtype
        self.window_batch = window_batch
        self._sam_builder = sam
        self._sam: Sam | None = None
        self._lock = threading.Lock()
        self._vocabularies: dict[tuple[Any, ...], Vocabulary] = {}
        self._size_filter = (inference.amg.min_area_frac, inference.amg.max_area_frac)
        self._amg = inference.amg.generator_args()

    @classmethod
    def from_checkpoint(
        cls,
        source: str | os.PathLike[str] | LoadedAligner,
        *,
        device: str | None = None,
        dtype: str | None = None,
        weights_dir: str | None = None,
        inference: InferenceSpec | None = None,
        window_batch: int = 16,
        random_weights: bool = False,
        student: str | None = None,
    ) -> Segmenter:
        """The segmenter of an aligner checkpoint (a path, or what ``load_aligner`` returned).

        device: "auto" (cuda when present, the default) | "cpu" | "cuda" | "cuda:N"; dtype: autocast
        of the forwards, "fp32" by default. DINOv2 and CLIP are built from the registry now (absent
        weights raise MissingWeightsError naming the fetch command), SAM on the first refined
        prediction (or :meth:`load_sam`). inference: overrides the checkpoint's protocol (the
        evaluation's settings). random_weights: the real architectures with random weights, whatever
        files are present -- for benchmarks only, never for results. student: the student spec the
        caller means to run; another than the checkpoint's is refused, naming both (None: the
        checkpoint's).
        """
        resolved = resolve_device(device or "auto")
        loaded = source if isinstance(source, LoadedAligner) else load_aligner(source, map_location=resolved)
        if student is not None:
            refuse_other_student(loaded, student, source=str(source) if not isinstance(source, LoadedAligner)
                                 else "the checkpoint")
        loaded.model.to(resolved)
        spec = inference or loaded.inference
        return cls(
            aligner=loaded.model,
            dino=build_dino(loaded.encoder_spec, device=resolved, weights_dir=weights_dir,
                            random_weights=random_weights),
            dino_spec=get_spec(loaded.encoder_spec),
            clip=build_clip(loaded.text_spec, device=resolved, weights_dir=weights_dir, random_weights=random_weights),
            inference=spec,
            sam=functools.partial(build_sam, spec.sam, device=resolved, weights_dir=weights_dir,
                                  random_weights=random_weights),
            device=resolved,
            dtype=dtype or "fp32",
            window_batch=window_batch,
        )

    # ------------------------------------------------------------------------------ vocabularies
    def vocabulary(self, classes: Sequence[str], prompts: PromptSet | None = None) -> Vocabulary:
        """The vocabulary of `classes` (K lines, synonyms allowed), its prototypes computed once.

        prompts: other prompts than one per class (e.g. ``benchmark_prompts``: PV-21's stuff
        prompts voting for background); their class_map must point into `classes`.
        """
        classes = tuple(classes)
        for k, line in enumerate(classes):
            if not isinstance(line, str) or not [s for s in line.split(",") if s.strip()]:
                raise ValueError(f"class {k} has an empty name: {line!r}")
        no_class_index(len(classes))
        if prompts is None:
            prompts = PromptSet(list(classes), torch.arange(len(classes), dtype=torch.int64))
        class_map = prompts.class_map.to(torch.int64).cpu()
        if class_map.shape != (len(prompts.names),) or (len(class_map) and (
                int(class_map.min()) < 0 or int(class_map.max()) >= len(classes))):
            raise ValueError(f"class_map must be [{len(prompts.names)}] indices into {len(classes)} classes")
        key = (self.clip.spec.name, tuple(self.inference.templates), classes, tuple(prompts.names),
               tuple(class_map.tolist()))
        with self._lock:
            cached = self._vocabularies.get(key)
        if cached is not None:
            return cached
        with torch.no_grad():
            text = text_prototypes(self.clip.model, self.clip.tokenizer, list(prompts.names),
                                   list(self.inference.templates))
        vocab = Vocabulary(classes, tuple(prompts.names), class_map.to(self.device), text.float().to(self.device))
        with self._lock:
            return self._vocabularies.setdefault(key, vocab)

    # ---------------------------------------------------------------------------------- forwards
    def _autocast(self) -> Any:
        return autocast_context(self.device, self.dtype)  # type: ignore[arg-type]

    @torch.no_grad()
    def encode(self, pixels: Tensor) -> Tensor:
        """Aligned patch embeddings z = M(DINOv2(x)): [B, 3, h, w] normalised pixels (h, w ÷ patch)
        -> [B, h/p, w/p, D] float32."""
        with self._autocast():
            features = patch_features(self.dino, pixels)
            batch, rows, cols, width = features.shape
            z = self.aligner(features.reshape(batch, rows * cols, width))
        return z.float().reshape(batch, rows, cols, -1)

    def _pixels(self, images: Sequence[np.ndarray]) -> list[Tensor]:
        spec = self.dino_spec
        return [resize_normalize(_as_tensor(im).to(self.device), im.shape[:2], spec.mean, spec.std)[0]
                for im in images]

    def _protocol(self, check: Callable[[], None] | None = None) -> dict[str, Any]:
        spec = self.inference
        encode_fn = self.encode
        if check is not None:
            def encode_fn(pixels: Tensor) -> Tensor:
                check()
                return self.encode(pixels)
        return {"encode_fn": encode_fn, "window": spec.window, "stride": spec.stride,
                "short_side": spec.short_side, "batch_size": self.window_batch, "pad_to": self.dino_spec.patch_size}

    def base_logits(self, images: Sequence[np.ndarray], vocabulary: Vocabulary) -> list[Tensor]:
        """[H_i, W_i, 3] uint8 images -> one [K', H_i, W_i] float32 of cosine logits of every prompt
        each (sliding windows; windows of all the images share encoder forwards)."""
        return predict_logits_batch(self._pixels(images), prototypes=vocabulary.prototypes, **self._protocol())

    def best_prompts(self, images: Sequence[np.ndarray], vocabulary: Vocabulary, *,
                     logit_scale: float | None = None,
                     check: Callable[[], None] | None = None) -> list[tuple[Tensor, Tensor]]:
        """The argmax of :meth:`base_logits` without holding them at full size: one ([H_i, W_i]
        float32 best cosine, or with `logit_scale` its softmax probability over the prompts,
        [H_i, W_i] int64 prompt index) per image. check: called before every encoder forward (of
        `window_batch` windows); what it raises stops the work."""
        return predict_scores_batch(self._pixels(images), prototypes=vocabulary.prototypes, logit_scale=logit_scale,
                                    **self._protocol(check))

    def load_sam(self) -> Sam:
        """The SAM of the refined prediction, built on first use (MissingWeightsError when absent)."""
        with self._lock:
            if self._sam is None:
                if self._sam_builder is None:
                    raise ValueError("this segmenter has no SAM: it was built for base predictions only")
                self._sam = self._sam_builder()
            return self._sam

    @torch.no_grad()
    def masks(self, image: np.ndarray) -> Tensor:
        """SAM automatic masks of the image, size-filtered: [M, H, W] bool at the image's size.

        SAM sees the image resized to the protocol's short side (as the windows do); its masks are
        resized (nearest) to the original size.
        """
        sam = self.load_sam()
        height, width = image.shape[:2]
        small = image
        if self.inference.short_side is not None:
            small = resize_short_side(_as_tensor(image), self.inference.short_side).numpy()
        with self._autocast():
            records = embed_image(sam, small).automatic_masks(**self._amg)
        records = size_filter(records, small.shape[0] * small.shape[1], *self._size_filter)
        if not records:
            return torch.zeros(0, height, width, dtype=torch.bool, device=self.device)
        stack = torch.from_numpy(np.stack([r["segmentation"] for r in records])).to(self.device)
        if stack.shape[1:] != (height, width):
            stack = F.interpolate(stack[None].to(torch.uint8), size=(height, width), mode="nearest-exact")[0].bool()
        return stack

    # ------------------------------------------------------------------------------ predictions
    def _predict(
        self,
        images: Sequence[np.ndarray],
        vocabulary: Vocabulary,
        *,
        refine: bool,
        bg_threshold: float | None,
        background_index: int | None,
        logit_scale: float | None = None,
        check: Callable[[], None] | None = None,
    ) -> list[tuple[Prediction, Tensor]]:
        """(Prediction, [H, W] float32 best prompt cosine, or its softmax probability) per image;
        `check` is called before every encoder forward and every image's SAM masks."""
        out = []
        scored = self.best_prompts(images, vocabulary, logit_scale=logit_scale, check=check)
        for image, (score, prompt) in zip(images, scored, strict=True):
            base = labels_from_scores(score, prompt, class_map=vocabulary.class_map, bg_threshold=bg_threshold,
                                      background_index=background_index)
            if refine and check is not None:
                check()
            refined = refine_with_masks(base, self.masks(image), vocabulary.num_classes) if refine else None
            out.append((Prediction(base, refined), score))
        return out

    def predict_batch(
        self,
        images: Sequence[np.ndarray],
        vocabulary: Vocabulary,
        *,
        refine: bool = False,
        bg_threshold: float | None = None,
        background_index: int | None = None,
        logit_scale: float | None = None,
    ) -> list[Prediction]:
        """[H, W, 3] uint8 RGB images -> base and (with refine) refined [H, W] int64 class maps.

        bg_threshold / background_index: pixels whose best cosine is below the threshold become
        class `background_index` (None: off; ``labels_from_scores``); with `logit_scale` the
        threshold applies to the winner's softmax(logit_scale · cosine) probability instead.
        """
        images = [_as_rgb(im) for im in images]
        return [p for p, _ in self._predict(images, vocabulary, refine=refine, bg_threshold=bg_threshold,
                                            background_index=background_index, logit_scale=logit_scale)]

    def predict(self, image: np.ndarray, vocabulary: Vocabulary, *, refine: bool = False,
                bg_threshold: float | None = None, background_index: int | None = None,
                logit_scale: float | None = None) -> Prediction:
        """:meth:`predict_batch` of one image."""
        return self.predict_batch([image], vocabulary, refine=refine, bg_threshold=bg_threshold,
                                  background_index=background_index, logit_scale=logit_scale)[0]

    def segment_batch(self, images: Sequence[ImageInput], classes: Sequence[str], *,
                      refine: bool = False, check: Callable[[], None] | None = None) -> list[SegmentResult]:
        """Segment images with any class names (one line per class, "a, b" = synonyms).

        images: [H, W, 3] uint8 RGB arrays or PIL images, any sizes; refine: the SAM-refined map;
        check: called before every encoder forward (of `window_batch` windows) and every image's
        SAM masks; what it raises stops the work (a server's deadline).
        Returns one :class:`SegmentResult` per image, label maps at the images' original sizes.
        """
        vocabulary = self.vocabulary(classes)
        arrays = [_as_rgb(im) for im in images]
        num = vocabulary.num_classes
        dtype = label_dtype(num)
        results = []
        for prediction, score in self._predict(arrays, vocabulary, refine=refine, bg_threshold=None,
                                               background_index=None, check=check):
            base = prediction.base.flatten()
            counts = torch.bincount(base, minlength=num).float()
            sums = torch.bincount(base, weights=score.flatten().float(), minlength=num)
            scores = torch.where(counts > 0, sums / counts.clamp(min=1), torch.zeros_like(sums))
            final = prediction.refined if refine else prediction.base
            pixel_counts = torch.bincount(final.flatten(), minlength=num)
            shares = pixel_counts.float() / final.numel()
            results.append(SegmentResult(
                label_map=final.cpu().numpy().astype(dtype),
                scores=scores.cpu().numpy().astype(np.float32),
                shares=shares.cpu().numpy().astype(np.float32),
                present=[int(k) for k in torch.nonzero(pixel_counts).flatten().tolist()],
            ))
        return results

    def segment(self, image: ImageInput, classes: Sequence[str], *, refine: bool = False) -> SegmentResult:
        """:meth:`segment_batch` of one image."""
        return self.segment_batch([image], classes, refine=refine)[0]


@dataclass(frozen=True)
class VocabularySegmenter:
    """A :class:`Segmenter` fixed to one vocabulary and variant: [H, W, 3] uint8 -> Prediction
    (the callable the evaluation loop scores)."""

    segmenter: Segmenter
    vocabulary: Vocabulary
    refine: bool
    bg_threshold: float | None = None
    background_index: int | None = None
    logit_scale: float | None = None

    def __call__(self, image: np.ndarray) -> Prediction:
        return self.segmenter.predict(image, self.vocabulary, refine=self.refine, bg_threshold=self.bg_threshold,
                                      background_index=self.background_index, logit_scale=self.logit_scale)

    @classmethod
    def for_benchmark(
        cls,
        segmenter: Segmenter,
        class_lines: Sequence[str],
        meta: Mapping[str, Any],
        *,
        refine: bool,
        synonyms: str = "mean",
        bg_prompts: bool = True,
        bg_threshold: float | None = None,
        logit_scale: float | None = None,
    ) -> VocabularySegmenter:
        """A benchmark's segmenter under its effective evaluate settings (``evaluate.for_benchmark``):
        its prompts (components/evaluation/prompts.py: synonyms, background prompts) and background
        rule. What the evaluate stage and bench/evaluate.py both score."""
        from components.evaluation.prompts import background_index, benchmark_prompts

        prompts = benchmark_prompts(class_lines, meta, synonyms=synonyms, background_prompts=bg_prompts)
        return cls(
            segmenter, segmenter.vocabulary(class_lines, prompts), refine=refine, bg_threshold=bg_threshold,
            background_index=background_index(meta) if bg_threshold is not None else None, logit_scale=logit_scale,
        )

