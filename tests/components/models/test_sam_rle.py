"""Batched RLE encoding of SAM's masks equals segment_anything's per-mask encoder."""

from __future__ import annotations

import torch
from segment_anything.utils.amg import mask_to_rle_pytorch

from components.models.sam import masks_to_rle


def test_masks_to_rle_equals_the_stock_encoder():
    torch.manual_seed(0)
    masks = torch.rand(6, 9, 7) > 0.5
    masks[0] = False  # empty
    masks[1] = True  # full
    masks[2, 0, 0] = True  # starts with a foreground pixel
    masks[3, 0, 0] = False
    assert masks_to_rle(masks) == mask_to_rle_pytorch(masks)
    assert masks_to_rle(masks[:0]) == mask_to_rle_pytorch(masks[:0]) == []
    assert masks_to_rle(masks[4:5]) == mask_to_rle_pytorch(masks[4:5])
