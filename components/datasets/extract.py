"""Safe, atomic extraction of downloaded archives, and atomic directory replacement.

Every member of an archive is checked before anything is written: absolute paths, ``..``
components, and symbolic or hard links that point outside the target are refused with an error
that names the member. Extraction goes into a temporary directory next to the target, which takes
the target's name only when everything is unpacked, so a killed process never leaves a half
extracted tree under the final name. An archive that does not open, list and extract to its
end (truncated, not an archive at all, bytes after the tar end that are not its zero padding)
raises :class:`BadArchiveError`, so that a caller never trusts it. Duplicate member names, and
archives that would unpack to more than a limit (a total, or a ratio to the archive's size: a
zip bomb), are refused before anything is written. A temporary tree left by a killed process is
removed by the next :func:`atomic_directory` on the same target.
"""

from __future__ import annotations

import contextlib
import gzip
import os
import posixpath
import shutil
import stat
import tarfile
import uuid
import zipfile
import zlib
from collections.abc import Iterator, Mapping
from pathlib import Path

from tqdm.auto import tqdm

from components.datasets.registry import ArchiveKind

__all__ = [
    "BadArchiveError",
    "MAX_RATIO",
    "UnsafeArchiveError",
    "atomic_directory",
    "check_link_target",
    "check_member_path",
    "check_sizes",
    "safe_extract",
]


class UnsafeArchiveError(ValueError):
    """An archive member would land outside the extraction directory, or is not a plain file."""

    def __init__(self, archive: Path, member: str, reason: str) -> None:
        super().__init__(f"refusing to extract {archive}: member {member!r} {reason}")
        self.archive = archive
        self.member = member
        self.reason = reason


class BadArchiveError(ValueError):
    """A file is not a complete, readable archive of its kind (truncated, an HTML page, ...)."""

    def __init__(self, archive: Path, kind: str, reason: str) -> None:
        super().__init__(f"{archive} is not a valid {kind} archive: {reason}")
        self.archive = archive
        self.reason = reason


_READ_ERRORS = (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error, gzip.BadGzipFile)
MAX_RATIO = 200.0  # unpacked / packed bytes beyond which an archive is a bomb (images barely compress)
_RATIO_FLOOR = 32 << 20  # ratios only matter for archives that unpack to more than this


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_temporaries(target: Path) -> None:
    """Remove ``.<name>.tmp-*`` / ``.<name>.old-*`` trees whose process is gone: the name carries
    the pid of the process that made it (a name without one predates that and is stale too)."""
    for kind in ("tmp", "old"):
        prefix = f".{target.name}.{kind}-"
        for path in target.parent.glob(f"{prefix}*"):
            pid, sep, _ = path.name[len(prefix) :].partition("-")
            if sep and pid.isdigit() and _pid_alive(int(pid)):
                continue
            shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def atomic_directory(target: Path) -> Iterator[Path]:
    """Yield an empty temporary directory next to ``target``; on success it replaces ``target``.

    An existing ``target`` is moved aside, the new tree renamed in, and the old one removed, so
    ``target`` names either the complete old tree or the complete new one. On an exception the
    temporary tree is removed and ``target`` is untouched.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(target)
    token = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp = target.parent / f".{target.name}.tmp-{token}"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if target.exists():
        old = target.parent / f".{target.name}.old-{token}"
        os.rename(target, old)
        os.rename(tmp, target)
        shutil.rmtree(old)
    else:
        os.rename(tmp, target)


def _split_parts(name: str) -> list[str]:
    return [p for p in name.replace("\\", "/").split("/") if p not in ("", ".")]


def check_member_path(archive: Path, name: str) -> str:
    """Validate a member name and return it normalised (posix, relative).

    Refuses absolute paths (``/x``, ``\\x``, ``C:x``) and any ``..`` component.
    """
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        raise UnsafeArchiveError(archive, name, "has an absolute path")
    parts = _split_parts(name)
    if ".." in parts:
        raise UnsafeArchiveError(archive, name, "contains '..' and would land outside the target directory")
    if not parts:
        raise UnsafeArchiveError(archive, name, "has an empty path")
    return "/".join(parts)


def check_link_target(archive: Path, name: str, link: str, *, relative_to_member: bool) -> None:
    """Refuse a link whose target resolves outside the extraction directory.

    Symbolic links resolve relative to the member's directory (``relative_to_member``); tar hard
    links name another member, relative to the archive root.
    """
    if link.startswith(("/", "\\")) or (len(link) > 1 and link[1] == ":"):
        raise UnsafeArchiveError(archive, name, f"is a link to the absolute path {link!r}")
    base = posixpath.dirname(name) if relative_to_member else ""
    resolved = posixpath.normpath(posixpath.join(base, link.replace("\\", "/")))
    if resolved == ".." or resolved.startswith("../"):
        raise UnsafeArchiveError(archive, name, f"is a link to {link!r}, outside the target directory")


def _check_unique(archive: Path, name: str, seen: set[str]) -> None:
    if name in seen:
        raise UnsafeArchiveError(archive, name, "appears more than once (which copy is meant is ambiguous)")
    seen.add(name)


def check_sizes(archive: Path, total: int, *, max_bytes: int | None, max_ratio: float) -> None:
    """Refuse an archive whose members add up to more than ``max_bytes`` or than ``max_ratio``
    times the archive's own size (for totals over 32 MiB)."""
    if max_bytes is not None and total > max_bytes:
        raise UnsafeArchiveError(
            archive, "*", f"(all members) would unpack to {total} bytes, more than the {max_bytes} bytes expected"
        )
    packed = max(archive.stat().st_size, 1)
    if total > _RATIO_FLOOR and total / packed > max_ratio:
        raise UnsafeArchiveError(
            archive, "*", f"(all members) would unpack to {total} bytes from {packed}: a ratio of "
            f"{total / packed:.0f}, more than {max_ratio:.0f} (a zip bomb)"
        )


def _check_tar(archive: Path, tar: tarfile.TarFile) -> list[tarfile.TarInfo]:
    members = tar.getmembers()
    seen: set[str] = set()
    for m in members:
        name = check_member_path(archive, m.name)
        if not m.isdir():
            _check_unique(archive, name, seen)
        if m.issym():
            check_link_target(archive, name, m.linkname, relative_to_member=True)
        elif m.islnk():
            check_link_target(archive, name, m.linkname, relative_to_member=False)
        elif not (m.isfile() or m.isdir()):
            raise UnsafeArchiveError(archive, m.name, "is a device, FIFO or other special file")
    return members


def _zip_symlink_target(zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> str | None:
    mode = info.external_attr >> 16
    if stat.S_ISLNK(mode):
        return zf.read(info).decode("utf-8", errors="replace")
    return None


def _check_zip(archive: Path, zf: zipfile.ZipFile) -> list[zipfile.ZipInfo]:
    infos = zf.infolist()
    seen: set[str] = set()
    for info in infos:
        name = check_member_path(archive, info.filename)
        if not info.is_dir():
            _check_unique(archive, name, seen)
        link = _zip_symlink_target(zf, info)
        if link is not None:
            check_link_target(archive, name, link, relative_to_member=True)
    return infos


def _inside(root: str, path: Path) -> bool:
    real = os.path.realpath(path)
    return real == root or real.startswith(root + os.sep)


def _extract_zip(archive: Path, dest: Path, progress: bool, limits: dict) -> None:
    root = os.path.realpath(dest)
    with zipfile.ZipFile(archive) as zf:
        infos = _check_zip(archive, zf)
        # zipfile reads no more than a member's declared size, so the declared sizes bound the output.
        check_sizes(archive, sum(i.file_size for i in infos), **limits)
        for info in tqdm(infos, desc=f"extract {archive.name}", unit="file", disable=not progress):
            link = _zip_symlink_target(zf, info)
            out = dest / check_member_path(archive, info.filename)
            # Links already extracted may redirect a lexically safe path; resolve the real one.
            if not _inside(root, out.parent):
                raise UnsafeArchiveError(
                    archive, info.filename, "would be written through a link to outside the target"
                )
            if link is not None:
                out.parent.mkdir(parents=True, exist_ok=True)
                os.symlink(link, out)
                if not _inside(root, out):
                    out.unlink()
                    raise UnsafeArchiveError(
                        archive, info.filename, f"is a link to {link!r}, outside the target directory"
                    )
            elif info.is_dir():
                out.mkdir(parents=True, exist_ok=True)
            else:
                out.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, open(out, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)


def _check_tar_end(archive: Path, tar: tarfile.TarFile) -> None:
    """Refuse bytes after the last member that are not the end-of-archive zero blocks: tarfile
    reads a header it cannot parse as the end, so a file spliced or cut mid-header would pass."""
    fileobj = tar.fileobj
    assert fileobj is not None
    fileobj.seek(tar.offset)
    for block in iter(lambda: fileobj.read(1 << 20), b""):
        if block.count(0) != len(block):
            raise tarfile.ReadError(f"data after the last readable member (byte {tar.offset}) is not tar padding")


def _extract_tar(archive: Path, dest: Path, mode: str, progress: bool, limits: dict) -> None:
    with tarfile.open(archive, mode) as tar:
        members = _check_tar(archive, tar)
        _check_tar_end(archive, tar)
        check_sizes(archive, sum(m.size for m in members if m.isfile()), **limits)
        for m in tqdm(members, desc=f"extract {archive.name}", unit="file", disable=not progress):
            # The "data" filter re-checks every member (defence in depth) and drops unsafe modes.
            tar.extract(m, dest, filter="data")


def safe_extract(
    archive: Path,
    target: Path,
    *,
    kind: ArchiveKind,
    required: str | None = None,
    extra_files: Mapping[str, bytes] | None = None,
    progress: bool = False,
    max_bytes: int | None = None,
    max_ratio: float = MAX_RATIO,
) -> Path:
    """Extract ``archive`` into ``target`` atomically and return ``target``.

    kind: "zip", "tar", "tar.gz", or "file" (a single file, copied into ``target``).
    required: a relative path that must exist in the extracted tree, else nothing is committed.
    extra_files: {relative name: bytes} written into the tree before it takes its final name
        (the completion stamp of a download).
    max_bytes, max_ratio: refuse an archive whose members add up to more bytes, or to more than
        ``max_ratio`` times its own size (see :func:`check_sizes`).
    Raises UnsafeArchiveError (naming the member) before anything is written when a member is unsafe,
    and BadArchiveError when the archive does not open, list and extract, or lacks ``required``.
    """
    archive = Path(archive)
    limits = {"max_bytes": max_bytes, "max_ratio": max_ratio}
    with atomic_directory(Path(target)) as tmp:
        try:
            if kind == "zip":
                _extract_zip(archive, tmp, progress, limits)
            elif kind == "tar":
                _extract_tar(archive, tmp, "r:", progress, limits)
            elif kind == "tar.gz":
                _extract_tar(archive, tmp, "r:gz", progress, limits)
            elif kind == "file":
                shutil.copyfile(archive, tmp / archive.name)
            else:
                raise ValueError(f"unsupported archive kind {kind!r}; supported: zip, tar, tar.gz, file")
        except _READ_ERRORS as err:
            raise BadArchiveError(archive, kind, f"{type(err).__name__}: {err}") from None
        if required is not None and not (tmp / required).exists():
            raise BadArchiveError(
                archive, kind, f"it does not contain {required!r} (not the expected archive, or incomplete)"
            )
        for rel, data in (extra_files or {}).items():
            (tmp / rel).write_bytes(data)
    return Path(target)
