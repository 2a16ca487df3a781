"""pool_labels against a per-patch loop over pixels."""

from __future__ import annotations

import pytest
import torch

from components.aligner.pooling import pool_labels


def ref_pool(label_map: torch.Tensor, grid: tuple[int, int], ignore_index: int = 255) -> torch.Tensor:
    """Loop over patches; pixel (y, x) -> patch (y*h//H, x*w//W); majority, ties -> smallest id."""
    h, w = grid
    height, width = label_map.shape
    votes: dict[tuple[int, int], dict[int, int]] = {}
    for y in range(height):
        for x in range(width):
            value = int(label_map[y, x])
            if value != ignore_index:
                cell = votes.setdefault((y * h // height, x * w // width), {})
                cell[value] = cell.get(value, 0) + 1
    out = torch.full((h, w), ignore_index, dtype=torch.int64)
    for (py, px), cell in votes.items():
        out[py, px] = min(cell, key=lambda c: (-cell[c], c))
    return out


@pytest.mark.parametrize(
    ("size", "grid"), [((28, 28), (2, 2)), ((30, 23), (4, 5)), ((17, 41), (6, 3)), ((5, 7), (8, 9))]
)
def test_matches_loop(size: tuple[int, int], grid: tuple[int, int]) -> None:
    g = torch.Generator().manual_seed(sum(size) + sum(grid))
    label_map = torch.randint(0, 4, size, generator=g).to(torch.uint8)
    label_map[torch.rand(size, generator=g) < 0.3] = 255
    label_map[: -(-size[0] // grid[0]), : -(-size[1] // grid[1])] = 255  # the top-left patch's pixels
    got = pool_labels(label_map, grid)
    assert got.dtype == torch.int64 and got.shape == grid
    assert torch.equal(got, ref_pool(label_map, grid))
    assert (got == 255).any()


def test_batched_equals_per_image() -> None:
    g = torch.Generator().manual_seed(0)
    maps = torch.randint(0, 6, (3, 21, 19), generator=g).to(torch.uint8)
    maps[1] = 255
    got = pool_labels(maps, (3, 4), num_classes=6)
    assert got.shape == (3, 3, 4)
    for b in range(3):
        assert torch.equal(got[b], ref_pool(maps[b], (3, 4)))
    assert (got[1] == 255).all()


def test_majority_and_ties() -> None:
    label_map = torch.tensor(
        [
            [3, 3, 1, 2],
            [1, 255, 2, 1],
        ],
        dtype=torch.uint8,
    )
    # Left patch: 3,3,1 -> 3 wins; right patch: 1,2,2,1 tie -> smaller id 1.
    assert pool_labels(label_map, (1, 2)).tolist() == [[3, 1]]


def test_custom_ignore_index_and_int_input() -> None:
    label_map = torch.tensor([[-1, -1, 0, 0], [-1, -1, 4, 0]])
    assert pool_labels(label_map, (1, 2), ignore_index=-1).tolist() == [[-1, 0]]


def test_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="integer"):
        pool_labels(torch.zeros(4, 4), (2, 2))
    with pytest.raises(ValueError, match=r"\[H, W\]"):
        pool_labels(torch.zeros(4, dtype=torch.uint8), (2, 2))
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        pool_labels(torch.full((4, 4), 3, dtype=torch.uint8), (2, 2), num_classes=3)
    with pytest.raises(ValueError, match="collides"):
        pool_labels(torch.full((4, 4), 3, dtype=torch.uint8), (2, 2), ignore_index=0)
    with pytest.raises(ValueError, match="grid"):
        pool_labels(torch.zeros(4, 4, dtype=torch.uint8), (0, 2))
