"""SAM's image-encoder attention through F.scaled_dot_product_attention equals segment_anything's own."""

from __future__ import annotations

import pytest
import torch
from segment_anything.modeling.image_encoder import Attention

from components.models.registry import build_sam
from components.models.sam_attention import SdpaAttention, use_sdpa_attention


@pytest.mark.parametrize(("size", "rel_pos"), [((4, 4), True), ((6, 5), True), ((7, 7), False)])
def test_sdpa_attention_equals_the_stock_block(size, rel_pos):
    torch.manual_seed(0)
    stock = Attention(32, num_heads=4, use_rel_pos=rel_pos, input_size=size if rel_pos else None)
    if rel_pos:  # non-zero relative-position tables, so the bias term is really checked
        torch.nn.init.normal_(stock.rel_pos_h, std=0.5)
        torch.nn.init.normal_(stock.rel_pos_w, std=0.5)
    fused = Attention(32, num_heads=4, use_rel_pos=rel_pos, input_size=size if rel_pos else None)
    fused.load_state_dict(stock.state_dict())
    assert use_sdpa_attention(fused) == 1 and isinstance(fused, SdpaAttention)
    x = torch.randn(2, *size, 32)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), stock(x), rtol=1e-5, atol=1e-5)


def test_built_sam_encodes_as_the_stock_encoder():
    sam = build_sam("mini-sam")
    blocks = [m for m in sam.image_encoder.modules() if isinstance(m, Attention)]
    assert blocks and all(type(m) is SdpaAttention for m in blocks)
    image = torch.randn(1, 3, sam.image_encoder.img_size, sam.image_encoder.img_size)
    with torch.no_grad():
        fused = sam.image_encoder(image)
        for m in blocks:
            m.__class__ = Attention
        stock = sam.image_encoder(image)
    torch.testing.assert_close(fused, stock, rtol=1e-5, atol=1e-5)
