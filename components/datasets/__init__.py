"""Datasets: the source registry, downloads, conversion to the canonical layout, readers, twins.

Canonical layout (docs/design.md §3): ``images/<split>/<id>.<ext>``, ``labels/<split>/<id>.png`` (uint8,
255 = ignore), ``classes.txt``, ``meta.json``.

The names below load on first use, so that components.datasets.registry (names and class files,
what components/config.py and the command line's checks read) imports without scipy and requests.
"""

from __future__ import annotations

from components.lazy import lazy_exports

_WHERE = {
    "BENCHMARKS": "registry",
    "BenchmarkSpec": "registry",
    "CanonicalDataset": "readers",
    "ChecksumMismatchError": "download",
    "DownloadError": "download",
    "InsufficientDiskSpaceError": "download",
    "ManualDownloadRequired": "download",
    "SOURCES": "registry",
    "SourceSpec": "registry",
    "UnknownDatasetError": "registry",
    "UnreadableImageError": "readers",
    "UnsafeArchiveError": "extract",
    "class_file_path": "registry",
    "convert_benchmark": "convert",
    "convert_image_folder": "convert",
    "download_source": "download",
    "get_benchmark": "registry",
    "get_source": "registry",
    "list_images": "readers",
    "prepare_dataset": "convert",
    "read_class_file": "registry",
    "read_image_rgb": "readers",
    "read_label_png": "readers",
    "safe_extract": "extract",
    "synthetic_scenes": "synthetic",
    "write_synthetic_benchmark": "synthetic",
    "write_synthetic_source": "synthetic",
    "write_synthetic_unlabelled": "synthetic",
}
__all__ = sorted(_WHERE)

__getattr__ = lazy_exports(__name__, _WHERE)
