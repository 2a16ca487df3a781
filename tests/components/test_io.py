"""Atomic writes and PNG label maps: what every stage writes goes through these."""

from __future__ import annotations

import os

import numpy as np
import pytest

from components.io import (
    atomic_path,
    atomic_write_json,
    atomic_write_text,
    bytes_sha256,
    decode_label_png,
    encode_label_png,
    file_sha256,
)


def test_atomic_write_replaces_and_leaves_no_temp_files(tmp_path):
    target = tmp_path / "sub" / "out.txt"
    atomic_write_text(target, "first")
    atomic_write_text(target, "second")
    assert target.read_text() == "second"
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.txt"]
    umask = os.umask(0)
    os.umask(umask)
    assert (target.stat().st_mode & 0o777) == 0o666 & ~umask


def test_a_failed_write_keeps_the_old_content(tmp_path):
    target = tmp_path / "out.json"
    atomic_write_json(target, {"a": 1})
    with pytest.raises(RuntimeError), atomic_path(target, suffix=".json") as tmp:
        tmp.write_text("half a fi")
        raise RuntimeError("killed mid-write")
    assert target.read_text() == '{\n  "a": 1\n}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


def test_hashes(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"fmbseg" * 100_000)
    assert file_sha256(path, chunk_size=4096) == bytes_sha256(path.read_bytes())


def test_label_png_round_trip_and_validation():
    label = np.random.default_rng(0).integers(0, 256, (17, 23), dtype=np.uint8)
    assert np.array_equal(decode_label_png(encode_label_png(label)), label)
    with pytest.raises(ValueError, match=r"\[H, W\] uint8"):
        encode_label_png(label.astype(np.int32))
    with pytest.raises(ValueError, match=r"\[H, W\] uint8"):
        encode_label_png(np.zeros((2, 3, 3), np.uint8))


def test_an_8_bit_label_png_is_a_palette_png_that_shows_the_class_colours():
    """As VOC ships its maps: each pixel's index as it is, and a palette any image viewer shows."""
    import io

    from PIL import Image

    from components.io import class_colours

    label = np.array([[0, 1, 2], [254, 255, 7]], dtype=np.uint8)
    assert Image.open(io.BytesIO(encode_label_png(label))).mode == "L"  # internal maps: plain grayscale
    with Image.open(io.BytesIO(encode_label_png(label, palette=True))) as im:
        assert im.mode == "P"
        np.testing.assert_array_equal(np.asarray(im), label)  # the indices, untouched
        shown = np.asarray(im.convert("RGB"))
    np.testing.assert_array_equal(shown, class_colours(256)[label])
    assert shown[1, 1].tolist() == [0, 0, 0] and (shown[0] != 0).any(axis=1).all()  # black = no class only


def test_output_lock_refuses_a_second_run_at_once_and_frees_on_exit(tmp_path):
    import subprocess
    import sys
    import time

    from components.io import OutputBusyError, output_lock

    out = tmp_path / "pseudo" / "stage1"
    code = (
        "import sys; from components.io import output_lock, OutputBusyError\n"
        "try:\n    with output_lock(sys.argv[1], stage='label'): pass\n"
        "except OutputBusyError as e:\n    print(e); sys.exit(e.exit_code)\n"
    )
    with output_lock(out, stage="label"):
        start = time.monotonic()
        busy = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True)
        assert time.monotonic() - start < 20
        assert busy.returncode == 75, busy.stderr
        assert str(out) in busy.stdout and "another" in busy.stdout and "fmbseg label" in busy.stdout
        with pytest.raises(OutputBusyError):  # the same process, a second holder: refused too
            with output_lock(out, stage="label"):
                pass
    free = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True)
    assert free.returncode == 0, free.stdout + free.stderr


@pytest.mark.parametrize(
    "name",
    ["plain/ascii.png", "été/日本.png", "caf\udce9.png", "a\ufffdE9.png", "\ufffd\udcff\ufffd", "%41\\x41"],
)
def test_path_text_is_valid_utf8_and_reversible(name):
    from components.io import fs_path, path_text

    text = path_text(name)
    text.encode("utf-8")  # never raises: Parquet, JSON and logs take it
    assert fs_path(text) == name
    if not any("\udc80" <= c <= "\udcff" or c == "\ufffd" for c in name):
        assert text == name  # ordinary names keep their ids


def test_label_maps_are_8_bit_up_to_255_classes_and_16_bit_beyond():
    from components.io import label_dtype, unlabelled_for, unlabelled_of

    assert label_dtype(255) is np.uint8 and unlabelled_for(255) == 255
    assert label_dtype(256) is np.uint16 and unlabelled_for(847) == 65535
    with pytest.raises(ValueError, match="1 to 65535"):
        label_dtype(65536)
    wide = np.array([[0, 458, 846], [65535, 300, 1]], np.uint16)
    decoded = decode_label_png(encode_label_png(wide))
    assert decoded.dtype == np.uint16 and np.array_equal(decoded, wide)
    assert unlabelled_of(decoded) == 65535 and unlabelled_of(np.zeros(2, np.uint8)) == 255
