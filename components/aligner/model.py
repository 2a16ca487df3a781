"""The alignment module M of Stage 2 (paper §3.3): frozen encoder patch features -> CLIP text space.

``transformer`` is the paper's module: one pre-norm transformer block at the encoder width (the
self-attention lets each patch attend to the other patches of its image), then a linear map to the
text dimension. ``mlp`` and ``linear`` are the lighter ablations.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from components.aligner.settings import ALIGNER_KINDS, AlignerKind

__all__ = ["ALIGNER_KINDS", "Aligner"]


class _SelfAttention(nn.Module):
    """Multi-head self-attention over the patches of each image: [B, N, C] -> [B, N, C]."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)  # [B, heads, N, C/heads]
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class _Block(nn.Module):
    """Pre-norm transformer block: x + MHSA(LN(x)), then x + MLP(LN(x)) with MLP ratio 4 and GELU."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = _SelfAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class Aligner(nn.Module):
    """z = M(x): [B, N, in_dim] float patch features of B images -> [B, N, out_dim] embeddings.

    The output is not normalised: the losses and inference compare by cosine.
    ``aligner_config()`` returns the keyword arguments that rebuild the module, for checkpoints.
    """

    def __init__(self, in_dim: int, out_dim: int, *, kind: AlignerKind = "transformer", num_heads: int = 8) -> None:
        super().__init__()
        if kind not in ALIGNER_KINDS:
            raise ValueError(f"unknown aligner kind {kind!r}; known kinds: {list(ALIGNER_KINDS)}")
        if in_dim < 1 or out_dim < 1:
            raise ValueError(f"in_dim and out_dim must be positive; got {in_dim}, {out_dim}")
        if kind == "transformer" and (num_heads < 1 or in_dim % num_heads):
            raise ValueError(f"num_heads={num_heads} must be positive and divide in_dim={in_dim}")
        self.in_dim, self.out_dim, self.kind, self.num_heads = in_dim, out_dim, kind, num_heads
        if kind == "transformer":
            self.net = nn.Sequential(_Block(in_dim, num_heads), nn.Linear(in_dim, out_dim))
        elif kind == "mlp":
            self.net = nn.Sequential(nn.Linear(in_dim, in_dim), nn.GELU(), nn.Linear(in_dim, out_dim))
        else:
            self.net = nn.Linear(in_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 3 or x.shape[-1] != self.in_dim:
            raise ValueError(f"expected [B, N, {self.in_dim}] patch features; got shape {tuple(x.shape)}")
        return self.net(x)

    def aligner_config(self) -> dict[str, int | str]:
        """Keyword arguments that rebuild this module: ``Aligner(**aligner.aligner_config())``."""
        return {
            "in_dim": self.in_dim,
            "out_dim": self.out_dim,
            "kind": self.kind,
            "num_heads": self.num_heads,
        }
