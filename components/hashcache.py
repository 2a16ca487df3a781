"""Content hashes of image files, remembered by (path, size, mtime_ns) so an unchanged file is never
reread to be hashed.

Label, features and predict know images by the sha256 of their bytes; for COCO, rehashing every
file on every run reads ~19 GB (about 40 s). :class:`HashCache` keeps the digest of each file in a
small SQLite file (by default ``.fmbseg/hashes.sqlite`` in the project, git-ignored) under the
file's absolute path, size and mtime in nanoseconds: any change of those rehashes the file.

Safe for concurrent readers and writers (threads of one process share a connection behind a lock;
processes each open their own, and SQLite's WAL journal lets them read while one writes). Two
guards keep a stale digest out: a file whose size or mtime changed while it was being hashed is
not remembered, and neither is one modified less than :data:`RACY_SECONDS` before it was hashed
(a write within the same mtime tick would leave size and mtime unchanged; git's "racy" rule).
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from pathlib import Path

from components.io import file_sha256

__all__ = ["DEFAULT_PATH", "RACY_SECONDS", "HashCache"]

DEFAULT_PATH = Path(".fmbseg") / "hashes.sqlite"
RACY_SECONDS = 2.0

_SCHEMA = """CREATE TABLE IF NOT EXISTS hashes (
    path TEXT PRIMARY KEY, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL, sha256 TEXT NOT NULL
) WITHOUT ROWID"""


class HashCache:
    """sha256 of files by (absolute path, size, mtime_ns), kept in the SQLite file ``db_path``."""

    def __init__(self, db_path: str | os.PathLike[str] = DEFAULT_PATH) -> None:
        self.path = Path(db_path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, timeout=60.0, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA busy_timeout = 60000")
        self._db.execute("PRAGMA journal_mode = WAL")
        self._db.execute("PRAGMA synchronous = NORMAL")  # a lost entry only costs a rehash
        self._db.execute(_SCHEMA)

    def sha256(self, path: str | os.PathLike[str]) -> str:
        """Hex sha256 of the file's bytes: remembered when its size and mtime are unchanged, else
        read and remembered. Raises OSError like ``open`` for a missing or unreadable file."""
        key = os.fsencode(os.path.abspath(path))  # bytes: a file name need not be valid UTF-8
        before = os.stat(key)
        with self._lock:
            row = self._db.execute("SELECT size, mtime_ns, sha256 FROM hashes WHERE path = ?", (key,)).fetchone()
        if row is not None and (row[0], row[1]) == (before.st_size, before.st_mtime_ns):
            return str(row[2])
        started = time.time_ns()
        digest = file_sha256(key)
        after = os.stat(key)
        unchanged = (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
        settled = started - before.st_mtime_ns >= RACY_SECONDS * 1e9
        if unchanged and settled:
            with self._lock:
                self._db.execute("INSERT OR REPLACE INTO hashes VALUES (?, ?, ?, ?)",
                                 (key, before.st_size, before.st_mtime_ns, digest))
        return digest

    def close(self) -> None:
        """Close the database connection."""
        with self._lock:
            self._db.close()

    def __enter__(self) -> HashCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
