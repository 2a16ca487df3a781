"""The demo world: one seeded visual identity per concept, shared by every synthetic twin.

A *concept* is what a class name means. Class lines of the shipped lists (components/datasets/
classes/) are matched across lists by their synonyms, so "car" in VOC, COCO-Stuff and Cityscapes,
or "motorbike" (VOC) and "motorcycle" (COCO), are one concept; two lines of the same list are never
merged (COCO-Stuff's "potted plant" and "plant-other, plant" stay two concepts, and a VOC line that
matches both joins the one with the longest shared synonym, "potted plant").

Each concept looks one way everywhere: an :class:`Identity` (two colours, a pattern, a period and
an angle) derived from a hash of its key, painted with a per-region phase, a small brightness
jitter and pixel noise. The stand-in foundation models (demoworld/standins/) are trained
on scenes of this world, and every twin (demoworld/synthetic.py) paints its regions with
it, so a model that learnt the world sees the twins' classes.
"""

from __future__ import annotations

import colorsys
import functools
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from components.datasets.registry import class_file_path, read_class_file

__all__ = [
    "PATTERNS",
    "WORLD_LISTS",
    "Identity",
    "concept_key",
    "concepts",
    "identity",
    "texture",
    "paint",
    "WorldScene",
    "world_scene",
]

# Lists whose lines define concepts, in priority order (the first list's lines are the first concepts).
WORLD_LISTS: tuple[str, ...] = (
    "cocostuff171",
    "coco_object",
    "cocostuff_stuff",
    "voc21",
    "context59",
    "cityscapes19",
    "ade150",
)
PATTERNS: tuple[str, ...] = ("flat", "stripes", "checker", "dots", "waves")
VOID = "void"  # pixels no class describes (unlabelled COCO, unannotated Context, ADE "other")


def _synonyms(line: str) -> list[str]:
    return [s.strip().lower() for s in line.split(",") if s.strip()]


@functools.cache
def _concept_table() -> tuple[dict[str, str], dict[tuple[str, ...], str], tuple[str, ...]]:
    """(synonym -> concept key, a shipped line's synonyms -> its concept key, all concept keys in
    order). A key is the first name of the first line that founded the concept; a line whose
    matches were all claimed by other lines of its list founds its own (ADE's "monitor" beside its
    "television receiver")."""
    owner: dict[str, str] = {}
    lines: dict[tuple[str, ...], str] = {}
    keys: list[str] = []
    for list_name in WORLD_LISTS:
        taken: set[str] = set()  # concepts already claimed by a line of this list
        for line in read_class_file(class_file_path(list_name)):
            names = _synonyms(line)
            matches = [(len(n), owner[n]) for n in names if n in owner and owner[n] not in taken]
            key = max(matches)[1] if matches else names[0]
            if not matches:
                keys.append(key)
            taken.add(key)
            lines.setdefault(tuple(names), key)
            for n in names:
                owner.setdefault(n, key)
    return owner, lines, tuple(keys)


def concept_key(name: str) -> str:
    """The concept a class line (or one synonym) means: a shipped line's own concept, else the
    concept of its longest known synonym; an unknown name is its own concept."""
    names = _synonyms(name)
    if not names:
        raise ValueError(f"empty class name {name!r}")
    owner, lines, _ = _concept_table()
    if tuple(names) in lines:  # a shipped line: the concept it was matched to
        return lines[tuple(names)]
    matches = [(len(n), owner[n]) for n in names if n in owner]
    return max(matches)[1] if matches else names[0]


def concepts() -> tuple[str, ...]:
    """Every concept of the shipped lists, in :data:`WORLD_LISTS` order."""
    return _concept_table()[2]


@dataclass(frozen=True)
class Identity:
    """How a concept looks: colours in [0, 255] RGB, a pattern of :data:`PATTERNS`, its period in
    pixels and angle in radians."""

    colour_a: tuple[float, float, float]
    colour_b: tuple[float, float, float]
    pattern: str
    period: float
    angle: float


def _unit(digest: bytes, i: int) -> float:
    return int.from_bytes(digest[2 * i : 2 * i + 2], "little") / 65535.0


@functools.cache
def identity(name: str) -> Identity:
    """The seeded identity of ``name``'s concept (synonyms and matched lines share it)."""
    key = concept_key(name) if name != VOID else VOID
    d = hashlib.sha256(f"fmbseg-world:{key}".encode()).digest()
    hue, sat, val = _unit(d, 0), 0.35 + 0.65 * _unit(d, 1), 0.3 + 0.7 * _unit(d, 2)
    a = colorsys.hsv_to_rgb(hue, sat, val)
    hue_b = (hue + 0.25 + 0.5 * _unit(d, 3)) % 1.0
    val_b = 0.2 + 0.8 * _unit(d, 4)
    b = colorsys.hsv_to_rgb(hue_b, 0.3 + 0.7 * _unit(d, 5), val_b)
    pattern = PATTERNS[d[12] % len(PATTERNS)] if key != VOID else "flat"
    period = (4.0, 6.0, 8.0, 11.0)[d[13] % 4]
    angle = (0.0, np.pi / 4, np.pi / 2, 3 * np.pi / 4)[d[14] % 4]
    return Identity(tuple(255 * c for c in a), tuple(255 * c for c in b), pattern, period, angle)


def texture(ident: Identity, shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """[H, W, 3] float image of one identity over a whole canvas, with a random phase and a small
    brightness jitter (the caller keeps the pixels of its region)."""
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    phase = rng.uniform(0, ident.period, size=2)
    u = (xx + phase[0]) * np.cos(ident.angle) + (yy + phase[1]) * np.sin(ident.angle)
    v = -(xx + phase[0]) * np.sin(ident.angle) + (yy + phase[1]) * np.cos(ident.angle)
    p = ident.period
    if ident.pattern == "flat":
        mix = np.zeros((h, w), np.float32)
    elif ident.pattern == "stripes":
        mix = ((u % p) < p / 2).astype(np.float32)
    elif ident.pattern == "checker":
        mix = (((u // (p / 2)) + (v // (p / 2))) % 2).astype(np.float32)
    elif ident.pattern == "dots":
        mix = (((u % p) - p / 2) ** 2 + ((v % p) - p / 2) ** 2 < (p / 3.2) ** 2).astype(np.float32)
    else:  # waves: a smooth sinusoid
        mix = 0.5 + 0.5 * np.sin(2 * np.pi * u / p).astype(np.float32)
    a, b = np.asarray(ident.colour_a, np.float32), np.asarray(ident.colour_b, np.float32)
    img = a[None, None] * (1 - mix[..., None]) + b[None, None] * mix[..., None]
    return img * rng.uniform(0.9, 1.1)


def paint(
    region_map: np.ndarray, names: Sequence[str], rng: np.random.Generator, *, noise: float = 10.0
) -> np.ndarray:
    """The image of a scene: region ``i`` of ``region_map`` ([H, W] int, values index ``names``)
    painted with ``identity(names[i])``, plus seeded pixel noise. Returns [H, W, 3] uint8."""
    shape = region_map.shape
    image = np.zeros((*shape, 3), np.float32)
    for i in np.unique(region_map).tolist():
        where = region_map == i
        image[where] = texture(identity(names[i]), shape, rng)[where]
    image += rng.normal(0.0, noise, size=image.shape).astype(np.float32)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


@dataclass(frozen=True)
class WorldScene:
    """One scene for training the stand-ins.

    image: [H, W, 3] uint8. regions: [H, W] int64 region id (0 = the fill, then painting order;
    an id may be absent where later regions cover it). region_concepts: [R] concept index (into the
    ``vocabulary`` the scene was drawn from) of each region id.
    """

    image: np.ndarray
    regions: np.ndarray
    region_concepts: np.ndarray

    @property
    def concept_map(self) -> np.ndarray:
        """[H, W] int64 concept index of every pixel."""
        return self.region_concepts[self.regions]


def _shape_mask(rng: np.random.Generator, shape: tuple[int, int], min_side: int) -> np.ndarray:
    """A rectangle or an ellipse of random size and place."""
    h, w = shape
    bh = int(rng.integers(min_side, max(min_side + 1, int(h * 0.6))))
    bw = int(rng.integers(min_side, max(min_side + 1, int(w * 0.6))))
    y0, x0 = int(rng.integers(0, h - bh + 1)), int(rng.integers(0, w - bw + 1))
    mask = np.zeros(shape, bool)
    if rng.random() < 0.5:
        mask[y0 : y0 + bh, x0 : x0 + bw] = True
    else:
        yy, xx = np.mgrid[0:h, 0:w]
        cy, cx = y0 + bh / 2, x0 + bw / 2
        mask = ((yy - cy) / (bh / 2)) ** 2 + ((xx - cx) / (bw / 2)) ** 2 <= 1.0
    return mask


def world_scene(
    rng: np.random.Generator,
    vocabulary: Sequence[str],
    *,
    size: tuple[int, int] = (96, 128),
    num_regions: tuple[int, int] = (1, 5),
    min_side: int = 12,
) -> WorldScene:
    """A random scene of the world: a fill plus ``num_regions`` (inclusive range) rectangles and
    ellipses painted over each other, each of a concept drawn uniformly from ``vocabulary``."""
    k = int(rng.integers(num_regions[0], num_regions[1] + 1))
    picks = rng.integers(0, len(vocabulary), size=k + 1)
    regions = np.zeros(size, np.int64)
    for r in range(1, k + 1):
        regions[_shape_mask(rng, size, min_side)] = r
    image = paint(regions, [vocabulary[i] for i in picks], rng)
    return WorldScene(image, regions, picks.astype(np.int64))
