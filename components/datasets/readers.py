"""Read images and canonical datasets (docs/design.md §3 layout).

``read_image_rgb`` is the one place an image file becomes pixels: EXIF orientation applied, every
common mode (L, P, RGBA, CMYK, 16-bit, ...) converted to 8-bit RGB, and any file that cannot be
decoded (empty, truncated, not an image) raised as ``UnreadableImageError`` with its path and the
reason, so that Stage 1 can skip it and report it.
"""

from __future__ import annotations

import json
import os
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from components.datasets.registry import read_class_file
from components.io import decode_label_png

__all__ = [
    "IMAGE_EXTENSIONS",
    "UnreadableImageError",
    "list_images",
    "scan_image_folder",
    "read_image_rgb",
    "read_label_png",
    "CanonicalDataset",
]

IMAGE_EXTENSIONS: frozenset[str] = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif"})
# Modes PIL converts to RGB exactly as one expects (palette expanded, alpha dropped, CMYK and YCbCr
# through PIL's colour conversion). 16/32-bit integer modes are rescaled by hand (PIL clips them).
_DIRECT_MODES = frozenset(
    {"1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"}
)
_WIDE_INT_MODES = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N"})


class UnreadableImageError(Exception):
    """An image file that cannot be decoded (corrupt, truncated, empty, not an image)."""

    def __init__(self, path: str | Path, reason: str) -> None:
        super().__init__(f"cannot read image {path}: {reason}")
        self.path = Path(path)
        self.reason = reason


def list_images(folder: str | Path, *, recursive: bool = True) -> list[Path]:
    """Image files under ``folder`` (extensions in IMAGE_EXTENSIONS, any case), sorted by path.

    Hidden files and folders (name starting with '.') are skipped.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise NotADirectoryError(f"{folder} is not a directory of images")
    pattern = folder.rglob("*") if recursive else folder.glob("*")
    out = []
    for path in pattern:
        rel = path.relative_to(folder)
        if any(part.startswith(".") for part in rel.parts):
            continue
        if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file():
            out.append(path)
    return sorted(out)


def scan_image_folder(
    folder: str | Path, *, external_symlinks: str = "refuse"
) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Every file under ``folder``, as an image to use or with the reason it is not one.

    Returns (images sorted by path, [(path, reason)] sorted by path). Hidden files and folders
    (name starting with '.') are left out silently. A symbolic link to a file or folder outside
    ``folder`` is refused and reported, or followed with ``external_symlinks="follow"``; a link to
    a folder inside it is reported (its files are listed where they are); a dangling link, and a
    file whose extension is not in IMAGE_EXTENSIONS, are reported.
    """
    if external_symlinks not in ("refuse", "follow"):
        raise ValueError(f"external_symlinks must be 'refuse' or 'follow', got {external_symlinks!r}")
    folder = Path(folder)
    if not folder.is_dir():
        raise NotADirectoryError(f"{folder} is not a directory of images")
    root = os.path.realpath(folder)
    images: list[Path] = []
    skipped: list[tuple[Path, str]] = []
    pending = [folder]
    while pending:
        directory = pending.pop()
        for entry in sorted(os.scandir(directory), key=lambda e: e.name):
            path = Path(entry.path)
            if entry.name.startswith("."):
                continue
            if entry.is_symlink():
                target = os.path.realpath(path)
                if not os.path.exists(target):
                    skipped.append((path, f"dangling symbolic link to {os.readlink(path)}"))
                    continue
                outside = not (target == root or target.startswith(root + os.sep))
                if outside and external_symlinks == "refuse":
                    skipped.append((path, f"symbolic link to {target}, outside the image folder (refused; "
                                          "set label.external_symlinks: follow to label it)"))
                    continue
                if os.path.isdir(target) and not outside:
                    skipped.append((path, f"symlinked folder (to {target}): its files are labelled where they are"))
                    continue
            if entry.is_dir():
                pending.append(path)
            elif path.suffix.lower() not in IMAGE_EXTENSIONS:
                skipped.append((path, f"not an image file (extension {path.suffix or 'none'!r}; "
                                      f"supported: {', '.join(sorted(IMAGE_EXTENSIONS))})"))
            elif entry.is_file():
                images.append(path)
            else:
                skipped.append((path, "not a regular file"))
    return sorted(images), sorted(skipped)


def _int32_format(im: Image.Image) -> str | None:
    """'signed' / 'unsigned' for a 32-bit integer TIFF (its BitsPerSample and SampleFormat tags),
    None for anything else (read before any transpose: copies lose the tags)."""
    tags = getattr(im, "tag_v2", None)
    if im.mode != "I" or tags is None or tags.get(258) not in (32, (32,)):
        return None
    return "unsigned" if tags.get(339) in (1, (1,)) else "signed"


def _to_rgb(im: Image.Image, path: Path, int32: str | None = None) -> np.ndarray:
    if im.mode in _WIDE_INT_MODES:
        arr = np.asarray(im).astype(np.int64)
        if int32 is not None:
            # 32-bit integer TIFF: scale its range onto 8 bits (signed: 0..2^31-1; unsigned: 0..2^32-1).
            unsigned = int32 == "unsigned"
            gray = ((arr & 0xFFFFFFFF) >> 24) if unsigned else (np.clip(arr, 0, None) >> 23)
        else:
            # 16-bit data (I;16*, or I as PIL opens 16-bit PNGs): keep the top 8 bits.
            gray = np.clip(arr, 0, 65535) >> 8
        gray = gray.astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if im.mode not in _DIRECT_MODES:
        raise UnreadableImageError(
            path,
            f"unsupported image mode {im.mode!r}; supported: {', '.join(sorted(_DIRECT_MODES | _WIDE_INT_MODES))}",
        )
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    return np.array(im.convert("RGB"), dtype=np.uint8)  # writable: torch.as_tensor warns on read-only arrays


def read_image_rgb(path: str | Path, *, exif_orientation: bool = True) -> np.ndarray:
    """Decode an image file into [H, W, 3] uint8 RGB, EXIF orientation applied (unless
    ``exif_orientation`` is False: the pixels as stored, which is what a benchmark's label maps
    are drawn on).

    Alpha is dropped (colour channels kept as stored); 16-bit grayscale keeps its top 8 bits.
    Raises UnreadableImageError(path, reason) for an empty, truncated, corrupt or non-image file.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise UnreadableImageError(path, "file does not exist") from None
    if size == 0:
        raise UnreadableImageError(path, "empty file (0 bytes)")
    try:
        with Image.open(path) as im:
            im.load()
            int32 = _int32_format(im)
            if exif_orientation:
                im = ImageOps.exif_transpose(im)
            return _to_rgb(im, path, int32)
    except UnidentifiedImageError:
        raise UnreadableImageError(path, "not an image (format not recognised)") from None
    except Image.DecompressionBombError as err:
        raise UnreadableImageError(path, f"too large to decode safely: {err}") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise UnreadableImageError(path, f"corrupt or truncated ({type(err).__name__}: {err})") from None


def read_label_png(path: str | Path) -> np.ndarray:
    """A canonical label map: [H, W] uint8 class index per pixel, 255 = ignore (uint16 with
    65535 = ignore past 255 classes: PC-459, ADE-847)."""
    return decode_label_png(Path(path).read_bytes())


class CanonicalDataset:
    """A dataset in the canonical layout (docs/design.md §3), one split.

    root/images/<split>/<id>.<ext>, root/labels/<split>/<id>.png (absent for unlabelled sets),
    root/classes.txt, root/meta.json.
    """

    def __init__(self, root: str | Path, split: str) -> None:
        self.root = Path(root)
        self.split = split
        image_dir = self.root / "images" / split
        if not image_dir.is_dir():
            available = sorted(p.name for p in (self.root / "images").glob("*") if p.is_dir())
            raise FileNotFoundError(
                f"{self.root} has no split {split!r} (no {image_dir}); available splits: {available or 'none'}"
            )
        self._images: dict[str, Path] = {}
        for path in sorted(image_dir.iterdir()):
            if path.suffix.lower() not in IMAGE_EXTENSIONS:
                continue
            if path.stem in self._images:
                raise ValueError(f"two images share the id {path.stem!r} in {image_dir}")
            self._images[path.stem] = path
        self.has_labels = (self.root / "labels" / split).is_dir()

    def __len__(self) -> int:
        return len(self._images)

    def __repr__(self) -> str:
        return f"CanonicalDataset(root={str(self.root)!r}, split={self.split!r}, images={len(self)})"

    @property
    def ids(self) -> list[str]:
        """Image ids in sorted order."""
        return list(self._images)

    def image_path(self, image_id: str) -> Path:
        try:
            return self._images[image_id]
        except KeyError:
            raise KeyError(f"no image {image_id!r} in {self.root / 'images' / self.split}") from None

    def label_path(self, image_id: str) -> Path:
        if not self.has_labels:
            raise FileNotFoundError(f"{self.root} is unlabelled: it has no labels/{self.split}/")
        self.image_path(image_id)
        return self.root / "labels" / self.split / f"{image_id}.png"

    def read_image(self, image_id: str) -> np.ndarray:
        """[H, W, 3] uint8 RGB as stored: EXIF orientation is not applied, because the label maps
        are drawn on the stored pixels and carry no orientation."""
        return read_image_rgb(self.image_path(image_id), exif_orientation=False)

    def read_label(self, image_id: str) -> np.ndarray:
        """[H, W] uint8 class index per pixel, 255 = ignore (uint16, 65535 = ignore, past 255 classes)."""
        return read_label_png(self.label_path(image_id))

    @cached_property
    def classes(self) -> list[str]:
        """One entry per class index; an entry may hold comma-separated synonyms (first = the name)."""
        return read_class_file(self.root / "classes.txt")

    @cached_property
    def meta(self) -> dict[str, Any]:
        """meta.json: background handling, reduce-zero-label, sources and their checksums."""
        return json.loads((self.root / "meta.json").read_text(encoding="utf-8"))
