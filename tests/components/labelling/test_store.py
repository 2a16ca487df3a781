"""Shard planning (resume, incremental, settings changes, mask reuse) and the sharded store."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from components.labelling.detect import Presence
from components.labelling.plan import plan_shards, settings_hash
from components.labelling.stage1 import AmgMask, Stage1Result, Stage11Result, Stage12Result
from components.labelling.store import (
    DETECTION_SCHEMA,
    INDEX_SCHEMA,
    SHARD_SCHEMA,
    ImageEntry,
    PseudoLabels,
    ShardRecord,
    detection_rows,
    labels_row,
    merge_outputs,
    read_records,
    shard_paths,
    write_shard,
)
from components.skipped import SKIPPED_SCHEMA


def _entries(n: int, prefix: str = "img") -> list[ImageEntry]:
    return [ImageEntry(f"{prefix}_{i:03d}", f"data/{prefix}_{i:03d}.jpg", f"sha-{prefix}-{i}") for i in range(n)]


def _record(shard: str, images: list[ImageEntry], settings: str = "S", masks: str = "M") -> ShardRecord:
    return ShardRecord(shard, settings, masks, images, rows={e.image_id: i for i, e in enumerate(images)})


def test_settings_hash_is_canonical() -> None:
    assert settings_hash({"a": 1, "b": [1, 2]}) == settings_hash({"b": [1, 2], "a": 1})
    assert settings_hash({"a": 1}) != settings_hash({"a": 2})


def test_plan_cuts_sorted_pending_images_into_stable_shards() -> None:
    entries = _entries(7)[::-1]
    plan = plan_shards(entries, [], settings_hash="S", mask_settings_hash="M", shard_size=3)
    assert [[e.image_id for e in s.images] for s in plan.pending] == [
        ["img_000", "img_001", "img_002"], ["img_003", "img_004", "img_005"], ["img_006"]]
    again = plan_shards(list(reversed(entries)), [], settings_hash="S", mask_settings_hash="M", shard_size=3)
    assert [s.shard_id for s in again.pending] == [s.shard_id for s in plan.pending]
    other = plan_shards(entries, [], settings_hash="S2", mask_settings_hash="M", shard_size=3)
    assert not {s.shard_id for s in other.pending} & {s.shard_id for s in plan.pending}


def test_plan_resumes_only_unfinished_shards_with_the_same_cuts() -> None:
    entries = _entries(7)
    first = plan_shards(entries, [], settings_hash="S", mask_settings_hash="M", shard_size=3)
    finished = [_record(first.pending[i].shard_id, list(first.pending[i].images)) for i in (0, 2)]
    resumed = plan_shards(entries, finished, settings_hash="S", mask_settings_hash="M", shard_size=3)
    assert [s.shard_id for s in resumed.pending] == [first.pending[1].shard_id]
    assert [r.shard_id for r in resumed.done] == [finished[0].shard_id, finished[1].shard_id]


def test_plan_labels_only_new_or_changed_images() -> None:
    old = _entries(4)
    done = [_record("a", old[:2]), _record("b", old[2:])]
    changed = ImageEntry("img_003", "data/img_003.jpg", "sha-new-bytes")
    now = old[:3] + [changed] + _entries(2, prefix="new")
    plan = plan_shards(now, done, settings_hash="S", mask_settings_hash="M", shard_size=10)
    assert [e.image_id for s in plan.pending for e in s.images] == ["img_003", "new_000", "new_001"]
    assert {r.shard_id for r in plan.done} == {"a", "b"}  # "b" still holds img_002
    # the changed image reuses no masks (different bytes); nothing else was labelled before
    assert plan.pending[0].mask_sources == {}


def test_plan_drops_records_of_removed_images_and_of_other_settings() -> None:
    entries = _entries(4)
    records = [_record("gone", _entries(2, prefix="old")), _record("other", entries, settings="S-old", masks="M")]
    plan = plan_shards(entries, records, settings_hash="S", mask_settings_hash="M", shard_size=4)
    assert plan.done == [] and {r.shard_id for r in plan.stale} == {"gone", "other"}
    # same mask settings: every pending image finds its kept automatic masks
    assert plan.pending[0].mask_sources == {e.image_id: type(plan.pending[0].mask_sources["img_000"])("other", i)
                                            for i, e in enumerate(entries)}
    new_masks = plan_shards(entries, records, settings_hash="S", mask_settings_hash="M2", shard_size=4)
    assert new_masks.pending[0].mask_sources == {}


def _result(label_size: int, classes: list[int], n_masks: int) -> Stage1Result:
    k = len(classes)
    s11 = Stage11Result(torch.zeros(8, 8, dtype=torch.uint8), torch.arange(k * 10, dtype=torch.float32).reshape(k, 5, 2),
                        torch.linspace(0.5, 0.9, k), torch.full((k,), 0.25))
    labels = torch.tensor([classes[i % k] for i in range(n_masks)], dtype=torch.int64)
    s12 = Stage12Result(torch.zeros(8, 8, dtype=torch.uint8), labels, torch.linspace(0.1, 0.2, n_masks))
    rng = np.random.default_rng(len(classes))
    stage = rng.integers(0, 3, (label_size, label_size)).astype(np.uint8)
    amg = [AmgMask(b"PP0" + bytes([48 + i]), 0.9, 0.95, 10 + i) for i in range(n_masks)]
    return Stage1Result(stage, 255 - stage, Presence(torch.tensor(classes), torch.tensor([1] * k)), s11, s12, amg)


def _write(root: Path, shard_id: str, entries: list[ImageEntry], skip: set[str] = frozenset()) -> ShardRecord:
    labels, detections, rows, skipped = [], [], {}, []
    for e in entries:
        if e.image_id in skip:
            skipped.append({"image_id": e.image_id, "path": e.path, "reason": "corrupt"})
            continue
        result = _result(12, [1, 2], 3)
        rows[e.image_id] = len(labels)
        labels.append(labels_row(e, result, height=30, width=40, sam_size=8))
        detections.extend(detection_rows(e.image_id, result, ["a", "b, bee", "c"]))
    record = ShardRecord(shard_id, "S", "M", entries, rows=rows, skipped=skipped, timings={"clip": 1.0})
    write_shard(root, record, labels, detections)
    return record


def test_store_round_trip_merge_and_reader(tmp_path: Path) -> None:
    entries = _entries(20)
    recs = [_write(tmp_path, "s1", entries[:18], skip={"img_004"}), _write(tmp_path, "s2", entries[18:])]
    _write(tmp_path, "stale", _entries(2, prefix="gone"))
    assert pq.read_schema(shard_paths(tmp_path, "s1")["labels"]).equals(SHARD_SCHEMA)
    assert {r.shard_id for r in read_records(tmp_path)} == {"s1", "s2", "stale"}

    now = entries[:19]  # img_019 was removed from the folder
    merged = merge_outputs(tmp_path, entries=now, done=recs, skipped=[{"path": "data/x.txt.jpg", "reason": "dup"}],
                           vocabulary=["a", "b, bee", "c"])
    assert merged.removed == ["stale"] and not shard_paths(tmp_path, "stale")["record"].exists()
    assert merged.index["image_id"].tolist() == [e.image_id for e in now if e.image_id != "img_004"]
    assert merged.skipped.to_dict("records") == [{"path": "data/img_004.jpg", "reason": "corrupt"},
                                                  {"path": "data/x.txt.jpg", "reason": "dup"}]
    assert pq.read_schema(tmp_path / "index.parquet").equals(INDEX_SCHEMA)
    assert pq.read_schema(tmp_path / "detections.parquet").equals(DETECTION_SCHEMA)
    assert pq.read_schema(tmp_path / "skipped.parquet").equals(SKIPPED_SCHEMA)
    assert set(merged.detections["image_id"]) == set(merged.index["image_id"])
    assert set(merged.detections["class_name"]) == {"b", "c"}
    first = merged.detections.iloc[0]
    assert first["stage1_2_masks"].tolist() == [0, 2] and len(first["points_xy"]) == 5

    reader = PseudoLabels(tmp_path)
    assert reader.vocabulary == ["a", "b, bee", "c"]
    expected = _result(12, [1, 2], 3)
    for image_id in ("img_000", "img_017", "img_018"):  # row groups 0 and 1 of s1, and s2
        np.testing.assert_array_equal(reader.read(image_id, "stage1_1"), expected.stage1_1)
        np.testing.assert_array_equal(reader.read(image_id, "stage1_2"), expected.stage1_2)
    rles = reader.rle_masks("img_016")
    assert [m["counts"] for m in rles] == [m.counts for m in expected.amg_masks]
    assert rles[0]["size"] == [8, 8] and rles[2]["area"] == 12
    with pytest.raises(KeyError, match="img_019"):
        reader.read("img_019", "stage1_1")
    with pytest.raises(ValueError, match="stage1_1"):
        reader.read("img_000", "stage2")
    shards = list(reader.iter_shards(columns=["image_id", "stage1_1"]))
    assert [len(s) for s in shards] == [17, 1]
    assert shards[1]["image_id"].tolist() == ["img_018"]


def test_read_records_ignores_broken_or_orphaned_records(tmp_path: Path) -> None:
    _write(tmp_path, "ok", _entries(2))
    _write(tmp_path, "orphan", _entries(1, prefix="o"))
    shard_paths(tmp_path, "orphan")["labels"].unlink()
    shard_paths(tmp_path, "bad")["record"].write_text("{not json")
    assert [r.shard_id for r in read_records(tmp_path)] == ["ok"]


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_a_damaged_shard_file_under_an_intact_record_is_redone_and_said(tmp_path: Path, caplog, damage) -> None:
    """The record vouches for the size and sha256 of each data file; a mismatch sends the shard
    back to the plan (rather than to train, which crashed with ArrowInvalid)."""
    _write(tmp_path, "ok", _entries(2))
    _write(tmp_path, "hurt", _entries(2, prefix="h"))
    labels = shard_paths(tmp_path, "hurt")["labels"]
    data = labels.read_bytes()
    if damage == "truncate":
        labels.write_bytes(data[: len(data) // 2])
    else:  # same size, one byte changed: only the digest tells
        labels.write_bytes(data[:100] + bytes([data[100] ^ 1]) + data[101:])
    with caplog.at_level("WARNING"):
        records = read_records(tmp_path)
    assert [r.shard_id for r in records] == ["ok"]
    assert "hurt" in caplog.text and "damaged" in caplog.text and "redone" in caplog.text
    plan = plan_shards(_entries(2) + _entries(2, prefix="h"), records, settings_hash="S",
                       mask_settings_hash="M", shard_size=2)
    assert [[e.image_id for e in s.images] for s in plan.pending] == [["h_000", "h_001"]]
