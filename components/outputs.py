"""Output folders a user names (``predict --out``, ``export --out``, ``label --images --out``): what
fmbseg may write there, and the one check of a relative path built from stored data.

The rule every such command follows: it never replaces or deletes a file it did not write. A folder
fmbseg writes keeps the list of what it wrote, ``<out>/.fmbseg-outputs.json`` (the manifest),
extended before each run's first write with everything that run will write. Then:

- a folder that is absent, empty, or holds a manifest is fmbseg's: a rerun resumes or replaces
  its own files;
- a non-empty folder without a manifest is the user's: refused, unless the user passes
  ``--overwrite`` to let fmbseg write next to their files;
- whatever the folder, a file at a path the run writes, or inside a folder the run replaces as a
  whole, that the manifest does not list is refused, ``--overwrite`` or not.

A manifest entry ending in ``/`` claims a whole tree (the Stage 1 store of ``label --images``).
Every check reads only; :func:`claim_outputs` is the first write, and is meant to run under the
command's :func:`components.io.output_lock`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path, PurePosixPath

from components.io import atomic_write_text

__all__ = [
    "MANIFEST_FILE",
    "safe_relative",
    "check_apart",
    "owned_outputs",
    "check_output_folder",
    "claim_outputs",
]

MANIFEST_FILE = ".fmbseg-outputs.json"
_SHOWN = 3  # paths named in a refusal


def safe_relative(text: str, *, what: str) -> PurePosixPath:
    """``text`` as a relative POSIX path that stays inside the folder it is joined to; ValueError
    (naming ``what``, e.g. "image id") for an empty, absolute or ``..``-holding one.

    The one check of every path built from stored or user-given data (image ids, record outputs,
    shard ids, artifact paths): joining such a path to a folder can then never leave the folder.
    """
    path = PurePosixPath(text)
    if not text or path.is_absolute() or text.startswith("~") or "\\" in text or "\0" in text:
        raise ValueError(f"{what} {text!r} is not a relative path (absolute, empty or with '\\', '~' or NUL): refused")
    if ".." in path.parts or path.parts == (".",):
        raise ValueError(f"{what} {text!r} leaves its folder ('..'): refused")
    return path


def check_apart(out: str | os.PathLike[str], folders: Iterable[str | os.PathLike[str]], *,
                files: Iterable[str | os.PathLike[str]] = (), flag: str = "--out", what: str = "source") -> None:
    """ValueError unless the output folder ``out`` and every input folder keep apart (neither
    holds the other) and ``out`` holds none of the input ``files``: a run must not write over its
    inputs, nor see its outputs as inputs on the next run."""
    dest = Path(out).resolve()
    for folder in folders:
        src = Path(folder).resolve()
        if dest == src or dest.is_relative_to(src) or src.is_relative_to(dest):
            raise ValueError(f"{flag} {out} and the {what} folder {folder} must not contain each other "
                             "(outputs would replace or join the inputs)")
    for file in files:
        if Path(file).resolve().is_relative_to(dest):
            raise ValueError(f"{flag} {out} holds the {what} {file}: outputs would replace the inputs")


def owned_outputs(out: str | os.PathLike[str]) -> set[str] | None:
    """The paths (relative, POSIX) the manifest of ``out`` lists; None when ``out`` has none.
    ValueError for a manifest that cannot be read."""
    path = Path(out) / MANIFEST_FILE
    if not path.is_file():
        return None
    try:
        files = json.loads(path.read_text(encoding="utf-8"))["files"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path} is damaged ({err}): move {out} aside, or delete the file to treat "
                         f"{out} as a folder of your own") from None
    return {str(safe_relative(f.rstrip("/"), what=f"{path} entry")) + ("/" if f.endswith("/") else "") for f in files}


def _is_owned(relative: str, owned: set[str]) -> bool:
    if relative in owned:
        return True
    parts = relative.split("/")
    return any("/".join(parts[:i]) + "/" in owned for i in range(1, len(parts)))


def _tree_files(root: Path) -> list[Path]:
    """Files and links under ``root`` (links not followed)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        found.extend(Path(dirpath) / name for name in filenames)
        found.extend(Path(dirpath) / name for name in dirnames if os.path.islink(os.path.join(dirpath, name)))
    return found


def check_output_folder(out: str | os.PathLike[str], planned: Iterable[str], *, overwrite: bool,
                        trees: Sequence[str] = (), flag: str = "--out") -> None:
    """Refuse (ValueError, one line) to write ``planned`` (paths relative to ``out``; an entry
    ending in '/' is a tree) and to replace the folders ``trees`` as a whole, where that would
    touch what fmbseg did not write (the rules of this module's docstring). Writes nothing."""
    root = Path(out)
    if os.path.lexists(root) and not root.is_dir():
        raise ValueError(f"{flag} {out} is a file, not a folder")
    if not root.is_dir():
        return
    owned = owned_outputs(root)
    if owned is None:
        owned = set()
        theirs = sorted(e.name for e in os.scandir(root))
        if theirs and not overwrite:
            raise ValueError(f"{flag} {out} is not empty ({len(theirs)} entries, e.g. {', '.join(theirs[:_SHOWN])}) and "
                             "fmbseg did not write it: choose a new folder, or pass --overwrite to write next to "
                             "those files (fmbseg never replaces a file it did not write)")
    clashes: list[str] = []
    linked: dict[str, bool] = {}  # sub-folder -> whether it is a link (a write there would land elsewhere)
    for entry in planned:
        rel = entry.rstrip("/")
        target = root / rel
        replaced_tree = rel in trees and target.is_dir() and not target.is_symlink()  # its files are checked below
        if os.path.lexists(target) and not replaced_tree and not _is_owned(entry, owned) and not _is_owned(rel, owned):
            clashes.append(rel)
        parts = rel.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            folder = "/".join(parts[:i])
            if folder not in linked:
                linked[folder] = os.path.islink(root / folder)
            if linked[folder]:
                clashes.append(f"{folder} (a link)")
                break
    for tree in trees:
        if (root / tree).is_dir():
            clashes.extend(p.relative_to(root).as_posix() for p in _tree_files(root / tree)
                           if not _is_owned(p.relative_to(root).as_posix(), owned))
    if clashes:
        clashes = sorted(set(clashes))
        raise ValueError(f"{flag} {out} holds {len(clashes)} file(s) that fmbseg did not write and would replace: "
                         f"{', '.join(clashes[:_SHOWN])}{' ...' if len(clashes) > _SHOWN else ''} "
                         "(move them away first; --overwrite never replaces a file fmbseg did not write)")


def claim_outputs(out: str | os.PathLike[str], planned: Iterable[str]) -> None:
    """Add ``planned`` to the manifest of ``out`` (created with the folder), before their first write."""
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    entries = (owned_outputs(root) or set()) | {str(p) for p in planned}
    atomic_write_text(root / MANIFEST_FILE, json.dumps({"written_by": "fmbseg", "files": sorted(entries)}) + "\n")
