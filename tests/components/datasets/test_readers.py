"""read_image_rgb on every common mode, EXIF orientation and broken files; list_images; the
canonical dataset reader."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from components.datasets.readers import CanonicalDataset, UnreadableImageError, list_images, read_image_rgb
from demoworld.synthetic import write_synthetic_benchmark


def _save(im: Image.Image, path: Path, **kw: object) -> Path:
    im.save(path, **kw)
    return path


def test_rgb_and_grayscale(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (6, 5, 3), dtype=np.uint8)
    out = read_image_rgb(_save(Image.fromarray(rgb), tmp_path / "a.png"))
    assert out.dtype == np.uint8 and np.array_equal(out, rgb)
    gray = np.arange(30, dtype=np.uint8).reshape(6, 5)
    out = read_image_rgb(_save(Image.fromarray(gray), tmp_path / "g.png"))
    assert out.shape == (6, 5, 3) and all(np.array_equal(out[..., c], gray) for c in range(3))


def test_rgba_drops_alpha_and_palette_expands(tmp_path):
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 0
    assert np.all(read_image_rgb(_save(Image.fromarray(rgba), tmp_path / "a.png")) == [200, 0, 0])
    p = Image.fromarray(np.array([[0, 1], [1, 0]], dtype=np.uint8))
    p.putpalette([10, 20, 30, 40, 50, 60] + [0] * 762)
    out = read_image_rgb(_save(p, tmp_path / "p.png"))
    assert out[0, 0].tolist() == [10, 20, 30] and out[0, 1].tolist() == [40, 50, 60]


def test_cmyk_jpeg(tmp_path):
    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # pure red
    out = read_image_rgb(_save(cmyk, tmp_path / "c.jpg", quality=95))
    assert out.shape == (8, 8, 3)
    assert out[..., 0].mean() > 200 and out[..., 1].mean() < 60 and out[..., 2].mean() < 60


def test_16bit_grayscale_keeps_the_top_byte(tmp_path):
    values = np.array([[0, 256, 65535], [4096, 32768, 1000]], dtype=np.uint16)
    im = Image.fromarray(values)
    assert im.mode.startswith("I;16")
    out = read_image_rgb(_save(im, tmp_path / "d.png"))
    assert np.array_equal(out[..., 0], (values >> 8).astype(np.uint8))


def test_exif_orientation_is_applied(tmp_path):
    arr = np.zeros((10, 20, 3), dtype=np.uint8)  # H=10, W=20, a white block at the top-left
    arr[:3, :3] = 255
    im = Image.fromarray(arr)
    exif = im.getexif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    out = read_image_rgb(_save(im, tmp_path / "e.jpg", exif=exif, quality=100))
    assert out.shape == (20, 10, 3)
    assert out[:3, -3:].mean() > 200 and out[:3, :3].mean() < 50  # top-left went to the top-right


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda p: p.write_bytes(b""), "empty file"),
        (lambda p: p.write_text("not an image at all"), "not an image"),
        (lambda p: p.write_bytes(_jpeg_bytes()[:400]), "truncated"),
        (lambda p: None, "does not exist"),
    ],
)
def test_unreadable_files_raise_with_path_and_reason(tmp_path, make, reason):
    path = tmp_path / "bad.jpg"
    make(path)
    with pytest.raises(UnreadableImageError, match=reason) as err:
        read_image_rgb(path)
    assert err.value.path == path and str(path) in str(err.value)


def _jpeg_bytes() -> bytes:
    buf = io.BytesIO()
    noise = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def test_list_images_recursive_sorted_hidden_skipped(tmp_path):
    for rel in ["b.JPG", "a.png", "sub/c.jpeg", ".hidden/d.jpg", "sub/.e.png", "notes.txt"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    assert [p.relative_to(tmp_path).as_posix() for p in list_images(tmp_path)] == [
        "a.png",
        "b.JPG",
        "sub/c.jpeg",
    ]
    assert [p.name for p in list_images(tmp_path, recursive=False)] == ["a.png", "b.JPG"]
    with pytest.raises(NotADirectoryError):
        list_images(tmp_path / "a.png")


def test_canonical_dataset_reader(tmp_path):
    root = write_synthetic_benchmark("pv21", tmp_path, num_images=3)
    ds = CanonicalDataset(root, "val")
    assert len(ds) == 3 and ds.ids == sorted(ds.ids)
    first = ds.ids[0]
    assert ds.image_path(first).suffix == ".jpg" and ds.label_path(first).name == f"{first}.png"
    assert ds.read_image(first).shape == (96, 128, 3) and ds.read_label(first).dtype == np.uint8
    assert ds.classes[0] == "background" and ds.meta["benchmark"] == "pv21"
    with pytest.raises(FileNotFoundError, match=r"available splits: \['val'\]"):
        CanonicalDataset(root, "train")
    with pytest.raises(KeyError, match="no image 'nope'"):
        ds.image_path("nope")


def test_32bit_integer_tiff_is_scaled_not_clipped(tmp_path):
    ramp = (np.arange(256, dtype=np.int64).reshape(16, 16) << 23).astype(np.int32)  # 0 .. 2**31 - 2**23
    Image.fromarray(ramp).save(tmp_path / "deep32.tif")
    rgb = read_image_rgb(tmp_path / "deep32.tif")
    np.testing.assert_array_equal(rgb[..., 0], np.arange(256, dtype=np.uint8).reshape(16, 16))


@pytest.mark.parametrize("policy", ["refuse", "follow"])
def test_scan_lists_every_file_as_an_image_or_a_reason(tmp_path, policy):
    import os

    from components.datasets.readers import scan_image_folder

    folder, outside = tmp_path / "imgs", tmp_path / "elsewhere"
    (folder / "sub").mkdir(parents=True)
    outside.mkdir()
    Image.new("RGB", (4, 4)).save(folder / "a.png")
    Image.new("P", (4, 4)).save(folder / "anim.gif")
    Image.new("RGB", (4, 4)).save(folder / "sub" / "b.jpg")
    Image.new("RGB", (4, 4)).save(outside / "c.png")
    (folder / "notes.txt").write_text("not an image")
    (folder / ".hidden.png").write_bytes(b"")
    os.symlink(folder / "gone.png", folder / "dangling.png")
    os.symlink(outside / "c.png", folder / "out.png")
    os.symlink(folder / "a.png", folder / "alias.png")
    os.symlink(outside, folder / "linked_dir")
    os.symlink(folder / "sub", folder / "sub_again")
    images, skipped = scan_image_folder(folder, external_symlinks=policy)
    names = sorted(p.relative_to(folder).as_posix() for p in images)
    reasons = {p.relative_to(folder).as_posix(): why for p, why in skipped}
    inside = ["a.png", "alias.png", "anim.gif", "sub/b.jpg"]
    if policy == "refuse":
        assert names == inside
        assert "outside the image folder" in reasons["out.png"] and "external_symlinks" in reasons["out.png"]
        assert "outside the image folder" in reasons["linked_dir"]
    else:
        assert names == sorted([*inside, "linked_dir/c.png", "out.png"])
    assert "dangling" in reasons["dangling.png"]
    assert "not an image" in reasons["notes.txt"]
    assert "symlinked folder" in reasons["sub_again"]  # its files are labelled where they are
    assert ".hidden.png" not in reasons
    assert read_image_rgb(folder / "anim.gif").shape == (4, 4, 3)
