"""Trying the model on one uploaded image: the upload checked and decoded, the result as a table.

An upload is a file a stranger chose, so it is checked before any pixel is decoded: PIL reads only
the header to learn the size, and an image of more than ``max_pixels`` pixels is refused (a small
PNG or JPEG can declare a huge canvas: a "decompression bomb"). Then the image is decoded as
``fmbseg predict`` decodes its inputs (``read_image_rgb``: EXIF orientation applied, RGB).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from components.datasets.readers import UnreadableImageError, read_image_rgb
from components.datasets.registry import display_name
from components.io import class_colours
from components.segmenter import SegmentResult

__all__ = ["DEFAULT_MAX_PIXELS", "read_upload", "legend_rows"]

DEFAULT_MAX_PIXELS = 40_000_000
"""The pixel budget of an upload (a 40-megapixel photo decodes into 120 MB of RGB)."""


def read_upload(path: str | os.PathLike[str], *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """An uploaded image file -> [H, W, 3] uint8 RGB (EXIF orientation applied).

    Raises UnreadableImageError(path, reason) for a file that is not an image, is corrupt, or has
    more than `max_pixels` pixels (checked from the header, before decoding).
    """
    path = Path(path)
    try:
        with Image.open(path) as im:
            width, height = im.size
    except Image.DecompressionBombError as err:
        raise UnreadableImageError(path, f"too large to decode safely: {err}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        raise UnreadableImageError(path, "not an image (format not recognised)") from None
    if width * height > max_pixels:
        raise UnreadableImageError(
            path, f"too large to decode safely: {width} x {height} = {width * height:,} pixels, "
                  f"more than the budget of {max_pixels:,}")
    return read_image_rgb(path)


def legend_rows(result: SegmentResult, classes: Sequence[str]) -> list[dict[str, Any]]:
    """One row per class present in the result, largest share first: index, name (the first
    synonym), colour ("#rrggbb", the overlay's VOC colour), share (of the image's pixels, in [0, 1])
    and score (the mean cosine of the class's pixels to its prototype, in [-1, 1])."""
    colours = class_colours(256 if result.label_map.dtype == np.uint8 else 65536)
    rows = [{"index": k, "name": display_name(classes[k]), "colour": "#{:02x}{:02x}{:02x}".format(*colours[k]),
             "share": float(result.shares[k]), "score": float(result.scores[k])} for k in result.present]
    return sorted(rows, key=lambda r: (-r["share"], r["index"]))
