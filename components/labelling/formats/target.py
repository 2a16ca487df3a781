"""The folder an export writes: written aside, then put in place whole.

Whether the target may be replaced is the caller's check (components.outputs.check_output_folder
with the target as a tree: it may hold only what fmbseg wrote); this module only makes the
replacement atomic: readers see the old folder or the new one, never a half-written one.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from components.io import swap_in

__all__ = ["fresh_folder"]


@contextlib.contextmanager
def fresh_folder(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield an empty temporary folder next to ``path``; once the block succeeds it becomes
    ``path`` (:func:`components.io.swap_in`). On an error the temporary folder is removed and ``path`` is
    untouched. Leftovers of a killed run (``.<name>.partial-*`` / ``.old-*``) are removed first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for leftover in [*path.parent.glob(f".{path.name}.partial-*"), *path.parent.glob(f".{path.name}.old-*")]:
        shutil.rmtree(leftover, ignore_errors=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{path.name}.partial-", dir=path.parent))
    try:
        yield partial
        swap_in(partial, path)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
