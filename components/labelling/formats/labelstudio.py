"""Label Studio tasks with the masks as brush pre-annotations, and the labelling config they use.

Layout of a folder OUT:

- ``OUT/tasks.json``: a list of tasks, one per image: ``data.image`` (the image's URL) and one
  prediction (``model_version`` = what made the labels) whose results are one ``brushlabels``
  region per class present, ``value.format`` ``rle`` in Label Studio's brush encoding
  (:func:`brush_rle`), lossless. Import it into a project whose labelling interface is
  ``OUT/labelling_config.xml``: the masks open in place, ready to correct.
- ``OUT/labelling_config.xml``: ``<Image name="image" value="$image"/>`` and ``<BrushLabels
  name="label" toName="image">`` with one ``<Label>`` per class (its first name).

Images are served by Label Studio's local-file storage: ``data.image`` is
``/data/local-files/?d=<path>`` with the image's path relative to the folder the export ran in
(start Label Studio with ``LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED=true`` and
``LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT`` = that folder); an image outside it keeps its absolute
path without the leading ``/`` (document root ``/``).
"""

from __future__ import annotations

import colorsys
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any
from urllib.parse import quote
from xml.sax.saxutils import quoteattr

import numpy as np

from components.datasets.registry import display_name
from components.io import atomic_write_text, unlabelled_of
from components.labelling.formats.source import LabelledImage

__all__ = ["TASKS_FILE", "CONFIG_FILE", "LOCAL_FILES", "brush_rle", "labelling_config", "image_url",
           "write_label_studio"]

TASKS_FILE = "tasks.json"
CONFIG_FILE = "labelling_config.xml"
LOCAL_FILES = "/data/local-files/?d="
FROM_NAME, TO_NAME = "label", "image"
_RUN_BITS = (3, 4, 8, 16)  # bits of (run length - 1) for each of the 4 size classes


def brush_rle(mask: np.ndarray) -> list[int]:
    """Label Studio's brush RLE of a [H, W] bool mask (the RGBA image of the mask, 255 inside, as
    ``thi.ng/rle-pack`` packs it): 32 bits of value count (H * W * 4), 5 bits of word size - 1 (8),
    4 x 4 bits of run-size bits - 1 (3, 4, 8, 16), then per run of equal bytes: 1 (a repeat), 2 bits of
    size class, (length - 1) in that many bits, the byte; zero bits up to a whole byte. Returns the
    bytes as ints (the JSON ``rle`` list)."""
    flat = np.repeat(np.asarray(mask, bool).ravel(), 4).astype(np.uint8) * 255
    starts = np.concatenate([[0], np.flatnonzero(np.diff(flat)) + 1])
    lengths = np.diff(np.concatenate([starts, [flat.size]]))
    values = flat[starts]
    longest = 1 << _RUN_BITS[-1]
    if (lengths > longest).any():  # split a run longer than the widest size class holds
        pieces = -(-lengths // longest)
        values = np.repeat(values, pieces)
        lengths = np.concatenate([[longest] * (p - 1) + [n - longest * (p - 1)]
                                  for n, p in zip(lengths.tolist(), pieces.tolist(), strict=True)])
    sizes = np.searchsorted(np.array([1 << b for b in _RUN_BITS[:-1]]), lengths)  # n <= 8 -> 0, <= 16 -> 1, ...
    bits = [f"{flat.size:032b}", f"{8 - 1:05b}", "".join(f"{b - 1:04b}" for b in _RUN_BITS)]
    bits += [f"1{size:02b}{n - 1:0{_RUN_BITS[size]}b}{value:08b}"
             for n, size, value in zip(lengths.tolist(), sizes.tolist(), values.tolist(), strict=True)]
    text = "".join(bits)
    text += "0" * (-len(text) % 8)
    return list(int(text, 2).to_bytes(len(text) // 8, "big"))


def _colour(k: int) -> str:
    """A distinct hex colour per class (golden-ratio hues)."""
    r, g, b = colorsys.hsv_to_rgb((k * 0.618033988749895) % 1.0, 0.65, 0.95)
    return f"#{int(r * 255):02x}{int(g * 255):02x}{int(b * 255):02x}"


def labelling_config(classes: list[str]) -> str:
    """The labelling interface XML: the image and one brush label per class (its first name)."""
    labels = "".join(f"    <Label value={quoteattr(display_name(line))} background={quoteattr(_colour(k))}/>\n"
                     for k, line in enumerate(classes))
    return (f'<View>\n  <Image name="{TO_NAME}" value="${TO_NAME}" zoom="true"/>\n'
            f'  <BrushLabels name="{FROM_NAME}" toName="{TO_NAME}">\n{labels}  </BrushLabels>\n</View>\n')


def image_url(path: str, root: str | os.PathLike[str]) -> str:
    """The local-files URL of an image: its path relative to ``root`` (module docstring)."""
    absolute = Path(root, path).resolve()
    try:
        relative = absolute.relative_to(Path(root).resolve()).as_posix()
    except ValueError:
        relative = absolute.as_posix().lstrip("/")
    return LOCAL_FILES + quote(relative)


def _task(image: LabelledImage, classes: list[str], model_version: str, root: Path) -> dict[str, Any]:
    none = unlabelled_of(image.label)
    results = []
    for k in np.unique(image.label).tolist():
        if k == none:
            continue
        results.append({
            "id": f"c{k}", "from_name": FROM_NAME, "to_name": TO_NAME, "type": "brushlabels",
            "original_width": image.width, "original_height": image.height, "image_rotation": 0,
            "value": {"format": "rle", "rle": brush_rle(image.label == k), "brushlabels": [display_name(classes[k])]},
        })
    return {"data": {TO_NAME: image_url(image.path, root), "file_name": image.file_name},
            "predictions": [{"model_version": model_version, "result": results}]}


def write_label_studio(images: Iterable[LabelledImage], classes: list[str], out: str | os.PathLike[str],
                       description: str) -> dict[str, Any]:
    """Write the layout of this module's docstring into ``out``; returns counts."""
    out = Path(out)
    tasks = [_task(image, classes, description, Path.cwd()) for image in images]
    atomic_write_text(out / TASKS_FILE, json.dumps(tasks, separators=(",", ":")) + "\n")
    atomic_write_text(out / CONFIG_FILE, labelling_config(classes))
    return {"images": len(tasks), "regions": sum(len(t["predictions"][0]["result"]) for t in tasks),
            "file": TASKS_FILE, "config": CONFIG_FILE}
