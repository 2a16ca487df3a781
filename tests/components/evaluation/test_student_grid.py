"""A 16-pixel student (DINOv3) downstream: sliding windows padded to its patch grid, and label
pooling to its 16-pixel patches, each against a naive reference, with the miniature DINOv3."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from components.aligner.pooling import pool_labels
from components.evaluation.inference import patch_logits, predict_logits_batch
from components.models.dino import patch_features
from components.models.registry import build_dino, get_spec
from tests.components.aligner.test_pooling import ref_pool
from tests.components.evaluation.test_inference import naive_padded

STUDENT = "mini-dinov3"


@pytest.fixture(scope="module")
def student():
    return build_dino(STUDENT), get_spec(STUDENT)


@pytest.mark.parametrize(
    ("height", "width", "window", "stride"),
    [(80, 112, 64, 32), (100, 130, 80, 48), (40, 72, 64, 32)],  # on the grid; odd sides padded; below a window
)
def test_sliding_windows_on_the_16_pixel_grid_match_a_naive_loop(student, height, width, window, stride):
    model, spec = student
    assert spec.patch_size == 16
    seen: list[tuple[int, int]] = []

    def encode_fn(crops: torch.Tensor) -> torch.Tensor:
        seen.append(tuple(crops.shape[-2:]))
        return F.normalize(patch_features(model, crops), dim=-1)  # refuses sides off the 16-px grid

    image = torch.randn(3, height, width, generator=torch.Generator().manual_seed(height))
    prototypes = F.normalize(torch.randn(3, spec.embed_dim, generator=torch.Generator().manual_seed(1)), dim=-1)
    got = predict_logits_batch([image], encode_fn=encode_fn, prototypes=prototypes, window=window, stride=stride,
                         short_side=None, pad_to=spec.patch_size)[0]
    assert seen and all(h % 16 == 0 and w % 16 == 0 for h, w in seen)
    want = naive_padded(image, lambda crops: patch_logits(encode_fn(crops), prototypes), window, stride, 16)
    assert got.shape == (3, height, width)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("label_side", [224, 112, 150])
def test_labels_pool_to_the_students_16_pixel_patches(label_side):
    spec = get_spec(STUDENT)
    side = spec.image_size // spec.patch_size  # the feature grid of the student's input side
    g = torch.Generator().manual_seed(label_side)
    label_map = torch.randint(0, 5, (label_side, label_side + 16), generator=g).to(torch.uint8)
    label_map[torch.rand(label_map.shape, generator=g) < 0.2] = 255
    got = pool_labels(label_map, (side, side + 1))
    assert got.shape == (side, side + 1)
    assert torch.equal(got, ref_pool(label_map, (side, side + 1)))


def test_each_patch_of_a_16_pixel_grid_votes_over_its_own_16x16_pixels():
    spec = get_spec(STUDENT)
    p, grid = spec.patch_size, (3, 4)
    label_map = torch.full((grid[0] * p, grid[1] * p), 255, dtype=torch.uint8)
    label_map[p : 2 * p, 2 * p : 3 * p] = 7  # exactly patch (1, 2)
    label_map[p - 1, 2 * p] = 3  # one pixel above it: patch (0, 2)
    pooled = pool_labels(label_map, grid)
    assert pooled[1, 2] == 7 and pooled[0, 2] == 3 and int((pooled != 255).sum()) == 2
