"""Resume and incremental relabelling: which images still need labels, in which shards.

A shard is done when its completion record names the settings hash of this run; its images are
known by content (sha256), so an image counts as labelled only under the same bytes and the same
settings. Everything else is pending, sorted by image id and cut into shards of ``shard_size``;
shard ids hash the settings and the members, so a rerun after a kill plans the same shards again
(finished shards drop out whole, the rest keep their cuts) and images added later form new shards
without touching the old ones.

Two hashes: ``mask_settings_hash`` covers what SAM's automatic masks depend on (SAM spec, SAM frame
size, generator settings); ``settings_hash`` covers every label setting. A pending image whose
content was labelled before under the same mask settings reuses the kept RLE masks instead of
running the automatic mask generator again.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from components.labelling.store import ImageEntry, ShardRecord, shard_id_for

__all__ = ["MaskSource", "PlannedShard", "LabelPlan", "settings_hash", "plan_shards"]


def settings_hash(settings: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of a settings dict (sorted keys), 16 hex digits."""
    text = json.dumps(settings, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class MaskSource:
    """Where an image's kept automatic masks are: shard id of an earlier run and the row in it."""

    shard_id: str
    row: int


@dataclass(frozen=True)
class PlannedShard:
    """A shard to label: its id, member images (sorted by id) and reusable masks per image id."""

    shard_id: str
    images: tuple[ImageEntry, ...]
    mask_sources: dict[str, MaskSource]


@dataclass(frozen=True)
class LabelPlan:
    """done: records valid for this run; pending: shards to label; stale: records of no use."""

    done: list[ShardRecord]
    pending: list[PlannedShard]
    stale: list[ShardRecord]


def plan_shards(
    entries: list[ImageEntry],
    records: list[ShardRecord],
    *,
    settings_hash: str,
    mask_settings_hash: str,
    shard_size: int,
) -> LabelPlan:
    """Split the current images into finished and pending shards.

    entries: the images in the folder now (unique ids); records: completion records found on disk.
    A record is done when it has this ``settings_hash`` and at least one member still present with
    the same content (members that changed or left are ignored by the merge); other records are
    stale, except that records with this ``mask_settings_hash`` lend their masks to pending images
    with the same content.
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    current = {(e.image_id, e.sha256) for e in entries}
    done: list[ShardRecord] = []
    stale: list[ShardRecord] = []
    covered: set[tuple[str, str]] = set()
    for record in records:
        members = {(e.image_id, e.sha256) for e in record.images} & current
        if record.settings_hash == settings_hash and members - covered:
            done.append(record)
            covered |= members
        else:
            stale.append(record)

    masks_by_sha: dict[str, MaskSource] = {}
    for record in records:
        if record.mask_settings_hash != mask_settings_hash:
            continue
        for entry in record.images:
            if entry.image_id in record.rows:
                masks_by_sha.setdefault(entry.sha256, MaskSource(record.shard_id, record.rows[entry.image_id]))

    todo = sorted((e for e in entries if (e.image_id, e.sha256) not in covered), key=lambda e: e.image_id)
    pending = []
    for start in range(0, len(todo), shard_size):
        members = tuple(todo[start : start + shard_size])
        sources = {e.image_id: masks_by_sha[e.sha256] for e in members if e.sha256 in masks_by_sha}
        pending.append(PlannedShard(shard_id_for(settings_hash, list(members)), members, sources))
    return LabelPlan(done=done, pending=pending, stale=stale)

