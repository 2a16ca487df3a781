"""SAM on one image: one image-encoder pass answers point prompts and automatic masks (docs/design.md §4).

Stage 1.1 prompts SAM with the top-k patch centres of each detected class; Stage 1.2 runs SAM's
automatic mask generator on the same image. :class:`SamImage` pays for the image embedding once
(``SamPredictor.set_image``) and serves both from it. The automatic masks come from
segment_anything's own ``SamAutomaticMaskGenerator``, subclassed (and its predictor):

- its predictor is a view of the already-set predictor, so the generator's ``set_image`` costs
  nothing (crops, ``crop_n_layers > 0``, would need new embeddings and are refused);
- its batch step filters candidates by predicted IoU *before* upsampling the low-resolution mask
  logits to the image size (the stock step upsamples every candidate first). The filter reads only
  the IoU prediction, so the records are identical to the stock generator's; where the image
  already has SAM's input size the upsampling skips the stock final same-size resize (exact);
- its crop step keeps the candidates as binary masks through duplicate removal (box NMS, which
  reads only boxes and IoU predictions); the stock step run-length encodes every candidate, which
  was most of the generator's time on noisy masks;
- its records are built from the surviving binary masks in one pass over the whole batch: COCO RLE
  by one ``pycocotools.mask.encode`` call (a mask's RLE is unique, so the counts are the stock
  generator's byte for byte), binary masks without the stock RLE round trip, boxes, scores and
  areas converted once per image rather than per mask (the stock loop deep-copies every box
  twice). With ``min_mask_region_area > 0`` the stock clean-up runs on RLEs as it does upstream.
"""

from __future__ import annotations

import importlib.util
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils
from segment_anything import SamAutomaticMaskGenerator, SamPredictor
from segment_anything.modeling import Sam
from segment_anything.utils.amg import (
    MaskData,
    batch_iterator,
    calculate_stability_score,
    is_box_near_crop_edge,
    uncrop_boxes_xyxy,
    uncrop_masks,
    uncrop_points,
)
from torchvision.ops.boxes import batched_nms

__all__ = ["PointMask", "PointMasks", "SamImage", "OUTPUT_MODES", "mask_boxes", "masks_to_coco_rle", "masks_to_rle"]

OUTPUT_MODES: tuple[str, ...] = ("binary_mask", "uncompressed_rle", "coco_rle")


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
    """mask: [H, W] bool at the image's size; score: SAM's predicted IoU of that mask."""

    mask: np.ndarray
    score: float


class PointMasks(NamedTuple):
    """masks: [C, H, W] bool (CPU) at the image's size, one per prompt set; scores: [C] float32,
    SAM's predicted IoU of each."""

    masks: torch.Tensor
    scores: torch.Tensor


@torch.no_grad()
def _decode(predictor: SamPredictor, coords: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Multimask decoding of foreground point prompts against the set image.

    coords: [B, P, 2] float xy in the resized input frame (``transform.apply_coords``).
    Returns low-resolution mask logits [B, 3, 4·h, 4·w] and predicted IoUs [B, 3].
    """
    model = predictor.model
    points = torch.as_tensor(coords, dtype=torch.float, device=predictor.device)
    labels = torch.ones(points.shape[:2], dtype=torch.int, device=points.device)
    sparse, dense = model.prompt_encoder(points=(points, labels), boxes=None, masks=None)
    return model.mask_decoder(
        image_embeddings=predictor.features,
        image_pe=model.prompt_encoder.get_dense_pe(),
        sparse_prompt_embeddings=sparse,
        dense_prompt_embeddings=dense,
        multimask_output=True,
    )


def _postprocess_masks(
    model: Sam, masks: torch.Tensor, input_size: tuple[int, ...], original_size: tuple[int, ...]
) -> torch.Tensor:
    """``Sam.postprocess_masks`` ([B, C, 4·h, 4·w] logits -> [B, C, H, W]: upsample to the encoder
    frame, crop the padding, resize to the original size), without the last resize where the crop
    already has the original size: a bilinear resize to the same size returns its input exactly,
    and costs a full pass over every candidate mask."""
    if tuple(input_size) != tuple(original_size):
        return model.postprocess_masks(masks, input_size, original_size)
    side = model.image_encoder.img_size
    masks = F.interpolate(masks, (side, side), mode="bilinear", align_corners=False)
    return masks[..., : input_size[0], : input_size[1]]


class _EmbeddedPredictor(SamPredictor):
    """The generator's predictor: shares the features of an already-set predictor. ``set_image``
    accepts only that image (no encoder pass); ``reset_image`` keeps the embedding."""

    def __init__(self, source: SamPredictor) -> None:
        super().__init__(source.model)
        self.features = source.features
        self.original_size = source.original_size
        self.input_size = source.input_size
        self.is_image_set = True

    def set_image(self, image: np.ndarray, image_format: str = "RGB") -> None:
        if tuple(image.shape[:2]) != tuple(self.original_size):
            raise RuntimeError(
                f"this SAM embedding is of a {self.original_size} image, not {image.shape[:2]}: "
                "automatic masks on crops need new embeddings (use crop_n_layers=0)"
            )

    def reset_image(self) -> None:
        """Keep the embedding: it belongs to the SamImage, which outlives one generator run."""


class _EmbeddedMaskGenerator(SamAutomaticMaskGenerator):
    """SamAutomaticMaskGenerator over an embedded image, filtering by predicted IoU before upsampling."""

    def __init__(self, predictor: _EmbeddedPredictor, **settings: Any) -> None:
        super().__init__(predictor.model, **settings)
        self.predictor = predictor

    def _process_batch(
        self,
        points: np.ndarray,
        im_size: tuple[int, ...],
        crop_box: list[int],
        orig_size: tuple[int, ...],
    ) -> MaskData:
        """The stock batch step (amg.py's functions in its order), with the predicted-IoU filter
        moved ahead of ``postprocess_masks`` so only surviving candidates are upsampled."""
        orig_h, orig_w = orig_size
        model = self.predictor.model
        coords = self.predictor.transform.apply_coords(points, im_size)
        low_res, iou_preds = _decode(self.predictor, coords[:, None, :])
        data = MaskData(
            masks=low_res.flatten(0, 1),
            iou_preds=iou_preds.flatten(0, 1),
            points=torch.as_tensor(points.repeat(low_res.shape[1], axis=0)),
        )
        if self.pred_iou_thresh > 0.0:
            data.filter(data["iou_preds"] > self.pred_iou_thresh)
        data["masks"] = _postprocess_masks(
            model, data["masks"][:, None], self.predictor.input_size, self.predictor.original_size
        )[:, 0]

        data["stability_score"] = calculate_stability_score(
            data["masks"], model.mask_threshold, self.stability_score_offset
        )
        if self.stability_score_thresh > 0.0:
            data.filter(data["stability_score"] >= self.stability_score_thresh)
        data["masks"] = data["masks"] > model.mask_threshold
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
        if self.crop_n_layers != 0:
            raise ValueError("crop_n_layers must be 0 (crops need new SAM embeddings)")
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


class SamImage:
    """One image embedded by SAM's image encoder (exactly one encoder pass, at construction).

    image: [H, W, 3] uint8 RGB numpy array.
    """

    def __init__(self, sam: Sam, image: np.ndarray) -> None:
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
        self.predictor = SamPredictor(sam)
        self.predictor.set_image(image)

    @property
    def size(self) -> tuple[int, int]:
        """(H, W) of the image."""
        return self.image.shape[0], self.image.shape[1]

    def masks_from_points(self, points: np.ndarray | torch.Tensor) -> PointMask:
        """Stage 1.1: foreground point prompts -> SAM's highest-predicted-IoU mask of 3 (multimask).

        points: [P, 2] float xy in the image's pixel coordinates, all foreground (P >= 1).
        """
        coords = np.asarray(
            points.detach().cpu() if isinstance(points, torch.Tensor) else points, dtype=np.float64
        )
        if coords.ndim != 2 or coords.shape[0] < 1 or coords.shape[1] != 2:
            raise ValueError(f"points must be [P, 2] xy with P >= 1, got shape {coords.shape}")
        result = self.masks_from_point_sets(coords[None])
        return PointMask(result.masks[0].numpy(), float(result.scores[0]))

    @torch.no_grad()
    def masks_from_point_sets(self, points: np.ndarray | torch.Tensor) -> PointMasks:
        """Stage 1.1 for all classes at once: C sets of P foreground point prompts -> for each set
        SAM's highest-predicted-IoU mask of 3 (multimask), in one prompt-decoder call.

        points: [C, P, 2] float xy in the image's pixel coordinates (C >= 0, P >= 1). The masks
        leave the device in one copy, not one per set.
        """
        coords = np.asarray(
            points.detach().cpu() if isinstance(points, torch.Tensor) else points, dtype=np.float64
        )
        if coords.ndim != 3 or coords.shape[1] < 1 or coords.shape[2] != 2:
            raise ValueError(f"points must be [C, P, 2] xy with P >= 1, got shape {coords.shape}")
        if coords.shape[0] == 0:
            return PointMasks(torch.zeros(0, *self.size, dtype=torch.bool), torch.zeros(0, dtype=torch.float32))
        coords = self.predictor.transform.apply_coords(coords, self.size)
        low_res, iou_preds = _decode(self.predictor, coords)
        best = iou_preds.argmax(dim=1)
        sets = torch.arange(best.shape[0], device=best.device)
        logits = _postprocess_masks(self.predictor.model, low_res[sets, best][:, None], self.predictor.input_size,
                                    self.size)
        masks = logits[:, 0] > self.predictor.model.mask_threshold
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
        (int pixels), bbox (XYWH floats), predicted_iou, stability_score, point_coords ([[x, y]]),
        crop_box (XYWH, the whole image).
        """
        if crop_n_layers != 0:
            raise ValueError(f"crop_n_layers must be 0 (crops need new SAM embeddings), got {crop_n_layers}")
        if output_mode not in OUTPUT_MODES:
            raise ValueError(f"unknown output_mode {output_mode!r}; supported: {', '.join(OUTPUT_MODES)}")
        if min_mask_region_area > 0 and importlib.util.find_spec("cv2") is None:
            raise ModuleNotFoundError(
                "min_mask_region_area > 0 needs OpenCV (segment_anything's remove_small_regions): "
                "install opencv-python-headless, or use min_mask_region_area=0"
            )
        generator = _EmbeddedMaskGenerator(
            _EmbeddedPredictor(self.predictor),
            points_per_side=points_per_side,
            points_per_batch=points_per_batch,
            pred_iou_thresh=pred_iou_thresh,
            stability_score_thresh=stability_score_thresh,
            stability_score_offset=stability_score_offset,
            box_nms_thresh=box_nms_thresh,
            crop_n_layers=0,
            min_mask_region_area=min_mask_region_area,
            output_mode=output_mode,
        )
        return generator.generate(self.image)
