"""Exact polygon outlines of pixel masks, traced along the pixel edges (no OpenCV).

A polygon here has its vertices on pixel *corners*: pixel (row r, column c) is the unit square
x in [c, c+1], y in [r, r+1], the convention of COCO polygons (``pycocotools`` rasterises a polygon
that runs along pixel edges back to exactly those pixels) and of Ultralytics' COCO-to-YOLO
converter (coordinates divided by the image's width and height). Tracing the edges instead of the
boundary pixels' centres (``cv2.findContours``) loses nothing: a one-pixel line stays one pixel
wide, and a rasterised outline gives back the mask exactly.

Every boundary edge is used by exactly one loop. Outer loops run clockwise on screen (y down:
positive shoelace area), holes counter-clockwise (negative). Where two pixels touch only at a
corner the tracer turns right, so each outer loop bounds one 4-connected part of the mask.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from scipy import ndimage

__all__ = ["Loop", "mask_loops", "bridged_polygons"]

# edge directions on screen (y down): right, down, left, up; (dx, dy) of each
_STEP = np.array([[1, 0], [0, 1], [-1, 0], [0, -1]], np.int64)


class Loop(NamedTuple):
    """One closed outline: ``points`` [N, 2] int64 (x, y) pixel corners, first point not repeated;
    ``hole`` True for the outline of a hole (counter-clockwise on screen)."""

    points: np.ndarray
    hole: bool


def _edges(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Directed boundary edges of a [H, W] bool mask: start corners [E, 2] (x, y) and directions [E]
    (interior on the right of each edge)."""
    padded = np.zeros((mask.shape[0] + 2, mask.shape[1] + 2), bool)
    padded[1:-1, 1:-1] = mask
    inside = mask
    starts, dirs = [], []
    # (neighbour that must be outside, start corner offset (dx, dy) from the pixel's top-left, direction)
    for neighbour, offset, direction in (
        (padded[:-2, 1:-1], (0, 0), 0),  # top edge, going right
        (padded[1:-1, 2:], (1, 0), 1),  # right edge, going down
        (padded[2:, 1:-1], (1, 1), 2),  # bottom edge, going left
        (padded[1:-1, :-2], (0, 1), 3),  # left edge, going up
    ):
        rows, cols = np.nonzero(inside & ~neighbour)
        starts.append(np.stack([cols + offset[0], rows + offset[1]], axis=1))
        dirs.append(np.full(len(rows), direction, np.int64))
    return np.concatenate(starts).astype(np.int64), np.concatenate(dirs)


def mask_loops(mask: np.ndarray) -> list[Loop]:
    """Every outline of a [H, W] bool mask (outer loops and holes), vertices only where the outline
    turns. The even-odd fill of all the loops is the mask exactly."""
    mask = np.asarray(mask, bool)
    if mask.ndim != 2:
        raise ValueError(f"a mask must be [H, W], got shape {mask.shape}")
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    if not len(rows):
        return []
    # trace inside the mask's bounding box (a class rarely fills its image), then shift back
    box = mask[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    shift = np.array([cols[0], rows[0]], np.int64)
    starts, dirs = _edges(box)
    width = box.shape[1] + 1
    start_key = starts[:, 1] * width + starts[:, 0]
    ends = starts + _STEP[dirs]
    end_key = ends[:, 1] * width + ends[:, 0]
    # out-edges of a corner sorted by (corner, direction): one, or two at a corner where pixels touch diagonally
    order = np.lexsort((dirs, start_key))
    sorted_keys = start_key[order]
    first = np.searchsorted(sorted_keys, end_key, side="left")
    count = np.searchsorted(sorted_keys, end_key, side="right") - first
    nxt = order[first]
    two = np.nonzero(count == 2)[0]
    if len(two):  # turn right: the out-edge whose direction is (incoming + 1) % 4
        a, b = order[first[two]], order[first[two] + 1]
        right = (dirs[two] + 1) % 4
        nxt[two] = np.where(dirs[a] == right, a, b)
    # keep a corner only where the direction changes: walk the turning edges alone, each to the next turn
    turning = dirs != dirs[_previous(nxt)]
    following = nxt.copy()
    for _ in range(max(box.shape) + 1):  # a straight run is at most one side of the box long
        ahead = ~turning[following]
        if not ahead.any():
            break
        following[ahead] = nxt[following[ahead]]
    successor = following.tolist()
    seen = bytearray(len(starts))
    chains = []
    for begin in np.flatnonzero(turning).tolist():
        if seen[begin]:
            continue
        chain = []
        e = begin
        while not seen[e]:
            seen[e] = 1
            chain.append(e)
            e = successor[e]
        chains.append(chain)
    # every loop's shoelace sum at once (y down: > 0 clockwise on screen, an outer loop)
    lengths = np.array([len(c) for c in chains])
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    points = starts[np.concatenate(chains)] + shift
    after = np.arange(len(points)) + 1
    after[offsets + lengths - 1] = offsets
    cross = points[:, 0] * points[after, 1] - points[after, 0] * points[:, 1]
    areas = np.add.reduceat(cross, offsets)
    return [Loop(p, bool(a < 0)) for p, a in zip(np.split(points, offsets[1:]), areas.tolist(), strict=True)]


def _previous(nxt: np.ndarray) -> np.ndarray:
    """The inverse of the successor permutation ``nxt``: the edge before each edge."""
    previous = np.empty_like(nxt)
    previous[nxt] = np.arange(len(nxt))
    return previous


def _mask_pixel(points: np.ndarray) -> tuple[int, int]:
    """(row, column) of the mask pixel right of a loop's first edge (on screen, y down)."""
    (x0, y0), (x1, y1) = points[0], points[1]
    dx, dy = int(np.sign(x1 - x0)), int(np.sign(y1 - y0))
    if dx == 1:  # going right: the pixel below
        return int(y0), int(x0)
    if dy == 1:  # going down: the pixel to the left
        return int(y0), int(x0) - 1
    if dx == -1:  # going left: the pixel above
        return int(y0) - 1, int(x0) - 1
    return int(y0) - 1, int(x0)  # going up: the pixel to the right


def bridged_polygons(mask: np.ndarray) -> list[np.ndarray]:
    """One [N, 2] (x, y) polygon per 4-connected part of a [H, W] bool mask, each hole joined to its
    part by a zero-width bridge (to the part's first vertex and back), the way formats without
    holes (YOLO-seg) carry them: an even-odd rasteriser (pycocotools) gives the mask back exactly."""
    mask = np.asarray(mask, bool)
    parts, _ = ndimage.label(mask)  # 4-connected; every loop hugs the pixels of one part
    outer_of: dict[int, np.ndarray] = {}
    holes_of: dict[int, list[np.ndarray]] = {}
    for loop in mask_loops(mask):
        part = int(parts[_mask_pixel(loop.points)])
        if loop.hole:
            holes_of.setdefault(part, []).append(loop.points)
        else:
            outer_of[part] = loop.points
    polygons = []
    for part, outer in sorted(outer_of.items()):
        pieces = [outer]
        for hole in holes_of.get(part, []):
            pieces += [outer[:1], hole, hole[:1], outer[:1]]
        polygons.append(np.concatenate(pieces))
    return polygons
