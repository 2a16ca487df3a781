"""Downloads against a real HTTP server on 127.0.0.1: resume, retries, checksums, mirrors, disk
space, lock file, local roots, manual sources. Timeouts are a fraction of a second."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import tarfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from components.datasets import download
from components.datasets.download import (
    STAMP_NAME,
    ChecksumMismatchError,
    DownloadError,
    InsufficientDiskSpaceError,
    ManualDownloadRequired,
    download_source,
    read_lock,
)
from components.datasets.registry import SourceSpec
from tests.components.datasets.fixtures_http import FixtureServer

FAST = {"progress": False, "retries": 1, "timeout": 0.5, "backoff": 0.01}


def _make_tar(payload: bytes) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in (("fixture/hello.txt", b"hello\n"), ("fixture/payload.bin", payload)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


ARCHIVE = _make_tar(np.random.default_rng(0).integers(0, 256, 300_000, dtype=np.uint8).tobytes())
OTHER_ARCHIVE = _make_tar(b"a different release")
SHA256 = hashlib.sha256(ARCHIVE).hexdigest()


def _spec(urls: tuple[str, ...], **changes: object) -> SourceSpec:
    base = SourceSpec(
        name="fixture",
        filename="fixture.tar",
        urls=urls,
        archive="tar",
        marker="fixture/hello.txt",
        size_bytes=len(ARCHIVE),
        approx_bytes=len(ARCHIVE),
        extracted_bytes=len(ARCHIVE),
        sha256=SHA256,
        license="test fixture",
        homepage="http://127.0.0.1/",
        checksum_note="test fixture",
        benchmarks=(),
    )
    return dataclasses.replace(base, **changes)


@pytest.fixture
def server():
    with FixtureServer({"fixture.tar": ARCHIVE, "other.tar": OTHER_ARCHIVE}) as s:
        yield s


def _download(spec: SourceSpec, tmp_path: Path, **kw: object) -> Path:
    return download_source(spec, raw_dir=tmp_path / "raw", lock_file=tmp_path / "lock.json", **{**FAST, **kw})


def test_plain_download_verifies_extracts_and_stamps(server, tmp_path):
    out = _download(_spec((server.url("ok", "fixture.tar"),)), tmp_path)
    assert out == tmp_path / "raw" / "fixture"
    assert (out / "fixture" / "hello.txt").read_bytes() == b"hello\n"
    stamp = json.loads((out / STAMP_NAME).read_text())
    assert stamp["sha256"] == SHA256
    assert not (tmp_path / "raw" / "downloads" / "fixture.tar").exists()  # archive removed by default
    # A second call finds the stamped tree and makes no request.
    n = len(server.log)
    assert _download(_spec((server.url("ok", "fixture.tar"),)), tmp_path) == out
    assert len(server.log) == n


def test_cut_transfer_resumes_with_range_and_ends_verified(server, tmp_path):
    out = _download(_spec((server.url("cut", "fixture.tar"),)), tmp_path, keep_archive=True)
    ranges = server.requests_for("cut", "fixture.tar")
    assert ranges[0] is None and len(ranges) == 2
    resumed_at = int(ranges[1].removeprefix("bytes=").rstrip("-"))
    assert 0 < resumed_at <= len(ARCHIVE) // 2  # resumed with what the cut transfer delivered
    archive = tmp_path / "raw" / "downloads" / "fixture.tar"
    assert hashlib.sha256(archive.read_bytes()).hexdigest() == SHA256
    assert not archive.with_name("fixture.tar.part").exists()
    assert (out / "fixture" / "payload.bin").stat().st_size == 300_000


def test_resume_from_a_part_left_by_an_earlier_run(server, tmp_path):
    part = tmp_path / "raw" / "downloads" / "fixture.tar.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(ARCHIVE[:1000])
    _download(_spec((server.url("ok", "fixture.tar"),)), tmp_path)
    assert server.requests_for("ok", "fixture.tar") == ["bytes=1000-"]


def test_server_that_ignores_range_restarts_from_zero(server, tmp_path):
    part = tmp_path / "raw" / "downloads" / "fixture.tar.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(b"garbage that must not stay in front")
    out = _download(_spec((server.url("norange", "fixture.tar"),)), tmp_path)
    assert (out / "fixture" / "hello.txt").exists()


def test_5xx_is_retried_with_backoff(server, tmp_path):
    out = _download(_spec((server.url("flaky", "fixture.tar"),)), tmp_path, retries=3)
    assert (out / "fixture" / "hello.txt").exists()
    assert len(server.requests_for("flaky", "fixture.tar")) == 3


def test_corrupted_byte_gives_checksum_error_and_no_final_file(server, tmp_path):
    with pytest.raises(ChecksumMismatchError) as err:
        _download(_spec((server.url("corrupt", "fixture.tar"),)), tmp_path)
    msg = str(err.value)
    assert "fixture.tar" in msg and SHA256 in msg and err.value.got in msg  # which file, expected, got
    assert "run" in msg and "again" in msg  # what to do
    downloads = tmp_path / "raw" / "downloads"
    assert not (downloads / "fixture.tar").exists()
    assert not (downloads / "fixture.tar.part").exists()
    assert not (tmp_path / "raw" / "fixture").exists()


def test_reference_md5_is_verified_too(server, tmp_path):
    spec = _spec((server.url("ok", "fixture.tar"),), sha256=None, reference_digests={"md5": "0" * 32})
    with pytest.raises(ChecksumMismatchError, match="expected md5 0{32}") as err:
        _download(spec, tmp_path)
    assert err.value.got == hashlib.md5(ARCHIVE).hexdigest()


def test_404_fails_fast_with_a_clear_error(server, tmp_path):
    start = time.monotonic()
    with pytest.raises(DownloadError, match="HTTP 404") as err:
        _download(_spec((server.url("missing", "fixture.tar"),)), tmp_path)
    assert time.monotonic() - start < 5
    assert "datasets.<source>.url" in str(err.value)


def test_hanging_server_times_out_within_bounded_time(server, tmp_path):
    start = time.monotonic()
    with pytest.raises(DownloadError, match="Timeout"):
        _download(_spec((server.url("hang", "fixture.tar"),)), tmp_path)
    assert time.monotonic() - start < 8
    assert len(server.requests_for("hang", "fixture.tar")) == 2  # first try + 1 retry


def test_failing_url_falls_back_to_the_mirror_and_the_lock_records_it(server, tmp_path):
    mirror = server.url("ok", "fixture.tar")
    spec = _spec((server.url("missing", "fixture.tar"), mirror), sha256=None)
    _download(spec, tmp_path)
    entry = read_lock(tmp_path / "lock.json")["sources"]["fixture"]
    assert entry["sha256"] == SHA256 and entry["recorded_from"] == mirror


def test_lock_file_pins_the_first_download(server, tmp_path):
    spec = _spec((server.url("ok", "fixture.tar"),), sha256=None, size_bytes=None)
    _download(spec, tmp_path)
    assert read_lock(tmp_path / "lock.json")["sources"]["fixture"]["sha256"] == SHA256
    # A later download (fresh raw dir, same lock) that serves other bytes is refused.
    other = dataclasses.replace(spec, urls=(server.url("ok", "other.tar"),))
    with pytest.raises(ChecksumMismatchError, match="lock file") as err:
        download_source(other, raw_dir=tmp_path / "raw2", lock_file=tmp_path / "lock.json", **FAST)
    assert str(tmp_path / "lock.json") in str(err.value)
    assert not (tmp_path / "raw2" / "downloads" / "fixture.tar").exists()


def test_url_override_replaces_the_registry_urls(server, tmp_path):
    spec = _spec((server.url("missing", "fixture.tar"),))
    _download(spec, tmp_path, url_override=server.url("ok", "fixture.tar"))
    assert server.requests_for("missing", "fixture.tar") == []


def test_refuses_without_enough_disk_space_before_any_request(server, tmp_path):
    spec = _spec(
        (server.url("ok", "fixture.tar"),), approx_bytes=10**16, size_bytes=None, extracted_bytes=10**16
    )
    with pytest.raises(InsufficientDiskSpaceError, match=r"needs 20000000\.00 GB, .* GB free"):
        _download(spec, tmp_path)
    assert server.log == []


def test_local_directory_root_is_verified_and_used_in_place(tmp_path):
    user = tmp_path / "mine"
    (user / "fixture").mkdir(parents=True)
    (user / "fixture" / "hello.txt").write_text("hi")
    spec = _spec(("http://127.0.0.1:9/never",))
    assert _download(spec, tmp_path, local_root=user) == user
    # Pointing at the folder inside the layout works too.
    assert _download(spec, tmp_path, local_root=user / "fixture") == user
    assert not (tmp_path / "raw").exists()  # nothing copied
    with pytest.raises(DownloadError, match="does not hold the layout"):
        _download(spec, tmp_path, local_root=tmp_path)


def test_local_archive_root_is_verified_then_extracted_and_never_deleted(tmp_path):
    user_archive = tmp_path / "fixture.tar"
    user_archive.write_bytes(ARCHIVE)
    out = _download(_spec(()), tmp_path, local_root=user_archive)
    assert (out / "fixture" / "hello.txt").exists() and user_archive.read_bytes() == ARCHIVE

    # The same file again: recognised by its stamp (path, size, mtime), not hashed or extracted again.
    (out / "sentinel").write_text("kept")
    assert _download(_spec(()), tmp_path, local_root=user_archive) == out
    assert (out / "sentinel").exists()

    bad = tmp_path / "bad.tar"
    mid = len(ARCHIVE) // 2
    bad.write_bytes(ARCHIVE[:mid] + bytes([ARCHIVE[mid] ^ 1]) + ARCHIVE[mid + 1 :])
    with pytest.raises(ChecksumMismatchError, match="left untouched"):
        download_source(
            _spec(()), raw_dir=tmp_path / "raw2", lock_file=tmp_path / "lock.json", local_root=bad, **FAST
        )
    assert bad.exists() and bad.stat().st_size == len(ARCHIVE)


def test_manual_source_says_where_to_place_the_file_then_runs_from_there(tmp_path):
    spec = _spec((), manual_instructions="log in and place the zip at {path}")
    expected_path = tmp_path / "raw" / "downloads" / "fixture.tar"
    with pytest.raises(ManualDownloadRequired, match=str(expected_path)):
        _download(spec, tmp_path)
    expected_path.write_bytes(ARCHIVE)
    out = _download(spec, tmp_path)
    assert (out / "fixture" / "hello.txt").exists()
    assert expected_path.exists()  # the user's file is kept


def test_foreign_tree_under_the_raw_name_is_not_touched(tmp_path):
    foreign = tmp_path / "raw" / "fixture"
    foreign.mkdir(parents=True)
    (foreign / "precious.txt").write_text("mine")
    with pytest.raises(DownloadError, match="not produced by fmbseg"):
        _download(_spec(("http://127.0.0.1:9/never",)), tmp_path)
    user_archive = tmp_path / "fixture.tar"
    user_archive.write_bytes(ARCHIVE)
    with pytest.raises(DownloadError, match="not produced by fmbseg"):
        _download(_spec(()), tmp_path, local_root=user_archive)
    assert [p.name for p in foreign.iterdir()] == ["precious.txt"]


# ------------------------------------------------------------- sources without a published digest
UNPINNED = {"sha256": None, "size_bytes": None}


@pytest.mark.parametrize("mode", ["short", "html", "nolen", "lie206"])
def test_a_bad_archive_is_removed_and_never_pinned(server, tmp_path, mode):
    """A transfer that ends 'complete' but is not the archive must not become the trusted sha256."""
    if mode == "lie206":
        part = tmp_path / "raw" / "downloads" / "fixture.tar.part"
        part.parent.mkdir(parents=True)
        part.write_bytes(ARCHIVE[:1000])
    with pytest.raises(DownloadError, match="not a valid tar archive") as err:
        _download(_spec((server.url(mode, "fixture.tar"),), **UNPINNED), tmp_path)
    assert "removed" in str(err.value) and "fixture.tar" in str(err.value)
    assert "fixture" not in read_lock(tmp_path / "lock.json")["sources"]
    downloads = tmp_path / "raw" / "downloads"
    assert not (downloads / "fixture.tar").exists() and not (downloads / "fixture.tar.part").exists()
    assert not (tmp_path / "raw" / "fixture").exists()
    # The correct file is then accepted and pinned.
    out = _download(_spec((server.url("ok", "fixture.tar"),), **UNPINNED), tmp_path)
    assert (out / "fixture" / "payload.bin").stat().st_size == 300_000
    assert read_lock(tmp_path / "lock.json")["sources"]["fixture"]["sha256"] == SHA256


@pytest.mark.parametrize("mode", ["redirect", "gzlie"])
def test_redirect_loop_and_lying_encoding_fall_back_to_the_mirror(server, tmp_path, mode):
    mirror = server.url("ok", "fixture.tar")
    _download(_spec((server.url(mode, "fixture.tar"), mirror), **UNPINNED), tmp_path)
    assert read_lock(tmp_path / "lock.json")["sources"]["fixture"]["recorded_from"] == mirror


def test_a_slow_drip_server_hits_the_overall_deadline(server, tmp_path):
    start = time.monotonic()
    with pytest.raises(DownloadError, match="deadline"):
        _download(_spec((server.url("drip", "fixture.tar"),)), tmp_path, deadline=1.0)
    assert time.monotonic() - start < 5
    assert (tmp_path / "raw" / "downloads" / "fixture.tar.part").exists()  # kept for a later resume


def _timed_download(spec: SourceSpec, tmp_path: Path, limit: float, **kw: object) -> tuple[BaseException | None, float]:
    """(what the download raised, its wall time), the download run in a thread given up on after
    ``limit`` seconds (a download without a working deadline would hold the test for hours; the
    server's exit ends it)."""
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            _download(spec, tmp_path, **kw)
            outcome.append(None)
        except BaseException as err:  # noqa: BLE001 - handed to the test
            outcome.append(err)

    start = time.monotonic()
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(limit)
    assert not thread.is_alive(), f"the download still ran after {limit:.0f} s"
    return outcome[0], time.monotonic() - start


@pytest.mark.parametrize("mode", ["trickle", "stall", "hang"])
def test_an_explicit_deadline_fires_on_time_on_a_timer(server, tmp_path, mode):
    """A server that sends a byte at a time (a 64 KiB read never completes), stops sending, or never
    answers is cut off within a second of the deadline, long before the 30 s read timeout."""
    err, wall = _timed_download(_spec((server.url(mode, "fixture.tar"),)), tmp_path, limit=15,
                                deadline=2.0, timeout=30.0, retries=3)
    assert isinstance(err, DownloadError) and "deadline of 2 s" in str(err), err
    assert 2.0 <= wall < 3.0, wall
    assert not (tmp_path / "raw" / "downloads" / "fixture.tar").exists()
    part = tmp_path / "raw" / "downloads" / "fixture.tar.part"
    assert ("is kept" in str(err)) == part.exists()  # the message names a partial file only when there is one


def test_a_source_without_a_size_in_the_registry_still_has_a_deadline(server, tmp_path, monkeypatch):
    """The default deadline (a base plus the size at a minimum rate) falls back on the registry's
    approximate size: 0.5 s + 300 kB at 100 kB/s here, where the drip takes 15 s."""
    monkeypatch.setattr(download, "_DEADLINE_BASE_S", 0.5)
    spec = _spec((server.url("drip", "fixture.tar"),), size_bytes=None)
    err, wall = _timed_download(spec, tmp_path, limit=12)
    assert isinstance(err, DownloadError) and "deadline of 4 s" in str(err), err
    assert wall < 5.0, wall


def test_a_redirect_loop_fails_at_once_without_claiming_a_partial_file(server, tmp_path):
    start = time.monotonic()
    with pytest.raises(DownloadError, match="redirect") as err:
        _download(_spec((server.url("redirect", "fixture.tar"),)), tmp_path, retries=3, backoff=1.0)
    assert time.monotonic() - start < 3  # no retries with backoff: the loop is the answer
    assert not (tmp_path / "raw" / "downloads" / "fixture.tar.part").exists()
    assert "partial file" not in str(err.value) and "resumes" not in str(err.value)
    assert len(server.requests_for("redirect", "fixture.tar")) == 31  # one try: requests follows 30 redirects
