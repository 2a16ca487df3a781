"""Dense CLIP features: one crop embedding and a patch-feature map from one pass (docs/design.md §4).

The vision tower runs to its last block once; there it branches. The CLS branch is the unmodified
last block (so ``cls == model.encode_image(pixels)``); the patch branch is the last block modified
by ``mode``, then ``ln_post`` and ``proj``:

- ``vanilla``:   the block unchanged.
- ``maskclip``:  t = x + out_proj(v(ln_1 x));  out = t + mlp(ln_2 t)          (MaskCLIP)
- ``fmbseg``:    out = x + out_proj(v(ln_1 x))  -- no MLP, the paper's default
- ``clearclip``: out = out_proj(softmax(q qᵀ / √d_head) v)  -- no residual, no MLP (ClearCLIP)

v(·), q(·) are the value / query projections of the block's ``in_proj_weight`` / ``in_proj_bias``
per head; ``out_proj`` is applied to the concatenated heads. A LayerScale (``ls_1`` / ``ls_2``) of
the block scales the attention / MLP branch in every mode.

The text side lives here too: :func:`prototypes` is the project's one text-prototype function.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from open_clip.transformer import ResidualAttentionBlock, VisionTransformer

from components.models.dense_modes import DENSE_MODES
from components.models.preprocess import resize_normalize

__all__ = [
    "MODES",
    "DenseFeatures",
    "dense_features",
    "tiled_features",
    "prototypes",
    "clip_preprocess",
]

MODES: tuple[str, ...] = DENSE_MODES  # declared once, torch-free, in components/models/dense_modes.py


class DenseFeatures(NamedTuple):
    """cls: [B, D] crop embeddings (== encode_image, not normalised).
    patches: [B, S/p, S/p, D] patch features after ln_post and proj (not normalised)."""

    cls: torch.Tensor
    patches: torch.Tensor


def _refuse(why: str) -> TypeError:
    from components.models.registry import dense_text_specs

    return TypeError(
        f"dense features need {why}; Stage 1's dense detection runs the text spaces "
        f"{', '.join(dense_text_specs())} (SigLIP 2 and PE-Core end in an attention-pool head without a class "
        "token: they serve Stage 2's prototypes only)"
    )


def _vision_tower(model: open_clip.CLIP) -> VisionTransformer:
    visual = model.visual
    if not isinstance(visual, VisionTransformer):
        raise _refuse(f"an open_clip VisionTransformer tower, got {type(visual).__name__}")
    if visual.attn_pool is not None or visual.pool_type != "tok" or visual.final_ln_after_pool:
        raise _refuse("a class-token ViT (no attentional pool, pool_type 'tok', ln_post before pooling)")
    if visual.proj is None:
        raise _refuse("the vision tower's output projection (proj)")
    blocks = visual.transformer.resblocks
    if not all(type(b) is ResidualAttentionBlock for b in blocks):
        raise _refuse("open_clip's default ResidualAttentionBlock in every layer")
    return visual


def _heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[B, N, C] -> [B, heads, N, C / heads]."""
    b, n, c = x.shape
    return x.view(b, n, num_heads, c // num_heads).transpose(1, 2)


def _merge(x: torch.Tensor) -> torch.Tensor:
    """[B, heads, N, d] -> [B, N, heads · d]."""
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


def dense_features(model: open_clip.CLIP, pixels: torch.Tensor, mode: str = "fmbseg") -> DenseFeatures:
    """Crop embeddings and dense patch features of a batch of crops in one pass of the tower.

    pixels: [B, 3, S, S] float, normalised, at the model's input size S.
    Returns DenseFeatures(cls [B, D], patches [B, S/p, S/p, D]).
    """
    if mode not in MODES:
        raise ValueError(f"unknown dense feature mode {mode!r}; modes: {', '.join(MODES)}")
    visual = _vision_tower(model)
    size = tuple(visual.image_size)
    if pixels.ndim != 4 or pixels.shape[1] != 3 or tuple(pixels.shape[-2:]) != size:
        raise ValueError(f"pixels must be [B, 3, {size[0]}, {size[1]}], got {tuple(pixels.shape)}")
    gh, gw = visual.grid_size
    batch = pixels.shape[0]

    # Token path of VisionTransformer.forward up to the last block (batch-first [B, N, C]).
    x = visual.conv1(pixels.to(visual.conv1.weight.dtype))
    x = x.flatten(2).transpose(1, 2)
    cls_token = visual.class_embedding.to(x.dtype).expand(batch, 1, -1)
    x = torch.cat([cls_token, x], dim=1) + visual.positional_embedding.to(x.dtype)
    x = visual.ln_pre(visual.patch_dropout(x))
    blocks = visual.transformer.resblocks
    batch_first = visual.transformer.batch_first
    if not batch_first:
        x = x.transpose(0, 1)
    for block in blocks[:-1]:
        x = block(x)
    last = blocks[-1]

    if mode == "vanilla":
        y = last(x)
        if not batch_first:
            y = y.transpose(0, 1)
        tokens = visual.ln_post(y) @ visual.proj
        return DenseFeatures(tokens[:, 0], tokens[:, 1:].reshape(batch, gh, gw, -1))

    if not batch_first:
        x = x.transpose(0, 1)
    attn = last.attn
    heads = attn.num_heads
    q, k, v = F.linear(last.ln_1(x), attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    q, k, v = _heads(q, heads), _heads(k, heads), _heads(v, heads)

    # CLS branch: the unmodified block, evaluated for the class-token query only (its output does
    # not depend on the other queries), so it costs one token of attention and MLP.
    x_cls = x[:, :1]
    x_cls = x_cls + last.ls_1(attn.out_proj(_merge(F.scaled_dot_product_attention(q[:, :, :1], k, v))))
    x_cls = x_cls + last.ls_2(last.mlp(last.ln_2(x_cls)))
    cls = visual.ln_post(x_cls[:, 0]) @ visual.proj

    # Patch branch: the modified block.
    if mode == "clearclip":
        out = last.ls_1(attn.out_proj(_merge(F.scaled_dot_product_attention(q, q, v))))
    else:
        out = x + last.ls_1(attn.out_proj(_merge(v)))
        if mode == "maskclip":
            out = out + last.ls_2(last.mlp(last.ln_2(out)))
    patches = visual.ln_post(out[:, 1:]) @ visual.proj
    return DenseFeatures(cls, patches.reshape(batch, gh, gw, -1))


def tiled_features(
    model: open_clip.CLIP,
    pixels: torch.Tensor,
    grid: int,
    mode: str = "fmbseg",
    *,
    batch_size: int | None = None,
) -> DenseFeatures:
    """Dense features of a G×G tiling (docs/design.md §4 "Tiling"): G² non-overlapping S×S crops.

    pixels: [3, G·S, G·S] float, normalised. Crops go through :func:`dense_features` batched,
    ``batch_size`` crops per forward (default: all G² in one).
    Returns DenseFeatures(cls [G², D], crop r·G + c in row-major order; patches
    [G·S/p, G·S/p, D], crop (r, c) filling rows r·S/p … and columns c·S/p …).
    """
    if grid < 1:
        raise ValueError(f"grid must be >= 1, got {grid}")
    if (
        pixels.ndim != 3
        or pixels.shape[0] != 3
        or pixels.shape[1] != pixels.shape[2]
        or pixels.shape[1] % grid
    ):
        raise ValueError(f"pixels must be [3, G·S, G·S] with G = {grid}, got {tuple(pixels.shape)}")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1 or None, got {batch_size}")
    side = pixels.shape[1] // grid
    crops = (
        pixels.reshape(3, grid, side, grid, side).permute(1, 3, 0, 2, 4).reshape(grid * grid, 3, side, side)
    )
    chunk = batch_size or grid * grid
    parts = [dense_features(model, crops[i : i + chunk], mode) for i in range(0, grid * grid, chunk)]
    cls = torch.cat([p.cls for p in parts])
    patches = torch.cat([p.patches for p in parts])
    n, h, w, d = patches.shape
    stitched = patches.reshape(grid, grid, h, w, d).permute(0, 2, 1, 3, 4).reshape(grid * h, grid * w, d)
    return DenseFeatures(cls, stitched)


def prototypes(
    model: open_clip.CLIP | open_clip.CustomTextCLIP,
    tokenizer: Callable[[list[str]], torch.Tensor],
    class_names: Sequence[str],
    templates: Sequence[str] = ("a photo of a {}.",),
    *,
    batch_size: int = 256,
) -> torch.Tensor:
    """Text prototypes t_k of the classes: [K, D] float, L2-normalised.

    A class name may hold comma-separated synonyms ("person, man, woman"); its prototype is the
    normalised mean, over templates × synonyms, of the normalised text embeddings. Texts are
    encoded ``batch_size`` at a time. Any open_clip text tower serves (only ``encode_text`` is used).
    """
    if not class_names:
        raise ValueError("class_names is empty")
    if not templates or any("{}" not in t for t in templates):
        raise ValueError(f"every template must contain '{{}}', got {list(templates)}")
    texts: list[str] = []
    owner: list[int] = []
    for k, name in enumerate(class_names):
        synonyms = [s.strip() for s in name.split(",") if s.strip()]
        if not synonyms:
            raise ValueError(f"class {k} has an empty name: {name!r}")
        for synonym in synonyms:
            texts.extend(t.format(synonym) for t in templates)
            owner.extend([k] * len(templates))
    device = model.logit_scale.device  # CLIP and CustomTextCLIP (SigLIP 2, PE-Core) both hold it
    embeddings = torch.cat(
        [
            F.normalize(model.encode_text(tokenizer(texts[i : i + batch_size]).to(device)).float(), dim=-1)
            for i in range(0, len(texts), batch_size)
        ]
    )
    index = torch.tensor(owner, device=device)
    sums = torch.zeros(len(class_names), embeddings.shape[1], device=device).index_add_(0, index, embeddings)
    return F.normalize(sums, dim=-1)


def clip_preprocess(
    images: np.ndarray | torch.Tensor,
    size: int,
    mean: Sequence[float] = open_clip.OPENAI_DATASET_MEAN,
    std: Sequence[float] = open_clip.OPENAI_DATASET_STD,
) -> torch.Tensor:
    """CLIP pixels: [B, H, W, 3] or [H, W, 3] uint8 RGB -> [B, 3, size, size] float (bicubic
    resize of the whole image, no crop; OpenAI mean/std by default)."""
    return resize_normalize(images, size, mean, std)
