"""SAM v1 (segment_anything ``Sam``) as a mask model (components/models/masks.py, docs/design.md §4).

Stage 1.1 prompts SAM with the top-k patch centres of each detected class; Stage 1.2 runs SAM's
automatic mask generator on the same image. :class:`SamImage` pays for the image embedding once
(``SamPredictor.set_image``) and serves both from it through the :class:`MaskImage` interface:
it decodes point prompts with SAM's prompt encoder and mask decoder against the set features,
and upsamples the low-resolution logits as ``Sam.postprocess_masks`` does (upsample to the
encoder frame, crop the padding, resize to the image), skipping the last resize where the crop
already has the image's size (exact). The automatic masks are the interface's
``GridMaskGenerator``: segment_anything's generator, records identical to the stock ones.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from segment_anything import SamPredictor
from segment_anything.modeling import Sam

from components.models.masks import (
    OUTPUT_MODES,
    MaskImage,
    PointMask,
    PointMasks,
    mask_boxes,
    masks_to_coco_rle,
    masks_to_rle,
)

__all__ = ["PointMask", "PointMasks", "SamImage", "OUTPUT_MODES", "mask_boxes", "masks_to_coco_rle", "masks_to_rle"]


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


class SamImage(MaskImage):
    """One image embedded by SAM's image encoder (exactly one encoder pass, at construction).

    image: [H, W, 3] uint8 RGB numpy array.
    """

    def __init__(self, sam: Sam, image: np.ndarray) -> None:
        super().__init__(image)
        self.predictor = SamPredictor(sam)
        self.predictor.set_image(image)

    @property
    def mask_threshold(self) -> float:
        return self.predictor.model.mask_threshold

    def decode(self, points: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        return _decode(self.predictor, self.predictor.transform.apply_coords(points, self.size))

    def upsample(self, logits: torch.Tensor) -> torch.Tensor:
        return _postprocess_masks(self.predictor.model, logits, self.predictor.input_size, self.size)
