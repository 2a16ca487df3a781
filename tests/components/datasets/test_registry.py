"""The registries are complete and consistent, and the synthetic twins are seeded."""

from __future__ import annotations

import numpy as np
import pytest

from components.datasets.convert import CONVERTERS
from components.datasets.registry import (
    BENCHMARKS,
    CLASS_FILES,
    SOURCES,
    UnknownDatasetError,
    class_file_path,
    get_benchmark,
    get_source,
    read_class_file,
)
from demoworld.synthetic import SYNTHETIC_SOURCES, synthetic_scenes


def test_unknown_names_list_the_known_ones():
    with pytest.raises(UnknownDatasetError, match="known datasets: ade20k, ade847, cityscapes, co80"):
        get_benchmark("pv22")
    with pytest.raises(UnknownDatasetError, match="known sources: ade20k, ade20k_full, cityscapes_gtfine"):
        get_source("voc2013")
    with pytest.raises(UnknownDatasetError, match="shipped class lists"):
        class_file_path("imagenet")


def test_the_keys_the_cli_and_dvc_use():
    assert set(BENCHMARKS) == {
        "coco_train",
        "pv21",
        "pv20",
        "pc59",
        "pc60",
        "pc459",
        "co80",
        "coco_object",
        "cs171",
        "cityscapes",
        "ade20k",
        "ade847",
    }


@pytest.mark.parametrize("name", sorted(BENCHMARKS))
def test_benchmark_entries_are_consistent(name):
    spec = BENCHMARKS[name]
    assert spec.name == name and spec.converter in CONVERTERS
    for source in spec.sources:
        assert name in SOURCES[source].benchmarks
    assert len(read_class_file(class_file_path(spec.class_file))) == spec.num_classes
    assert spec.labelled == (name != "coco_train")
    if spec.reduce_zero_label:
        assert spec.background == "ignored"


@pytest.mark.parametrize("name", sorted(SOURCES))
def test_source_entries_say_where_checksums_come_from_and_how_to_get_them(name):
    spec = SOURCES[name]
    assert spec.name == name and spec.checksum_note and spec.license and spec.homepage.startswith("http")
    assert bool(spec.urls) != bool(spec.manual_instructions)  # downloadable, or placed by hand
    if spec.manual_instructions:
        assert "{path}" in spec.manual_instructions and spec.filename in spec.manual_instructions
    for url in spec.urls:
        assert url.startswith(("http://", "https://")) and url.endswith(spec.filename)
    assert set(spec.reference_digests) <= {"md5", "sha1"}
    assert not spec.marker.startswith("/") and ".." not in spec.marker
    assert spec.approx_bytes > 0 and spec.extracted_bytes > 0
    if spec.size_bytes is not None:
        assert spec.approx_bytes == spec.size_bytes
    for benchmark in spec.benchmarks:
        assert name in BENCHMARKS[benchmark].sources


def test_every_source_has_a_synthetic_twin_and_every_class_file_ships():
    assert set(SYNTHETIC_SOURCES) == set(SOURCES)
    for name in CLASS_FILES:
        lines = read_class_file(class_file_path(name))
        assert lines and all(line == line.strip() and line for line in lines)
        assert len(set(lines)) == len(lines), f"duplicate class lines in {name}"
        firsts = [line.split(",")[0].strip() for line in lines]
        repeated = sorted({f for f in firsts if firsts.count(f) > 1})
        # ADE-847's list (MaskFormer / CAT-Seg) names 9 first names twice or three times
        # ("bag": the object, a travelling bag, a handbag); their synonyms tell them apart.
        expected = ["bag", "basket", "control panel", "grill", "patio", "pier", "pipe", "pot", "screen"]
        assert repeated == (expected if name == "ade847" else []), f"repeated class names in {name}"


def test_class_file_rejects_blank_lines(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("cat\n\ndog\n")
    with pytest.raises(ValueError, match="c.txt:2 is blank"):
        read_class_file(path)


def test_synthetic_scenes_are_seeded():
    a = synthetic_scenes("ade20k", num_images=3, seed=5)
    b = synthetic_scenes("ade20k", num_images=3, seed=5)
    c = synthetic_scenes("ade20k", num_images=3, seed=6)
    assert [s.id for s in a] == [s.id for s in b]
    assert all(
        np.array_equal(x.image, y.image) and np.array_equal(x.raw_label, y.raw_label)
        for x, y in zip(a, b, strict=True)
    )
    assert not all(np.array_equal(x.raw_label, y.raw_label) for x, y in zip(a, c, strict=True))
    # Sources that share a family share ids and images.
    imgs = synthetic_scenes("coco_val2017", num_images=2, seed=1)
    maps = synthetic_scenes("cocostuff_maps", num_images=2, seed=1)
    assert [s.id for s in imgs] == [s.id for s in maps]
    with pytest.raises(ValueError, match="no synthetic twin for 'imagenet'"):
        synthetic_scenes("imagenet")
