"""Student encoder patch features on miniatures of DINOv2, DINOv2 with registers and DINOv3 ViT."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import (
    Dinov2Backbone,
    Dinov2Model,
    Dinov2WithRegistersBackbone,
    Dinov2WithRegistersModel,
    DINOv3ViTBackbone,
    DINOv3ViTModel,
)

from components.models.dino import dino_preprocess, patch_features
from components.models.registry import IMAGENET_MEAN, IMAGENET_STD, build_dino, get_spec

CLASSES = {
    "mini-dino": (Dinov2Model, Dinov2Backbone, 0),
    "mini-dino-reg": (Dinov2WithRegistersModel, Dinov2WithRegistersBackbone, 4),
    "mini-dinov3": (DINOv3ViTModel, DINOv3ViTBackbone, 4),
}


def _non_square(name: str) -> list[tuple[int, int]]:
    """Two non-square sizes and a square one, in patches of the spec."""
    p = get_spec(name).patch_size
    return [(4 * p, 6 * p), (7 * p, 3 * p), (5 * p, 5 * p)]


@pytest.mark.parametrize("name", sorted(CLASSES))
def test_patch_features_are_the_patch_tokens_at_non_square_sizes(name):
    cls, _, registers = CLASSES[name]
    model, spec = build_dino(name), get_spec(name)
    assert type(model) is cls and spec.prefix_tokens == 1 + registers
    for height, width in _non_square(name):
        pixels = torch.randn(2, 3, height, width, generator=torch.Generator().manual_seed(0))
        feats = patch_features(model, pixels)
        h, w = height // spec.patch_size, width // spec.patch_size
        assert feats.shape == (2, h, w, spec.embed_dim) and feats.dtype == torch.float32
        tokens = model(pixel_values=pixels).last_hidden_state
        assert tokens.shape[1] == spec.prefix_tokens + h * w
        for i in range(h):
            for j in range(w):
                torch.testing.assert_close(feats[:, i, j], tokens[:, spec.prefix_tokens + i * w + j])


@pytest.mark.parametrize("name", sorted(CLASSES))
def test_patch_features_equal_transformers_own_backbone_feature_map(name):
    """transformers' Backbone class drops the prefix tokens and reshapes to the grid itself: an
    independent reference for the layout (same weights, the last stage's layer-normed map)."""
    _, backbone_cls, _ = CLASSES[name]
    model = build_dino(name)
    backbone = backbone_cls(model.config.__class__(**{**model.config.to_dict(), "out_indices": [-1]})).eval()
    missing, unexpected = backbone.load_state_dict(model.state_dict(), strict=False)
    assert not missing, missing
    height, width = _non_square(name)[0]
    pixels = torch.randn(1, 3, height, width, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        (reference,) = backbone(pixel_values=pixels).feature_maps  # [B, C, h, w]
        torch.testing.assert_close(patch_features(model, pixels), reference.permute(0, 2, 3, 1))


def test_patch_features_bad_input():
    for name in ("mini-dino", "mini-dinov3"):
        p = get_spec(name).patch_size
        with pytest.raises(ValueError, match=f"divisible by the patch size {p}"):
            patch_features(build_dino(name), torch.zeros(1, 3, 4 * p, 4 * p + 2))
    with pytest.raises(TypeError, match="DINOv3ViTModel"):
        patch_features(torch.nn.Identity(), torch.zeros(1, 3, 56, 56))


def test_dino_preprocess():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
    pixels = dino_preprocess(image, (42, 56))
    assert pixels.shape == (1, 3, 42, 56) and pixels.dtype == torch.float32
    same = dino_preprocess(image[:28, :28], 28)[0]
    expected = (
        torch.from_numpy(image[:28, :28]).permute(2, 0, 1).float() / 255
        - torch.tensor(IMAGENET_MEAN)[:, None, None]
    ) / torch.tensor(IMAGENET_STD)[:, None, None]
    torch.testing.assert_close(same, expected)
