"""The DINOv2 feature cache (stage ``features``): fp16 shards, completion records and an index.

Layout under ``${paths.features}``:

    shards/<shard_id>.npy    [n, h, w, C] float16 patch features of n images (np.load mmap_mode="r")
    shards/<shard_id>.json   completion record, written after the shard (:class:`ShardRecord`)
    index.parquet            image_id -> shard, row, sha256 (:data:`INDEX_COLUMNS`), merged at the end
    manifest.json            what the directory holds: settings, grid, width, counts (or cache: false)

Features are per unique image (both pseudo-label variants of an image share them). A shard is
keyed by its images' content hashes and the settings hash (encoder spec, input size, precision), so a resumed
or repeated run skips every shard whose record matches, new images go to new shards, and a change
of settings recomputes everything. Every file is written atomically; the shard array is written
through a memory map so memory stays at one batch whatever the shard size.

``cache: false`` writes only ``manifest.json`` saying so: training then computes the features on
the fly from the images.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from components.features.encode import DinoEncoder, encode_images
from components.io import atomic_path, atomic_write_json, file_sha256, fs_path

__all__ = [
    "FEATURES_FORMAT",
    "SHARDS_DIR",
    "INDEX_FILE",
    "MANIFEST_FILE",
    "INDEX_COLUMNS",
    "CacheImage",
    "ShardRecord",
    "ShardPlan",
    "CachePlan",
    "settings_hash",
    "unique_images",
    "plan_cache",
    "write_shard",
    "finalize_cache",
    "write_uncached_manifest",
    "read_manifest",
    "FeatureCache",
]

log = logging.getLogger(__name__)

FEATURES_FORMAT = 1
SHARDS_DIR = "shards"
INDEX_FILE = "index.parquet"
MANIFEST_FILE = "manifest.json"
INDEX_COLUMNS: tuple[str, ...] = ("image_id", "shard", "row", "sha256")


class CacheImage(NamedTuple):
    """One image to encode: its id, file path (as given) and sha256 of the file's bytes."""

    image_id: str
    path: str
    sha256: str


@dataclass(frozen=True)
class ShardRecord:
    """Completion record of one shard: its images (id, sha256) in row order, under which settings."""

    shard_id: str
    settings_hash: str
    images: list[tuple[str, str]]
    shape: list[int]  # [n, h, w, C]
    seconds: float


class ShardPlan(NamedTuple):
    """A shard still to write."""

    shard_id: str
    images: list[CacheImage]


class CachePlan(NamedTuple):
    """What a run does: ``todo`` shards to write; ``done`` shards reused from an earlier run."""

    todo: list[ShardPlan]
    done: list[ShardRecord]
    num_images: int


def settings_hash(dino: str, image_size: int, *, precision: str) -> str:
    """Hex sha256 of what determines a feature: the format, encoder spec name, input side and the
    precision it ran in (``models.dtype``: bf16 features are not fp32 ones, so a switch re-encodes)."""
    blob = json.dumps({"format": FEATURES_FORMAT, "dino": dino, "image_size": image_size, "precision": precision},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def unique_images(samples: pd.DataFrame, project_root: str | os.PathLike[str], *, num_workers: int,
                  sha256: Callable[[Path], str] = file_sha256) -> list[CacheImage]:
    """The distinct images of a train index, sorted by id, with the sha256 of each file.

    samples: train index rows with columns image_id and image_path (relative to ``project_root``).
    Hashing runs in ``num_workers`` threads with ``sha256`` (``file_sha256`` reads every file once;
    a :class:`~components.hashcache.HashCache`'s skips unchanged files).
    """
    missing = [c for c in ("image_id", "image_path") if c not in samples.columns]
    if missing:
        raise ValueError(f"the train index lacks columns {missing}")
    pairs = samples.loc[:, ["image_id", "image_path"]].drop_duplicates()
    clash = pairs["image_id"].duplicated(keep=False)
    if clash.any():
        raise ValueError(f"image ids with more than one path in the train index: {pairs.loc[clash].head(6).values.tolist()}")
    pairs = pairs.sort_values("image_id", kind="stable")
    root = Path(project_root)
    paths = [str(p) for p in pairs["image_path"]]  # as text (components.io.path_text)
    for p in paths:
        if not (root / fs_path(p)).is_file():
            raise FileNotFoundError(f"{root / p} (in the train index) does not exist")
    with ThreadPoolExecutor(max_workers=max(num_workers, 1)) as pool:
        hashes = list(pool.map(lambda p: sha256(root / fs_path(p)), paths))
    return [CacheImage(i, p, h) for i, p, h in zip(pairs["image_id"], paths, hashes, strict=True)]


def _shard_id(settings: str, images: Sequence[CacheImage]) -> str:
    h = hashlib.sha256(settings.encode())
    for image in images:
        h.update(f"\0{image.image_id}\0{image.sha256}".encode())
    return h.hexdigest()[:20]


def _shard_paths(root: Path, shard_id: str) -> tuple[Path, Path]:
    base = root / SHARDS_DIR
    return base / f"{shard_id}.npy", base / f"{shard_id}.json"


def _read_records(root: Path) -> list[ShardRecord]:
    """Readable completion records whose shard file exists (others: the shard is redone)."""
    records = []
    for path in sorted((root / SHARDS_DIR).glob("*.json")):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            record = ShardRecord(
                shard_id=data["shard_id"], settings_hash=data["settings_hash"],
                images=[(str(i), str(s)) for i, s in data["images"]], shape=[int(n) for n in data["shape"]],
                seconds=float(data["seconds"]),
            )
        except (OSError, ValueError, KeyError, TypeError) as err:
            log.warning("ignoring unreadable completion record %s (%s); its images will be redone", path, err)
            continue
        features = _shard_paths(root, record.shard_id)[0]
        if not features.exists():
            continue
        try:  # a truncated file fails to map; a wrong one has another shape
            intact = list(np.load(features, mmap_mode="r").shape) == record.shape
        except (OSError, ValueError) as err:
            intact, why = False, str(err)
        else:
            why = f"shape differs from its record's {record.shape}"
        if not intact:
            log.warning("feature shard %s is damaged (%s); its images will be redone", features, why)
            continue
        records.append(record)
    return records


def plan_cache(
    root: str | os.PathLike[str], images: Sequence[CacheImage], *, settings: str, shard_size: int
) -> CachePlan:
    """Reuse every recorded shard (same settings) holding a wanted image with the same content;
    group the images not covered, in id order, into new shards of ``shard_size``.

    Removes the temporary files a killed run left; call it under ``output_lock(root)``, which
    makes sure no other run is writing them.
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    _remove_temporaries(Path(root))
    wanted = {(im.image_id, im.sha256) for im in images}
    covered: set[tuple[str, str]] = set()
    done = []
    for record in _read_records(Path(root)):
        members = {tuple(m) for m in record.images} & wanted
        if record.settings_hash == settings and members - covered:
            done.append(record)
            covered |= members
    rest = [im for im in images if (im.image_id, im.sha256) not in covered]
    todo = [
        ShardPlan(_shard_id(settings, rest[i : i + shard_size]), rest[i : i + shard_size])
        for i in range(0, len(rest), shard_size)
    ]
    return CachePlan(todo=todo, done=done, num_images=len(images))


def write_shard(
    root: str | os.PathLike[str],
    shard: ShardPlan,
    encoder: DinoEncoder,
    *,
    settings: str,
    project_root: str | os.PathLike[str],
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    batch_size: int,
    num_workers: int,
    on_images: Callable[[int], None] | None = None,
) -> ShardRecord:
    """Encode one shard's images and write ``shards/<id>.npy`` then its record (both atomic).

    on_images(n) after every batch of n images (progress).
    """
    t0 = time.perf_counter()
    root = Path(root)
    features_path, record_path = _shard_paths(root, shard.shard_id)
    grid = image_size // encoder.patch_size
    shape = (len(shard.images), grid, grid, encoder.embed_dim)
    paths = [Path(project_root) / fs_path(im.path) for im in shard.images]
    with atomic_path(features_path, suffix=".npy") as tmp:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=shape)
        row = 0
        for batch in encode_images(
            encoder, paths, image_size=image_size, mean=mean, std=std, batch_size=batch_size, num_workers=num_workers
        ):
            out[row : row + len(batch)] = batch
            row += len(batch)
            if on_images is not None:
                on_images(len(batch))
        out.flush()
        del out
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
    record = ShardRecord(
        shard_id=shard.shard_id, settings_hash=settings,
        images=[(im.image_id, im.sha256) for im in shard.images], shape=list(shape),
        seconds=time.perf_counter() - t0,
    )
    atomic_write_json(record_path, asdict(record))
    return record


def _write_parquet(path: Path, frame: pd.DataFrame) -> None:
    with atomic_path(path, suffix=".parquet") as tmp:
        pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), tmp, compression="zstd")


def _remove_temporaries(root: Path) -> None:
    """Delete the ``.*.tmp`` files (of :func:`~components.io.atomic_path`) in the shards folder."""
    base = root / SHARDS_DIR
    if base.is_dir():
        for path in base.iterdir():
            if path.name.startswith(".") and path.name.endswith(".tmp"):
                path.unlink(missing_ok=True)


def _remove_unlisted(root: Path, keep: set[str]) -> int:
    """Delete shard files (and leftover temporary files) of shards not in ``keep``; return how many."""
    removed = 0
    base = root / SHARDS_DIR
    if not base.is_dir():
        return 0
    for path in base.iterdir():
        if path.name.startswith(".") and path.name.endswith(".tmp"):
            path.unlink()
        elif path.suffix in (".npy", ".json") and path.stem not in keep:
            path.unlink()
            removed += path.suffix == ".npy"
    return removed


def finalize_cache(
    root: str | os.PathLike[str], images: Sequence[CacheImage], *, dino: str, image_size: int, precision: str
) -> dict[str, Any]:
    """Merge the records into ``index.parquet`` and write ``manifest.json`` (both atomic); delete
    shards no wanted image uses (older settings, removed images). Returns the manifest."""
    if not images:
        raise ValueError("no images to index: the train index is empty")
    root = Path(root)
    settings = settings_hash(dino, image_size, precision=precision)
    where: dict[tuple[str, str], tuple[str, int]] = {}
    shapes: dict[str, list[int]] = {}
    for record in _read_records(root):
        if record.settings_hash != settings:
            continue
        shapes[record.shard_id] = record.shape
        for row, member in enumerate(record.images):
            where.setdefault(member, (record.shard_id, row))
    lost = [im.image_id for im in images if (im.image_id, im.sha256) not in where]
    if lost:
        raise RuntimeError(f"{len(lost)} images have no features in {root} (first: {lost[:5]}); rerun `fmbseg features`")
    rows = [(im.image_id, *where[(im.image_id, im.sha256)], im.sha256) for im in images]
    index = pd.DataFrame(rows, columns=list(INDEX_COLUMNS)).astype({"row": "int64"})
    used = set(index["shard"])
    removed = _remove_unlisted(root, used)
    shape = shapes[index["shard"].iloc[0]]
    _write_parquet(root / INDEX_FILE, index)
    manifest = {
        "format": FEATURES_FORMAT,
        "cache": True,
        "dino": dino,
        "image_size": image_size,
        "precision": precision,
        "settings_hash": settings,
        "grid": shape[1:3],
        "dim": shape[3],
        "dtype": "float16",
        "num_images": len(index),
        "num_shards": len(used),
    }
    atomic_write_json(root / MANIFEST_FILE, manifest)
    if removed:
        log.info("removed %d feature shards no current image uses", removed)
    return manifest


def write_uncached_manifest(root: str | os.PathLike[str], *, dino: str, image_size: int,
                            precision: str) -> dict[str, Any]:
    """``features.cache: false``: remove any cached shards and index; write a manifest saying so."""
    root = Path(root)
    _remove_unlisted(root, set())
    (root / INDEX_FILE).unlink(missing_ok=True)
    manifest = {
        "format": FEATURES_FORMAT,
        "cache": False,
        "dino": dino,
        "image_size": image_size,
        "precision": precision,
        "settings_hash": settings_hash(dino, image_size, precision=precision),
    }
    atomic_write_json(root / MANIFEST_FILE, manifest)
    return manifest


def read_manifest(root: str | os.PathLike[str]) -> dict[str, Any]:
    """The manifest of a features directory (raises when the stage has not run)."""
    path = Path(root) / MANIFEST_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: run `fmbseg features` first")
    manifest = json.loads(path.read_text(encoding="utf-8"))
    if manifest.get("format") != FEATURES_FORMAT:
        raise ValueError(f"{path} has format {manifest.get('format')}; this code reads {FEATURES_FORMAT}")
    return manifest


class FeatureCache:
    """Reader of a feature cache: ``read(image_id)`` -> [h, w, C] float16 (a copy out of the mmap).

    Shards are memory-mapped on first use, per process (a DataLoader worker maps its own).
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.manifest = read_manifest(self.root)
        if not self.manifest["cache"]:
            raise ValueError(f"{self.root} holds no cached features (features.cache was false)")
        index = pq.read_table(self.root / INDEX_FILE).to_pandas()
        self._where = dict(zip(index["image_id"], zip(index["shard"], index["row"].astype(int), strict=True), strict=True))
        self._maps: dict[str, np.ndarray] = {}

    @property
    def grid(self) -> tuple[int, int]:
        """(h, w) patch grid."""
        h, w = self.manifest["grid"]
        return int(h), int(w)

    @property
    def dim(self) -> int:
        """C, the encoder width."""
        return int(self.manifest["dim"])

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, image_id: object) -> bool:
        return image_id in self._where

    def read(self, image_id: str) -> np.ndarray:
        """Patch features of one image: [h, w, C] float16."""
        try:
            shard, row = self._where[image_id]
        except KeyError:
            raise KeyError(f"no cached features for image {image_id!r} in {self.root}") from None
        if shard not in self._maps:
            self._maps[shard] = np.load(_shard_paths(self.root, shard)[0], mmap_mode="r")
        return np.array(self._maps[shard][row])

    def sample(self, image_id: str, image_path: str) -> dict[str, torch.Tensor]:
        """A training input: ``{"features": [h, w, C] float16}``."""
        return {"features": torch.from_numpy(self.read(image_id))}

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_maps"] = {}  # memory maps are reopened in the receiving process
        return state
