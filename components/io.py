"""File I/O shared by every stage: atomic writes, content hashes, PNG label maps.

Every output of the pipeline is written through these helpers: the bytes go to a temporary file in
the destination's directory and take their final name with ``os.replace``, so a killed process
never leaves a half-written file under a final name (the rename is atomic on POSIX filesystems).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import io
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

UNLABELLED = 255
"""The label-map value of a pixel no class claims in an 8-bit map: Stage 1's unlabelled, the
benchmarks' ignore, predict's "no class". Every module that writes or reads label maps uses this
one, or :func:`unlabelled_for` where the vocabulary may be larger."""
MAX_UINT8_CLASSES = 255
"""Classes an 8-bit label map holds next to UNLABELLED: indices 0..254."""
UNLABELLED_16 = 65535
""""No class" in a 16-bit label map (vocabularies of 256 to 65535 classes: PC-459, ADE-847)."""
MAX_LABEL_CLASSES = 65535
"""Classes a 16-bit label map holds next to UNLABELLED_16: indices 0..65534."""

__all__ = [
    "fs_path",
    "path_text",
    "OutputBusyError",
    "output_lock",
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_text",
    "atomic_write_json",
    "swap_in",
    "voc_colour_map",
    "class_colours",
    "file_sha256",
    "bytes_sha256",
    "UNLABELLED",
    "UNLABELLED_16",
    "MAX_UINT8_CLASSES",
    "MAX_LABEL_CLASSES",
    "label_dtype",
    "unlabelled_for",
    "unlabelled_of",
    "encode_label_png",
    "decode_label_png",
]


def label_dtype(num_classes: int) -> type[np.unsignedinteger]:
    """The dtype of a label map over ``num_classes`` classes: uint8 up to 255 classes (255 = no
    class), uint16 up to 65535 (65535 = no class). The one rule every stage follows."""
    if not 1 <= num_classes <= MAX_LABEL_CLASSES:
        raise ValueError(f"a vocabulary needs 1 to {MAX_LABEL_CLASSES} classes, got {num_classes}")
    return np.uint8 if num_classes <= MAX_UINT8_CLASSES else np.uint16


def unlabelled_for(num_classes: int) -> int:
    """The "no class" value of a label map over ``num_classes`` classes: 255 or 65535."""
    return UNLABELLED if label_dtype(num_classes) is np.uint8 else UNLABELLED_16


def unlabelled_of(label: Any) -> int:
    """The "no class" value of a label map by its dtype (numpy or torch): 255 for 8-bit maps,
    65535 for wider ones (uint16 arrays; int32/int64 tensors holding 16-bit maps)."""
    dtype = getattr(label, "dtype", None)
    return UNLABELLED if dtype in (np.uint8, np.dtype(np.uint8)) or str(dtype) == "torch.uint8" else UNLABELLED_16



def _file_mode() -> int:
    """The mode ``open()`` would give a new file (0o666 less the umask), read once at import."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


_FILE_MODE = _file_mode()


_ESC = "\ufffd"  # U+FFFD, the replacement character, starts an escape in path_text


def path_text(path: str | os.PathLike[str]) -> str:
    """A file name as valid Unicode text (for ids, Parquet, JSON and logs), reversibly.

    A name the file system holds need not be UTF-8: Python gives its undecodable bytes as lone
    surrogates (U+DC80..U+DCFF), which no UTF-8 writer accepts. Each becomes U+FFFD and the byte in
    two hex digits ("caf\\udce9" -> "caf\ufffdE9"); a real U+FFFD is doubled. Names with neither
    are returned unchanged. :func:`fs_path` is the inverse.
    """
    name = os.fspath(path)
    if not any(c == _ESC or "\udc80" <= c <= "\udcff" for c in name):
        return name
    out = []
    for c in name:
        if c == _ESC:
            out.append(_ESC + _ESC)
        elif "\udc80" <= c <= "\udcff":
            out.append(f"{_ESC}{ord(c) - 0xDC00:02X}")
        else:
            out.append(c)
    return "".join(out)


def fs_path(text: str) -> str:
    """The file name :func:`path_text` made ``text`` from (what ``open`` needs)."""
    if _ESC not in text:
        return text
    out, i = [], 0
    while i < len(text):
        if text[i] != _ESC:
            out.append(text[i])
            i += 1
        elif text[i + 1 : i + 2] == _ESC:
            out.append(_ESC)
            i += 2
        else:
            out.append(chr(0xDC00 + int(text[i + 1 : i + 3], 16)))
            i += 3
    return "".join(out)


class OutputBusyError(RuntimeError):
    """Another run holds the lock on a stage's output."""

    exit_code = 75  # EX_TEMPFAIL: try again later


@contextlib.contextmanager
def output_lock(out: str | os.PathLike[str], *, stage: str) -> Iterator[Path]:
    """Hold an exclusive lock on ``out`` (a stage's output folder) for the block; yield ``out``.

    The lock is an ``flock`` on ``.<name>.lock`` next to ``out``: the kernel frees it when its
    holder exits, however it exits, so a killed run never leaves it taken. A second holder (another
    process, or this one) fails at once with :class:`OutputBusyError`. While it is held, whatever
    temporary files lie in ``out`` are provably stale: no other run can be writing them.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    lock = out.parent / f".{out.name}.lock"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, _FILE_MODE)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            raise OutputBusyError(
                f"{out} is being written by another `fmbseg {stage}` run (pid {holder} holds {lock}); "
                "wait for it to finish, then run again"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield out
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it is renamed onto ``path``.

    On an exception the temporary file is removed and ``path`` keeps its previous content (or stays
    absent). ``suffix`` lets writers that infer the format from the name (pandas, PIL) see it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix + ".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, _FILE_MODE)  # mkstemp makes 0600 files; outputs get the usual mode
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file + fsync + rename)."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as indented, key-sorted JSON (stable diffs for DVC metrics) atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, allow_nan=True) + "\n")


def bytes_sha256(data: bytes) -> str:
    """Hex sha256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def swap_in(partial: Path, final: Path) -> None:
    """Put the finished folder ``partial`` at ``final``, replacing what was there."""
    old = None
    if final.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
        os.replace(final, old / final.name)
    os.replace(partial, final)
    if old is not None:
        shutil.rmtree(old)


def file_sha256(path: str | os.PathLike[str], chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks (bounded memory for multi-GB archives)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk_size), b""):
            h.update(block)
    return h.hexdigest()


@functools.cache
def voc_colour_map(size: int = 256) -> np.ndarray:
    """[size, 3] uint8, read-only: the PASCAL VOC colour map (the bits of index i interleaved into
    R, G, B, high bit first; 24 bits, so 16-bit indices get distinct colours too). Index 0 is black."""
    index = np.arange(size)
    colours = np.zeros((size, 3), dtype=np.int64)
    for bit in range(8):
        for channel in range(3):
            colours[:, channel] |= ((index >> (3 * bit + channel)) & 1) << (7 - bit)
    colours = colours.astype(np.uint8)
    colours.flags.writeable = False
    return colours


@functools.cache
def class_colours(size: int = 256) -> np.ndarray:
    """[size, 3] uint8, read-only: the colour of each class index in every picture fmbseg draws
    and in its label PNGs. Class k takes VOC's colour of k + 1, so no class is black: black means
    "no class" (the map's last value, 255 or 65535, whose row here is black)."""
    colours = voc_colour_map(size + 1)[1:].copy()
    colours[size - 1] = 0
    colours.flags.writeable = False
    return colours


def encode_label_png(label: np.ndarray, *, palette: bool = False) -> bytes:
    """Encode a label map as a lossless PNG: 8-bit for uint8, 16-bit grayscale for uint16.

    palette: the 8-bit map as a palette PNG (the same index per pixel, shown in
    :func:`class_colours` by any image viewer, as VOC ships its maps) -- the maps a person opens
    (predict, export, the web page, the served model); internal stores keep plain 8-bit grayscale,
    768 bytes smaller each.

    label: [H, W] uint8 (255 = unlabelled / ignore) or uint16 (65535 = unlabelled / ignore),
    class index per pixel.
    """
    if label.ndim != 2 or label.dtype not in (np.uint8, np.uint16):
        raise ValueError(
            f"a label map must be [H, W] uint8 or uint16, got shape {label.shape} dtype {label.dtype}"
        )
    buf = io.BytesIO()
    if palette and label.dtype == np.uint8:  # the indices as they are, with a palette
        image = Image.frombytes("P", (label.shape[1], label.shape[0]), np.ascontiguousarray(label).tobytes())
        image.putpalette(class_colours(256).reshape(-1).tolist())
    else:
        image = Image.fromarray(label)  # L or I;16
    image.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def decode_label_png(data: bytes) -> np.ndarray:
    """Decode a label PNG into [H, W] uint8 (8-bit L or P) or uint16 (16-bit grayscale)."""
    with Image.open(io.BytesIO(data)) as im:
        if im.mode in ("I;16", "I;16B", "I"):
            array = np.asarray(im)
            if array.size and (int(array.min()) < 0 or int(array.max()) > UNLABELLED_16):
                raise ValueError(f"a 16-bit label PNG holds values 0..65535, got {array.min()}..{array.max()}")
            return array.astype(np.uint16)
        if im.mode not in ("L", "P"):
            raise ValueError(f"a label PNG must be single-channel (L, P or 16-bit I), got mode {im.mode}")
        return np.asarray(im, dtype=np.uint8).copy()
