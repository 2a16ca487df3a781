"""Overlay pictures: the VOC colour map and the class colours, blending, panels and the legend."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from components.io import class_colours, voc_colour_map
from components.overlay import colorize, overlay_picture, write_overlay


def naive_voc_palette() -> list[tuple[int, int, int]]:
    """The PASCAL VOC devkit's colour map, bit by bit."""
    colours = []
    for index in range(256):
        r = g = b = 0
        c = index
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        colours.append((r, g, b))
    return colours


def test_palette_is_the_voc_colour_map():
    assert [tuple(int(v) for v in row) for row in voc_colour_map()] == naive_voc_palette()
    assert tuple(voc_colour_map()[15]) == (192, 128, 128)  # person
    assert voc_colour_map()[255].tolist() == [224, 224, 192] and voc_colour_map()[1].tolist() == [128, 0, 0]


@pytest.mark.parametrize("size", [256, 65536])
def test_no_class_is_black_only_no_class_is(size):
    colours = class_colours(size)
    np.testing.assert_array_equal(colours[: size - 1], voc_colour_map(size)[1:size])  # class k: VOC's k + 1
    assert not (colours[: size - 1] == 0).all(axis=1).any() and colours[size - 1].tolist() == [0, 0, 0]


def test_colorize_looks_up_each_pixel():
    label = np.array([[0, 1], [14, 255]], dtype=np.uint8)
    rgb = colorize(label)
    assert rgb.shape == (2, 2, 3) and rgb.dtype == np.uint8
    assert tuple(rgb[1, 0]) == (192, 128, 128) and tuple(rgb[0, 0]) == (128, 0, 0) and tuple(rgb[1, 1]) == (0, 0, 0)
    with pytest.raises(ValueError, match="uint8"):
        colorize(label.astype(np.int64))


def scene(height: int = 40, width: int = 60) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    label = np.zeros((height, width), dtype=np.uint8)
    label[:, width // 2 :] = 2
    label[:5] = 255
    return image, label


def test_panels_blend_labels_and_leave_ignored_pixels_alone():
    image, label = scene()
    pred = np.full_like(label, 1)
    picture = np.asarray(overlay_picture(image, label, {"base": pred}, ["a", "b", "c"], panel_height=40))
    height, width = 40, 60
    title = 22
    # three panels of 60 px with 6 px gaps: image, ground truth, base
    assert picture.shape[1] == 3 * width + 2 * 6
    image_panel = picture[title : title + height, :width]
    np.testing.assert_array_equal(image_panel, image)
    truth_panel = picture[title : title + height, width + 6 : 2 * width + 6].astype(np.int64)
    np.testing.assert_array_equal(truth_panel[:5], image[:5])  # ignored rows: the image unchanged
    expected = np.round(image[10, 40] * 0.45 + class_colours()[2] * 0.55)
    np.testing.assert_allclose(truth_panel[10, 40], expected, atol=1)
    base_panel = picture[title : title + height, 2 * (width + 6) :].astype(np.int64)
    np.testing.assert_allclose(base_panel[10, 5], np.round(image[10, 5] * 0.45 + class_colours()[1] * 0.55), atol=1)


def test_legend_lists_only_present_classes():
    image, label = scene()
    few = np.asarray(overlay_picture(image, label, {"p": label}, [f"class {i}" for i in range(30)]))
    many_label = (np.arange(40 * 60).reshape(40, 60) % 30).astype(np.uint8)
    many = np.asarray(overlay_picture(image, many_label, {"p": many_label}, [f"class {i}" for i in range(30)]))
    assert many.shape[0] > few.shape[0]  # 30 classes wrap onto more legend rows than 2


def test_bad_inputs_raise():
    image, label = scene()
    with pytest.raises(ValueError, match="no name"):
        overlay_picture(image, label, {"p": label}, ["only one"])
    with pytest.raises(ValueError, match="prediction 'p'"):
        overlay_picture(image, label, {"p": label[:10]}, ["a", "b", "c"])
    with pytest.raises(ValueError, match="image"):
        overlay_picture(image[..., 0], label, {}, ["a", "b", "c"])


def test_write_overlay_writes_a_png(tmp_path):
    image, label = scene()
    path = write_overlay(tmp_path / "sub" / "x.png", image, label, {"base": label}, ["a", "b", "c"], panel_height=80)
    with Image.open(path) as im:
        assert im.format == "PNG" and im.mode == "RGB" and im.size[0] == 3 * 120 + 12
    assert [p.name for p in path.parent.iterdir()] == ["x.png"]  # no temporary file left behind


def test_full_resolution_overlay_png_paints_every_class_and_no_class_black(tmp_path):
    """panel_height None: each panel is the image's own pixels (no resampling), read back from a
    real PNG; on a black image every class shows in its colour, and only unlabelled pixels stay black."""
    height, width = 37, 53
    image = np.zeros((height, width, 3), dtype=np.uint8)
    label = np.random.default_rng(1).integers(0, 4, (height, width)).astype(np.uint8)
    label[label == 3] = 255
    path = write_overlay(tmp_path / "full.png", image, None, {"prediction": label}, ["a", "b", "c"], panel_height=None)
    with Image.open(path) as im:
        picture = np.asarray(im.convert("RGB"))
    assert picture.shape[1] == 2 * width + 6
    panel = picture[22 : 22 + height, width + 6 :]
    np.testing.assert_array_equal(panel, np.round(class_colours()[label] * 0.55).astype(np.uint8) * (label != 255)[..., None])
    assert not (panel[label != 255] == 0).all(axis=1).any()  # no class is painted black
    assert (panel[label == 255] == 0).all()
