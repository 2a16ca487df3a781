"""Where every dataset comes from and which conventions each benchmark uses.

Two registries, one entry per name:

- ``SOURCES``: one downloadable file each (an archive or a single file) with everything a download
  and an extraction need: URLs (official first, then mirrors), the exact size and checksums where
  they are known, the archive kind, the license, and a path inside the extracted tree that proves
  the layout is the expected one.
- ``BENCHMARKS``: one canonical dataset each (docs/design.md §3), built by a converter from one or more
  sources, with the label conventions of the published protocols (TCL / mmseg).

No publisher of these datasets gives a sha256. Where a checksum is known it is a reference digest
(md5 or sha1) that other projects verify against; the first verified download of every source
records its sha256 in the lock file (``download.py``) and later downloads must match it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Literal

from components.hints import did_you_mean

__all__ = [
    "ArchiveKind",
    "BackgroundHandling",
    "SourceSpec",
    "BenchmarkSpec",
    "SOURCES",
    "BENCHMARKS",
    "CLASS_FILES",
    "class_list_path",
    "read_class_list",
    "UnknownDatasetError",
    "get_source",
    "get_benchmark",
    "class_file_path",
    "read_class_file",
]

ArchiveKind = Literal["zip", "tar", "tar.gz", "file"]
# class0: background is class 0 and is scored; ignored: background / "other" pixels are 255 and
# not scored; none: the dataset has no background class (only void / unlabelled pixels, 255).
BackgroundHandling = Literal["class0", "ignored", "none"]

GB = 1_000_000_000
MB = 1_000_000
# Images of the Detail JSON's val phase, the one list of PC-59 / PC-60 / PC-459: 5104, as counted by
# PyTorch-Encoding issue 155 and mmseg issue 394, and CAT-Seg's pascalcontext_val.txt (VOC2010's
# Main/val.txt, 5105 ids, without 2010_001606). Papers write 5105.
CONTEXT_VAL_IMAGES = 5_104


class UnknownDatasetError(ValueError):
    """A source or benchmark name that is not in the registry."""


@dataclass(frozen=True)
class SourceSpec:
    """One downloadable file and how to check and unpack it.

    size_bytes: exact size of the file in bytes, verified after download; None where unknown.
    approx_bytes: size estimate used to check free disk space when the exact size is unknown.
    extracted_bytes: disk space the extracted tree takes (approximate).
    sha256: published sha256 (None for all current sources: see checksum_note).
    reference_digests: {"md5" | "sha1": hex} recorded by other projects; verified when present.
    marker: a relative path inside the extracted tree that must exist (proves the layout; a
        ``root`` override must contain it).
    manual_instructions: set when the file needs a login; the download then reads it from the
        place these instructions name.
    """

    name: str
    filename: str
    urls: tuple[str, ...]
    archive: ArchiveKind
    marker: str
    approx_bytes: int
    extracted_bytes: int
    license: str
    homepage: str
    checksum_note: str
    benchmarks: tuple[str, ...]
    size_bytes: int | None = None
    sha256: str | None = None
    reference_digests: Mapping[str, str] = field(default_factory=dict)
    manual_instructions: str | None = None


@dataclass(frozen=True)
class BenchmarkSpec:
    """One canonical dataset (docs/design.md §3) and the protocol conventions its labels follow.

    split: the canonical split name written (``images/<split>/``); source_split: what the source
        calls it. num_classes: classes scored (rows of classes.txt).
    reduce_zero_label: raw label 0 becomes 255 and every other label k becomes k - 1 (mmseg).
    extra_background_class_file: class list whose prompts are added at evaluation time and mapped
        to background (PV-21 adds the COCO-Stuff stuff classes, paper §4).
    expected_images: number of images of the full split, checked when a full conversion ends.
    """

    name: str
    display_name: str
    sources: tuple[str, ...]
    converter: str
    split: str
    source_split: str
    num_classes: int
    background: BackgroundHandling
    reduce_zero_label: bool
    class_file: str
    labelled: bool
    expected_images: int | None
    protocol: str
    extra_background_class_file: str | None = None


_COCO_LICENSE = (
    "COCO: annotations CC BY 4.0; images under the Flickr terms of use of each image "
    "(https://cocodataset.org/#termsofuse)."
)
_VOC_LICENSE = (
    "PASCAL VOC: images from Flickr under their terms of use; annotations for research use "
    "(http://host.robots.ox.ac.uk/pascal/VOC/)."
)

SOURCES: dict[str, SourceSpec] = {
    s.name: s
    for s in (
        SourceSpec(
            name="coco_train2017",
            filename="train2017.zip",
            urls=("http://images.cocodataset.org/zips/train2017.zip",),
            archive="zip",
            marker="train2017",
            size_bytes=19_336_861_798,
            approx_bytes=19_336_861_798,
            extracted_bytes=19_400 * MB,
            reference_digests={"sha1": "10ad623668ab00c62c096f0ed636d6aff41faca5"},
            checksum_note="COCO publishes no checksum; sha1 as recorded by GluonCV's COCO download script.",
            license=_COCO_LICENSE,
            homepage="https://cocodataset.org/#download",
            benchmarks=("coco_train",),
        ),
        SourceSpec(
            name="coco_val2017",
            filename="val2017.zip",
            urls=("http://images.cocodataset.org/zips/val2017.zip",),
            archive="zip",
            marker="val2017",
            size_bytes=815_585_330,
            approx_bytes=815_585_330,
            extracted_bytes=820 * MB,
            reference_digests={"sha1": "4950dc9d00dbe1c933ee0170f5797584351d2a41"},
            checksum_note="COCO publishes no checksum; sha1 as recorded by GluonCV's COCO download script.",
            license=_COCO_LICENSE,
            homepage="https://cocodataset.org/#download",
            benchmarks=("cs171", "co80", "coco_object"),
        ),
        SourceSpec(
            name="cocostuff_maps",
            filename="stuffthingmaps_trainval2017.zip",
            urls=(
                "http://calvin.inf.ed.ac.uk/wp-content/uploads/data/cocostuffdataset/"
                "stuffthingmaps_trainval2017.zip",
            ),
            archive="zip",
            marker="val2017",
            approx_bytes=660 * MB,
            extracted_bytes=700 * MB,
            checksum_note="COCO-Stuff publishes no checksum or exact size; the lock file pins the first download.",
            license="COCO-Stuff annotations: CC BY 4.0 (https://github.com/nightrome/cocostuff).",
            homepage="https://github.com/nightrome/cocostuff#downloads",
            benchmarks=("cs171", "co80", "coco_object"),
        ),
        SourceSpec(
            name="voc2012",
            filename="VOCtrainval_11-May-2012.tar",
            urls=(
                "http://host.robots.ox.ac.uk/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar",
                "https://data.pjreddie.com/files/VOCtrainval_11-May-2012.tar",
            ),
            archive="tar",
            marker="VOCdevkit/VOC2012/ImageSets/Segmentation/val.txt",
            size_bytes=1_999_639_040,
            approx_bytes=1_999_639_040,
            extracted_bytes=2_000 * MB,
            reference_digests={"md5": "6cd6e144f989b92b3379bac3b3de84fd"},
            checksum_note="PASCAL publishes no checksum; md5 as recorded by torchvision's VOCSegmentation.",
            license=_VOC_LICENSE,
            homepage="http://host.robots.ox.ac.uk/pascal/VOC/voc2012/",
            benchmarks=("pv21", "pv20"),
        ),
        SourceSpec(
            name="voc2010",
            filename="VOCtrainval_03-May-2010.tar",
            urls=("http://host.robots.ox.ac.uk/pascal/VOC/voc2010/VOCtrainval_03-May-2010.tar",),
            archive="tar",
            marker="VOCdevkit/VOC2010/JPEGImages",
            approx_bytes=1_400 * MB,
            extracted_bytes=1_400 * MB,
            reference_digests={"md5": "da459979d0c395079b5c75ee67908abb"},
            checksum_note="PASCAL publishes no checksum; md5 as recorded by torchvision's VOC datasets.",
            license=_VOC_LICENSE,
            homepage="http://host.robots.ox.ac.uk/pascal/VOC/voc2010/",
            benchmarks=("pc59", "pc60", "pc459"),
        ),
        SourceSpec(
            name="context_json",
            filename="trainval_merged.json",
            urls=("https://codalabuser.blob.core.windows.net/public/trainval_merged.json",),
            archive="file",
            marker="trainval_merged.json",
            approx_bytes=700 * MB,
            extracted_bytes=700 * MB,
            reference_digests={"md5": "3c2d0c0656b7be9eb61928ffe885d8ce"},
            checksum_note=(
                "PASCAL Context (PASCAL in Detail) publishes no checksum; md5 as recorded by "
                "third-party torchvision-style loaders. The host has moved before: set "
                "datasets.context_json.url to a mirror if it fails."
            ),
            license="PASCAL Context annotations: research use (https://cs.stanford.edu/~roozbeh/pascal-context/).",
            homepage="https://cs.stanford.edu/~roozbeh/pascal-context/",
            benchmarks=("pc59", "pc60", "pc459"),
        ),
        SourceSpec(
            name="context_full",
            filename="trainval.tar.gz",
            urls=(
                "https://www.cs.stanford.edu/~roozbeh/pascal-context/trainval.tar.gz",
                "https://roozbehm.info/pascal-context/trainval.tar.gz",
            ),
            archive="tar.gz",
            marker="trainval",
            approx_bytes=40 * MB,
            extracted_bytes=600 * MB,
            checksum_note=(
                "PASCAL Context publishes no checksum or exact size and no project records one; the "
                "lock file pins the first download. The first URL has been down at times; the second "
                "is the authors' own mirror (CAT-Seg's README)."
            ),
            license="PASCAL Context annotations: research use (https://cs.stanford.edu/~roozbeh/pascal-context/).",
            homepage="https://cs.stanford.edu/~roozbeh/pascal-context/",
            benchmarks=("pc459",),
        ),
        SourceSpec(
            name="cityscapes_leftimg",
            filename="leftImg8bit_trainvaltest.zip",
            urls=(),
            archive="zip",
            marker="leftImg8bit/val",
            approx_bytes=11_600 * MB,
            extracted_bytes=11_600 * MB,
            checksum_note="Cityscapes needs a login; the lock file pins the sha256 of the first archive used.",
            license="Cityscapes: non-commercial research and teaching only (https://www.cityscapes-dataset.com/license/).",
            homepage="https://www.cityscapes-dataset.com/downloads/",
            benchmarks=("cityscapes",),
            manual_instructions=(
                "Cityscapes needs a free account. Log in at https://www.cityscapes-dataset.com/downloads/, "
                "download 'leftImg8bit_trainvaltest.zip' (11 GB, packageID=3) and place it at {path} "
                "(or set datasets.cityscapes_leftimg.root to the zip or to an extracted folder that "
                "contains leftImg8bit/val), then run the command again."
            ),
        ),
        SourceSpec(
            name="cityscapes_gtfine",
            filename="gtFine_trainvaltest.zip",
            urls=(),
            archive="zip",
            marker="gtFine/val",
            approx_bytes=250 * MB,
            extracted_bytes=1_000 * MB,
            checksum_note="Cityscapes needs a login; the lock file pins the sha256 of the first archive used.",
            license="Cityscapes: non-commercial research and teaching only (https://www.cityscapes-dataset.com/license/).",
            homepage="https://www.cityscapes-dataset.com/downloads/",
            benchmarks=("cityscapes",),
            manual_instructions=(
                "Cityscapes needs a free account. Log in at https://www.cityscapes-dataset.com/downloads/, "
                "download 'gtFine_trainvaltest.zip' (241 MB, packageID=1) and place it at {path} "
                "(or set datasets.cityscapes_gtfine.root to the zip or to an extracted folder that "
                "contains gtFine/val), then run the command again."
            ),
        ),
        SourceSpec(
            name="ade20k",
            filename="ADEChallengeData2016.zip",
            urls=("http://data.csail.mit.edu/places/ADEchallenge/ADEChallengeData2016.zip",),
            archive="zip",
            marker="ADEChallengeData2016/annotations/validation",
            approx_bytes=925 * MB,
            extracted_bytes=950 * MB,
            reference_digests={"sha1": "219e1696abb36c8ba3a3afe7fb2f4b4606a897c7"},
            checksum_note="MIT CSAIL publishes no checksum; sha1 as recorded by GluonCV / PyTorch-Encoding.",
            license="ADE20K / MIT Scene Parsing: research and educational use (https://groups.csail.mit.edu/vision/datasets/ADE20K/).",
            homepage="http://sceneparsing.csail.mit.edu/",
            benchmarks=("ade20k",),
        ),
        SourceSpec(
            name="ade20k_full",
            filename="ADE20K_2021_17_01.zip",
            urls=(),
            archive="zip",
            marker="ADE20K_2021_17_01/images/ADE/validation",
            approx_bytes=4_000 * MB,
            extracted_bytes=4_500 * MB,
            checksum_note="ADE20K (full) needs a login and publishes no checksum; the lock file pins the sha256 of the first archive used.",
            license="ADE20K: non-commercial research and educational use (https://groups.csail.mit.edu/vision/datasets/ADE20K/).",
            homepage="https://ade20k.csail.mit.edu/",
            benchmarks=("ade847",),
            manual_instructions=(
                "ADE20K (full) needs a free account. Request access at "
                "https://ade20k.csail.mit.edu/request_data/, download 'ADE20K_2021_17_01.zip' from "
                "the personal link you are sent and place it at {path} (or set "
                "datasets.ade20k_full.root to the zip or to an extracted folder that contains "
                "ADE20K_2021_17_01/images/ADE/validation), then run the command again."
            ),
        ),
    )
}

BENCHMARKS: dict[str, BenchmarkSpec] = {
    b.name: b
    for b in (
        BenchmarkSpec(
            name="coco_train",
            display_name="COCO train2017 (unlabelled)",
            sources=("coco_train2017",),
            converter="unlabelled",
            split="train",
            source_split="train2017",
            num_classes=171,
            background="none",
            reduce_zero_label=False,
            class_file="cocostuff171",
            labelled=False,
            expected_images=118_287,
            protocol="The unlabelled training images (paper §4); vocabulary: the 171 COCO-Stuff classes.",
        ),
        BenchmarkSpec(
            name="pv21",
            display_name="PV-21",
            sources=("voc2012",),
            converter="voc",
            split="val",
            source_split="val",
            num_classes=21,
            background="class0",
            reduce_zero_label=False,
            class_file="voc21",
            labelled=True,
            expected_images=1_449,
            protocol="VOC 2012 val SegmentationClass: background 0 + 20 classes, object boundaries (255) ignored.",
            extra_background_class_file="cocostuff_stuff",
        ),
        BenchmarkSpec(
            name="pv20",
            display_name="PV-20",
            sources=("voc2012",),
            converter="voc",
            split="val",
            source_split="val",
            num_classes=20,
            background="ignored",
            reduce_zero_label=True,
            class_file="voc20",
            labelled=True,
            expected_images=1_449,
            protocol="VOC 2012 val SegmentationClass without background: 0 and boundaries -> 255, k -> k-1.",
        ),
        BenchmarkSpec(
            name="pc59",
            display_name="PC-59",
            sources=("voc2010", "context_json"),
            converter="context",
            split="val",
            source_split="val",
            num_classes=59,
            background="ignored",
            reduce_zero_label=True,
            class_file="context59",
            labelled=True,
            expected_images=CONTEXT_VAL_IMAGES,
            protocol=(
                "PASCAL Context val (trainval_merged.json, phase 'val'): the 59 classes in sorted "
                "category-id order (mmseg PascalContextDataset59); unannotated pixels -> 255."
            ),
        ),
        BenchmarkSpec(
            name="pc60",
            display_name="PC-60",
            sources=("voc2010", "context_json"),
            converter="context",
            split="val",
            source_split="val",
            num_classes=60,
            background="class0",
            reduce_zero_label=False,
            class_file="context60",
            labelled=True,
            expected_images=CONTEXT_VAL_IMAGES,
            protocol=(
                "PASCAL Context val (trainval_merged.json, phase 'val'): background 0 (every pixel no "
                "annotation covers) + the 59 classes as 1..59 in sorted category-id order (mmseg "
                "PascalContextDataset)."
            ),
        ),
        BenchmarkSpec(
            name="pc459",
            display_name="PC-459",
            sources=("voc2010", "context_json", "context_full"),
            converter="context_full",
            split="val",
            source_split="val",
            num_classes=459,
            background="ignored",
            reduce_zero_label=True,
            class_file="context459",
            labelled=True,
            expected_images=CONTEXT_VAL_IMAGES,
            protocol=(
                "PASCAL Context full (trainval.tar.gz LabelMaps) on the val images of PC-59: the 459 "
                "labels.txt classes, 0 (unlabelled) -> 65535, k -> k-1; 16-bit labels (CAT-Seg / SAN)."
            ),
        ),
        BenchmarkSpec(
            name="co80",
            display_name="CO-80",
            sources=("coco_val2017", "cocostuff_maps"),
            converter="coco_thing80",
            split="val",
            source_split="val2017",
            num_classes=80,
            background="ignored",
            reduce_zero_label=False,
            class_file="coco80",
            labelled=True,
            expected_images=5_000,
            protocol="COCO-Stuff val2017 stuffthingmaps, the 80 thing classes; stuff and unlabelled -> 255.",
        ),
        BenchmarkSpec(
            name="coco_object",
            display_name="COCO-Object",
            sources=("coco_val2017", "cocostuff_maps"),
            converter="coco_object",
            split="val",
            source_split="val2017",
            num_classes=81,
            background="class0",
            reduce_zero_label=False,
            class_file="coco_object",
            labelled=True,
            expected_images=5_000,
            protocol=(
                "GroupViT/TCL COCO-Object: background 0 + the 80 thing classes; stuff and unlabelled "
                "pixels -> background 0."
            ),
        ),
        BenchmarkSpec(
            name="cs171",
            display_name="CS-171",
            sources=("coco_val2017", "cocostuff_maps"),
            converter="cocostuff171",
            split="val",
            source_split="val2017",
            num_classes=171,
            background="none",
            reduce_zero_label=False,
            class_file="cocostuff171",
            labelled=True,
            expected_images=5_000,
            protocol="COCO-Stuff-164k val2017: the 171 used ids mapped to 0..170 (mmseg order); unlabelled -> 255.",
        ),
        BenchmarkSpec(
            name="cityscapes",
            display_name="City",
            sources=("cityscapes_leftimg", "cityscapes_gtfine"),
            converter="cityscapes",
            split="val",
            source_split="val",
            num_classes=19,
            background="none",
            reduce_zero_label=False,
            class_file="cityscapes19",
            labelled=True,
            expected_images=500,
            protocol="Cityscapes val gtFine labelIds -> the 19 trainIds of cityscapesscripts; the rest -> 255.",
        ),
        BenchmarkSpec(
            name="ade20k",
            display_name="ADE",
            sources=("ade20k",),
            converter="ade20k",
            split="val",
            source_split="validation",
            num_classes=150,
            background="ignored",
            reduce_zero_label=True,
            class_file="ade150",
            labelled=True,
            expected_images=2_000,
            protocol="ADEChallengeData2016 validation, 150 classes with reduce-zero-label (0 'other' -> 255).",
        ),
        BenchmarkSpec(
            name="ade847",
            display_name="ADE-847",
            sources=("ade20k_full",),
            converter="ade_full",
            split="val",
            source_split="validation",
            num_classes=847,
            background="none",
            reduce_zero_label=False,
            class_file="ade847",
            labelled=True,
            expected_images=2_000,
            protocol=(
                "ADE20K_2021_17_01 validation, the 847 classes of MaskFormer / CAT-Seg: object index "
                "(R / 10) * 256 + G of each _seg.png -> its position among the 847; the rest -> 65535; "
                "16-bit labels at the annotation's resolution."
            ),
        ),
    )
}

CLASS_FILES: tuple[str, ...] = (
    "cocostuff171",
    "cocostuff_stuff",
    "coco80",
    "coco_object",
    "voc21",
    "voc20",
    "context59",
    "context60",
    "context459",
    "cityscapes19",
    "ade150",
    "ade847",
)


def get_source(name: str) -> SourceSpec:
    """The registry entry of source ``name``; an unknown name raises an error listing the known ones."""
    try:
        return SOURCES[name]
    except KeyError:
        raise UnknownDatasetError(
            f"unknown source {name!r}{did_you_mean(name, SOURCES)}; known sources: {', '.join(sorted(SOURCES))}"
        ) from None


def get_benchmark(name: str) -> BenchmarkSpec:
    """The registry entry of benchmark ``name``; an unknown name raises an error listing the known ones."""
    try:
        return BENCHMARKS[name]
    except KeyError:
        raise UnknownDatasetError(
            f"unknown dataset {name!r}{did_you_mean(name, BENCHMARKS)}; known datasets: {', '.join(sorted(BENCHMARKS))}"
        ) from None


def class_file_path(name: str) -> Path:
    """Path of the shipped class list ``name`` (components/datasets/classes/<name>.txt)."""
    if name not in CLASS_FILES:
        raise UnknownDatasetError(
            f"unknown class list {name!r}{did_you_mean(name, CLASS_FILES)}; shipped class lists: {', '.join(CLASS_FILES)}"
        )
    return Path(str(resources.files("components.datasets") / "classes" / f"{name}.txt"))


def class_list_path(spec: str) -> Path:
    """A vocabulary given as a shipped class list's name or as a class file's path -> the file's path
    (not checked to exist)."""
    return class_file_path(spec) if spec in CLASS_FILES else Path(spec)


def read_class_list(spec: str, *, source: str) -> list[str]:
    """Class lines (:func:`read_class_file`) of a vocabulary given as a shipped class list's name or a
    class file's path; FileNotFoundError naming ``source`` and the shipped lists when it is neither."""
    path = class_list_path(spec)
    if not path.is_file():
        raise FileNotFoundError(
            f"{source} {spec!r} is neither a shipped class list nor an existing file{did_you_mean(spec, CLASS_FILES)};"
            f" shipped class lists: {', '.join(CLASS_FILES)}"
        )
    return read_class_file(path)


def display_name(line: str) -> str:
    """The protocol's name of a class line: its first comma-separated synonym ("person, people" -> "person")."""
    return line.split(",")[0].strip()


def read_class_file(path: str | Path) -> list[str]:
    """Class lines of a class file: one class per line, comma-separated synonyms kept in the line.

    The first name of a line is the protocol's class name; blank lines are an error (they would
    shift every following class index).
    """
    path = Path(path)
    data = path.read_bytes().removeprefix(b"\xef\xbb\xbf")  # a BOM is no part of the first name
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(
            f"{path} is not UTF-8 text (byte 0x{data[err.start]:02x} at offset {err.start}); save it as UTF-8"
        ) from None
    lines = text.splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    for i, line in enumerate(lines):
        if not line.strip():
            raise ValueError(f"{path}:{i + 1} is blank; a class file holds exactly one class per line")
    return [line.strip() for line in lines]
