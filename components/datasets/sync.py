"""Bring new unlabelled images from a source folder into the project's incoming folder.

Used by the nightly relabel-and-retrain job: only files that are not yet in the destination (by
relative path) are copied, each atomically, so an interrupted sync leaves no half image behind and
a rerun copies only what is still missing.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from components.io import atomic_path

__all__ = ["IMAGE_SUFFIXES", "sync_new_images"]

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"})


def sync_new_images(source: Path, dest: Path) -> list[Path]:
    """Copy the image files under ``source`` that ``dest`` lacks; return their paths in ``dest``.

    Files are matched by their path relative to ``source`` (sub-folders are kept). Hidden files and
    non-image suffixes are ignored. Existing destination files are never overwritten.
    """
    if not source.is_dir():
        raise FileNotFoundError(f"the image source folder {source} does not exist (nightly.source_dir)")
    dest.mkdir(parents=True, exist_ok=True)
    copied: list[Path] = []
    for root, dirs, files in os.walk(source):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            src = Path(root) / name
            if name.startswith(".") or src.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            target = dest / src.relative_to(source)
            if target.exists():
                continue
            with atomic_path(target, suffix=src.suffix) as tmp:
                shutil.copyfile(src, tmp)
            copied.append(target)
    return copied
