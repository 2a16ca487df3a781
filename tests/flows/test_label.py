"""`fmbseg label` / `balance` / `show` end to end on synthetic images with the miniature models:
files and schemas, the skipped report, resume after a failure, incremental labelling, relabelling
after a settings change from the kept SAM masks, and the semi-supervised presence."""

from __future__ import annotations

import io
import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

import flows.label as label_module
from components.io import encode_label_png
from components.labelling.plan import PlannedShard
from components.labelling.store import (
    DETECTION_SCHEMA,
    INDEX_SCHEMA,
    SHARD_SCHEMA,
    PseudoLabels,
    read_records,
)
from components.skipped import SKIPPED_SCHEMA
from demoworld.synthetic import write_synthetic_unlabelled
from flows.balance import balance_flow
from flows.label import LabelContext, run_label
from tests import REPO_ROOT

PARAMS = {
    "paths": {"images": "imgs", "incoming": "incoming", "pseudo": "pseudo", "reports": "reports"},
    # the random miniatures: these tests check the stage's mechanics, whatever the models see
    "models": {"profile": "mini", "device": "cpu", "dtype": "fp32"},
    "label": {
        "vocabulary": "voc21",
        "grid": 2,
        "sam_size": 64,
        "label_size": 48,
        "amg": {"points_per_side": 4, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0,
                "min_area_frac": 0.0, "max_area_frac": 1.0},
        "shard_size": 3,
        "crop_batch": 4,
        "num_workers": 1,
    },
    "balance": {"ratio": 0.75, "seed": 0},
    "orchestration": {"task_runner": "threads", "max_workers": 1},
}
BAD = {"corrupt.jpg", "empty.jpg", "notes.png"}


def _jpeg_bytes(image: Image.Image, **kw: Any) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", **kw)
    return buf.getvalue()


def _make_project(root: Path, params: dict[str, Any] | None = None) -> Path:
    """params.yaml + an image folder: 4 synthetic JPEGs, odd formats that must be labelled, and
    files that must be skipped."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "params.yaml").write_text(yaml.safe_dump(params or PARAMS))
    images = root / "imgs"
    write_synthetic_unlabelled(images, num_images=4, seed=0, size=(48, 64))
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)
    Image.fromarray(rgb).convert("CMYK").save(images / "cmyk.jpg", format="JPEG")
    Image.fromarray(rgb[..., 0]).save(images / "gray.png")
    Image.fromarray(np.dstack([rgb, rgb[..., :1]])).save(images / "rgba.png")
    Image.fromarray(rgb[..., 0].astype(np.uint16) * 257).save(images / "deep16.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° on display: stored 40x56, shown 56x40
    (images / "rotated.jpg").write_bytes(_jpeg_bytes(Image.fromarray(rgb), exif=exif))
    (images / "corrupt.jpg").write_bytes(_jpeg_bytes(Image.fromarray(rgb))[:300])
    (images / "empty.jpg").write_bytes(b"")
    (images / "notes.png").write_text("not an image")
    return root


def _outputs(root: Path) -> dict[str, bytes]:
    """Every output file of the label stage except run timings (summary, records), by name."""
    out = root / "pseudo" / "stage1"
    files = {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*.parquet"))}
    files["vocabulary.txt"] = (out / "vocabulary.txt").read_bytes()
    return files


def _task_runs() -> int:
    """Task runs the Prefect server holds (its REST endpoint ``POST /task_runs/count``)."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return int(client.request("POST", "/task_runs/count", json={}).json())


def test_label_end_to_end_files_schemas_and_skipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     prefect_harness: None) -> None:
    project = _make_project(tmp_path / "p")
    monkeypatch.chdir(project)
    before = _task_runs()
    summary = run_label("params.yaml")
    # one task run per shard plus the listing, whatever the shard size: the server records task runs
    # from events, so wait until the 4 shards' runs are in, then check nothing more came
    deadline = time.monotonic() + 30
    while _task_runs() - before < 5 and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)
    assert _task_runs() - before == 5
    out = project / "pseudo" / "stage1"
    good = {"img_00000", "img_00001", "img_00002", "img_00003", "cmyk", "gray", "rgba", "deep16", "rotated"}
    assert summary["images_labelled"] == len(good) and summary["images_skipped"] == len(BAD)
    assert set(summary["seconds_per_image"]) == {"clip", "sam_encoder", "prompts", "amg", "labelling", "io", "total"}
    assert summary["seconds_per_image"]["clip"] > 0 and summary["seconds_per_image"]["amg"] > 0

    skipped = pq.read_table(out / "skipped.parquet")
    assert skipped.schema.equals(SKIPPED_SCHEMA)
    reasons = dict(zip(skipped["path"].to_pylist(), skipped["reason"].to_pylist(), strict=True))
    assert set(reasons) == {f"imgs/{name}" for name in BAD}
    assert "empty" in reasons["imgs/empty.jpg"] and "not an image" in reasons["imgs/notes.png"]
    assert "truncated" in reasons["imgs/corrupt.jpg"]

    index = pq.read_table(out / "index.parquet")
    assert index.schema.equals(INDEX_SCHEMA) and set(index["image_id"].to_pylist()) == good
    records = read_records(out)
    assert len(records) == 4  # 12 images in shards of 3
    for record in records:
        assert pq.read_schema(out / "shards" / f"{record.shard_id}.parquet").equals(SHARD_SCHEMA)
    detections = pq.read_table(out / "detections.parquet")
    assert detections.schema.equals(DETECTION_SCHEMA)
    assert set(detections["image_id"].to_pylist()) == good
    assert all(len(p) == 5 for p in detections["points_xy"].to_pylist())
    assert (out / "vocabulary.txt").read_text().splitlines()[0] == "background"

    labels = PseudoLabels(out)
    for image_id in good:
        for variant in ("stage1_1", "stage1_2"):
            label = labels.read(image_id, variant)
            assert label.shape == (48, 48) and label.dtype == np.uint8
        present = set(detections.filter(pq.ParquetFile(out / "detections.parquet").read()["image_id"]
                                         .to_numpy(zero_copy_only=False) == image_id)["class_id"].to_pylist())
        assert set(np.unique(labels.read(image_id, "stage1_1")).tolist()) <= present | {255}
        assert len(labels.rle_masks(image_id)) > 0
    shard_table = pq.read_table(out / labels.index.set_index("image_id").loc["rotated", "shard"])
    row = shard_table.to_pylist()[int(labels.index.set_index("image_id").loc["rotated", "row"])]
    assert (row["height"], row["width"]) == (56, 40)  # EXIF orientation applied


def test_resume_after_a_failure_and_incremental_labelling(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          prefect_harness: None) -> None:
    reference = _make_project(tmp_path / "reference")
    monkeypatch.chdir(reference)
    run_label("params.yaml")
    expected = _outputs(reference)

    project = _make_project(tmp_path / "interrupted")
    monkeypatch.chdir(project)
    real_run_shard = label_module.run_shard
    calls: list[list[str]] = []

    def failing_after_first(context: LabelContext, job: PlannedShard, tally: str | None = None) -> dict[str, Any]:
        calls.append([e.image_id for e in job.images])
        if len(calls) > 1:
            raise RuntimeError("simulated crash")
        return real_run_shard(context, job, tally)

    monkeypatch.setattr(label_module, "run_shard", failing_after_first)
    with pytest.raises(RuntimeError, match="3 of 4 shards failed"):
        run_label("params.yaml")
    out = project / "pseudo" / "stage1"
    first = read_records(out)
    assert len(first) == 1 and not (out / "index.parquet").exists()
    first_files = sorted((out / "shards").glob(f"{first[0].shard_id}*"))
    stamps = {p: p.stat().st_mtime_ns for p in first_files}

    calls.clear()

    def counting(context: LabelContext, job: PlannedShard, tally: str | None = None) -> dict[str, Any]:
        calls.append([e.image_id for e in job.images])
        return real_run_shard(context, job, tally)

    monkeypatch.setattr(label_module, "run_shard", counting)
    summary = run_label("params.yaml")
    assert len(calls) == 3 and summary["shards_this_run"] == 3
    assert not set(sum(calls, [])) & {e.image_id for e in first[0].images}
    assert {p: p.stat().st_mtime_ns for p in first_files} == stamps
    assert _outputs(project) == expected  # byte-identical to the uninterrupted run

    # two new images (one in the incoming folder of the nightly sync): only they are labelled
    before = {p: p.stat().st_mtime_ns for p in (out / "shards").iterdir()}
    (project / "incoming").mkdir()
    Image.fromarray(np.full((30, 30, 3), 200, dtype=np.uint8)).save(project / "incoming" / "new_a.jpg")
    Image.fromarray(np.full((30, 40, 3), 90, dtype=np.uint8)).save(project / "imgs" / "new_b.png")
    calls.clear()
    summary = run_label("params.yaml")
    assert calls == [["new_a", "new_b"]]
    assert summary["images_labelled_this_run"] == 2 and summary["images_labelled"] == 11
    assert {p: p.stat().st_mtime_ns for p in before} == before
    index = PseudoLabels(out).index.set_index("image_id")
    assert index.loc["new_a", "image_path"] == "incoming/new_a.jpg"

    # nothing new: nothing runs, and the merged outputs stay as they are
    calls.clear()
    merged = _outputs(project)
    assert run_label("params.yaml")["shards_this_run"] == 0 and calls == []
    assert _outputs(project) == merged

    # an image removed from the folder drops out of the outputs
    (project / "imgs" / "new_b.png").unlink()
    run_label("params.yaml")
    assert "new_b" not in PseudoLabels(out).image_ids and calls == []


def test_a_clip_side_setting_change_relabels_all_from_the_kept_masks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, prefect_harness: None
) -> None:
    project = _make_project(tmp_path / "p")
    monkeypatch.chdir(project)
    run_label("params.yaml")
    out = project / "pseudo" / "stage1"
    old_labels = PseudoLabels(out)
    old = {i: (old_labels.read(i, "stage1_2"), old_labels.rle_masks(i)) for i in old_labels.image_ids}
    old_shards = {r.shard_id for r in read_records(out)}

    params = yaml.safe_load((project / "params.yaml").read_text())
    params["label"]["top_k_points"] = 3  # changes Stage 1.1 prompts only
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    summary = run_label("params.yaml")
    assert summary["images_labelled_this_run"] == len(old) == summary["masks_reused_this_run"]
    assert not {r.shard_id for r in read_records(out)} & old_shards  # old shards are gone
    new_labels = PseudoLabels(out)
    for image_id, (stage1_2, rles) in old.items():
        np.testing.assert_array_equal(new_labels.read(image_id, "stage1_2"), stage1_2)
        assert new_labels.rle_masks(image_id) == rles
    detections = pq.read_table(out / "detections.parquet")
    assert all(len(p) == 3 for p in detections["points_xy"].to_pylist())


def test_semi_supervised_presence_reads_image_level_labels(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           prefect_harness: None) -> None:
    gt = tmp_path / "gt"  # canonical layout: labels/<split>/<id>.png and classes.txt
    (gt / "labels" / "val").mkdir(parents=True)
    (gt / "classes.txt").write_text("car\nperson\n")
    for k in range(4):
        label = np.full((48, 64), 255, dtype=np.uint8)
        label[20:, : 16 * (k + 1)] = k % 2  # car or person
        (gt / "labels" / "val" / f"img_{k:05d}.png").write_bytes(encode_label_png(label))
    params = yaml.safe_load(yaml.safe_dump(PARAMS))
    params["label"].update({"presence": "ground_truth", "ground_truth_dir": str(gt)})
    project = tmp_path / "p"
    project.mkdir()
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    write_synthetic_unlabelled(project / "imgs", num_images=5, seed=1, size=(48, 64))
    monkeypatch.chdir(project)
    summary = run_label("params.yaml")
    out = project / "pseudo" / "stage1"
    assert summary["images_labelled"] == 4  # img_00004 has no ground truth
    skipped = pq.read_table(out / "skipped.parquet").to_pylist()
    assert skipped == [{"path": "imgs/img_00004.jpg",
                        "reason": f"no ground-truth label for image-level presence in {gt}"}]
    detections = pq.read_table(out / "detections.parquet").to_pandas()
    voc = (out / "vocabulary.txt").read_text().splitlines()
    car, person = voc.index("car"), voc.index("person")
    by_image = detections.groupby("image_id")["class_id"].apply(sorted).to_dict()
    assert by_image == {"img_00000": [car], "img_00001": [person], "img_00002": [car], "img_00003": [person]}


def test_cli_balance_and_show(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, prefect_harness: None) -> None:
    from typer.testing import CliRunner

    from flows.cli import app

    project = _make_project(tmp_path / "p")
    for bad in BAD:
        (project / "imgs" / bad).unlink()
    monkeypatch.chdir(project)
    runner = CliRunner()
    result = runner.invoke(app, ["label"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["balance"])
    assert result.exit_code == 0, result.output
    index = pq.read_table(project / "pseudo" / "train_index.parquet").to_pandas()
    assert (index["variant"] == "stage1_1").sum() == 9 and (index["variant"] == "stage1_2").sum() == 7
    assert all((project / shard).is_file() for shard in index["shard"])
    assert all((project / path).is_file() for path in index["image_path"])
    again = balance_flow("params.yaml")
    assert again["stage1_2"] == 7
    assert pq.read_table(project / "pseudo" / "train_index.parquet").to_pandas().equals(index)

    result = runner.invoke(app, ["show", "gray", "--out", "gray.png"])
    assert result.exit_code == 0, result.output
    with Image.open(project / "gray.png") as picture:
        assert picture.format == "PNG" and picture.width > 3 * 48
    result = runner.invoke(app, ["show", "nope"])
    assert result.exit_code == 2 and "no pseudo labels for image id 'nope'" in result.output
    shutil.rmtree(project / "reports", ignore_errors=True)


def test_every_stage1_setting_is_counted_or_named_as_not_changing_a_label() -> None:
    """The resume keys hash an explicit list of Stage1Settings' fields: a new field must join the
    masks' list, the labels' list, or the list of those that cannot change a label."""
    from dataclasses import fields

    from components.labelling.settings import (
        AMG_GENERATOR_FIELDS,
        LABEL_FIELDS,
        MASK_FIELDS,
        UNCOUNTED_FIELDS,
        AmgSettings,
        Stage1Settings,
    )

    listed = [*MASK_FIELDS, *LABEL_FIELDS, *UNCOUNTED_FIELDS]
    assert sorted(listed) == sorted(f.name for f in fields(Stage1Settings))
    # amg: the generator's settings (masks), then the size filter (labels)
    assert [f.name for f in fields(AmgSettings)] == [*AMG_GENERATOR_FIELDS, "min_area_frac", "max_area_frac"]


def test_settings_hashes_stay_those_stores_were_labelled_under() -> None:
    """A store labelled by an earlier version resumes: the hashes of fixed settings do not move when
    the code that computes them does (values written by the version before typed settings)."""
    from components.config import apply_overrides, parse_params
    from flows.label import settings_hashes, vocabulary_lines

    vocabulary = vocabulary_lines("voc21")
    assert settings_hashes(parse_params(PARAMS), vocabulary) == ("5b74d18d1aa68c64", "47102d948e1df550")
    taught = parse_params(apply_overrides(PARAMS, {"models.teacher": "mini-sam3"}))
    assert settings_hashes(taught, vocabulary) == ("adec24dfd00fffe3", "47102d948e1df550")


def test_settings_hashes_follow_what_labels_and_masks_depend_on() -> None:
    from components.config import ConfigError, apply_overrides, parse_params
    from flows.label import settings_hashes, vocabulary_lines

    vocabulary = vocabulary_lines("voc21")

    def hashes(**overrides: Any) -> tuple[str, str]:
        return settings_hashes(parse_params(apply_overrides(PARAMS, overrides)), vocabulary)

    base = hashes()
    for harmless in ({"label.shard_size": 7}, {"label.crop_batch": 1}, {"label.num_workers": 0},
                     {"models.device": "auto"}, {"orchestration.max_workers": 2}):
        assert hashes(**harmless) == base, harmless
    for clip_side in ({"label.top_k_points": 3}, {"label.grid": 3}, {"label.min_crops": 2}, {"label.label_size": 32},
                      {"label.amg.min_area_frac": 0.01}, {"label.dense_mode": "maskclip"}):
        full, masks = hashes(**clip_side)
        assert full != base[0] and masks == base[1], clip_side
    for sam_side in ({"label.sam_size": 96}, {"label.amg.points_per_side": 5}, {"models.dtype": "bf16"}):
        full, masks = hashes(**sam_side)
        assert full != base[0] and masks != base[1], sam_side
    assert settings_hashes(parse_params(PARAMS), vocabulary[:-1])[0] != base[0]
    with pytest.raises(ConfigError, match="neither a shipped class list.*voc21"):
        vocabulary_lines("no-such-list")


def test_odd_file_names_and_kinds_are_labelled_or_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, prefect_harness: None
) -> None:
    import os

    project = tmp_path / "p"
    project.mkdir()
    (project / "params.yaml").write_text(yaml.safe_dump(PARAMS))
    write_synthetic_unlabelled(project / "imgs", num_images=1, seed=0, size=(48, 64))
    raw = os.fsencode(project / "imgs") + b"/caf\xe9 \xef\xbf\xbd.jpg"  # Latin-1 é, then a real U+FFFD
    shutil.copyfile(project / "imgs" / "img_00000.jpg", os.fsdecode(raw))
    # and files that are neither labelled nor reported on main: a .gif, a dangling link, a link out
    Image.open(project / "imgs" / "img_00000.jpg").convert("P").save(project / "imgs" / "anim.gif")
    os.symlink(project / "gone.jpg", project / "imgs" / "dangling.jpg")
    (tmp_path / "outside.jpg").write_bytes((project / "imgs" / "img_00000.jpg").read_bytes())
    os.symlink(tmp_path / "outside.jpg", project / "imgs" / "out.jpg")
    monkeypatch.chdir(project)
    summary = run_label("params.yaml")
    from components.features.cache import unique_images
    from components.io import fs_path

    assert summary["images_labelled"] == 3 and summary["images_skipped"] == 2
    skipped = pq.read_table(project / "pseudo" / "stage1" / "skipped.parquet").to_pylist()
    reasons = {r["path"]: r["reason"] for r in skipped}
    assert "dangling" in reasons["imgs/dangling.jpg"] and "outside the image folder" in reasons["imgs/out.jpg"]
    index = pq.read_table(project / "pseudo" / "stage1" / "index.parquet").to_pandas()
    assert "anim" in set(index["image_id"])
    row = index.loc[~index["image_id"].isin(["img_00000", "anim"])].iloc[0]
    assert row["image_id"].encode("utf-8")  # valid text in Parquet, JSON and logs
    assert os.fsencode(fs_path(row["image_path"])) == b"imgs/caf\xe9 \xef\xbf\xbd.jpg"  # and back, exactly
    assert PseudoLabels(project / "pseudo" / "stage1").read(row["image_id"], "stage1_1").shape == (48, 48)
    assert [im.image_id for im in unique_images(index, project, num_workers=1)] == sorted(index["image_id"])


def test_a_second_label_run_on_the_same_output_fails_at_once_and_touches_nothing(tmp_path: Path) -> None:
    """The lock is an flock a real process holds (here: this test); `fmbseg label` started beside
    it exits 75 before loading a model, and the first run's files are left as they were."""
    import os
    import subprocess
    import sys
    import time

    from components.io import output_lock

    project = tmp_path / "p"
    project.mkdir()
    (project / "params.yaml").write_text(yaml.safe_dump(PARAMS))
    write_synthetic_unlabelled(project / "imgs", num_images=1, seed=0, size=(48, 64))
    shards = project / "pseudo" / "stage1" / "shards"
    shards.mkdir(parents=True)
    (shards / "other-run.json").write_text("{}")
    (shards / ".other-run.parquet.abc.parquet.tmp").write_bytes(b"being written")
    cli = Path(sys.executable).with_name("fmbseg")
    with output_lock(project / "pseudo" / "stage1", stage="label"):
        start = time.monotonic()
        second = subprocess.run([str(cli), "label"], cwd=project, capture_output=True, text=True,
                                env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
        elapsed = time.monotonic() - start
    assert second.returncode == 75, second.stderr[-2000:]
    assert "another `fmbseg label` run" in second.stderr and "stage1" in second.stderr
    assert elapsed < 60
    assert sorted(p.name for p in shards.iterdir()) == [".other-run.parquet.abc.parquet.tmp", "other-run.json"]


@pytest.mark.slow
def test_two_concurrent_label_processes_one_labels_the_other_refuses(tmp_path: Path) -> None:
    """Two real `fmbseg label` processes on one output: the second exits 75 naming the first's pid
    while the first runs on and finishes its store intact."""
    import os
    import subprocess
    import sys
    import time

    project = tmp_path / "p"
    project.mkdir()
    (project / "params.yaml").write_text(yaml.safe_dump(PARAMS))
    write_synthetic_unlabelled(project / "imgs", num_images=4, seed=0, size=(48, 64))
    cli = Path(sys.executable).with_name("fmbseg")
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    env.pop("PREFECT_API_URL", None)  # each process starts Prefect's temporary server: the first holds the lock for it
    first = subprocess.Popen([str(cli), "label"], cwd=project, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    try:
        lock = project / "pseudo" / ".stage1.lock"
        deadline = time.monotonic() + 120
        while not (lock.exists() and lock.read_text().strip() == str(first.pid)):
            assert first.poll() is None and time.monotonic() < deadline, "the first run never took the lock"
            time.sleep(0.2)
        second = subprocess.run([str(cli), "label"], cwd=project, env=env, capture_output=True, text=True)
        out, _ = first.communicate(timeout=600)
    finally:
        if first.poll() is None:
            first.kill()
    assert second.returncode == 75, second.stderr[-2000:]
    assert f"pid {first.pid} holds" in second.stderr
    assert first.returncode == 0, out[-3000:]
    summary = json.loads((project / "pseudo" / "stage1" / "summary.json").read_text())
    assert summary["images_labelled"] == 4
