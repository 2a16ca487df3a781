"""The folder an export writes: a fresh one, put in place whole, never over a user's files."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = ["check_target", "fresh_folder"]


def check_target(path: str | os.PathLike[str], overwrite: bool) -> None:
    """Raise FileExistsError when ``path`` is a file, or a folder with anything in it and not
    ``overwrite``: an export never writes over what is there unless told to."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{path} exists and is not a folder; choose another --out")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise FileExistsError(f"{path} exists and is not empty; choose another --out or pass --overwrite to replace it")


@contextlib.contextmanager
def fresh_folder(path: str | os.PathLike[str], overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder next to ``path``; once the block succeeds it becomes
    ``path`` (an existing ``path`` is replaced only when empty or with ``overwrite``). On an error
    the temporary folder is removed and ``path`` is untouched."""
    path = Path(path)
    check_target(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{path.name}.partial-", dir=path.parent))
    try:
        yield partial
        check_target(path, overwrite)  # nothing arrived there while we wrote
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.replace(path, old / path.name)
            os.replace(partial, path)
            shutil.rmtree(old)
        else:
            os.replace(partial, path)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
