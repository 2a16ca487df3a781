"""SAM 2.1 (transformers ``Sam2Model``) as a mask model (components/models/masks.py, docs/design.md §4).

:class:`Sam2Image` embeds an image once (``Sam2Model.get_image_embeddings``: the Hiera backbone and
its FPN, with the "no memory" token a single image gets) and decodes point prompts against those
embeddings. The pixels and the prompt coordinates go through transformers' own ``Sam2Processor``
(resize to the model's square input, ImageNet normalisation; points scaled per axis to that
square), and the low-resolution logits return to the image's size through its
``post_process_masks`` (one bilinear resize), so a prompt decodes exactly as
``Sam2Model(pixel_values, input_points)`` does. The automatic masks are the interface's generator
(segment_anything's filters and records) over these decodes; on a square image they are the masks
of transformers' ``pipeline("mask-generation")`` with the same settings (tests/components/models/test_sam2.py).
"""

from __future__ import annotations

import numpy as np
import torch
from transformers import Sam2ImageProcessor, Sam2Model, Sam2Processor

from components.models.masks import MaskImage

__all__ = ["Sam2Image", "sam2_processor"]


def sam2_processor(model: Sam2Model) -> Sam2Processor:
    """The processor that fits ``model``: its square input side, low-resolution masks of a quarter
    of it, the image processor's defaults otherwise (those of the published SAM 2.1 repos)."""
    side = model.config.prompt_encoder_config.image_size
    image_processor = Sam2ImageProcessor(
        size={"height": side, "width": side}, mask_size={"height": side // 4, "width": side // 4}
    )
    return Sam2Processor(image_processor=image_processor)


class Sam2Image(MaskImage):
    """One image embedded by SAM 2.1's image encoder (exactly one encoder pass, at construction).

    image: [H, W, 3] uint8 RGB numpy array.
    """

    def __init__(self, model: Sam2Model, image: np.ndarray) -> None:
        super().__init__(image)
        self.model = model
        self.processor = sam2_processor(model)
        # the processor wraps the array with torch.from_numpy, which warns on a read-only one
        pixels = self.processor(images=np.require(image, requirements="W"), return_tensors="pt")["pixel_values"]
        weight = next(model.parameters())
        self.embeddings = model.get_image_embeddings(pixels.to(weight.device, weight.dtype))

    @property
    def mask_threshold(self) -> float:
        return 0.0

    @torch.no_grad()
    def decode(self, points: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        inputs = self.processor(
            input_points=torch.as_tensor(points, dtype=torch.float32)[None],
            input_labels=torch.ones(1, *points.shape[:2], dtype=torch.int64),
            original_sizes=[list(self.size)],
            return_tensors="pt",
        )
        device = self.embeddings[-1].device
        out = self.model(
            image_embeddings=self.embeddings,
            input_points=inputs["input_points"].to(device),
            input_labels=inputs["input_labels"].to(device),
            multimask_output=True,
        )
        return out.pred_masks[0], out.iou_scores[0]

    def upsample(self, logits: torch.Tensor) -> torch.Tensor:
        return self.processor.post_process_masks([logits], [self.size], binarize=False)[0]
