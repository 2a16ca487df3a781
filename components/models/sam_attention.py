"""SAM's image-encoder attention through PyTorch's fused ``scaled_dot_product_attention``.

segment_anything's ``Attention`` writes softmax(q k^T * scale + rel-pos bias) v out by hand, so on
a GPU every block materialises and normalises the attention matrix in separate kernels. The same
function with the decomposed relative-position terms passed as SDPA's additive mask runs in
PyTorch's fused kernels (flash / memory-efficient where they apply, the math kernel elsewhere):
same parameters, same state dict, outputs equal to float rounding (tests/components/models/test_sam.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from segment_anything.modeling.image_encoder import Attention, get_rel_pos

__all__ = ["SdpaAttention", "use_sdpa_attention"]


class SdpaAttention(Attention):
    """segment_anything ``Attention`` whose forward calls ``F.scaled_dot_product_attention``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, height, width, _ = x.shape
        heads = self.num_heads
        # q, k, v: [B * heads, H * W, head_dim], laid out as segment_anything lays them out
        qkv = self.qkv(x).reshape(batch, height * width, 3, heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.reshape(3, batch * heads, height * width, -1).unbind(0)
        bias = None
        if self.use_rel_pos:
            rel_h_table = get_rel_pos(height, height, self.rel_pos_h)  # [H, H, head_dim]
            rel_w_table = get_rel_pos(width, width, self.rel_pos_w)  # [W, W, head_dim]
            r_q = q.reshape(batch * heads, height, width, -1)
            rel_h = torch.einsum("bhwc,hkc->bhwk", r_q, rel_h_table)
            rel_w = torch.einsum("bhwc,wkc->bhwk", r_q, rel_w_table)
            bias = (rel_h[:, :, :, :, None] + rel_w[:, :, :, None, :]).reshape(
                batch * heads, height * width, height * width)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale)
        out = out.view(batch, heads, height, width, -1).permute(0, 2, 3, 1, 4).reshape(batch, height, width, -1)
        return self.proj(out)


def use_sdpa_attention(model: torch.nn.Module) -> int:
    """Switch every segment_anything ``Attention`` inside ``model`` to :class:`SdpaAttention` in
    place (parameters untouched); returns how many were switched."""
    switched = 0
    for module in model.modules():
        if type(module) is Attention:
            module.__class__ = SdpaAttention
            switched += 1
    return switched
