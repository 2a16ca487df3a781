"""Ultralytics YOLO-seg: one text file of normalised polygons per image and a ``data.yaml``.

Layout of a folder OUT:

- ``OUT/labels/<file name without extension>.txt``: one line per 4-connected part of each class
  present, ``<class index> x1 y1 x2 y2 ...`` with x / width and y / height of the part's outline on
  pixel corners (the scale of Ultralytics' own COCO converter), 6 decimals. A hole is joined to its
  part by a zero-width bridge (outline.bridged_polygons). An image without labels gets an empty file
  (Ultralytics' "background image").
- ``OUT/images/<file name>``: a symbolic link to the image where the image file is found from the
  current folder (Ultralytics finds a label by swapping ``images`` for ``labels`` in the image's
  path), none where it is not.
- ``OUT/data.yaml``: ``train`` and ``val`` (``images``) and ``names`` ({index: the class line's
  first name}); no ``path``, so Ultralytics resolves ``images`` next to the file wherever OUT moves.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from components.datasets.registry import display_name
from components.io import atomic_write_text, unlabelled_of
from components.labelling.formats.outline import bridged_polygons
from components.labelling.formats.source import LabelledImage

__all__ = ["DATA_YAML", "yolo_lines", "write_yolo_seg"]

DATA_YAML = "data.yaml"


def yolo_lines(label: np.ndarray) -> list[str]:
    """YOLO-seg lines of a [H, W] label map (uint8, 255 = none, or uint16, 65535): one per
    4-connected part of each class, coordinates normalised to [0, 1]."""
    height, width = label.shape
    scale = np.array([width, height], np.float64)
    none = unlabelled_of(label)
    lines = []
    for k in np.unique(label).tolist():
        if k == none:
            continue
        for polygon in bridged_polygons(label == k):
            coords = " ".join(f"{v:.6f}" for v in (polygon / scale).ravel())
            lines.append(f"{k} {coords}")
    return lines


def write_yolo_seg(images: Iterable[LabelledImage], classes: list[str], out: str | os.PathLike[str],
                   description: str) -> dict[str, Any]:
    """Write the layout of this module's docstring into ``out``; returns counts."""
    out = Path(out)
    written = parts = linked = 0
    for image in images:
        stem = str(Path(image.file_name).with_suffix(""))
        lines = yolo_lines(image.label)
        atomic_write_text(out / "labels" / f"{stem}.txt", "".join(f"{line}\n" for line in lines))
        source = Path(image.path)
        if source.is_file():
            link = out / "images" / image.file_name
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(source.resolve())
            linked += 1
        written += 1
        parts += len(lines)
    (out / "images").mkdir(exist_ok=True)
    data = {"train": "images", "val": "images",
            "names": {k: display_name(line) for k, line in enumerate(classes)}}
    atomic_write_text(out / DATA_YAML, f"# {description}\n" + yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
    return {"images": written, "polygons": parts, "images_linked": linked, "file": DATA_YAML}
