"""Export formats that labelling tools import (``fmbseg export --format``).

``coco`` (COCO RLE, the default) of a Stage 1 store is components.labelling.export; every format
also writes from a ``fmbseg predict`` output folder. Each writer takes label maps at the images'
sizes (:mod:`.source`) and the class lines, and writes one folder (:mod:`.target`: a fresh folder,
put in place whole, never over a user's files).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from components.labelling.formats.coco import write_coco, write_coco_polygons
from components.labelling.formats.labelstudio import write_label_studio
from components.labelling.formats.source import LabelledImage
from components.labelling.formats.yolo import write_yolo_seg

__all__ = ["FORMATS", "DEFAULT_FORMAT", "Writer", "writer"]

Writer = Callable[[Iterable[LabelledImage], list[str], str, str], dict[str, Any]]
FORMATS: dict[str, Writer] = {
    "coco": write_coco,
    "coco-polygons": write_coco_polygons,
    "yolo-seg": write_yolo_seg,
    "label-studio": write_label_studio,
}
DEFAULT_FORMAT = "coco"


def writer(name: str) -> Writer:
    """The writer of format ``name``; raises ValueError naming the supported formats."""
    if name not in FORMATS:
        raise ValueError(f"unknown format {name!r}; supported: {', '.join(FORMATS)}")
    return FORMATS[name]
