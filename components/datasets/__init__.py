"""Datasets: the source registry, downloads, conversion to the canonical layout, readers.

The benchmarks' synthetic twins are the demo world's (demoworld/synthetic.py), above this library.

Canonical layout (docs/design.md §3): ``images/<split>/<id>.<ext>``, ``labels/<split>/<id>.png`` (uint8,
255 = ignore), ``classes.txt``, ``meta.json``.
"""

from components.datasets.convert import convert_benchmark
from components.datasets.download import (
    ChecksumMismatchError,
    DownloadError,
    InsufficientDiskSpaceError,
    ManualDownloadRequired,
    download_source,
)
from components.datasets.extract import UnsafeArchiveError, safe_extract
from components.datasets.readers import (
    CanonicalDataset,
    UnreadableImageError,
    list_images,
    read_image_rgb,
    read_label_png,
)
from components.datasets.registry import (
    BENCHMARKS,
    SOURCES,
    BenchmarkSpec,
    SourceSpec,
    UnknownDatasetError,
    class_file_path,
    get_benchmark,
    get_source,
    read_class_file,
)

__all__ = [
    "BENCHMARKS",
    "SOURCES",
    "BenchmarkSpec",
    "SourceSpec",
    "UnknownDatasetError",
    "get_benchmark",
    "get_source",
    "class_file_path",
    "read_class_file",
    "download_source",
    "DownloadError",
    "ChecksumMismatchError",
    "InsufficientDiskSpaceError",
    "ManualDownloadRequired",
    "safe_extract",
    "UnsafeArchiveError",
    "convert_benchmark",
    "CanonicalDataset",
    "UnreadableImageError",
    "list_images",
    "read_image_rgb",
    "read_label_png",
]
