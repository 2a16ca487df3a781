"""Dense CLIP features, tiling and text prototypes on miniature open_clip CLIPs, against naive references."""

from __future__ import annotations

import math

import numpy as np
import open_clip
import pytest
import torch

from components.models.clip_dense import (
    MODES,
    clip_preprocess,
    dense_features,
    prototypes,
    tiled_features,
)
from components.models.registry import build_clip


@pytest.fixture(scope="module")
def bundle():
    return build_clip("mini-clip")


@pytest.fixture(scope="module")
def layerscale_clip() -> open_clip.CLIP:
    """A miniature CLIP whose blocks carry LayerScale (ls_1 / ls_2), with non-trivial gammas."""
    torch.manual_seed(3)
    model = open_clip.CLIP(
        embed_dim=24,
        vision_cfg={
            "image_size": 48,
            "patch_size": 16,
            "width": 48,
            "head_width": 16,
            "layers": 2,
            "ls_init_value": 0.1,
        },
        text_cfg={"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    )
    for block in model.visual.transformer.resblocks:
        block.ls_1.gamma.data.uniform_(0.5, 1.5)
        block.ls_2.gamma.data.uniform_(0.5, 1.5)
    return model.eval().requires_grad_(False)


def _pixels(model: open_clip.CLIP, batch: int, seed: int = 0) -> torch.Tensor:
    size = model.visual.image_size[0]
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _last_block_input(model: open_clip.CLIP, pixels: torch.Tensor) -> torch.Tensor:
    """Input of the last vision block, captured from open_clip's own forward: [B, N, C]."""
    captured = {}
    last = model.visual.transformer.resblocks[-1]
    handle = last.register_forward_pre_hook(lambda module, args: captured.setdefault("x", args[0]))
    model.encode_image(pixels)
    handle.remove()
    x = captured["x"]
    return x if model.visual.transformer.batch_first else x.transpose(0, 1)


def _naive_last_block(block, x: torch.Tensor, mode: str) -> torch.Tensor:
    """The paper's last-block variants written head by head from in_proj / out_proj (x: [B, N, C])."""
    c = x.shape[-1]
    heads = block.attn.num_heads
    d = c // heads
    w, b = block.attn.in_proj_weight, block.attn.in_proj_bias
    h = block.ln_1(x)
    q = h @ w[:c].T + b[:c]
    k = h @ w[c : 2 * c].T + b[c : 2 * c]
    v = h @ w[2 * c :].T + b[2 * c :]
    per_head = []
    for i in range(heads):
        qi, ki, vi = (t[..., i * d : (i + 1) * d] for t in (q, k, v))
        if mode == "vanilla":
            per_head.append(torch.softmax(qi @ ki.transpose(1, 2) / math.sqrt(d), dim=-1) @ vi)
        elif mode == "clearclip":
            per_head.append(torch.softmax(qi @ qi.transpose(1, 2) / math.sqrt(d), dim=-1) @ vi)
        else:
            per_head.append(vi)
    attn_out = block.ls_1(
        torch.cat(per_head, dim=-1) @ block.attn.out_proj.weight.T + block.attn.out_proj.bias
    )
    if mode == "clearclip":
        return attn_out
    t = x + attn_out
    if mode in ("vanilla", "maskclip"):
        t = t + block.ls_2(block.mlp(block.ln_2(t)))
    return t


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("which", ["mini-clip", "layerscale"])
def test_dense_features_match_naive_formulas(bundle, layerscale_clip, mode, which):
    model = bundle.model if which == "mini-clip" else layerscale_clip
    pixels = _pixels(model, 3)
    feats = dense_features(model, pixels, mode)
    visual = model.visual
    gh, gw = visual.grid_size
    out = _naive_last_block(visual.transformer.resblocks[-1], _last_block_input(model, pixels), mode)
    expected = (visual.ln_post(out[:, 1:]) @ visual.proj).reshape(3, gh, gw, -1)
    assert feats.patches.shape == (3, gh, gw, model.text_projection.shape[1])
    torch.testing.assert_close(feats.patches, expected, atol=1e-5, rtol=1e-4)
    # The CLS branch is the unmodified block whatever the mode: the crop embedding.
    torch.testing.assert_close(feats.cls, model.encode_image(pixels), atol=1e-5, rtol=1e-4)


def test_modes_differ(bundle):
    pixels = _pixels(bundle.model, 2)
    outs = {mode: dense_features(bundle.model, pixels, mode).patches for mode in MODES}
    for a in MODES:
        for b in MODES:
            if a < b:
                assert not torch.allclose(outs[a], outs[b], atol=1e-4), (a, b)


def test_vanilla_patches_equal_open_clip_tokens(bundle):
    model = bundle.model
    pixels = _pixels(model, 2, seed=1)
    model.visual.output_tokens = True
    try:
        pooled, tokens = model.visual(pixels)
    finally:
        model.visual.output_tokens = False
    feats = dense_features(model, pixels, "vanilla")
    gh, gw = model.visual.grid_size
    torch.testing.assert_close(feats.patches, (tokens @ model.visual.proj).reshape(2, gh, gw, -1))
    torch.testing.assert_close(feats.cls, pooled)


def test_dense_features_bad_input(bundle):
    pixels = _pixels(bundle.model, 1)
    with pytest.raises(ValueError, match="vanilla, maskclip, fmbseg, clearclip"):
        dense_features(bundle.model, pixels, "sclip")
    with pytest.raises(ValueError, match=r"\[B, 3, 64, 64\]"):
        dense_features(bundle.model, pixels[..., :32, :32])


@pytest.mark.parametrize("batch_size", [None, 3])
def test_tiled_features_equal_stitched_crops(bundle, batch_size):
    model, grid = bundle.model, 2
    size = model.visual.image_size[0]
    p = size // model.visual.patch_size[0]
    image = torch.randn(3, grid * size, grid * size, generator=torch.Generator().manual_seed(5))
    tiled = tiled_features(model, image, grid, "fmbseg", batch_size=batch_size)
    d = model.text_projection.shape[1]
    assert tiled.cls.shape == (grid * grid, d)
    assert tiled.patches.shape == (grid * p, grid * p, d)
    for r in range(grid):
        for c in range(grid):
            crop = image[:, r * size : (r + 1) * size, c * size : (c + 1) * size][None]
            ref = dense_features(model, crop, "fmbseg")
            torch.testing.assert_close(tiled.cls[r * grid + c], ref.cls[0], atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(
                tiled.patches[r * p : (r + 1) * p, c * p : (c + 1) * p], ref.patches[0], atol=1e-5, rtol=1e-4
            )


def test_tiled_features_bad_input(bundle):
    with pytest.raises(ValueError, match="G = 3"):
        tiled_features(bundle.model, torch.zeros(3, 128, 128), 3)


def test_prototypes_match_naive_mean_of_normalised_embeddings(bundle):
    model, tok = bundle.model, bundle.tokenizer
    classes = ["cat", "dog, puppy", "traffic light"]
    templates = ("a photo of a {}.", "a drawing of the {}.")
    protos = prototypes(model, tok, classes, templates, batch_size=2)
    assert protos.shape == (3, model.text_projection.shape[1])
    torch.testing.assert_close(protos.norm(dim=-1), torch.ones(3))
    for k, name in enumerate(classes):
        embs = []
        for synonym in [s.strip() for s in name.split(",")]:
            for t in templates:
                e = model.encode_text(tok([t.format(synonym)]))[0]
                embs.append(e / e.norm())
        mean = torch.stack(embs).mean(0)
        torch.testing.assert_close(protos[k], mean / mean.norm(), atol=1e-5, rtol=1e-4)


def test_prototypes_bad_input(bundle):
    with pytest.raises(ValueError, match="empty name"):
        prototypes(bundle.model, bundle.tokenizer, ["cat", " , "])
    with pytest.raises(ValueError, match="template"):
        prototypes(bundle.model, bundle.tokenizer, ["cat"], ("a photo",))


def test_tokenizer_is_open_clip_bpe(bundle):
    tokens = bundle.tokenizer(["a photo of a cat.", "dog"])
    assert tokens.dtype == torch.long and tokens.shape == (2, 77)
    torch.testing.assert_close(tokens, open_clip.tokenize(["a photo of a cat.", "dog"]))


def test_clip_preprocess():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    mean, std = open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD
    same = clip_preprocess(image, 64)
    expected = (
        torch.from_numpy(image).permute(2, 0, 1).float() / 255 - torch.tensor(mean)[:, None, None]
    ) / torch.tensor(std)[:, None, None]
    assert same.shape == (1, 3, 64, 64) and same.dtype == torch.float32
    torch.testing.assert_close(same[0], expected)
    resized = clip_preprocess(np.stack([image, image]), 32)
    assert resized.shape == (2, 3, 32, 32)
    flat = np.full((40, 50, 3), 200, dtype=np.uint8)  # a constant picture stays constant after resizing
    torch.testing.assert_close(
        clip_preprocess(flat, 32)[0, :, 5, 7], (200 / 255 - torch.tensor(mean)) / torch.tensor(std)
    )
    with pytest.raises(ValueError, match="uint8"):
        clip_preprocess(image.astype(np.float32), 32)
