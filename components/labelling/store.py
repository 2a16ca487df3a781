"""Storage of Stage 1 pseudo labels: per-shard Parquet files, completion records, and a reader.

At COCO scale (118k images, two maps each) one file per map makes DVC slow to hash and push, so
the maps live in one Parquet file per shard of images. Layout under the stage's output root
(``${paths.pseudo}/stage1``):

    shards/<shard_id>.parquet             one row per labelled image (:data:`SHARD_SCHEMA`)
    shards/<shard_id>.detections.parquet  one row per (image, present class) (:data:`DETECTION_SCHEMA`)
    shards/<shard_id>.json                completion record, written last (:class:`ShardRecord`)
    index.parquet                         where each current image's maps are (:data:`INDEX_SCHEMA`)
    detections.parquet, skipped.parquet, vocabulary.txt, summary.json   merged at the end of a run

A shard counts as done only when its record exists (every file is written atomically and the
record after the data), so a run killed at any point leaves finished shards intact and no
half-written file under a final name. ``PseudoLabels`` reads it back one image or one shard at a
time. Image ids and shard ids become paths (an export's label maps, a shard's files), so the
writers and the reader refuse one that is absolute or holds ``..`` (components.outputs.safe_relative).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from components.datasets.registry import display_name
from components.io import (
    atomic_path,
    atomic_write_json,
    atomic_write_text,
    decode_label_png,
    encode_label_png,
    file_sha256,
)
from components.labelling.settings import TEACHER_VARIANT
from components.outputs import safe_relative
from components.skipped import SKIPPED_FILE, write_skipped

if TYPE_CHECKING:  # a type only: importing Stage 1 loads torch and open_clip, which reading a store needs not
    from components.labelling.stage1 import Stage1Result

if TYPE_CHECKING:  # Stage 1's models (torch, open_clip) load with the labelling, not with the store
    from components.labelling.stage1 import Stage1Result

__all__ = [
    "SHARDS_DIR",
    "INDEX_FILE",
    "DETECTIONS_FILE",
    "VOCABULARY_FILE",
    "SUMMARY_FILE",
    "SHARD_SCHEMA",
    "TEACHER_SHARD_SCHEMA",
    "TEACHER_VARIANT",
    "DETECTION_SCHEMA",
    "INDEX_SCHEMA",
    "ImageEntry",
    "ShardRecord",
    "shard_id_for",
    "shard_paths",
    "write_table",
    "write_record",
    "read_record",
    "read_records",
    "rle_masks_from_row",
    "labels_row",
    "teacher_columns",
    "detection_rows",
    "write_shard",
    "MergeResult",
    "merge_outputs",
    "TIMING_KEYS",
    "summarise",
    "PseudoLabels",
]

log = logging.getLogger(__name__)

SHARDS_DIR = "shards"
INDEX_FILE = "index.parquet"
DETECTIONS_FILE = "detections.parquet"
VOCABULARY_FILE = "vocabulary.txt"
SUMMARY_FILE = "summary.json"
VARIANTS: tuple[str, str] = ("stage1_1", "stage1_2")
_ROW_GROUP = 16  # rows per Parquet row group: reading one image decodes at most this many rows

AMG_MASK_TYPE = pa.struct(
    [
        ("counts", pa.binary()),  # COCO compressed RLE of a [sam_size, sam_size] mask
        ("predicted_iou", pa.float32()),
        ("stability_score", pa.float32()),
        ("area", pa.int64()),  # pixels in the SAM frame
    ]
)
SHARD_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("image_path", pa.string()),  # as the run saw it (relative to the project root)
        ("sha256", pa.string()),  # of the image file
        ("height", pa.int32()),  # original image size
        ("width", pa.int32()),
        ("stage1_1", pa.binary()),  # PNG, [label_size, label_size] uint8, 255 = unlabelled
        ("stage1_2", pa.binary()),
        ("sam_size", pa.int32()),  # side of the SAM frame the masks live in
        ("amg_masks", pa.list_(AMG_MASK_TYPE)),  # SAM automatic masks before the size filter
    ]
)
# A run with a concept teacher (models.teacher) writes two more columns; a paper run's files keep
# SHARD_SCHEMA, byte for byte.
TEACHER_SHARD_SCHEMA = SHARD_SCHEMA.append(
    pa.field(TEACHER_VARIANT, pa.binary())  # PNG as stage1_1: the teacher's fused map, 255 = unlabelled
).append(
    pa.field("teacher_presence", pa.list_(pa.float32()))  # [K] presence score per class (NaN: not prompted)
)
DETECTION_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("class_id", pa.int32()),
        ("class_name", pa.string()),
        ("crops_won", pa.int32()),
        ("points_xy", pa.list_(pa.list_(pa.float32()))),  # Stage 1.1 prompts, SAM frame (x, y)
        ("sam_score", pa.float32()),  # predicted IoU of the chosen Stage 1.1 mask
        ("mask_area_frac", pa.float32()),  # its area / image area
        ("stage1_2_masks", pa.list_(pa.int32())),  # indices into the image's amg_masks labelled this class
        ("stage1_2_scores", pa.list_(pa.float32())),  # their cosine to the class prototype
    ]
)
INDEX_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("image_path", pa.string()),  # relative to the project root (as the run saw it)
        ("sha256", pa.string()),
        ("shard", pa.string()),  # shard file, relative to the output root
        ("row", pa.int64()),
    ]
)
DETECTION_COLUMNS: tuple[str, ...] = tuple(DETECTION_SCHEMA.names)


@dataclass(frozen=True)
class ImageEntry:
    """One input image: id (path without extension, relative to its image folder), path (as the
    run sees it, relative to the project root) and content hash (sha256 of the file)."""

    image_id: str
    path: str
    sha256: str


@dataclass
class ShardRecord:
    """Completion record of one shard: which images (by content) under which settings.

    rows: image_id -> row in the shard file; skipped: [{"image_id", "path", "reason"}] for members
    that could not be used; unlabelled: ids of labelled images on which no class passed the
    concept teacher's presence (their stage1_sam3 map is empty); timings: seconds per step (clip, sam_encoder, prompts, amg, io, other);
    files: {"labels" | "detections": {"size", "sha256"}} of the data files the record vouches for
    (filled by :func:`write_shard`; records written before it have none and are not checked).
    """

    shard_id: str
    settings_hash: str
    mask_settings_hash: str
    images: list[ImageEntry]
    rows: dict[str, int] = field(default_factory=dict)
    skipped: list[dict[str, str]] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    unlabelled: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        if not data["unlabelled"]:  # a paper run's record stays as it was
            del data["unlabelled"]
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ShardRecord:
        """The record of :meth:`to_json`; ValueError for a shard id or image id that would lead
        out of the store."""
        shard_paths(".", data["shard_id"])
        for entry in data["images"]:
            safe_relative(entry["image_id"], what="image id")
        return cls(
            shard_id=data["shard_id"],
            settings_hash=data["settings_hash"],
            mask_settings_hash=data["mask_settings_hash"],
            images=[ImageEntry(**e) for e in data["images"]],
            rows={k: int(v) for k, v in data["rows"].items()},
            skipped=list(data["skipped"]),
            timings={k: float(v) for k, v in data["timings"].items()},
            files={k: {"size": int(v["size"]), "sha256": str(v["sha256"])} for k, v in data.get("files", {}).items()},
            unlabelled=list(data.get("unlabelled", [])),
        )


def shard_id_for(settings_hash: str, images: list[ImageEntry]) -> str:
    """Stable shard id: a hash of the settings and the members' (id, content hash) pairs."""
    h = hashlib.sha256(settings_hash.encode())
    for entry in sorted(images, key=lambda e: e.image_id):
        h.update(f"\0{entry.image_id}\0{entry.sha256}".encode())
    return h.hexdigest()[:20]


def shard_paths(root: str | Path, shard_id: str) -> dict[str, Path]:
    """Files of one shard: {"labels", "detections", "record"}; ValueError for a shard id that is
    not one file name (read from a record, it must not lead out of ``shards/``)."""
    if "/" in shard_id:
        raise ValueError(f"shard id {shard_id!r} is not a file name: refused")
    safe_relative(shard_id, what="shard id")
    base = Path(root) / SHARDS_DIR
    return {
        "labels": base / f"{shard_id}.parquet",
        "detections": base / f"{shard_id}.detections.parquet",
        "record": base / f"{shard_id}.json",
    }


def write_table(path: str | Path, table: pa.Table) -> None:
    """Write a Parquet file atomically (no pandas metadata: same rows -> same bytes)."""
    with atomic_path(path, suffix=".parquet") as tmp:
        pq.write_table(table, tmp, row_group_size=_ROW_GROUP, compression="zstd")


def write_record(path: str | Path, record: ShardRecord) -> None:
    """Write a completion record atomically (after the shard's data files)."""
    atomic_write_json(path, record.to_json())


def read_record(path: str | Path) -> ShardRecord | None:
    """A completion record, or None (with a warning) when it cannot be parsed: the shard is redone."""
    try:
        return ShardRecord.from_json(json.loads(Path(path).read_text(encoding="utf-8")))
    except (OSError, ValueError, KeyError, TypeError) as err:
        log.warning("ignoring unreadable completion record %s (%s); its shard will be redone", path, err)
        return None


def read_records(root: str | Path) -> list[ShardRecord]:
    """Every readable completion record under ``root/shards`` whose data files exist, by shard id."""
    base = Path(root) / SHARDS_DIR
    if not base.is_dir():
        return []
    records = []
    for path in sorted(base.glob("*.json")):
        record = read_record(path)
        if record is None:
            continue
        files = shard_paths(root, record.shard_id)
        if not (files["labels"].exists() and files["detections"].exists()):
            log.warning("completion record %s has lost its data files; its shard will be redone", path)
            continue
        damage = _damage(files, record.files)
        if damage:
            log.warning("shard %s is damaged (%s); its shard will be redone", record.shard_id, damage)
            continue
        records.append(record)
    return records


def _fingerprint(path: Path) -> dict[str, Any]:
    return {"size": path.stat().st_size, "sha256": file_sha256(path)}


def _damage(files: dict[str, Path], vouched: dict[str, dict[str, Any]]) -> str:
    """'' when every file a record vouches for has its recorded size and sha256, else what differs."""
    for kind, want in sorted(vouched.items()):
        path = files[kind]
        size = path.stat().st_size
        if size != want["size"]:
            return f"{path.name} has {size} bytes, its record says {want['size']}"
        if file_sha256(path) != want["sha256"]:
            return f"{path.name} does not have the sha256 its record gives"
    return ""


def rle_masks_from_row(amg_masks: list[dict[str, Any]], sam_size: int) -> list[dict[str, Any]]:
    """COCO RLE records ({"size": [h, w], "counts": bytes} + predicted_iou, stability_score, area)."""
    return [{"size": [sam_size, sam_size], **m} for m in amg_masks]


class PseudoLabels:
    """Reader of a Stage 1 output root (``${paths.pseudo}/stage1``).

    >>> labels = PseudoLabels("data/pseudo/stage1")
    >>> labels.read(labels.image_ids[0], "stage1_1")  # [L, L] uint8, 255 = unlabelled
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        index_path = self.root / INDEX_FILE
        if not index_path.exists():
            raise FileNotFoundError(f"{index_path} does not exist: run `fmbseg label` first")
        self.index: pd.DataFrame = pq.read_table(index_path).to_pandas()
        for column, what in (("image_id", "image id"), ("shard", "shard file")):
            for value in self.index[column]:
                safe_relative(value, what=f"{index_path}: {what}")
        self._by_id = pd.Series(np.arange(len(self.index)), index=self.index["image_id"])
        self._teacher: bool | None = None  # whether the shards hold stage1_sam3 (read on first use)

    @property
    def image_ids(self) -> list[str]:
        """Ids of every labelled image, sorted."""
        return self.index["image_id"].tolist()

    @property
    def vocabulary(self) -> list[str]:
        """Class names (one line of vocabulary.txt each; label value k is line k)."""
        return (self.root / VOCABULARY_FILE).read_text(encoding="utf-8").splitlines()

    def _row(self, image_id: str, columns: list[str]) -> dict[str, Any]:
        if image_id not in self._by_id.index:
            raise KeyError(f"no pseudo labels for image id {image_id!r} in {self.root}")
        entry = self.index.iloc[int(self._by_id[image_id])]
        file = pq.ParquetFile(self.root / entry["shard"])
        row = int(entry["row"])
        group, offset = divmod(row, _ROW_GROUP)
        table = file.read_row_group(group, columns=columns)
        return {c: table.column(c)[offset].as_py() for c in columns}

    def has_variant(self, variant: str) -> bool:
        """Whether the store holds ``variant``'s maps (stage1_sam3: a run with ``models.teacher``;
        one run's shards share their settings, so the first shard file answers for all)."""
        if variant in VARIANTS:
            return True
        if variant != TEACHER_VARIANT:
            raise ValueError(f"unknown variant {variant!r}; supported: {(*VARIANTS, TEACHER_VARIANT)}")
        if self._teacher is None:
            shards = self.index["shard"].unique()
            self._teacher = bool(len(shards)) and variant in pq.read_schema(self.root / shards[0]).names
        return self._teacher

    def read(self, image_id: str, variant: str) -> np.ndarray:
        """Label map of one image: [L, L] uint8 (255 = unlabelled), or uint16 (65535) for a vocabulary
        of more than 255 classes; class index per pixel. ``stage1_sam3`` needs a store labelled
        with ``models.teacher`` set."""
        if not self.has_variant(variant):
            raise ValueError(f"{self.root} holds no {variant} maps: label with models.teacher set (e.g. sam3)")
        return decode_label_png(self._row(image_id, [variant])[variant])

    def teacher_presence(self, image_id: str) -> np.ndarray:
        """[K] float32: the concept teacher's presence score of each class on one image (NaN: not prompted)."""
        if not self.has_variant(TEACHER_VARIANT):
            raise ValueError(f"{self.root} holds no {TEACHER_VARIANT} maps: label with models.teacher set")
        return np.asarray(self._row(image_id, ["teacher_presence"])["teacher_presence"], dtype=np.float32)

    def rle_masks(self, image_id: str) -> list[dict[str, Any]]:
        """SAM automatic masks of one image as COCO RLE records (SAM frame, before the size filter)."""
        row = self._row(image_id, ["amg_masks", "sam_size"])
        return rle_masks_from_row(row["amg_masks"], row["sam_size"])

    def iter_shards(self, columns: list[str] | None = None) -> Iterator[pd.DataFrame]:
        """One DataFrame per shard file (only its current images), read one shard at a time."""
        for shard, group in self.index.groupby("shard", sort=True):
            table = pq.read_table(self.root / shard, columns=columns)
            yield table.take(pa.array(group["row"].to_numpy())).to_pandas()



def labels_row(entry: ImageEntry, result: Stage1Result, *, height: int, width: int, sam_size: int) -> dict[str, Any]:
    """One :data:`SHARD_SCHEMA` row: both label maps as PNG and the automatic masks as RLE."""
    return {
        "image_id": entry.image_id,
        "image_path": entry.path,
        "sha256": entry.sha256,
        "height": height,
        "width": width,
        "stage1_1": encode_label_png(result.stage1_1),
        "stage1_2": encode_label_png(result.stage1_2),
        "sam_size": sam_size,
        "amg_masks": [m._asdict() for m in result.amg_masks],
    }


def teacher_columns(label: np.ndarray, presence: np.ndarray) -> dict[str, Any]:
    """The :data:`TEACHER_SHARD_SCHEMA` columns of one image: the concept teacher's map ([L, L]
    uint8 / uint16) as PNG and its [K] presence scores."""
    return {TEACHER_VARIANT: encode_label_png(label), "teacher_presence": np.asarray(presence, np.float32).tolist()}


def detection_rows(image_id: str, result: Stage1Result, class_names: list[str]) -> list[dict[str, Any]]:
    """:data:`DETECTION_SCHEMA` rows of one image, one per present class (class_name: the first
    name of its vocabulary line)."""
    s11, s12 = result.stage1_1_detail, result.stage1_2_detail
    mask_labels = s12.mask_labels.tolist()
    mask_scores = s12.mask_scores.tolist()
    rows = []
    for i, (k, won) in enumerate(zip(result.presence.classes.tolist(), result.presence.crops_won.tolist(), strict=True)):
        mine = [m for m, label in enumerate(mask_labels) if label == k]
        rows.append(
            {
                "image_id": image_id,
                "class_id": k,
                "class_name": display_name(class_names[k]),
                "crops_won": won,
                "points_xy": s11.points_xy[i].tolist(),
                "sam_score": float(s11.scores[i]),
                "mask_area_frac": float(s11.area_frac[i]),
                "stage1_2_masks": mine,
                "stage1_2_scores": [mask_scores[m] for m in mine],
            }
        )
    return rows


def write_shard(
    root: str | Path, record: ShardRecord, labels: list[dict[str, Any]], detections: list[dict[str, Any]]
) -> ShardRecord:
    """Write one shard: labels file, detections file, then its completion record (all atomic), which
    carries the size and sha256 of both files. Returns the record as written. ValueError, before
    any write, for an image id that is not a relative path inside the store's folders."""
    for entry in record.images:
        safe_relative(entry.image_id, what="image id")
    paths = shard_paths(root, record.shard_id)
    schema = TEACHER_SHARD_SCHEMA if labels and TEACHER_VARIANT in labels[0] else SHARD_SCHEMA
    write_table(paths["labels"], pa.Table.from_pylist(labels, schema=schema))
    write_table(paths["detections"], pa.Table.from_pylist(detections, schema=DETECTION_SCHEMA))
    written = replace(record, files={kind: _fingerprint(paths[kind]) for kind in ("labels", "detections")})
    write_record(paths["record"], written)
    return written


class MergeResult(NamedTuple):
    """What a run's merge wrote: index (one row per labelled image), detections, skipped inputs;
    removed: shard ids whose files were deleted (no current image left in them)."""

    index: pd.DataFrame
    detections: pd.DataFrame
    skipped: pd.DataFrame
    removed: list[str]


def merge_outputs(
    root: str | Path,
    *,
    entries: list[ImageEntry],
    done: list[ShardRecord],
    skipped: list[dict[str, str]],
    vocabulary: list[str],
) -> MergeResult:
    """Merge the finished shards into index.parquet, detections.parquet, skipped.parquet and
    vocabulary.txt, and delete every shard file that no finished shard claims.

    entries: the images present now; an image counts from the first finished shard (by shard id)
    that holds it with the same content. skipped: inputs rejected before labelling ({"path",
    "reason"}), joined with the members each shard could not read.
    """
    root = Path(root)
    current = {(e.image_id, e.sha256): e for e in entries}
    claimed: set[str] = set()
    index_rows: list[dict[str, Any]] = []
    skipped_rows = list(skipped)
    members_by_shard: dict[str, set[str]] = {}
    for record in sorted(done, key=lambda r: r.shard_id):
        shard_file = f"{SHARDS_DIR}/{record.shard_id}.parquet"
        paths_now = {}
        for member in record.images:
            entry = current.get((member.image_id, member.sha256))
            if entry is None or member.image_id in claimed:
                continue
            claimed.add(member.image_id)
            paths_now[member.image_id] = entry.path
        mine = set(paths_now)
        members_by_shard[record.shard_id] = mine
        for image_id, row in sorted(record.rows.items(), key=lambda item: item[1]):
            if image_id in mine:
                sha = next(m.sha256 for m in record.images if m.image_id == image_id)
                index_rows.append(
                    {"image_id": image_id, "image_path": paths_now[image_id], "sha256": sha,
                     "shard": shard_file, "row": row}
                )
        skipped_rows.extend(
            {"path": paths_now[s["image_id"]], "reason": s["reason"]} for s in record.skipped if s["image_id"] in mine
        )

    index = pa.Table.from_pylist(sorted(index_rows, key=lambda r: r["image_id"]), schema=INDEX_SCHEMA)
    parts = []
    for shard_id, mine in sorted(members_by_shard.items()):
        if mine:
            table = pq.read_table(shard_paths(root, shard_id)["detections"])
            parts.append(table.filter(pc.is_in(table["image_id"], pa.array(sorted(mine), pa.string()))))
    detections = pa.concat_tables(parts) if parts else DETECTION_SCHEMA.empty_table()
    detections = detections.sort_by([("image_id", "ascending"), ("class_id", "ascending")])

    write_table(root / INDEX_FILE, index)
    write_table(root / DETECTIONS_FILE, detections)
    skipped_table = write_skipped(root / SKIPPED_FILE, skipped_rows)
    atomic_write_text(root / VOCABULARY_FILE, "".join(f"{line}\n" for line in vocabulary))

    keep = {shard_id for shard_id, mine in members_by_shard.items() if mine}
    removed = sorted(_remove_unclaimed(root, keep))
    return MergeResult(index.to_pandas(), detections.to_pandas(), skipped_table.to_pandas(), removed)


def _remove_unclaimed(root: Path, keep: set[str]) -> set[str]:
    """Delete shard files whose shard id is not in ``keep`` (record first: a crash in between leaves
    data without a record, which the next run treats as unfinished) and writers' leftover temp
    files. Returns the removed ids."""
    removed: set[str] = set()
    base = root / SHARDS_DIR
    if not base.is_dir():
        return removed
    # Temp files of a killed writer: run_label holds output_lock, so no other run is writing them.
    for leftover in base.glob(".*.tmp"):
        leftover.unlink()
    files = sorted(p for p in base.iterdir() if p.is_file())
    for path in sorted(files, key=lambda p: p.suffix != ".json"):
        shard_id = path.name.split(".")[0]
        if shard_id not in keep:
            path.unlink()
            removed.add(shard_id)
    return removed


TIMING_KEYS: tuple[str, ...] = ("clip", "sam_encoder", "prompts", "amg", "labelling", "io")


def summarise(
    merged: MergeResult,
    *,
    images_found: int,
    reports: list[dict[str, Any]],
    settings_hash: str,
    wall_seconds: float,
) -> dict[str, Any]:
    """summary.json of a run.

    reports: one per shard labelled in this run ({"labelled", "skipped", "reused_masks",
    "timings": {step: seconds}}). seconds_per_image splits this run's time per processed image
    into :data:`TIMING_KEYS` (CLIP forward, SAM encoder, SAM prompts, automatic masks, Stage 1
    math and painting, decoding and writing).
    """
    processed = sum(r["labelled"] + r["skipped"] for r in reports)
    keys = TIMING_KEYS + (("teacher",) if any("teacher" in r["timings"] for r in reports) else ())  # concept teacher
    totals = {key: sum(r["timings"].get(key, 0.0) for r in reports) for key in keys}
    per_image = {key: (value / processed if processed else 0.0) for key, value in totals.items()}
    per_image["total"] = sum(per_image.values())
    counts = merged.detections.groupby("class_name").size().sort_values(ascending=False)
    return {
        "settings_hash": settings_hash,
        "images_found": images_found,
        "images_labelled": len(merged.index),
        "images_labelled_this_run": sum(r["labelled"] for r in reports),
        "images_skipped": len(merged.skipped),
        "shards": int(merged.index["shard"].nunique()),
        "shards_this_run": len(reports),
        "shards_removed": len(merged.removed),
        "masks_reused_this_run": sum(r["reused_masks"] for r in reports),
        "detections_per_class": {str(k): int(v) for k, v in counts.items()},
        "seconds_per_image": per_image,
        "wall_seconds": wall_seconds,
    }
