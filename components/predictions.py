"""Segmenting folders of new images into files (what ``fmbseg predict`` writes), resumably.

Layout of an output folder DIR, for images listed from SOURCEs (:func:`list_sources`), each kept at
its path relative to its SOURCE folder:

- ``DIR/<relative path without extension>.png``: the label map at the image's original size
  (EXIF orientation applied), class index into ``DIR/classes.txt``, 255 = no class; a 16-bit PNG
  (65535 = no class) when the vocabulary has more than 255 classes;
- ``DIR/<relative path without extension>_overlay.jpg`` (with overlays): the image | the prediction, with a legend;
- ``DIR/classes.txt``: the vocabulary, one class per line (synonyms kept);
- ``DIR/predictions.jsonl``: one line per image, in listing order: source path, sha256 of the
  file, size, and each present class with its pixel share, score and mask as COCO RLE;
- ``DIR/skipped.parquet`` (``path``, ``reason``: components/skipped.py, the format of ``label``'s
  store): every input not segmented (never fatal): what the folder scanner of ``label`` refuses (not an image, a dangling or looping link, a link out of the folder
  unless ``label.external_symlinks: follow``), a file that cannot be decoded, and an image above
  the pixel budget (``max_pixels``: its memory grows with its pixels, so it is skipped, not tiled);
- ``DIR/.predict_settings.json``: the key of the settings (model hash, vocabulary, variant,
  protocol) the records were made with;
- ``DIR/.fmbseg-outputs.json``: what fmbseg wrote there (components.outputs): the flow refuses an
  output folder that holds a source, or files it did not write, before its first write.

Resuming: images go through the model in batches fixed by their position in the listing, and the
records of a batch are appended to ``predictions.jsonl`` in one write once its label maps (written
atomically) are in place. A rerun with the same settings key skips every image whose record has
the file's current sha256 (and whose outputs exist), so an interrupted run continues where it
stopped and ends with the same bytes as an uninterrupted one; a torn last line is dropped. Another
key starts the folder's records over. At the end the records are rewritten, atomically, in listing
order.
"""

from __future__ import annotations

import contextvars
import glob
import hashlib
import json
import os
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from components.datasets.readers import (
    IMAGE_EXTENSIONS,
    UnreadableImageError,
    read_image_rgb,
    scan_image_folder,
)
from components.datasets.registry import display_name
from components.io import (
    atomic_write_bytes,
    atomic_write_text,
    decode_label_png,
    encode_label_png,
    file_sha256,
)
from components.outputs import safe_relative
from components.overlay import PANEL_HEIGHT, jpeg_bytes, overlay_picture
from components.prefetch import batched, prefetch
from components.skipped import SKIPPED_FILE, write_skipped

if TYPE_CHECKING:  # the segmenter (torch) loads with the model, not with this module
    from components.segmenter import Segmenter, SegmentResult

__all__ = [
    "CLASSES_FILE",
    "PREDICTIONS_FILE",
    "SETTINGS_FILE",
    "DEFAULT_MAX_PIXELS",
    "Source",
    "Listing",
    "PredictSummary",
    "list_sources",
    "planned_outputs",
    "encode_label_map",
    "decode_label_map",
    "mask_rle",
    "settings_key",
    "PredictionWriter",
    "predict_images",
]

CLASSES_FILE = "classes.txt"
PREDICTIONS_FILE = "predictions.jsonl"
SETTINGS_FILE = ".predict_settings.json"
_GLOB_CHARS = frozenset("*?[")
DEFAULT_MAX_PIXELS = 50_000_000
"""Pixel budget of one image (``--max-pixels``): a 48-megapixel phone photo fits. Peak memory grows
with the pixels of the largest image (decoded RGB, the resized copies, the label map at full size),
so a bigger one is skipped with its size in skipped.parquet instead of taking the machine's memory."""


@dataclass(frozen=True)
class Source:
    """One input file and where its outputs go: ``relative`` is its path under its SOURCE folder
    (a file given by itself: its name)."""

    path: Path
    relative: PurePosixPath

    @property
    def stem(self) -> str:
        """The output name without extension: ``relative`` with its suffix dropped."""
        return str(self.relative.with_suffix(""))


def _glob_base(pattern: str) -> Path:
    """The leading folders of a glob pattern that hold no wildcard."""
    parts = []
    for part in Path(pattern).parts:
        if _GLOB_CHARS & set(part):
            break
        parts.append(part)
    return Path(*parts) if parts else Path(".")


def _under(path: Path, base: Path) -> PurePosixPath:
    return PurePosixPath(path.relative_to(base).as_posix())


class Listing(NamedTuple):
    """What :func:`list_sources` found: the images, every entry it will not segment with the
    reason ([(path, reason)], as the skipped file lists them), and the folders it scanned (given or
    matched by a glob: an output folder must keep apart from them)."""

    sources: list[Source]
    skipped: list[tuple[str, str]]
    folders: list[Path]


def _glob_match(match: Path, base: Path, external_symlinks: str) -> str | None:
    """Why a file a glob matched is not listed (None: it is): the folder scanner's link rules."""
    if not match.exists():
        return f"dangling symbolic link to {os.readlink(match)}"
    if match.is_symlink() and external_symlinks == "refuse":
        target, root = os.path.realpath(match), os.path.realpath(base)
        if not target.startswith(root + os.sep):
            return (f"symbolic link to {target}, outside {base} (refused; set label.external_symlinks: follow to "
                    "segment it)")
    if match.suffix.lower() not in IMAGE_EXTENSIONS:
        return f"not an image file (extension {match.suffix or 'none'!r}; supported: {', '.join(sorted(IMAGE_EXTENSIONS))})"
    return None


def list_sources(sources: Sequence[str | os.PathLike[str]], *, external_symlinks: str = "refuse") -> Listing:
    """The image files of SOURCEs: files as given, folders recursively and globs (``**``
    recursive) matching files or folders, with what is not listed and why.

    Folders go through ``label``'s scanner (components.datasets.readers.scan_image_folder): hidden
    entries are left out; links out of the folder follow ``external_symlinks`` ("refuse" or
    "follow"), and every other entry not used (not an image, a dangling or looping link) is
    reported. Each path keeps its position: sources in the order given, folders and globs sorted. A
    file met twice is listed once (first place). Raises FileNotFoundError for a source that does
    not exist or a glob that matches nothing, ValueError when two images would write the same
    outputs (``a.jpg`` and ``a.png`` in one folder) or no image is found.
    """
    found: list[Source] = []
    skipped: list[tuple[str, str]] = []
    folders: list[Path] = []

    def scan(folder: Path, base: Path) -> None:
        folders.append(folder)
        images, rejected = scan_image_folder(folder, external_symlinks=external_symlinks)
        found.extend(Source(p, _under(p, base)) for p in images)
        skipped.extend((p.as_posix(), reason) for p, reason in rejected)

    for source in sources:
        text = os.fspath(source)
        if _GLOB_CHARS & set(text):
            base = _glob_base(text)
            matches = sorted(Path(p) for p in glob.glob(text, recursive=True))
            if not matches:
                raise FileNotFoundError(f"no file matches {text!r}")
            for match in matches:
                if match.is_dir():
                    scan(match, base)
                elif (reason := _glob_match(match, base, external_symlinks)) is not None:
                    skipped.append((match.as_posix(), reason))
                else:
                    found.append(Source(match, _under(match, base)))
        else:
            path = Path(text)
            if path.is_dir():
                scan(path, path)
            elif path.is_file():
                found.append(Source(path, PurePosixPath(path.name)))
            else:
                raise FileNotFoundError(f"no such file or folder: {text}")
    unique: list[Source] = []
    seen_files: set[Path] = set()
    owners: dict[str, Source] = {}
    clashes = []
    for item in found:
        resolved = item.path.resolve()
        if resolved in seen_files:
            continue
        seen_files.add(resolved)
        if item.stem in owners:
            clashes.append(f"{owners[item.stem].path} and {item.path} -> {item.stem}.png")
            continue
        owners[item.stem] = item
        unique.append(item)
    if clashes:
        raise ValueError("two images would write the same outputs: " + "; ".join(clashes[:5]))
    if not unique:
        raise ValueError(f"no images in {[os.fspath(s) for s in sources]} (extensions: {sorted(IMAGE_EXTENSIONS)})")
    return Listing(unique, sorted(set(skipped)), folders)


def planned_outputs(sources: Sequence[Source], *, overlays: bool) -> list[str]:
    """Every file :func:`predict_images` writes for ``sources`` (paths relative to the output
    folder): what the output folder's manifest claims before the first write."""
    files = [CLASSES_FILE, PREDICTIONS_FILE, SKIPPED_FILE, SETTINGS_FILE]
    for source in sources:
        files.append(f"{source.stem}.png")
        if overlays:
            files.append(f"{source.stem}_overlay.jpg")
    return files


encode_label_map = encode_label_png  # the one PNG codec of label maps (8- or 16-bit)
decode_label_map = decode_label_png


def mask_rle(mask: np.ndarray) -> dict[str, Any]:
    """COCO RLE of a [H, W] bool mask (pycocotools): {"size": [H, W], "counts": str}."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def settings_key(settings: dict[str, Any]) -> str:
    """sha256 of the (JSON-serialisable) settings that change the outputs."""
    text = json.dumps(settings, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def _record(source: Source, sha256: str, result: SegmentResult, classes: Sequence[str]) -> dict[str, Any]:
    height, width = result.label_map.shape
    present = []
    for k in result.present:
        present.append({
            "index": k,
            "name": display_name(classes[k]),
            "share": round(float(result.shares[k]), 6),
            "score": round(float(result.scores[k]), 6),
            "rle": mask_rle(result.label_map == k),
        })
    return {"source": source.path.as_posix(), "output": f"{source.stem}.png", "sha256": sha256,
            "width": width, "height": height, "classes": present}


def _overlay_jpeg(image: np.ndarray, label: np.ndarray, classes: Sequence[str], panel_height: int | None) -> bytes:
    return jpeg_bytes(overlay_picture(image, None, {"prediction": label}, [display_name(c) for c in classes],
                                      panel_height=panel_height))


class PredictSummary(NamedTuple):
    """What a run did: images listed, segmented now, found done (resumed), skipped (unreadable)."""

    images: int
    segmented: int
    resumed: int
    skipped: int


@dataclass
class _Item:
    source: Source
    sha256: str
    image: np.ndarray | None
    error: str | None
    done: bool = False  # segmented by an earlier run with these settings: not decoded


def _pixels(path: Path) -> int:
    """Width x height from the image's header (nothing decoded); 0 when PIL cannot read a header
    (the decoder then reports why)."""
    try:
        with Image.open(path) as im:
            return im.width * im.height
    except (OSError, ValueError, Image.DecompressionBombError):
        return 0


def _load(source: Source, sha256: Callable[[Path], str], is_done: Callable[[Source, str], bool],
          max_pixels: int) -> _Item:
    """Hash the file and, unless an earlier run already segmented these bytes or the image is above
    the pixel budget, decode it."""
    try:
        sha = sha256(source.path)
    except OSError as err:
        return _Item(source, "", None, f"{type(err).__name__}: {err}")
    if is_done(source, sha):
        return _Item(source, sha, None, None, done=True)
    pixels = _pixels(source.path)
    if pixels > max_pixels:
        return _Item(source, sha, None, f"{pixels} pixels, above the pixel budget of {max_pixels} "
                                        "(--max-pixels): skipped, not decoded")
    try:
        return _Item(source, sha, read_image_rgb(source.path), None)
    except UnreadableImageError as err:
        return _Item(source, sha, None, err.reason)


def _read_records(path: Path) -> list[dict[str, Any]]:
    """The complete lines of a predictions.jsonl (a torn last line, from a kill mid-write, dropped);
    ValueError for a record whose output is not a path inside the folder."""
    if not path.exists():
        return []
    data = path.read_bytes()
    complete = data[: data.rfind(b"\n") + 1]
    if len(complete) != len(data):
        with open(path, "r+b") as f:
            f.truncate(len(complete))
    records = [json.loads(line) for line in complete.decode("utf-8").splitlines() if line.strip()]
    for number, record in enumerate(records, start=1):
        safe_relative(record["output"], what=f"{path} line {number}: output")
    return records


class PredictionWriter:
    """The files of one output folder (this module's layout), written a batch at a time on a thread
    of its own while the model runs the next batch.

    Opening a folder readies it for the settings ``key``: the records of another key are dropped
    and the vocabulary is written; :meth:`is_done` tells which images an earlier run with this key
    already segmented. :meth:`submit` writes a batch; :meth:`finish` the skipped inputs and the
    records in listing order. on_image(n): called on the writer thread as n more images are done
    (each segmented one once its files are written; the resumed and skipped ones with their batch).
    """

    def __init__(self, out: Path, classes: Sequence[str], *, key: str, overlays: bool,
                 overlay_height: int | None = PANEL_HEIGHT, on_image: Callable[[int], None] | None = None) -> None:
        self.out = out
        self.classes = list(classes)
        self.overlays = overlays
        self.overlay_height = overlay_height
        self._on_image = on_image
        self._records = out / PREDICTIONS_FILE
        out.mkdir(parents=True, exist_ok=True)
        settings_path = out / SETTINGS_FILE
        previous_key = json.loads(settings_path.read_text())["key"] if settings_path.exists() else None
        if previous_key != key:
            self._records.unlink(missing_ok=True)
            atomic_write_text(settings_path, json.dumps({"key": key}) + "\n")
        atomic_write_text(out / CLASSES_FILE, "".join(f"{c}\n" for c in self.classes))
        self._done = {r["output"]: r for r in _read_records(self._records)}
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="predict-writer")
        self._pending: Future[None] | None = None

    def is_done(self, source: Source, sha: str) -> bool:
        """Whether an earlier run segmented these bytes (``sha``) and its outputs are in place."""
        record = self._done.get(f"{source.stem}.png")
        return (record is not None and record["sha256"] == sha and (self.out / record["output"]).exists()
                and (not self.overlays or (self.out / f"{source.stem}_overlay.jpg").exists()))

    def submit(self, items: Sequence[_Item], results: Sequence[SegmentResult], others: int) -> None:
        """Write the outputs of ``items`` (segmented as ``results``) once the previous batch's are in
        place; ``others``: the batch's images not segmented (resumed or skipped), done with it."""
        self.wait()
        # the caller's context (a flow run's) goes along, for an on_image that reports to it
        self._pending = self._thread.submit(contextvars.copy_context().run, self._write, items, results, others)

    def wait(self) -> None:
        """Block until the submitted batch is written (re-raising its error)."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def _tick(self, n: int) -> None:
        if self._on_image is not None and n:
            self._on_image(n)

    def _write(self, items: Sequence[_Item], results: Sequence[SegmentResult], others: int) -> None:
        """The label maps and overlays (each atomically), then the batch's records in one append."""
        lines = []
        for item, result in zip(items, results, strict=True):
            assert item.image is not None
            stem = item.source.stem
            atomic_write_bytes(self.out / f"{stem}.png", encode_label_png(result.label_map, palette=True))
            if self.overlays:
                atomic_write_bytes(self.out / f"{stem}_overlay.jpg",
                                   _overlay_jpeg(item.image, result.label_map, self.classes, self.overlay_height))
            lines.append(json.dumps(_record(item.source, item.sha256, result, self.classes), separators=(",", ":")))
            self._tick(1)
        if lines:
            with open(self._records, "ab") as f:  # the batch's records in one write
                f.write(("\n".join(lines) + "\n").encode("utf-8"))
                f.flush()
                os.fsync(f.fileno())
        self._tick(others)

    def finish(self, sources: Sequence[Source], skipped: Iterable[tuple[str, str]]) -> None:
        """After the last batch: the skipped inputs (components/skipped.py), and the records
        rewritten atomically in listing order (the last record of an image wins)."""
        self.wait()
        write_skipped(self.out / SKIPPED_FILE, [{"path": path, "reason": reason} for path, reason in skipped])
        records = {r["output"]: r for r in _read_records(self._records)}
        ordered = [records[f"{s.stem}.png"] for s in sources if f"{s.stem}.png" in records]
        atomic_write_text(self._records, "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in ordered))

    def __enter__(self) -> PredictionWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self._thread.shutdown(wait=True)  # an interrupted run still completes the batch being written


def predict_images(
    segmenter: Segmenter,
    sources: Sequence[Source],
    classes: Sequence[str],
    out_dir: str | os.PathLike[str],
    *,
    key: str,
    refine: bool = False,
    overlays: bool = False,
    overlay_height: int | None = PANEL_HEIGHT,
    batch_size: int = 8,
    num_workers: int = 2,
    on_image: Callable[[int], None] | None = None,
    sha256: Callable[[Path], str] = file_sha256,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    skipped: Sequence[tuple[str, str]] = (),
) -> PredictSummary:
    """Segment `sources` with `classes` into `out_dir` (the layout of this module's docstring).

    key: :func:`settings_key` of everything that changes the outputs (model, classes, refine,
    protocol, dtype); records made under another key are discarded. Images are read and decoded
    by `num_workers` threads (0: in line) two batches ahead of the model, and their outputs
    written by a :class:`PredictionWriter` while the next batch runs. on_image(n): n more images
    done (progress; see :class:`PredictionWriter`). sha256(path): the file's hex digest (a
    :class:`~components.hashcache.HashCache`'s skips rereading unchanged files). max_pixels: the
    pixel budget of one image (larger ones are skipped, never decoded). skipped: entries the
    listing left out ([(path, reason)], :class:`Listing`), written to the skipped file with the
    images that cannot be segmented. overlay_height: the overlays' panel height in pixels, None for the
    image's own size. Returns a :class:`PredictSummary`.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    classes = list(classes)
    segmenter.vocabulary(classes)  # a bad vocabulary fails before any file is touched
    skipped = list(skipped)
    segmented = resumed = 0
    with PredictionWriter(Path(out_dir), classes, key=key, overlays=overlays, overlay_height=overlay_height,
                          on_image=on_image) as writer:
        loaded = prefetch(lambda source: _load(source, sha256, writer.is_done, max_pixels), sources,
                          num_workers=num_workers, depth=2 * batch_size)
        for batch in batched(loaded, batch_size):
            todo = [item for item in batch if item.error is None and not item.done]
            skipped.extend((item.source.path.as_posix(), item.error) for item in batch if item.error is not None)
            resumed += sum(item.done for item in batch)
            results = segmenter.segment_batch([item.image for item in todo], classes, refine=refine) if todo else []
            writer.submit(todo, results, others=len(batch) - len(todo))
            segmented += len(todo)
        writer.finish(sources, skipped)
    return PredictSummary(images=len(sources), segmented=segmented, resumed=resumed, skipped=len(skipped))
