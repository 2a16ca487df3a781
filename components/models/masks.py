"""The mask-model role: one interface over SAM v1 and SAM 2.1 (docs/design.md §4).

Stage 1.1 prompts a mask model with points, Stage 1.2 and SAM refinement run its automatic mask
generator; neither needs to know which model it is. :class:`MaskImage` is one image embedded by a
mask model (one image-encoder pass, at construction) and serves both:

- :meth:`MaskImage.masks_from_point_sets`: C sets of foreground points -> per set the best of the
  3 multimask outputs by predicted IoU, all sets in one prompt-decoder call;
- :meth:`MaskImage.automatic_masks`: segment_anything's automatic mask generator over a point grid
  (predicted-IoU filter, stability filter, box NMS, optional small-region clean-up) with its
  records (binary masks or RLEs, COCO compressed RLE byte for byte).

A model contributes only what differs: its image encoding (``__init__``), :meth:`MaskImage.decode`
(point prompts -> low-resolution multimask logits and predicted IoUs) and
:meth:`MaskImage.upsample` (those logits -> the image size). SamImage (components/models/sam.py)
wraps segment_anything's ``Sam``, Sam2Image (components/models/sam2.py) transformers'
``Sam2Model``; :func:`embed_image` picks by the model's class, so a new mask model (a SAM 3
tracker, say) is one more subclass and one more row of :func:`mask_image_classes`.

The generator is segment_anything's ``SamAutomaticMaskGenerator``, subclassed
(:class:`GridMaskGenerator`), with its pure ``utils/amg.py`` functions in its order:

- its batch step decodes through the image's :meth:`~MaskImage.decode` and filters candidates by
  predicted IoU *before* upsampling the low-resolution logits (the stock step upsamples every
  candidate first; the filter reads only the IoU prediction, so the records are the stock ones);
- its crop step keeps the candidates as binary masks through box NMS (which reads only boxes and
  IoU predictions); the stock step run-length encodes every candidate, most of its time on noisy
  masks;
- its records are built from the surviving binary masks in one pass over the whole batch: COCO RLE
  by one ``pycocotools.mask.encode`` call (a mask's RLE is unique, so the counts are the stock
  generator's byte for byte), boxes, scores and areas converted once per image rather than per mask.
  With ``min_mask_region_area > 0`` the stock clean-up runs on RLEs as it does upstream.
Crops (``crop_n_layers > 0``) would need new embeddings and are refused.
"""

from __future__ import annotations

import importlib.util
from abc import ABC, abstractmethod
from typing import Any, NamedTuple

import numpy as np
import torch
from pycocotools import mask as mask_utils
from segment_anything import SamAutomaticMaskGenerator
from segment_anything.utils.amg import (
    MaskData,
    batch_iterator,
    build_all_layer_point_grids,
    calculate_stability_score,
    is_box_near_crop_edge,
    uncrop_boxes_xyxy,
    uncrop_masks,
    uncrop_points,
)
from torchvision.ops.boxes import batched_nms

__all__ = [
    "OUTPUT_MODES",
    "MaskImage",
    "MaskModel",
    "GridMaskGenerator",
    "PointMask",
    "PointMasks",
    "embed_image",
    "mask_image_classes",
    "mask_boxes",
    "masks_to_coco_rle",
    "masks_to_rle",
]

OUTPUT_MODES: tuple[str, ...] = ("binary_mask", "uncompressed_rle", "coco_rle")

MaskModel = torch.nn.Module
"""A mask model: any class of :func:`mask_image_classes` (segment_anything ``Sam``, transformers
``Sam2Model``), as ``build_sam`` returns it."""


def masks_to_rle(masks: torch.Tensor) -> list[dict[str, Any]]:
    """Uncompressed COCO RLEs of [B, H, W] bool masks, equal to segment_anything's
    ``mask_to_rle_pytorch``, with one device-to-host copy for the whole batch instead of one
    ``.cpu()`` (a GPU sync) per mask: the change positions are found on the device, split per mask
    on the host."""
    count, height, width = masks.shape
    flat = masks.permute(0, 2, 1).flatten(1)  # column-major, as COCO counts
    changes = (flat[:, 1:] ^ flat[:, :-1]).nonzero().cpu().numpy()  # [N, 2] (mask, position), sorted
    first = flat[:, 0].cpu().numpy()
    bounds = np.searchsorted(changes[:, 0], np.arange(count + 1))
    total = height * width
    out = []
    for i in range(count):
        edges = np.concatenate(([0], changes[bounds[i] : bounds[i + 1], 1] + 1, [total]))
        counts = ([] if not first[i] else [0]) + np.diff(edges).tolist()
        out.append({"size": [height, width], "counts": counts})
    return out


def masks_to_coco_rle(masks: np.ndarray) -> list[dict[str, Any]]:
    """COCO compressed RLEs ({"size": [H, W], "counts": bytes}) of [N, H, W] bool masks, in one
    ``pycocotools.mask.encode`` call for the whole stack. A mask has one RLE, so the counts equal
    segment_anything's (``mask_to_rle_pytorch``, then ``coco_encode_rle``) byte for byte."""
    if masks.shape[0] == 0:
        return []
    # [H, W, N] in Fortran order (column-major within each mask), as pycocotools takes it
    columns = np.ascontiguousarray(masks.transpose(0, 2, 1)).view(np.uint8).transpose(2, 1, 0)
    return mask_utils.encode(columns)


def mask_boxes(masks: torch.Tensor) -> torch.Tensor:
    """XYXY boxes of [N, H, W] bool masks ([0, 0, 0, 0] for an empty one), equal to
    segment_anything's ``batched_mask_to_box``, with the rows' and columns' coverage reduced by
    ``amax`` (``torch.max`` along a dimension also computes the arg-max indices, which it drops:
    two to four times the cost on the generator's candidate stack) over the masks' bytes as uint8
    (a bool reduction is not vectorised on CPU: 4-15 times slower for the same answer). [N, 4] int64."""
    count, height, width = masks.shape
    if masks.numel() == 0:
        return torch.zeros(count, 4, device=masks.device)
    edges = []
    flags = masks.view(torch.uint8)
    for covered, side in ((flags.amax(dim=-2).bool(), width), (flags.amax(dim=-1).bool(), height)):  # [N, W], [N, H]
        coords = covered * torch.arange(side, device=masks.device)[None, :]
        edges.append(((coords + side * ~covered).amin(dim=-1), coords.amax(dim=-1)))
    (left, right), (top, bottom) = edges
    empty = (right < left) | (bottom < top)
    return torch.stack([left, top, right, bottom], dim=-1) * ~empty[:, None]


class PointMask(NamedTuple):
    """mask: [H, W] bool at the image's size; score: the model's predicted IoU of that mask."""

    mask: np.ndarray
    score: float


class PointMasks(NamedTuple):
    """masks: [C, H, W] bool (CPU) at the image's size, one per prompt set; scores: [C] float32,
    the model's predicted IoU of each."""

    masks: torch.Tensor
    scores: torch.Tensor


def _as_points(points: np.ndarray | torch.Tensor) -> np.ndarray:
    return np.asarray(points.detach().cpu() if isinstance(points, torch.Tensor) else points, dtype=np.float64)


class MaskImage(ABC):
    """One image embedded by a mask model (exactly one image-encoder pass, at construction).

    image: [H, W, 3] uint8 RGB numpy array. Subclasses encode it in ``__init__`` (after this
    ``__init__`` has checked it) and implement :meth:`decode`, :meth:`upsample` and
    :attr:`mask_threshold`.
    """

    def __init__(self, image: np.ndarray) -> None:
        if (
            not isinstance(image, np.ndarray)
            or image.dtype != np.uint8
            or image.ndim != 3
            or image.shape[2] != 3
        ):
            shape = getattr(image, "shape", None)
            raise ValueError(
                f"image must be an [H, W, 3] uint8 RGB numpy array, got {type(image).__name__} {shape}"
            )
        self.image = image

    @property
    def size(self) -> tuple[int, int]:
        """(H, W) of the image."""
        return self.image.shape[0], self.image.shape[1]

    @property
    @abstractmethod
    def mask_threshold(self) -> float:
        """Logit above which a pixel is in the mask."""

    @abstractmethod
    def decode(self, points: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Multimask decoding of foreground point prompts against the embedded image.

        points: [B, P, 2] float64 xy in the image's pixel coordinates. Returns low-resolution mask
        logits [B, 3, h, w] and predicted IoUs [B, 3], on the model's device.
        """

    @abstractmethod
    def upsample(self, logits: torch.Tensor) -> torch.Tensor:
        """[N, C, h, w] low-resolution mask logits -> [N, C, H, W] logits at the image's size."""

    def masks_from_points(self, points: np.ndarray | torch.Tensor) -> PointMask:
        """Stage 1.1: foreground point prompts -> the highest-predicted-IoU mask of 3 (multimask).

        points: [P, 2] float xy in the image's pixel coordinates, all foreground (P >= 1).
        """
        coords = _as_points(points)
        if coords.ndim != 2 or coords.shape[0] < 1 or coords.shape[1] != 2:
            raise ValueError(f"points must be [P, 2] xy with P >= 1, got shape {coords.shape}")
        result = self.masks_from_point_sets(coords[None])
        return PointMask(result.masks[0].numpy(), float(result.scores[0]))

    @torch.no_grad()
    def masks_from_point_sets(self, points: np.ndarray | torch.Tensor) -> PointMasks:
        """Stage 1.1 for all classes at once: C sets of P foreground point prompts -> for each set
        the highest-predicted-IoU mask of 3 (multimask), in one prompt-decoder call.

        points: [C, P, 2] float xy in the image's pixel coordinates (C >= 0, P >= 1). The masks
        leave the device in one copy, not one per set.
        """
        coords = _as_points(points)
        if coords.ndim != 3 or coords.shape[1] < 1 or coords.shape[2] != 2:
            raise ValueError(f"points must be [C, P, 2] xy with P >= 1, got shape {coords.shape}")
        if coords.shape[0] == 0:
            return PointMasks(torch.zeros(0, *self.size, dtype=torch.bool), torch.zeros(0, dtype=torch.float32))
        low_res, iou_preds = self.decode(coords)
        best = iou_preds.argmax(dim=1)
        sets = torch.arange(best.shape[0], device=best.device)
        logits = self.upsample(low_res[sets, best][:, None])
        masks = logits[:, 0] > self.mask_threshold
        return PointMasks(masks.cpu(), iou_preds[sets, best].float().cpu())

    def automatic_masks(
        self,
        *,
        points_per_side: int = 32,
        points_per_batch: int = 64,
        pred_iou_thresh: float = 0.88,
        stability_score_thresh: float = 0.95,
        stability_score_offset: float = 1.0,
        box_nms_thresh: float = 0.7,
        crop_n_layers: int = 0,
        min_mask_region_area: int = 0,
        output_mode: str = "binary_mask",
    ) -> list[dict[str, Any]]:
        """Stage 1.2: SamAutomaticMaskGenerator's records for this image, from the same embedding.

        Settings as SamAutomaticMaskGenerator's (same defaults); ``crop_n_layers`` must be 0.
        Each record: segmentation ([H, W] bool, or an RLE dict for the RLE output modes), area
        (int pixels), bbox (XYWH), predicted_iou, stability_score, point_coords ([[x, y]]),
        crop_box (XYWH, the whole image).
        """
        if crop_n_layers != 0:
            raise ValueError(f"crop_n_layers must be 0 (crops need new mask-model embeddings), got {crop_n_layers}")
        if output_mode not in OUTPUT_MODES:
            raise ValueError(f"unknown output_mode {output_mode!r}; supported: {', '.join(OUTPUT_MODES)}")
        if min_mask_region_area > 0 and importlib.util.find_spec("cv2") is None:
            raise ModuleNotFoundError(
                "min_mask_region_area > 0 needs OpenCV (segment_anything's remove_small_regions): "
                "install opencv-python-headless, or use min_mask_region_area=0"
            )
        generator = GridMaskGenerator(
            self,
            points_per_side=points_per_side,
            points_per_batch=points_per_batch,
            pred_iou_thresh=pred_iou_thresh,
            stability_score_thresh=stability_score_thresh,
            stability_score_offset=stability_score_offset,
            box_nms_thresh=box_nms_thresh,
            min_mask_region_area=min_mask_region_area,
            output_mode=output_mode,
        )
        return generator.generate(self.image)


class GridMaskGenerator(SamAutomaticMaskGenerator):
    """SamAutomaticMaskGenerator over an embedded :class:`MaskImage` (one crop: the whole image),
    filtering by predicted IoU before upsampling.

    The stock ``__init__`` builds a ``SamPredictor`` over a segment_anything ``Sam``; this one
    decodes through the image instead, so it sets the stock attributes itself.
    """

    def __init__(
        self,
        image: MaskImage,
        *,
        points_per_side: int,
        points_per_batch: int,
        pred_iou_thresh: float,
        stability_score_thresh: float,
        stability_score_offset: float,
        box_nms_thresh: float,
        min_mask_region_area: int,
        output_mode: str,
    ) -> None:
        self.image = image
        self.point_grids = build_all_layer_point_grids(points_per_side, 0, 1)
        self.points_per_batch = points_per_batch
        self.pred_iou_thresh = pred_iou_thresh
        self.stability_score_thresh = stability_score_thresh
        self.stability_score_offset = stability_score_offset
        self.box_nms_thresh = box_nms_thresh
        self.crop_n_layers = 0
        self.crop_nms_thresh = 0.7  # the stock default; the stock clean-up's NMS reads it
        self.crop_overlap_ratio = 512 / 1500
        self.crop_n_points_downscale_factor = 1
        self.min_mask_region_area = min_mask_region_area
        self.output_mode = output_mode

    def _process_batch(
        self,
        points: np.ndarray,
        im_size: tuple[int, ...],
        crop_box: list[int],
        orig_size: tuple[int, ...],
    ) -> MaskData:
        """The stock batch step (amg.py's functions in its order), with the predicted-IoU filter
        moved ahead of the upsampling so only surviving candidates are upsampled."""
        orig_h, orig_w = orig_size
        low_res, iou_preds = self.image.decode(points[:, None, :])
        data = MaskData(
            masks=low_res.flatten(0, 1),
            iou_preds=iou_preds.flatten(0, 1),
            points=torch.as_tensor(points.repeat(low_res.shape[1], axis=0)),
        )
        if self.pred_iou_thresh > 0.0:
            data.filter(data["iou_preds"] > self.pred_iou_thresh)
        data["masks"] = self.image.upsample(data["masks"][:, None])[:, 0]

        threshold = self.image.mask_threshold
        data["stability_score"] = calculate_stability_score(data["masks"], threshold, self.stability_score_offset)
        if self.stability_score_thresh > 0.0:
            data.filter(data["stability_score"] >= self.stability_score_thresh)
        data["masks"] = data["masks"] > threshold
        data["boxes"] = mask_boxes(data["masks"])
        keep = ~is_box_near_crop_edge(data["boxes"], crop_box, [0, 0, orig_w, orig_h])
        if not torch.all(keep):
            data.filter(keep)
        data["masks"] = uncrop_masks(data["masks"], crop_box, orig_h, orig_w)
        return data

    def _generate_masks(self, image: np.ndarray) -> MaskData:
        """The stock step for the one crop this generator allows (crop_n_layers = 0): the crop's
        data as it is. The stock loop gathers crops with ``MaskData.cat``, which deep-copies the
        first crop's data (every run-length list, item by item) only to have a copy; nothing
        else differs, since with one crop there is no duplicate removal between crops."""
        height, width = image.shape[:2]
        data = self._process_crop(image, [0, 0, width, height], 0, (height, width))
        if self.min_mask_region_area > 0:  # the stock clean-up reads RLEs
            data["rles"] = masks_to_rle(data["masks"])
            del data["masks"]
        data.to_numpy()
        return data

    def _process_crop(
        self,
        image: np.ndarray,
        crop_box: list[int],
        crop_layer_idx: int,
        orig_size: tuple[int, ...],
    ) -> MaskData:
        """The stock crop step (amg.py's functions in its order) on the embedded image, keeping the
        candidates as binary masks (``masks``) instead of run-length encoding every one, and taking
        the first batch as it is (``MaskData.cat`` into an empty MaskData deep-copies it)."""
        x0, y0, x1, y1 = crop_box
        cropped_im_size = image[y0:y1, x0:x1, :].shape[:2]
        points_scale = np.array(cropped_im_size)[None, ::-1]
        points_for_image = self.point_grids[crop_layer_idx] * points_scale
        data: MaskData | None = None
        for (points,) in batch_iterator(self.points_per_batch, points_for_image):
            batch = self._process_batch(points, cropped_im_size, crop_box, orig_size)
            if data is None:
                data = batch
            else:
                data.cat(batch)
        assert data is not None  # a point grid has at least one point
        keep_by_nms = batched_nms(
            data["boxes"].float(),
            data["iou_preds"],
            torch.zeros(len(data["boxes"])),  # one category
            iou_threshold=self.box_nms_thresh,
        )
        data.filter(keep_by_nms)
        data["boxes"] = uncrop_boxes_xyxy(data["boxes"], crop_box)
        data["points"] = uncrop_points(data["points"], crop_box)
        data["crop_boxes"] = torch.tensor([crop_box for _ in range(len(data["boxes"]))])
        return data

    @torch.no_grad()
    def generate(self, image: np.ndarray) -> list[dict[str, Any]]:
        """The stock records (``SamAutomaticMaskGenerator.generate``), built once per image from the
        kept binary masks ([N, H, W] in ``masks``) instead of once per mask from RLEs."""
        if self.min_mask_region_area > 0:  # the stock clean-up and records, on RLEs
            return super().generate(image)
        data = self._generate_masks(image)
        if len(data["boxes"]) == 0:
            return []
        masks = data["masks"]
        count = masks.shape[0]
        if self.output_mode == "binary_mask":
            segmentations: list[Any] = list(masks)
        elif self.output_mode == "coco_rle":
            segmentations = masks_to_coco_rle(masks)
            for rle in segmentations:
                rle["counts"] = rle["counts"].decode("utf-8")  # as segment_anything's coco_encode_rle
        else:
            segmentations = masks_to_rle(torch.from_numpy(masks))
        boxes, crop_boxes = _xywh(data["boxes"]), _xywh(data["crop_boxes"])
        areas = masks.reshape(count, -1).sum(axis=1).tolist()
        ious, stability, points = data["iou_preds"].tolist(), data["stability_score"].tolist(), data["points"].tolist()
        return [
            {
                "segmentation": segmentations[i],
                "area": areas[i],
                "bbox": boxes[i],
                "predicted_iou": ious[i],
                "point_coords": [points[i]],
                "stability_score": stability[i],
                "crop_box": crop_boxes[i],
            }
            for i in range(count)
        ]


def _xywh(boxes: np.ndarray) -> list[list[Any]]:
    """[N, 4] XYXY -> XYWH rows as lists (segment_anything's ``box_xyxy_to_xywh`` per row)."""
    out = boxes.copy()
    out[:, 2:] -= boxes[:, :2]
    return out.tolist()


def mask_image_classes() -> dict[type, type[MaskImage]]:
    """Mask-model class -> the MaskImage subclass that embeds an image with it."""
    from segment_anything.modeling import Sam
    from transformers import Sam2Model

    from components.models.sam import SamImage
    from components.models.sam2 import Sam2Image

    return {Sam: SamImage, Sam2Model: Sam2Image}


def embed_image(model: MaskModel, image: np.ndarray) -> MaskImage:
    """One image embedded by a mask model (any of :func:`mask_image_classes`), chosen by its class.

    image: [H, W, 3] uint8 RGB.
    """
    images = mask_image_classes()
    for model_class, image_class in images.items():
        if isinstance(model, model_class):
            return image_class(model, image)
    raise TypeError(
        f"{type(model).__name__} is not a mask model; supported: {', '.join(c.__name__ for c in images)}"
    )
