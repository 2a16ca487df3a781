"""Progress a person can see, image by image, wherever the images are processed.

- :func:`terminal_bar`: a tqdm bar on stderr (count, images/s, ETA), shown only when stderr is a
  terminal, so logs and pipes stay free of carriage returns.
- :class:`Tally`: images done, counted across threads and processes (Dask and Ray workers): each
  worker appends one byte per image to a file of its own in a folder next to the output, which
  every worker reaches because it writes the output; the flow sums the file sizes while it waits
  (:meth:`Tally.counts`). An append needs no lock and a size cannot be read torn.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["terminal_bar", "Tally", "counter"]

_COLUMNS, _ROWS = 100, 24  # the screen where the terminal does not say its size


def terminal_bar(total: int, desc: str, unit: str = "img") -> Any:
    """A tqdm bar of ``total`` ``unit`` on stderr with rate and ETA; disabled (prints nothing)
    unless stderr is a terminal. Cleared from the screen when closed."""
    from tqdm import tqdm

    terminal = sys.stderr.isatty()
    try:
        columns = os.get_terminal_size(sys.stderr.fileno()).columns if terminal else 0
    except OSError:
        columns = 0
    # a terminal that reports no size (a bare pseudo-terminal) would get an empty bar from tqdm
    sized = {"dynamic_ncols": True} if columns > 0 else {"ncols": _COLUMNS, "nrows": _ROWS}
    return tqdm(total=max(int(total), 0), desc=desc, unit=unit, file=sys.stderr, disable=not terminal, leave=False,
                **sized)


class Tally:
    """Per-image counts of a run's workers (shards, batches) in ``folder``: one file per worker,
    one byte per image. The flow makes it empty (:meth:`fresh`, or ``with``) before it submits
    work, under the output's lock, gives each worker the path of its own file (:meth:`file`), and
    removes the folder at the end; the worker ticks it through :func:`counter`."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)

    @classmethod
    def beside(cls, out: str | Path, name: str) -> Tally:
        """The tally ``name`` of an output ``out``: the folder ``.<out name>.<name>.progress`` next
        to it (as components.io.output_lock's lock file), never inside a stage's output."""
        out = Path(out)
        return cls(out.parent / f".{out.name}.{name}.progress")

    def fresh(self) -> Tally:
        """Empty the folder (what a killed run left there is stale under the output's lock)."""
        self.remove()
        self.folder.mkdir(parents=True)
        return self

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)

    def file(self, worker: int) -> str:
        """The path of worker ``worker``'s file, for :func:`counter` on the worker's side."""
        return (self.folder / str(worker)).as_posix()

    def counts(self) -> dict[int, int]:
        """Images done so far, by worker."""
        counts = {}
        try:
            entries = list(self.folder.iterdir())
        except FileNotFoundError:
            return {}
        for path in entries:
            try:
                counts[int(path.name)] = path.stat().st_size
            except (FileNotFoundError, ValueError):
                continue
        return counts

    def __enter__(self) -> Tally:
        return self.fresh()

    def __exit__(self, *exc: object) -> None:
        self.remove()


def counter(path: str | None) -> Callable[[int], None] | None:
    """``tick(n)``: n more images done, appended to a worker's tally file (:meth:`Tally.file`);
    None without one (a worker run outside a flow)."""
    if path is None:
        return None

    def tick(n: int = 1) -> None:
        with open(path, "ab") as f:
            f.write(b"." * n)

    return tick
