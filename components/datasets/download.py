"""Download, verify and unpack the registry's sources (``fmbseg download <dataset>``).

A download streams into ``<file>.part`` next to its final name, resumes an interrupted transfer
with an HTTP Range request, retries connection errors and 5xx answers with exponential backoff,
and tries the next URL (a mirror) when one fails for good. The file takes its final name only
after its size and every known checksum match. Where the registry has no sha256, the first
download that also opens, lists and extracts as a valid archive records it in a lock file (JSON),
and every later download must match it; an archive that fails to extract is removed and nothing
is pinned. A whole transfer has a deadline, also without a size in the registry (a server that
drips bytes never hits a read timeout); a timer cuts the connection when it passes, so a read that
waits on a slow or silent server ends then, not at the next block.

Data a user already has (``root`` override) is verified and used in place: a directory must hold
the source's layout, an archive must match the checksums; neither is copied or ever deleted.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import hashlib
import json
import os
import shutil
import socket
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import requests
from tqdm.auto import tqdm

from components.datasets.extract import BadArchiveError, safe_extract
from components.datasets.registry import SourceSpec, get_source
from components.io import atomic_write_json

__all__ = [
    "DownloadError",
    "Fetched",
    "ChecksumMismatchError",
    "InsufficientDiskSpaceError",
    "ManualDownloadRequired",
    "STAMP_NAME",
    "download_file",
    "download_source",
    "file_digests",
    "check_free_space",
    "read_lock",
    "read_stamp",
]

STAMP_NAME = ".fmbseg_source.json"  # written into every extracted tree this module produced
_CHUNK = 1 << 16  # small enough that a cut transfer keeps nearly all it received
_MAX_BACKOFF_S = 60.0
_DEADLINE_BASE_S = 600.0  # the default deadline: 10 min plus the (expected or approximate) size at
_MIN_AVERAGE_RATE = 100_000  # this many bytes/s


class DownloadError(RuntimeError):
    """A source could not be fetched, verified or placed."""


class ChecksumMismatchError(DownloadError):
    """A file's size or digest differs from the expected one."""

    def __init__(self, message: str, *, path: Path, algorithm: str, expected: str, got: str) -> None:
        super().__init__(message)
        self.path = path
        self.algorithm = algorithm
        self.expected = expected
        self.got = got


class InsufficientDiskSpaceError(DownloadError):
    """The disk holding the data directory lacks room for the download and its extraction."""


class ManualDownloadRequired(DownloadError):
    """The source needs a login; the message says where to place the file by hand."""


class Fetched(NamedTuple):
    """A completed transfer: the part file (not yet verified) and the URL that served it."""

    path: Path
    url: str


class _Retryable(Exception):
    """A transfer failure worth retrying on the same URL."""


class _UrlFailed(Exception):
    """A transfer failure that no retry on this URL will fix (4xx, wrong size)."""


class _DeadlinePassed(Exception):
    """The whole download took longer than its deadline."""


class _DeadlineTimer:
    """A timer that fires at ``deadline_at`` (use it as a context manager): it sets ``fired`` and
    shuts down the sockets of the answers handed to :meth:`watch`, so that a read blocked on them
    returns at once (a read timeout only fires on silence, and a server that drips bytes fills a
    64 KiB block in hours)."""

    def __init__(self, deadline_at: float) -> None:
        self.fired = threading.Event()
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._timer = threading.Timer(max(deadline_at - time.monotonic(), 0.0), self._cut)
        self._timer.daemon = True

    def __enter__(self) -> _DeadlineTimer:
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._timer.cancel()
        with self._lock:
            for sock in self._sockets:
                sock.close()

    def watch(self, resp: requests.Response) -> None:
        """Cut ``resp``'s connection when the timer fires (at once if it has): a duplicate of its
        socket (for TLS, the TCP socket under it) is shut down, which ends the reads of the original."""
        with contextlib.suppress(OSError, ValueError, AttributeError):  # no socket: the body was already read
            sock = socket.socket(fileno=os.dup(resp.raw.fileno()))
            with self._lock:
                self._sockets.append(sock)
                if self.fired.is_set():
                    sock.shutdown(socket.SHUT_RDWR)

    def _cut(self) -> None:
        with self._lock:
            self.fired.set()
            for sock in self._sockets:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)


# ------------------------------------------------------------------------------------- helpers
def _gb(n: int | float) -> str:
    return f"{n / 1e9:.2f} GB"


def file_digests(path: Path, algorithms: Sequence[str], *, progress: bool = False) -> dict[str, str]:
    """Hex digests of one file for every algorithm in ``algorithms``, in a single read."""
    hashers = {a: hashlib.new(a) for a in dict.fromkeys(algorithms)}
    size = path.stat().st_size
    with (
        open(path, "rb") as f,
        tqdm(total=size, unit="B", unit_scale=True, desc=f"verify {path.name}", disable=not progress) as bar,
    ):
        for block in iter(lambda: f.read(_CHUNK), b""):
            for h in hashers.values():
                h.update(block)
            bar.update(len(block))
    return {a: h.hexdigest() for a, h in hashers.items()}


def check_free_space(path: Path, needed_bytes: int, *, what: str) -> None:
    """Refuse with the numbers when the disk holding ``path`` has less than ``needed_bytes`` free."""
    probe = Path(path).absolute()
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if needed_bytes > free:
        raise InsufficientDiskSpaceError(
            f"not enough disk space for {what}: needs {_gb(needed_bytes)}, {_gb(free)} free on the disk "
            f"holding {probe}. Free {_gb(needed_bytes - free)} or more, point the data directory at a "
            "larger disk, or set datasets.<source>.root to a copy you already have."
        )


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``<path>.flock`` (download stages that run in parallel)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".flock"), "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def read_lock(lock_file: Path) -> dict[str, Any]:
    """The lock file's content: {"sources": {source: {"filename", "sha256", "size", ...}}}."""
    if not lock_file.exists():
        return {"sources": {}}
    data = json.loads(lock_file.read_text(encoding="utf-8"))
    if not isinstance(data, dict) or not isinstance(data.get("sources"), dict):
        raise DownloadError(f"{lock_file} is not an fmbseg download lock file (no 'sources' mapping)")
    return data


def _record_lock(lock_file: Path, spec: SourceSpec, *, sha256: str, size: int, origin: str) -> None:
    with _locked(lock_file):
        data = read_lock(lock_file)
        data["sources"][spec.name] = {
            "filename": spec.filename,
            "sha256": sha256,
            "size": size,
            "recorded_from": origin,
            "recorded_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
        atomic_write_json(lock_file, data)


def read_stamp(extracted: Path) -> dict[str, Any] | None:
    """The completion stamp of a tree extracted by :func:`download_source` (None when absent)."""
    path = extracted / STAMP_NAME
    if not path.exists():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def _expected_digests(spec: SourceSpec, lock_file: Path) -> tuple[dict[str, str], dict[str, str]]:
    """({algorithm: hex}, {algorithm: where that expectation comes from})."""
    expected = dict(spec.reference_digests)
    origin = {a: f"reference digest in the registry ({spec.checksum_note})" for a in expected}
    if spec.sha256 is not None:
        expected["sha256"] = spec.sha256
        origin["sha256"] = "the registry"
    else:
        entry = read_lock(lock_file)["sources"].get(spec.name)
        if entry is not None and entry.get("filename") == spec.filename:
            expected["sha256"] = entry["sha256"]
            origin["sha256"] = f"the lock file {lock_file} (recorded from {entry.get('recorded_from')})"
    return expected, origin


def _verify(
    path: Path,
    *,
    spec: SourceSpec,
    expected: Mapping[str, str],
    origin: Mapping[str, str],
    remedy: str,
    progress: bool,
) -> dict[str, str]:
    """Check size and digests of ``path``; return its digests (sha256 always among them)."""
    size = path.stat().st_size
    if spec.size_bytes is not None and size != spec.size_bytes:
        raise ChecksumMismatchError(
            f"size mismatch for {path.name} ({path}): expected {spec.size_bytes} bytes, got {size}. {remedy}",
            path=path,
            algorithm="size",
            expected=str(spec.size_bytes),
            got=str(size),
        )
    digests = file_digests(path, ["sha256", *expected], progress=progress)
    for algorithm, want in expected.items():
        got = digests[algorithm]
        if got.lower() != want.lower():
            raise ChecksumMismatchError(
                f"checksum mismatch for {path.name} ({path}): expected {algorithm} {want} "
                f"(from {origin[algorithm]}), got {got}. {remedy}",
                path=path,
                algorithm=algorithm,
                expected=want,
                got=got,
            )
    return digests


# ------------------------------------------------------------------------------------ transfer
def _parse_content_range(value: str | None) -> tuple[int, int | None]:
    """'bytes 100-199/1000' -> (100, 1000); total None for '*'."""
    if not value or not value.startswith("bytes "):
        raise _Retryable(f"206 answer without a usable Content-Range ({value!r})")
    span, _, total = value[len("bytes ") :].partition("/")
    start = int(span.split("-")[0])
    return start, (None if total.strip() == "*" else int(total))


def _transfer_once(
    session: requests.Session,
    url: str,
    part: Path,
    *,
    expected_size: int | None,
    timeout: float,
    deadline_at: float,
    bar: tqdm,
) -> bool:
    """One HTTP request continuing ``part``; True when the file is complete, False when it made
    progress but is not (the caller retries at once). Raises _Retryable, _UrlFailed or
    _DeadlinePassed (connecting and waiting for the answer are bounded by the time left, reading the
    body by :class:`_DeadlineTimer`)."""
    offset = part.stat().st_size if part.exists() else 0
    if expected_size is not None and offset == expected_size:
        return True
    left = deadline_at - time.monotonic()
    if left <= 0:
        raise _DeadlinePassed
    wait = min(timeout, left)
    # identity: byte offsets (Range, Content-Length) must count the stored bytes, not decoded ones.
    headers = {"Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    with _DeadlineTimer(deadline_at) as timer:
        try:
            total, received = _receive(session, url, part, headers=headers, offset=offset,
                                       expected_size=expected_size, timeout=wait, timer=timer, bar=bar)
        except requests.TooManyRedirects as err:
            raise _UrlFailed(f"redirect loop ({err})") from None
        except (
            requests.ConnectionError,
            requests.Timeout,
            requests.exceptions.ChunkedEncodingError,
            requests.exceptions.ContentDecodingError,  # a Content-Encoding the body does not have
        ) as err:
            if timer.fired.is_set():
                raise _DeadlinePassed from None
            raise _Retryable(f"{type(err).__name__}: {err}") from None
        if timer.fired.is_set():  # a cut without Content-Length reads as the end of the body
            raise _DeadlinePassed
    size = part.stat().st_size
    if total is not None and size < total:
        if received:
            return False
        raise _Retryable(f"connection closed after {size} of {total} bytes")
    return True


def _receive(
    session: requests.Session,
    url: str,
    part: Path,
    *,
    headers: dict[str, str],
    offset: int,
    expected_size: int | None,
    timeout: float,
    timer: _DeadlineTimer,
    bar: tqdm,
) -> tuple[int | None, int]:
    """Request ``url`` and write its body to ``part`` (appended at ``offset`` after a 206);
    return (the file's total size as the server announced it, None when unknown; the bytes
    received). The answer's connection is handed to ``timer`` as soon as it arrives."""
    with session.get(url, stream=True, timeout=(timeout, timeout), headers=headers) as resp:
        timer.watch(resp)
        if resp.status_code == 416:
            # Range not satisfiable: the part is complete (size unknown) or longer than the file.
            total = resp.headers.get("Content-Range", "").rpartition("/")[2]
            if total.isdigit() and int(total) == offset:
                return offset, 0
            part.unlink(missing_ok=True)
            raise _Retryable(f"server refused to resume at byte {offset}; restarting from 0")
        if resp.status_code >= 500:
            raise _Retryable(f"HTTP {resp.status_code} {resp.reason}")
        if resp.status_code >= 400:
            raise _UrlFailed(f"HTTP {resp.status_code} {resp.reason}")
        if resp.status_code == 206:
            start, total = _parse_content_range(resp.headers.get("Content-Range"))
            if start != offset:
                part.unlink(missing_ok=True)
                raise _Retryable(f"server resumed at byte {start}, not {offset}; restarting from 0")
            mode = "ab"
        else:  # 200: a server that ignores Range sends the whole file again
            offset = 0
            length = resp.headers.get("Content-Length")
            total = int(length) if length is not None and length.isdigit() else None
            mode = "wb"
        if expected_size is not None and total is not None and total != expected_size:
            raise _UrlFailed(f"server announces {total} bytes, the registry expects {expected_size}")
        if total is not None:
            bar.total = total
        bar.n = offset
        bar.refresh()
        received = 0
        with open(part, mode) as out:
            for block in resp.iter_content(chunk_size=_CHUNK):
                out.write(block)
                received += len(block)
                bar.update(len(block))
    return total, received


def download_file(
    urls: Sequence[str],
    dest: Path,
    *,
    expected_size: int | None,
    approx_size: int | None = None,
    progress: bool = True,
    retries: int = 5,
    timeout: float = 30.0,
    backoff: float = 1.0,
    deadline: float | None = None,
) -> Fetched:
    """Fetch the first URL that works into ``dest.part`` (resuming it); return the part and the URL.

    The caller verifies the part and renames it; ``dest`` itself is never written here.
    retries: failures without progress tolerated per URL (a transfer that advances resets it);
    backoff: seconds before the first retry, doubled each time (at most 60 s);
    timeout: seconds to connect and between two reads (a server that hangs fails after it);
    deadline: seconds for the whole call, all URLs and retries together, checked on a timer (a
        server that drips bytes, or stops sending, fails within a second of it); None: 10 minutes
        plus ``expected_size`` (else ``approx_size``, else nothing) at 100 kB/s.
    """
    if not urls:
        raise DownloadError(f"no URL to download {dest.name} from")
    if deadline is not None and not deadline > 0:
        raise ValueError(f"deadline must be a positive number of seconds, got {deadline}")
    part = dest.with_name(dest.name + ".part")
    part.parent.mkdir(parents=True, exist_ok=True)
    failures: list[str] = []
    if deadline is None:
        size = expected_size if expected_size is not None else approx_size
        deadline = _DEADLINE_BASE_S + (size or 0) / _MIN_AVERAGE_RATE
    deadline_at = time.monotonic() + deadline
    with (
        requests.Session() as session,
        tqdm(unit="B", unit_scale=True, desc=dest.name, disable=not progress) as bar,
    ):
        for url in urls:
            attempt = 0
            while True:
                size_before = part.stat().st_size if part.exists() else 0
                try:
                    if _transfer_once(
                        session,
                        url,
                        part,
                        expected_size=expected_size,
                        timeout=timeout,
                        deadline_at=deadline_at,
                        bar=bar,
                    ):
                        return Fetched(path=part, url=url)
                    attempt = 0
                    continue
                except _DeadlinePassed:
                    raise DownloadError(
                        f"could not download {dest.name}: {url} passed the deadline of {deadline:.0f} s "
                        f"for the whole transfer. {_partial_note(part)}Set datasets.<source>.url to a "
                        "faster mirror."
                    ) from None
                except _UrlFailed as err:
                    failures.append(f"{url}: {err}")
                    break
                except _Retryable as err:
                    if part.exists() and part.stat().st_size > size_before:
                        attempt = 0
                    attempt += 1
                    if attempt > retries:
                        failures.append(f"{url}: {err} (gave up after {retries} retries)")
                        break
                    pause = min(backoff * 2 ** (attempt - 1), _MAX_BACKOFF_S, deadline_at - time.monotonic())
                    time.sleep(max(pause, 0.0))  # the next try then finds the deadline passed
    raise DownloadError(
        f"could not download {dest.name}:\n  "
        + "\n  ".join(failures)
        + f"\n{_partial_note(part)}Check the network, or set datasets.<source>.url to a mirror, or "
        "datasets.<source>.root to a copy you already have."
    )


def _partial_note(part: Path) -> str:
    """What an error says about the partial file: kept and resumed, when there is one."""
    if not part.exists():
        return ""
    return f"The partial file {part} ({part.stat().st_size} bytes) is kept and the next run resumes it. "


# -------------------------------------------------------------------------------------- sources
def _locate_root(root: Path, marker: str) -> Path | None:
    """The directory that holds ``marker`` given ``root`` or a folder inside that layout.

    ``root`` may be the extracted tree itself (holding ``marker``) or one of the folders named by
    the marker's leading parts (e.g. ``.../ADEChallengeData2016`` for
    ``ADEChallengeData2016/annotations/validation``).
    """
    if (root / marker).exists():
        return root
    parts = Path(marker).parts
    for depth in range(1, len(parts) + 1):
        if depth > len(root.parents):
            break
        candidate = root.parents[depth - 1]
        if Path(*root.parts[-depth:]) == Path(*parts[:depth]) and (candidate / marker).exists():
            return candidate
    return None


def _extract_verified(
    archive: Path,
    spec: SourceSpec,
    extracted: Path,
    digests: Mapping[str, str],
    origin: str,
    progress: bool,
    *,
    lock_file: Path,
    pin: bool,
    owned: bool,
) -> Path:
    """Extract ``archive``; then, with ``pin``, record its sha256 in ``lock_file``.

    An archive that does not open, list or extract is removed when this module downloaded it
    (``owned``) and kept when it is the user's; nothing is pinned either way.
    """
    try:
        result = _extract(archive, spec, extracted, digests, origin, progress)
    except BadArchiveError as err:
        if owned:
            archive.unlink(missing_ok=True)
            fate = f"it was removed and nothing was pinned in {lock_file}; run again to download it afresh"
        else:
            fate = f"your file was left untouched; check that it is {spec.filename} from {spec.homepage}"
        raise DownloadError(f"{err}; {fate}") from None
    if pin:
        _record_lock(lock_file, spec, sha256=digests["sha256"], size=archive.stat().st_size, origin=origin)
    return result


def _extract(
    archive: Path, spec: SourceSpec, extracted: Path, digests: Mapping[str, str], origin: str, progress: bool
) -> Path:
    if extracted.exists() and read_stamp(extracted) is None:
        raise DownloadError(
            f"{extracted} exists but was not produced by fmbseg download; move it away (it is not "
            "replaced: it may be yours) and run again."
        )
    check_free_space(extracted.parent, spec.extracted_bytes, what=f"extracting {spec.filename}")
    st = archive.stat()
    stamp = {
        "source": spec.name,
        "filename": spec.filename,
        "sha256": digests["sha256"],
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "origin": origin,
        "extracted_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    return safe_extract(
        archive,
        extracted,
        kind=spec.archive,
        required=spec.marker,
        extra_files={STAMP_NAME: (json.dumps(stamp, indent=2, sort_keys=True) + "\n").encode()},
        progress=progress,
        # The registry's size is approximate; twice it (plus 64 MiB for tiny fixtures) is no release.
        max_bytes=2 * spec.extracted_bytes + (64 << 20),
    )


def _use_local_root(
    spec: SourceSpec, local_root: Path, *, extracted: Path, lock_file: Path, progress: bool
) -> Path:
    root = Path(local_root).expanduser()
    if not root.exists():
        raise DownloadError(f"datasets.{spec.name}.root is {root}, which does not exist")
    if root.is_dir():
        found = _locate_root(root, spec.marker)
        if found is None:
            raise DownloadError(
                f"datasets.{spec.name}.root {root} does not hold the layout of {spec.filename}: "
                f"expected {root / spec.marker} (or point root at the folder that contains {spec.marker})"
            )
        return found
    stamp = read_stamp(extracted) if extracted.exists() else None
    st = root.stat()
    if stamp is not None and (stamp.get("origin"), stamp.get("size"), stamp.get("mtime_ns")) == (
        str(root),
        st.st_size,
        st.st_mtime_ns,
    ):
        return extracted  # this very file was verified and extracted before
    expected, origin = _expected_digests(spec, lock_file)
    remedy = f"Your file {root} was left untouched; check that it is {spec.filename} from {spec.homepage}."
    digests = _verify(root, spec=spec, expected=expected, origin=origin, remedy=remedy, progress=progress)
    if spec.archive == "file":
        if root.name != spec.filename:
            raise DownloadError(
                f"datasets.{spec.name}.root {root} must be named {spec.filename} (or be the folder holding it)"
            )
        if "sha256" not in expected:
            _record_lock(lock_file, spec, sha256=digests["sha256"], size=st.st_size, origin=str(root))
        return root.parent
    return _extract_verified(
        root, spec, extracted, digests, str(root), progress,
        lock_file=lock_file, pin="sha256" not in expected, owned=False,
    )


def download_source(
    source: str | SourceSpec,
    *,
    raw_dir: Path,
    lock_file: Path,
    url_override: str | None = None,
    local_root: Path | None = None,
    progress: bool = True,
    retries: int = 5,
    timeout: float = 30.0,
    backoff: float = 1.0,
    keep_archive: bool = False,
    deadline: float | None = None,
) -> Path:
    """Fetch, verify and extract one source; return the directory that holds its layout.

    raw_dir: archives go to ``raw_dir/downloads/<filename>``, trees to ``raw_dir/<source>/``.
    url_override: a mirror tried instead of the registry's URLs.
    local_root: data the user already has: an extracted folder (verified by its layout and
        returned as is) or the archive itself (verified by checksum, then extracted).
    lock_file: JSON file pinning the sha256 of every source the registry has none for.
    keep_archive: keep a downloaded archive after extraction (default: remove it; the tree's
        stamp records its sha256).
    deadline: seconds for the whole transfer (see :func:`download_file`).
    """
    spec = get_source(source) if isinstance(source, str) else source
    raw_dir = Path(raw_dir)
    if local_root is not None and Path(local_root).expanduser().is_dir():  # used in place, nothing written
        return _use_local_root(
            spec,
            Path(local_root),
            extracted=raw_dir / spec.name,
            lock_file=Path(lock_file),
            progress=progress,
        )
    # Benchmarks share sources (cs171, co80, coco_object): one process at a time per source.
    with _locked(raw_dir / "downloads" / spec.name):
        return _download_source_locked(
            spec,
            raw_dir=raw_dir,
            lock_file=Path(lock_file),
            url_override=url_override,
            local_root=local_root,
            progress=progress,
            retries=retries,
            timeout=timeout,
            backoff=backoff,
            keep_archive=keep_archive,
            deadline=deadline,
        )


def _download_source_locked(
    spec: SourceSpec,
    *,
    raw_dir: Path,
    lock_file: Path,
    url_override: str | None,
    local_root: Path | None,
    progress: bool,
    retries: int,
    timeout: float,
    backoff: float,
    keep_archive: bool,
    deadline: float | None,
) -> Path:
    extracted = raw_dir / spec.name
    if local_root is not None:
        return _use_local_root(
            spec, Path(local_root), extracted=extracted, lock_file=lock_file, progress=progress
        )

    expected, origin = _expected_digests(spec, lock_file)
    if extracted.exists():
        return _extracted_before(spec, extracted, expected, origin)

    archive = raw_dir / "downloads" / spec.filename
    if not spec.urls and url_override is None:
        return _extract_manual_download(spec, archive, extracted, expected, origin, lock_file=lock_file,
                                        progress=progress)

    urls = (url_override,) if url_override is not None else spec.urls
    if not archive.exists():
        digests, used_url = _fetch_archive(
            spec, urls, archive, expected, origin, lock_file=lock_file, progress=progress, retries=retries,
            timeout=timeout, backoff=backoff, deadline=deadline,
        )
    else:
        used_url = str(archive)
        remedy = f"Delete {archive} and run again to download it afresh."
        digests = _verify(
            archive, spec=spec, expected=expected, origin=origin, remedy=remedy, progress=progress
        )
    result = _extract_verified(
        archive, spec, extracted, digests, used_url, progress,
        lock_file=lock_file, pin="sha256" not in expected, owned=True,
    )
    if not keep_archive:
        archive.unlink()
    return result


def _extracted_before(spec: SourceSpec, extracted: Path, expected: dict[str, str], origin: dict[str, str]) -> Path:
    """A tree fmbseg extracted before, checked against the expected sha256 of its archive."""
    stamp = read_stamp(extracted)
    if stamp is None:
        raise DownloadError(
            f"{extracted} exists but was not produced by fmbseg download. If it holds {spec.filename}'s "
            f"layout, set datasets.{spec.name}.root to it; otherwise move it away and run again."
        )
    if "sha256" in expected and stamp["sha256"] != expected["sha256"]:
        raise ChecksumMismatchError(
            f"{extracted} was extracted from an archive with sha256 {stamp['sha256']}, but "
            f"{origin['sha256']} expects {expected['sha256']}. Move {extracted} away to download again.",
            path=extracted,
            algorithm="sha256",
            expected=expected["sha256"],
            got=stamp["sha256"],
        )
    return extracted


def _extract_manual_download(spec: SourceSpec, archive: Path, extracted: Path, expected: dict[str, str],
                             origin: dict[str, str], *, lock_file: Path, progress: bool) -> Path:
    """A source without URLs: the archive the user put in place (instructions when it is missing),
    verified, then extracted; the user's file is kept."""
    if not archive.exists():
        assert spec.manual_instructions is not None, (
            f"source {spec.name} has neither URLs nor instructions"
        )
        raise ManualDownloadRequired(spec.manual_instructions.format(path=archive))
    remedy = (
        f"Your file {archive} was left untouched; download {spec.filename} again from {spec.homepage}."
    )
    digests = _verify(
        archive, spec=spec, expected=expected, origin=origin, remedy=remedy, progress=progress
    )
    return _extract_verified(
        archive, spec, extracted, digests, str(archive), progress,
        lock_file=lock_file, pin="sha256" not in expected, owned=False,
    )


def _fetch_archive(
    spec: SourceSpec,
    urls: tuple[str, ...],
    archive: Path,
    expected: dict[str, str],
    origin: dict[str, str],
    *,
    lock_file: Path,
    progress: bool,
    retries: int,
    timeout: float,
    backoff: float,
    deadline: float | None,
) -> tuple[dict[str, str], str]:
    """Download the archive (resuming a ``.part``, after checking the disk has room for it and its
    tree), verify it and move it into place; returns (its digests, the URL it came from). A
    transfer with the wrong digest is deleted."""
    part = archive.with_name(archive.name + ".part")
    done = part.stat().st_size if part.exists() else 0
    total = spec.size_bytes if spec.size_bytes is not None else spec.approx_bytes
    check_free_space(
        archive.parent.parent,  # raw_dir (the archive is raw_dir/downloads/<filename>): the tree goes there too
        max(total - done, 0) + spec.extracted_bytes,
        what=f"downloading and extracting {spec.filename}",
    )
    fetched = download_file(
        urls,
        archive,
        expected_size=spec.size_bytes,
        approx_size=spec.approx_bytes,
        progress=progress,
        retries=retries,
        timeout=timeout,
        backoff=backoff,
        deadline=deadline,
    )
    part = fetched.path
    remedy = (
        "The downloaded file was deleted (a corrupted transfer usually succeeds when run again). "
        "If it fails again with the same digest, the file on the server differs from the one "
        f"expected: check {spec.homepage}, and if the change is legitimate remove the entry "
        f"{spec.name!r} from {lock_file}."
    )
    try:
        digests = _verify(part, spec=spec, expected=expected, origin=origin, remedy=remedy, progress=progress)
    except ChecksumMismatchError:
        part.unlink(missing_ok=True)
        raise
    os.replace(part, archive)
    return digests, fetched.url
