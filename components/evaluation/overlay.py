"""Overlay pictures for eyeballing predictions: image | ground truth | prediction(s), with a legend.

Label maps are blended over the image in fmbseg's class colours (components.io.class_colours:
class c takes PASCAL VOC's colour of c + 1, so no class is painted black, the colour of "no
class"); ignored pixels (255, or 65535 in a 16-bit map) show the image unchanged. The legend lists every class present in the ground truth or a prediction.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from components.io import UNLABELLED, atomic_write_bytes, class_colours, unlabelled_of

__all__ = ["IGNORE_INDEX", "PANEL_HEIGHT", "colorize", "jpeg_bytes", "overlay_picture", "overlay_height", "write_overlay"]

IGNORE_INDEX = UNLABELLED
_LABEL_DTYPES = (np.uint8, np.uint16)

PANEL_HEIGHT = 320  # pixels: the panels' default height; None draws them at the image's own size
_TITLE_HEIGHT = 22
_SWATCH = 14
_PAD = 6


def colorize(label: np.ndarray) -> np.ndarray:
    """[H, W] uint8 (255 = ignore) or uint16 (65535 = ignore) class map -> [H, W, 3] uint8 RGB in
    the class colours (ignored pixels black)."""
    if label.ndim != 2 or label.dtype not in _LABEL_DTYPES:
        raise ValueError(f"a label map must be [H, W] uint8 or uint16, got shape {label.shape} dtype {label.dtype}")
    return class_colours(256 if label.dtype == np.uint8 else 65536)[label]


def _blend(image: np.ndarray, label: np.ndarray, alpha: float) -> np.ndarray:
    """[H, W, 3] uint8: the label colours blended over the image; ignored pixels left as they are."""
    mixed = image.astype(np.float32) * (1.0 - alpha) + colorize(label).astype(np.float32) * alpha
    keep = (label == unlabelled_of(label))[..., None]
    return np.where(keep, image, mixed.round().astype(np.uint8))


def _check_label(name: str, label: np.ndarray, shape: tuple[int, int]) -> None:
    if label.dtype not in _LABEL_DTYPES or label.shape != shape:
        raise ValueError(f"{name} must be [{shape[0]}, {shape[1]}] uint8 or uint16, got {label.shape} {label.dtype}")


def overlay_picture(
    image: np.ndarray,
    ground_truth: np.ndarray | None,
    predictions: Mapping[str, np.ndarray],
    class_names: Sequence[str],
    *,
    panel_height: int | None = PANEL_HEIGHT,
    alpha: float = 0.55,
) -> Image.Image:
    """One RGB picture: image | ground truth | each prediction, titled, and a legend underneath.

    image: [H, W, 3] uint8 RGB; ground_truth: [H, W] uint8 (255 = ignore; uint16 with 65535 for
    more than 255 classes), or None for no ground truth panel (new images); predictions: title ->
    [H, W] class map of the same dtype (e.g. {"base": ...,
    "refined": ...}); class_names: one name per class index. Every panel is scaled to `panel_height` pixels high (labels with nearest neighbour),
    or drawn pixel for pixel at the image's size when `panel_height` is None (full resolution).
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be [H, W, 3] uint8, got {image.shape} {image.dtype}")
    shape = image.shape[:2]
    if ground_truth is not None:
        _check_label("ground_truth", ground_truth, shape)
    for title, pred in predictions.items():
        _check_label(f"prediction {title!r}", pred, shape)
    labels = dict(predictions) if ground_truth is None else {"ground truth": ground_truth, **predictions}
    if len({label.dtype for label in labels.values()}) > 1:
        raise ValueError("the ground truth and the predictions must all be uint8 or all uint16 maps")
    present = np.unique(np.concatenate([p.ravel() for p in labels.values()]))
    present = present[present != unlabelled_of(present)]
    if present.size and int(present.max()) >= len(class_names):
        raise ValueError(f"class index {int(present.max())} has no name ({len(class_names)} class names)")

    height = shape[0] if panel_height is None else panel_height
    width = max(1, round(shape[1] * height / shape[0]))
    panels = [("image", Image.fromarray(image).resize((width, height), Image.BILINEAR))]
    for title, label in labels.items():
        small = np.asarray(Image.fromarray(label).resize((width, height), Image.NEAREST))
        small_image = np.asarray(panels[0][1])
        panels.append((title, Image.fromarray(_blend(small_image, small, alpha))))

    font = ImageFont.load_default()
    total_width = len(panels) * width + (len(panels) - 1) * _PAD
    legend = _legend_rows(present.tolist(), class_names, font, total_width)
    line = _SWATCH + _PAD
    canvas = Image.new("RGB", (total_width, _TITLE_HEIGHT + height + _PAD + len(legend) * line), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (title, panel) in enumerate(panels):
        x = i * (width + _PAD)
        draw.text((x + 2, 4), title, fill="black", font=font)
        canvas.paste(panel, (x, _TITLE_HEIGHT))
    colours = class_colours(256 if present.dtype == np.uint8 else 65536)
    y = _TITLE_HEIGHT + height + _PAD
    for row in legend:
        for x, index in row:
            draw.rectangle([x, y, x + _SWATCH, y + _SWATCH], fill=tuple(int(c) for c in colours[index]),
                           outline="black")
            draw.text((x + _SWATCH + 4, y), class_names[index], fill="black", font=font)
        y += line
    return canvas


def overlay_height(size: str) -> int | None:
    """The panel height an ``--overlay-size`` option names: ``full`` (None: the image's own size) or
    a height in pixels. Raises ValueError with the accepted forms."""
    if size == "full":
        return None
    if size.isdigit() and int(size) >= 16:
        return int(size)
    raise ValueError(f"--overlay-size must be 'full' or a height in pixels (at least 16), got {size!r}")


def _legend_rows(
    indices: list[int], class_names: Sequence[str], font: ImageFont.ImageFont | ImageFont.FreeTypeFont,
    width: int,
) -> list[list[tuple[int, int]]]:
    """Legend entries laid out left to right, wrapped at `width`: rows of (x, class index)."""
    rows: list[list[tuple[int, int]]] = []
    x = width
    for index in indices:
        entry = _SWATCH + 4 + int(font.getlength(class_names[index])) + 2 * _PAD
        if x + entry > width and (x > 0 or not rows):
            rows.append([])
            x = 0
        rows[-1].append((x, index))
        x += entry
    return rows


def jpeg_bytes(picture: Image.Image, quality: int = 90) -> bytes:
    """An overlay picture as JPEG bytes (the form predict and ``label --images`` write)."""
    buf = io.BytesIO()
    picture.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def write_overlay(
    path: str | Path,
    image: np.ndarray,
    ground_truth: np.ndarray | None,
    predictions: Mapping[str, np.ndarray],
    class_names: Sequence[str],
    *,
    panel_height: int | None = PANEL_HEIGHT,
) -> Path:
    """Write :func:`overlay_picture` as a PNG to `path` atomically; returns the path."""
    picture = overlay_picture(image, ground_truth, predictions, class_names, panel_height=panel_height)
    buf = io.BytesIO()
    picture.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)
