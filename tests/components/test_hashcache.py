"""HashCache: an unchanged file is not reread, any change of size or mtime rehashes it, the
entries outlive the process, and threads and processes share the file."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from components.hashcache import HashCache

OLD_NS = 1_600_000_000 * 10**9  # 2020: well before the racy window


def _write(path: Path, data: bytes, mtime_ns: int = OLD_NS) -> None:
    path.write_bytes(data)
    os.utime(path, ns=(mtime_ns, mtime_ns))


def test_unchanged_file_is_not_reread_and_any_change_rehashes(tmp_path: Path) -> None:
    image = tmp_path / "a.jpg"
    _write(image, b"first bytes")
    with HashCache(tmp_path / ".fmbseg" / "hashes.sqlite") as cache:
        assert cache.sha256(image) == hashlib.sha256(b"first bytes").hexdigest()
        # same size, same mtime, other bytes: the remembered digest proves the file was not read
        _write(image, b"other bytes")
        assert cache.sha256(image) == hashlib.sha256(b"first bytes").hexdigest()
        _write(image, b"other bytes", OLD_NS + 1)  # touched: rehashed
        assert cache.sha256(image) == hashlib.sha256(b"other bytes").hexdigest()
        _write(image, b"other bytes, longer", OLD_NS + 1)  # same mtime, new size: rehashed
        assert cache.sha256(image) == hashlib.sha256(b"other bytes, longer").hexdigest()
        fresh = tmp_path / "fresh.jpg"
        fresh.write_bytes(b"just written")  # in the racy window: hashed, not remembered
        cache.sha256(fresh)
        fresh.write_bytes(b"just changed")
        assert cache.sha256(fresh) == hashlib.sha256(b"just changed").hexdigest()


def test_a_file_name_that_is_not_utf8_is_cached(tmp_path: Path) -> None:
    image = Path(os.fsdecode(bytes(tmp_path) + b"/caf\xe9.jpg"))  # Latin-1 bytes: a surrogate escape
    _write(image, b"bytes")
    with HashCache(tmp_path / "hashes.sqlite") as cache:
        assert cache.sha256(image) == hashlib.sha256(b"bytes").hexdigest()
        _write(image, b"other")  # same size and mtime: served from the cache
        assert cache.sha256(image) == hashlib.sha256(b"bytes").hexdigest()


def test_entries_are_shared_by_threads_and_processes(tmp_path: Path) -> None:
    db = tmp_path / "hashes.sqlite"
    files = [tmp_path / f"{i}.png" for i in range(40)]
    for i, path in enumerate(files):
        _write(path, f"image {i}".encode())
    with HashCache(db) as cache, ThreadPoolExecutor(max_workers=4) as pool:
        digests = list(pool.map(cache.sha256, files))
    assert digests == [hashlib.sha256(f"image {i}".encode()).hexdigest() for i in range(40)]
    extra = [tmp_path / f"new{i}.png" for i in range(2)]
    for i, path in enumerate(extra):
        _write(path, f"new {i}".encode())
    for path in files:  # new bytes under the old size and mtime: only a cache hit returns the old digest
        _write(path, path.read_bytes().upper())
    script = (
        "import sys; from components.hashcache import HashCache\n"
        "with HashCache(sys.argv[1]) as c: print(' '.join(c.sha256(p) for p in sys.argv[2:]))"
    )
    # two processes at once, each reading the shared entries and writing one new one
    procs = [subprocess.Popen([sys.executable, "-c", script, str(db), *map(str, files), str(new)],
                              stdout=subprocess.PIPE, text=True) for new in extra]
    outputs = [proc.communicate(timeout=120)[0].split() for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0]
    for i, out in enumerate(outputs):
        assert out == [*digests, hashlib.sha256(f"new {i}".encode()).hexdigest()]
    with HashCache(db) as cache:
        _write(extra[0], b"new X")  # same size and mtime as "new 0": remembered by the other process
        assert cache.sha256(extra[0]) == hashlib.sha256(b"new 0").hexdigest()
