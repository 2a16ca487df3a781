"""Nightly image sync: only missing images are copied, atomically, sub-folders kept."""

from __future__ import annotations

import pytest

from components.datasets.sync import sync_new_images


def test_copies_only_new_images(tmp_path):
    source, dest = tmp_path / "src", tmp_path / "dst"
    (source / "day2").mkdir(parents=True)
    (source / "a.jpg").write_bytes(b"a")
    (source / "day2" / "b.PNG").write_bytes(b"b")
    (source / "notes.txt").write_text("not an image")
    (source / ".hidden.jpg").write_bytes(b"h")
    dest.mkdir()
    (dest / "a.jpg").write_bytes(b"already here, kept")

    copied = sync_new_images(source, dest)
    assert copied == [dest / "day2" / "b.PNG"]
    assert (dest / "a.jpg").read_bytes() == b"already here, kept"
    assert sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file()) == ["a.jpg", "day2/b.PNG"]
    assert sync_new_images(source, dest) == []


def test_missing_source_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nightly.source_dir"):
        sync_new_images(tmp_path / "nope", tmp_path / "dst")
