"""Safe extraction: members that would land outside the target are refused by name, nothing is
written, and a good archive lands atomically."""

from __future__ import annotations

import io
import os
import stat
import tarfile
import zipfile
from pathlib import Path

import pytest

from components.datasets.extract import BadArchiveError, UnsafeArchiveError, atomic_directory, safe_extract


def _tar(path: Path, members: list[tarfile.TarInfo | tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for m in members:
            if isinstance(m, tarfile.TarInfo):
                tar.addfile(m)
            else:
                info = tarfile.TarInfo(m[0])
                info.size = len(m[1])
                tar.addfile(info, io.BytesIO(m[1]))
    return path


def _link(name: str, target: str, kind: bytes) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    return info


def _zip(path: Path, members: list[tuple[str, bytes] | tuple[str, str, str]]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for m in members:
            if len(m) == 3:  # (name, "symlink", target)
                info = zipfile.ZipInfo(m[0])
                info.external_attr = (stat.S_IFLNK | 0o777) << 16
                zf.writestr(info, m[2])
            else:
                zf.writestr(zipfile.ZipInfo(m[0]), m[1])
    return path


GOOD = ("data/ok.txt", b"fine")


@pytest.mark.parametrize(
    ("member", "reason"),
    [
        (("../evil.txt", b"x"), "'..'"),
        (("/abs/evil.txt", b"x"), "absolute path"),
        (_link("data/up", "../../outside", tarfile.SYMTYPE), "outside the target"),
        (_link("data/etc", "/etc/passwd", tarfile.SYMTYPE), "absolute path"),
        (_link("data/hard", "../outside.txt", tarfile.LNKTYPE), "outside the target"),
        (_link("data/hard", "/etc/passwd", tarfile.LNKTYPE), "absolute path"),
        (_link("data/fifo", "", tarfile.FIFOTYPE), "special file"),
    ],
)
def test_tar_unsafe_members_are_refused_by_name(tmp_path, member, reason):
    archive = _tar(tmp_path / "a.tar", [GOOD, member])
    target = tmp_path / "out" / "tree"
    with pytest.raises(UnsafeArchiveError, match=reason) as err:
        safe_extract(archive, target, kind="tar")
    name = member[0] if isinstance(member, tuple) else member.name
    assert err.value.member == name and repr(name) in str(err.value)
    assert not target.exists()
    assert list((tmp_path / "out").iterdir()) == []  # no temporary tree left behind
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "outside.txt").exists()


@pytest.mark.parametrize(
    ("member", "reason"),
    [
        (("../evil.txt", b"x"), "'..'"),
        (("/abs/evil.txt", b"x"), "absolute path"),
        (("C:/evil.txt", b"x"), "absolute path"),
        (("data/up", "symlink", "../../outside"), "outside the target"),
        (("data/etc", "symlink", "/etc/passwd"), "absolute path"),
    ],
)
def test_zip_unsafe_members_are_refused_by_name(tmp_path, member, reason):
    archive = _zip(tmp_path / "a.zip", [GOOD, member])
    target = tmp_path / "out" / "tree"
    with pytest.raises(UnsafeArchiveError, match=reason) as err:
        safe_extract(archive, target, kind="zip")
    assert err.value.member == member[0]
    assert not target.exists() and list((tmp_path / "out").iterdir()) == []


def test_zip_link_chain_that_escapes_through_an_earlier_link_is_refused(tmp_path):
    # d/b -> .. is inside (the root); d/a -> b/../x looks inside lexically (d/x) but resolves
    # through d/b to <root>/../x.
    archive = _zip(tmp_path / "a.zip", [("d/b", "symlink", ".."), ("d/a", "symlink", "b/../x")])
    target = tmp_path / "out" / "tree"
    with pytest.raises(UnsafeArchiveError, match="outside the target") as err:
        safe_extract(archive, target, kind="zip")
    assert err.value.member == "d/a"
    assert not target.exists()


@pytest.mark.parametrize("kind", ["tar", "tar.gz", "zip"])
def test_good_archive_extracts_with_inner_links_and_stamp(tmp_path, kind):
    if kind == "zip":
        archive = _zip(tmp_path / "a.zip", [GOOD, ("data/sub/", b""), ("data/link", "symlink", "ok.txt")])
    else:
        archive = tmp_path / f"a.{kind}"
        with tarfile.open(archive, "w:gz" if kind == "tar.gz" else "w") as tar:
            info = tarfile.TarInfo(GOOD[0])
            info.size = len(GOOD[1])
            tar.addfile(info, io.BytesIO(GOOD[1]))
            tar.addfile(_link("data/link", "ok.txt", tarfile.SYMTYPE))
    target = tmp_path / "tree"
    out = safe_extract(archive, target, kind=kind, required="data/ok.txt", extra_files={"stamp.json": b"{}"})
    assert out == target
    assert (target / "data" / "ok.txt").read_bytes() == b"fine"
    assert (target / "data" / "link").read_bytes() == b"fine"
    assert (target / "stamp.json").read_bytes() == b"{}"


def test_missing_required_path_commits_nothing(tmp_path):
    archive = _tar(tmp_path / "a.tar", [GOOD])
    with pytest.raises(BadArchiveError, match="not the expected archive"):
        safe_extract(archive, tmp_path / "tree", kind="tar", required="VOCdevkit/VOC2012")
    assert not (tmp_path / "tree").exists()


def test_atomic_directory_keeps_the_old_tree_on_failure_and_replaces_it_on_success(tmp_path):
    target = tmp_path / "tree"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(RuntimeError), atomic_directory(target) as tmp:
        (tmp / "new.txt").write_text("new")
        raise RuntimeError("killed half way")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tree"]
    assert (target / "old.txt").exists()
    with atomic_directory(target) as tmp:
        (tmp / "new.txt").write_text("new")
    assert [p.name for p in target.iterdir()] == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tree"]


def test_a_killed_extraction_leaves_nothing_the_next_run_does_not_clean(tmp_path):
    import subprocess
    import sys

    target = tmp_path / "tree"
    # A real process killed inside atomic_directory leaves its temporary folder behind.
    code = (
        "import os, signal, sys; from pathlib import Path\n"
        "from components.datasets.extract import atomic_directory\n"
        "with atomic_directory(Path(sys.argv[1])) as tmp:\n"
        "    (tmp / 'half.txt').write_text('x'); os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    subprocess.run([sys.executable, "-c", code, str(target)], check=False)
    (tmp_path / ".tree.tmp-0123abcd").mkdir()  # the name a killed run of an earlier version left
    assert len(list(tmp_path.glob(".tree.tmp-*"))) == 2
    live = tmp_path / f".tree.tmp-{os.getpid()}-feedbeef"  # a run in progress (this process) is kept
    live.mkdir()
    safe_extract(_tar(tmp_path / "a.tar", [GOOD]), target, kind="tar")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, "a.tar", "tree"])


def test_zip_bomb_is_refused_by_ratio_and_by_the_expected_total(tmp_path):
    bomb = tmp_path / "bomb.zip"
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("data/zeros.bin", bytes(40 << 20))  # 40 MiB of zeros deflate to ~40 kB
    with pytest.raises(UnsafeArchiveError, match="ratio"):
        safe_extract(bomb, tmp_path / "tree", kind="zip")
    big = _tar(tmp_path / "big.tar", [GOOD, ("data/more.bin", os.urandom(50_000))])
    with pytest.raises(UnsafeArchiveError, match="more than the 10000 bytes"):
        safe_extract(big, tmp_path / "tree", kind="tar", max_bytes=10_000)
    assert not (tmp_path / "tree").exists()


@pytest.mark.parametrize("kind", ["tar", "zip"])
def test_duplicate_member_names_are_refused(tmp_path, kind):
    members = [GOOD, ("data/./ok.txt", b"second copy")]
    if kind == "zip":
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # zipfile warns about the duplicate it writes
            archive = _zip(tmp_path / "a.zip", members)
    else:
        archive = _tar(tmp_path / "a.tar", members)
    with pytest.raises(UnsafeArchiveError, match="more than once") as err:
        safe_extract(archive, tmp_path / "tree", kind=kind)
    assert "data/ok.txt" in str(err.value)
    assert not (tmp_path / "tree").exists()
