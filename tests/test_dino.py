"""DINOv2 patch features on the miniature Dinov2Model and Dinov2WithRegistersModel."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import Dinov2Model, Dinov2WithRegistersModel

from components.models.dino import dino_preprocess, patch_features
from components.models.registry import IMAGENET_MEAN, IMAGENET_STD, build_dino


@pytest.mark.parametrize(
    ("name", "cls", "registers"),
    [("mini-dino", Dinov2Model, 0), ("mini-dino-reg", Dinov2WithRegistersModel, 4)],
)
@pytest.mark.parametrize(("height", "width"), [(56, 84), (98, 98)])
def test_patch_features_are_the_patch_tokens(name, cls, registers, height, width):
    model = build_dino(name)
    assert type(model) is cls and getattr(model.config, "num_register_tokens", 0) == registers
    pixels = torch.randn(2, 3, height, width, generator=torch.Generator().manual_seed(0))
    feats = patch_features(model, pixels)
    h, w = height // 14, width // 14
    assert feats.shape == (2, h, w, model.config.hidden_size) and feats.dtype == torch.float32
    tokens = model(pixel_values=pixels).last_hidden_state
    assert tokens.shape[1] == 1 + registers + h * w
    for i in range(h):
        for j in range(w):
            torch.testing.assert_close(feats[:, i, j], tokens[:, 1 + registers + i * w + j])


def test_patch_features_bad_input():
    model = build_dino("mini-dino")
    with pytest.raises(ValueError, match="divisible by the patch size 14"):
        patch_features(model, torch.zeros(1, 3, 56, 60))
    with pytest.raises(TypeError, match="Dinov2"):
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
    with pytest.raises(ValueError, match="divisible by 14"):
        dino_preprocess(image, 50)
