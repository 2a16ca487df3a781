"""Inputs a command did not use, with the reason: one file format for every command.

``label`` keeps them in its store (``skipped.parquet`` beside ``index.parquet``) and ``predict`` in
its output folder, as the same Parquet table: columns ``path`` and ``reason`` (strings), one row
per input, sorted by path. Parquet because the label store is Parquet throughout (its readers and
the exports read it back); a person reads it with
``python -c "import pandas; print(pandas.read_parquet('skipped.parquet'))"``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping

import pyarrow as pa
import pyarrow.parquet as pq

from components.io import atomic_path

__all__ = ["SKIPPED_FILE", "SKIPPED_SCHEMA", "write_skipped", "read_skipped"]

SKIPPED_FILE = "skipped.parquet"
SKIPPED_SCHEMA = pa.schema([("path", pa.string()), ("reason", pa.string())])
_ROW_GROUP = 16  # the label store's row groups: the same rows give the same bytes as its other tables


def write_skipped(path: str | os.PathLike[str], rows: Iterable[Mapping[str, str]]) -> pa.Table:
    """Write ``rows`` ({"path", "reason"}) to ``path`` atomically, sorted by path (no pandas
    metadata: the same rows give the same bytes); returns the table written."""
    table = pa.Table.from_pylist(sorted(rows, key=lambda r: r["path"]), schema=SKIPPED_SCHEMA)
    with atomic_path(path, suffix=".parquet") as tmp:
        pq.write_table(table, tmp, row_group_size=_ROW_GROUP, compression="zstd")
    return table


def read_skipped(path: str | os.PathLike[str]) -> list[dict[str, str]]:
    """The rows of a skipped file ({"path", "reason"}), in file order."""
    return pq.read_table(path, schema=SKIPPED_SCHEMA).to_pylist()
