"""The commands a user points at their own folders (`predict`, `export`, `label --images`, `show`)
never replace, delete or write outside what they own: each case a user's mistake or a hostile
input, on real files, real stores, a real MLflow store and real processes. Every refusal is one
line on stderr, exit 2 (75 for a held lock), with nothing written."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from components.io import encode_label_png
from components.labelling.store import (
    INDEX_FILE,
    INDEX_SCHEMA,
    ImageEntry,
    PseudoLabels,
    ShardRecord,
    merge_outputs,
    shard_paths,
    write_shard,
    write_table,
)
from components.outputs import MANIFEST_FILE, check_output_folder, claim_outputs, safe_relative
from components.skipped import SKIPPED_FILE, read_skipped
from flows.cli import app
from tests import REPO_ROOT
from tests.mini_checkpoint import write_mini_checkpoint

REPO = REPO_ROOT


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (links not followed) and its bytes."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and not p.is_symlink()}


def photos(folder: Path, n: int = 4, size: tuple[int, int] = (24, 32)) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for k in range(n):
        path = folder / f"img_{k:05d}.png"
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def one_line_refusal(result, code: int = 2) -> str:
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1, result.output
    return result.output


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A project folder (the working directory) with CPU settings and a miniature model."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text().replace("device: auto", "device: cpu"))
    write_mini_checkpoint(tmp_path / "model.pt")
    photos(tmp_path / "photos")
    return tmp_path


def predict(*args: str):
    return CliRunner().invoke(app, ["predict", *args, "--model", "model.pt", "--classes", "sky,grass"])


# ------------------------------------------------------------------------------------- predict
@pytest.mark.parametrize(("source", "out", "message"), [
    ("photos", "photos", "must not contain each other"),
    ("photos", "photos/preds", "must not contain each other"),
    ("photos", ".", "must not contain each other"),
    ("photos/*.png", "photos", "outputs would replace the inputs"),
    ("photos/img_00000.png", ".", "outputs would replace the inputs"),
])
def test_predict_refuses_an_out_that_holds_or_lies_in_a_source(project: Path, source: str, out: str,
                                                               message: str) -> None:
    before = snapshot(project)
    assert message in one_line_refusal(predict(source, "--out", out))
    assert snapshot(project) == before and not (project / "photos" / "preds").exists()


def test_predict_refuses_a_users_folder_and_never_replaces_their_files(project: Path, prefect_harness: str) -> None:
    mine = project / "mine"
    mine.mkdir()
    for name in ("img_00003.png", "img_00004_overlay.jpg", "predictions.jsonl", "classes.txt", SKIPPED_FILE):
        (mine / name).write_text(f"the user's {name}")
    before = snapshot(mine)
    assert "fmbseg did not write it" in one_line_refusal(predict("photos", "--out", "mine"))
    assert "would replace" in one_line_refusal(predict("photos", "--out", "mine", "--overwrite"))
    assert snapshot(mine) == before and not (mine / MANIFEST_FILE).exists()

    # --overwrite writes next to the user's files that it would not replace, and keeps them
    (mine / "img_00003.png").unlink()
    for name in ("img_00004_overlay.jpg", "predictions.jsonl", "classes.txt", SKIPPED_FILE):
        (mine / name).rename(mine / f"kept_{name}")
    kept = snapshot(mine)
    result = predict("photos", "--out", "mine", "--overwrite")
    assert result.exit_code == 0, result.output
    assert all(snapshot(mine)[name] == data for name, data in kept.items())
    assert (mine / "img_00003.png").exists() and (mine / MANIFEST_FILE).exists()
    # its own folder now: a rerun resumes without --overwrite
    again = predict("photos", "--out", "mine")
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout[again.stdout.index("{"):])["resumed"] == 4


def test_second_predict_on_one_out_exits_75_naming_the_holder(project: Path) -> None:
    """The same lock `label` takes, held by another real process."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom components.io import output_lock\n"
         "with output_lock('out', stage='predict'):\n    print('held', flush=True)\n    time.sleep(120)"],
        cwd=project, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        start = time.monotonic()
        result = predict("photos", "--out", "out")
        assert time.monotonic() - start < 60
    finally:
        holder.kill()
        holder.wait()
    output = one_line_refusal(result, 75)
    assert f"pid {holder.pid} holds" in output and "`fmbseg predict`" in output
    assert not (project / "out").exists()


def test_predict_reports_every_skipped_entry_with_labels_link_rules(project: Path, prefect_harness: str) -> None:
    """label's scanner: links out of the folder follow `label.external_symlinks`; broken and looping
    links, non-images and an image above the pixel budget are each a row of the skipped file."""
    outside = photos(project / "elsewhere", n=1)[0]
    folder = project / "photos"
    (folder / "outside.png").symlink_to(outside)
    (folder / "dangling.png").symlink_to(project / "gone.png")
    (folder / "loop_a.png").symlink_to(folder / "loop_b.png")
    (folder / "loop_b.png").symlink_to(folder / "loop_a.png")
    (folder / "notes.txt").write_text("not an image")
    photos(project / "big", n=1, size=(100, 120))[0].rename(folder / "big.png")
    result = predict("photos", "--out", "out", "--max-pixels", "10000")
    assert result.exit_code == 0, result.output
    reasons = {Path(row["path"]).name: row["reason"] for row in read_skipped(project / "out" / SKIPPED_FILE)}
    assert sorted(reasons) == ["big.png", "dangling.png", "loop_a.png", "loop_b.png", "notes.txt", "outside.png"]
    assert "outside the image folder" in reasons["outside.png"] and "12000 pixels" in reasons["big.png"]
    assert json.loads(result.stdout[result.stdout.index("{"):])["segmented"] == 4

    params = yaml.safe_load((project / "params.yaml").read_text())
    params["label"]["external_symlinks"] = "follow"
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    followed = predict("photos", "--out", "out", "--max-pixels", "10000")
    assert followed.exit_code == 0, followed.output
    assert (project / "out" / "outside.png").exists()


# --------------------------------------------------------------------------------------- models
def test_a_run_artifact_path_never_leaves_its_run(project: Path, mlflow_uri: str) -> None:
    from components.config import parse_params
    from flows import model_registry, tracking

    params = parse_params({})
    model = write_mini_checkpoint(project / "ck" / "aligner.pt")
    with tracking.start_run(params, run_name="train", tags={}) as run_id:
        tracking.log_checkpoint(params, run_id, model)
        model_registry.log_model(params, run_id, model)
    for uri in (f"runs:/{run_id}/../../../../../../etc/passwd", f"runs:/{run_id}//etc/passwd", "runs:/../x"):
        result = CliRunner().invoke(app, ["predict", "photos", "--out", "out", "--model", uri, "--classes", "a"])
        assert "refused" in one_line_refusal(result), uri
    assert not (project / "out").exists()
    name = params.tracking.registered_model
    assert model_registry.resolve_model_uri(f"models:/{name}/latest", params).read_bytes() == model.read_bytes()


@pytest.mark.parametrize("kind", ["text", "pickle", "folder", "other dict"])
def test_a_file_that_is_no_checkpoint_is_one_line(project: Path, kind: str) -> None:
    path = project / "not_a_model"
    if kind == "text":
        path.write_text("root:x:0:0:root:/root:/bin/bash\n")
    elif kind == "pickle":
        path.write_bytes(pickle.dumps(Path("/"), protocol=2))  # a global weights_only refuses
    elif kind == "folder":
        path.mkdir()
        (path / "x").write_text("x")
    else:
        import torch

        torch.save({"model": {}, "format": 2}, path)
    result = CliRunner().invoke(app, ["predict", "photos", "--out", "out", "--model", str(path), "--classes", "a"])
    assert f"{path} is not an fmbseg checkpoint: " in one_line_refusal(result)
    assert not (project / "out").exists()


# ---------------------------------------------------------------------------------- label --images
def test_label_images_with_a_class_twice_writes_nothing(project: Path) -> None:
    before = snapshot(project)
    result = CliRunner().invoke(app, ["label", "--images", "photos", "--classes", "sky,grass,sky", "--out", "lab",
                                      "--profile", "demo"])
    assert "'sky' appears more than once" in one_line_refusal(result)
    assert snapshot(project) == before and not (project / "lab").exists()


def test_label_images_refuses_a_users_out_folder(project: Path) -> None:
    (project / "lab").mkdir()
    (project / "lab" / "classes.txt").write_text("mine\n")
    before = snapshot(project)
    for extra in ([], ["--overwrite"]):
        result = CliRunner().invoke(app, ["label", "--images", "photos", "--classes", "sky", "--out", "lab",
                                          "--profile", "demo", *extra])
        one_line_refusal(result)
    assert snapshot(project) == before


# ---------------------------------------------------------------------------------------- export
def store(root: Path, ids: list[str]) -> Path:
    """A real one-shard Stage 1 store of 8x8 maps for ``ids``."""
    entries = [ImageEntry(i, f"imgs/{i}.png", f"sha-{i}") for i in ids]
    label = encode_label_png(np.zeros((8, 8), np.uint8))
    rows = [{"image_id": e.image_id, "image_path": e.path, "sha256": e.sha256, "height": 8, "width": 8,
             "stage1_1": label, "stage1_2": label, "sam_size": 16, "amg_masks": []} for e in entries]
    record = ShardRecord("s0", "h", "m", entries, rows={e.image_id: k for k, e in enumerate(entries)})
    write_shard(root, record, rows, [])
    merge_outputs(root, entries=entries, done=[record], skipped=[], vocabulary=["sky", "grass"])
    return root


def export(*args: str):
    return CliRunner().invoke(app, ["export", "--store", "store", "--out", "X", *args])


def test_export_never_replaces_or_deletes_a_users_files(project: Path, prefect_harness: str) -> None:
    store(project / "store", ["a", "sub/b"])
    (project / "X" / "stage1_1").mkdir(parents=True)
    (project / "X" / "stage1_1" / "mine.png").write_text("mine")
    (project / "X" / "classes.txt").write_text("my classes\n")
    (project / "X" / "stage1_1.json").write_text("{}")
    before = snapshot(project / "X")
    assert "fmbseg did not write it" in one_line_refusal(export("--variant", "stage1_1"))
    output = one_line_refusal(export("--variant", "stage1_1", "--overwrite"))
    assert "3 file(s)" in output and "stage1_1/mine.png" in output
    assert snapshot(project / "X") == before

    (project / "X" / "stage1_1" / "mine.png").rename(project / "X" / "mine.png")
    (project / "X" / "classes.txt").rename(project / "X" / "my_classes.txt")
    (project / "X" / "stage1_1.json").unlink()
    cli = [sys.executable, "-m", "flows.cli", "export", "--store", "store", "--out", "X"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}  # a process per flow run: in-process runs share Prefect's logging
    done = subprocess.run([*cli, "--variant", "stage1_1", "--overwrite"], cwd=project, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (project / "X" / "mine.png").read_text() == "mine" and (project / "X" / "stage1_1" / "sub" / "b.png").exists()
    again = subprocess.run([*cli, "--variant", "both"], cwd=project, env=env, capture_output=True, text=True,
                           timeout=600)  # its own folder: rewritten without --overwrite
    assert again.returncode == 0, again.stderr[-3000:]
    assert (project / "X" / "my_classes.txt").read_text() == "my classes\n"
    assert (project / "X" / "mine.png").read_text() == "mine" and (project / "X" / "stage1_2" / "a.png").exists()


def hostile_store(root: Path, image_id: str) -> Path:
    """A store whose index, rewritten by hand, names ``image_id``."""
    store(root, ["a"])
    index = pa.Table.from_pylist([{"image_id": image_id, "image_path": "imgs/a.png", "sha256": "sha-a",
                                   "shard": "shards/s0.parquet", "row": 0}], schema=INDEX_SCHEMA)
    write_table(root / INDEX_FILE, index)
    return root


@pytest.mark.parametrize("image_id", ["../../../x", "/tmp/x", "a/../../x"])
def test_a_hostile_image_id_is_refused_by_export_and_show(project: Path, image_id: str) -> None:
    hostile_store(project / "store", image_id)
    before = snapshot(project)
    assert "refused" in one_line_refusal(export())
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["paths"]["stage1"] = "store"
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    before = snapshot(project)
    assert "refused" in one_line_refusal(CliRunner().invoke(app, ["show", image_id]))
    assert snapshot(project) == before and not (project / "X").exists() and not Path("/tmp/x.png").exists()


def test_the_stores_writers_refuse_paths_that_leave_the_store(tmp_path: Path) -> None:
    label = encode_label_png(np.zeros((8, 8), np.uint8))
    entry = ImageEntry("../x", "imgs/x.png", "sha")
    row = {"image_id": "../x", "image_path": "imgs/x.png", "sha256": "sha", "height": 8, "width": 8,
           "stage1_1": label, "stage1_2": label, "sam_size": 16, "amg_masks": []}
    with pytest.raises(ValueError, match="leaves its folder"):
        write_shard(tmp_path, ShardRecord("s0", "h", "m", [entry], rows={"../x": 0}), [row], [])
    with pytest.raises(ValueError, match="shard id"):
        shard_paths(tmp_path, "../../evil")
    assert not any(tmp_path.iterdir())
    with pytest.raises(ValueError, match="leaves its folder"):
        PseudoLabels(hostile_store(tmp_path / "s", "../up"))


def test_predict_records_naming_a_path_outside_are_refused(tmp_path: Path) -> None:
    from components.predictions import PREDICTIONS_FILE, _read_records

    (tmp_path / PREDICTIONS_FILE).write_text(json.dumps({"output": "../../x.png", "sha256": "s"}) + "\n")
    with pytest.raises(ValueError, match="leaves its folder"):
        _read_records(tmp_path / PREDICTIONS_FILE)


def test_safe_relative_and_the_manifest(tmp_path: Path) -> None:
    for bad in ["", "/etc/passwd", "..", "a/../../b", "~/x", "a\\..\\b"]:
        with pytest.raises(ValueError):
            safe_relative(bad, what="id")
    assert str(safe_relative("sub/a b.png", what="id")) == "sub/a b.png"
    claim_outputs(tmp_path / "o", ["stage1/", "classes.txt"])
    (tmp_path / "o" / "stage1" / "shards").mkdir(parents=True)
    (tmp_path / "o" / "stage1" / "shards" / "s.parquet").write_text("ours")
    check_output_folder(tmp_path / "o", ["classes.txt", "stage1/"], overwrite=False, trees=["stage1"])
    (tmp_path / "o" / "notes.txt").write_text("mine")
    check_output_folder(tmp_path / "o", ["classes.txt"], overwrite=False)  # ours, with a user file beside
    with pytest.raises(ValueError, match="notes.txt"):
        check_output_folder(tmp_path / "o", ["notes.txt"], overwrite=True)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "o" / "sub").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ValueError, match=r"sub \(a link\)"):
        check_output_folder(tmp_path / "o", ["sub/x.png"], overwrite=True)
