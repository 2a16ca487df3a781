"""What an export reads: label maps at the images' original sizes, from a Stage 1 store (one variant)
or from a ``fmbseg predict`` output folder, one image at a time."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import NamedTuple

import numpy as np

from components.io import decode_label_png
from components.labelling.export import resize_nearest
from components.labelling.store import PseudoLabels
from components.predictions import CLASSES_FILE, PREDICTIONS_FILE

__all__ = ["LabelledImage", "is_predict_folder", "predict_classes", "predict_images", "store_images"]


class LabelledImage(NamedTuple):
    """One image's labels: ``file_name`` (its path under its image folder, the COCO ``file_name``),
    ``path`` (the image file as the labelling run saw it), original ``height`` and ``width``, and
    ``label`` [height, width] uint8 (255 = no class) or uint16 (65535), class index per pixel."""

    file_name: str
    path: str
    height: int
    width: int
    label: np.ndarray


def store_images(labels: PseudoLabels, variant: str) -> Iterator[LabelledImage]:
    """A Stage 1 store's ``variant`` maps, resized to the images' sizes (as ``fmbseg export`` resizes
    them), read one shard at a time: shard by shard, by image id within a shard."""
    for shard in labels.iter_shards(columns=["image_id", "image_path", "height", "width", variant]):
        for row in shard.sort_values("image_id").itertuples(index=False):
            height, width = int(row.height), int(row.width)
            yield LabelledImage(f"{row.image_id}{PurePosixPath(row.image_path).suffix}", row.image_path, height,
                                width, resize_nearest(decode_label_png(getattr(row, variant)), height, width))


def is_predict_folder(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a ``fmbseg predict`` output folder (it holds predictions.jsonl)."""
    return (Path(path) / PREDICTIONS_FILE).is_file()


def predict_classes(folder: str | os.PathLike[str]) -> list[str]:
    """The class lines of a predict output folder (its classes.txt)."""
    return (Path(folder) / CLASSES_FILE).read_text(encoding="utf-8").splitlines()


def predict_images(folder: str | os.PathLike[str]) -> Iterator[LabelledImage]:
    """A predict output folder's label maps (already at the images' sizes), in its records' order."""
    folder = Path(folder)
    for line in (folder / PREDICTIONS_FILE).read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        record = json.loads(line)
        label = decode_label_png((folder / record["output"]).read_bytes())
        file_name = str(PurePosixPath(record["output"]).with_suffix(PurePosixPath(record["source"]).suffix))
        yield LabelledImage(file_name, record["source"], int(record["height"]), int(record["width"]), label)
