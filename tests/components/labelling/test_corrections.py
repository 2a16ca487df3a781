"""`fmbseg import-labels FILE`: corrected masks from a labelling tool's COCO export take precedence
over Stage 1's maps in `balance` and training, and no relabel (the nightly's included) undoes them."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from pycocotools import mask as mask_utils
from typer.testing import CliRunner

from components.labelling.corrections import (
    CORRECTIONS_FILE,
    CorrectedLabels,
    Corrections,
    import_corrections,
)
from components.labelling.export import resize_nearest
from components.labelling.store import PseudoLabels
from flows.cli import app
from flows.pipeline import dvc_command, stage_env
from tests import REPO_ROOT
from tests.components.labelling.test_export import SIZES, _write_store

REPO = REPO_ROOT


def _stage1_maps(value: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    return {i: (np.full((16, 16), value, np.uint8), np.full((16, 16), value, np.uint8)) for i in SIZES}


def _coco(tmp_path: Path, images: list[dict], annotations: list[dict], categories: list[str]) -> Path:
    """A COCO file as CVAT / Label Studio write it (their own image ids, not ours)."""
    path = tmp_path / "corrected.json"
    path.write_text(json.dumps({
        "images": images, "annotations": annotations,
        "categories": [{"id": 10 + k, "name": name} for k, name in enumerate(categories)]}))
    return path


def _corrected_file(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    """Corrections of images a (40 x 40: a polygon of "lawn" over a "sky" RLE) and sub/c (57 x 21: a
    polygon reaching outside the image), and b listed without annotations; the expected maps."""
    a = np.full((40, 40), 255, np.uint8)
    a[:, :20] = 0
    a[10:30, 5:35] = 1
    c = np.full((57, 21), 255, np.uint8)
    c[50:, 15:] = 2
    sky = mask_utils.encode(np.asfortranarray((np.arange(40)[None, :] < 20).repeat(40, 0).astype(np.uint8)))
    path = _coco(tmp_path, images=[
        {"id": 7, "file_name": "a.png", "height": 40, "width": 40},
        {"id": 8, "file_name": "images/b.jpg", "height": 30, "width": 52},
        {"id": 9, "file_name": "sub/c.jpg", "height": 57, "width": 21},
    ], annotations=[
        {"id": 1, "image_id": 7, "category_id": 10, "iscrowd": 0,
         "segmentation": {"size": [40, 40], "counts": sky["counts"].decode()}},
        {"id": 2, "image_id": 7, "category_id": 11, "iscrowd": 0, "segmentation": [[5, 10, 35, 10, 35, 30, 5, 30]]},
        {"id": 3, "image_id": 9, "category_id": 12, "iscrowd": 0, "segmentation": [[15, 50, 30, 50, 30, 70, 15, 70]]},
    ], categories=["sky", "lawn", "car"])
    return path, {"a": a, "sub/c": c}


def test_import_labels_keeps_the_corrected_maps_and_what_made_them(tmp_path: Path) -> None:
    labels = _write_store(tmp_path / "stage1", _stage1_maps(2))
    path, expected = _corrected_file(tmp_path)
    result = CliRunner().invoke(app, ["import-labels", str(path), "--store", str(labels.root)])
    assert result.exit_code == 0, result.output
    assert "clipped to its image: sub/c.jpg: annotation 3" in result.output
    assert "not imported, no annotation: images/b.jpg" in result.output
    corrections = Corrections(tmp_path / "corrections")
    assert corrections.table["image_id"].tolist() == ["a", "sub/c"]
    for image_id, label in expected.items():
        assert np.array_equal(corrections.read(image_id), resize_nearest(label, 16, 16))
    source = corrections.table["source"].iloc[0]
    assert (tmp_path / "corrections" / source).read_bytes() == path.read_bytes()  # what produced the maps


@pytest.mark.parametrize(("change", "message"), [
    (lambda c: c["images"][0].update(file_name="zebra.png"), "match no image in"),
    (lambda c: c["annotations"][0].update(image_id=99), "image ids the file does not list: 99"),
    (lambda c: c["categories"].append({"id": 20, "name": "unicorn"}), "classes not in the store's vocabulary: unicorn"),
    (lambda c: c["images"][0].update(height=41), "image sizes differ from the store's"),
])
def test_bad_input_names_the_problem_and_imports_nothing(change, message: str, tmp_path: Path) -> None:
    labels = _write_store(tmp_path / "stage1", _stage1_maps(2))
    path, _ = _corrected_file(tmp_path)
    coco = json.loads(path.read_text())
    change(coco)
    path.write_text(json.dumps(coco))
    result = CliRunner().invoke(app, ["import-labels", str(path), "--store", str(labels.root)])
    assert result.exit_code == 2
    assert message in result.output and "nothing imported" in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "corrections").exists()


def _workspace(tmp_path: Path) -> Path:
    """A project folder holding the shipped params.yaml (its paths are relative: the folder's own)."""
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    return tmp_path


def test_balance_prefers_corrections_and_a_relabel_never_undoes_them(tmp_path: Path, prefect_harness: str,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from flows.balance import balance_flow

    ws = _workspace(tmp_path)
    monkeypatch.chdir(ws)
    store = ws / "data" / "pseudo" / "stage1"
    labels = _write_store(store, _stage1_maps(2))
    path, expected = _corrected_file(ws)
    import_corrections(path, labels, ws / "data" / "pseudo" / "corrections")

    def training_maps() -> dict[str, np.ndarray]:
        """What training reads: the train index's samples through train's label source."""
        summary = balance_flow(str(ws / "params.yaml"))
        index = pd.read_parquet(ws / "data" / "pseudo" / "train_index.parquet")
        source = CorrectedLabels(PseudoLabels(store), Corrections(ws / "data" / "pseudo" / "corrections"))
        assert summary["corrected"] == sum(index["variant"] == "corrected")
        return {row.sample_id: source.read(row.image_id, row.variant) for row in index.itertuples()}

    first = training_maps()
    assert {k for k in first if not k.startswith("b/")} == {"a/corrected", "sub/c/corrected"}  # Stage 1's maps out
    assert "b/stage1_1" in first
    for image_id, label in expected.items():
        assert np.array_equal(first[f"{image_id}/corrected"], resize_nearest(label, 16, 16))

    _write_store(store, _stage1_maps(0))  # a relabel: new Stage 1 maps of the same images
    again = training_maps()
    assert again.keys() == first.keys()
    assert all(np.array_equal(again[k], first[k]) for k in first if k.endswith("corrected"))
    assert (again["b/stage1_1"] == 0).all()


def test_a_failed_nights_restore_keeps_the_corrections(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The nightly job restores dvc.lock and runs `dvc checkout --force` when a night fails; the
    `corrections` stage's output is not cached, so neither that nor rerunning the stage reverts it."""
    from flows.nightly import restore, snapshot_lock

    ws = _workspace(tmp_path)
    shutil.copy(REPO / "dvc.yaml", ws / "dvc.yaml")
    env = stage_env({"PYTHONPATH": str(REPO)})
    for cmd in (["git", "init", "-q"], [dvc_command(), "init", "-q"], [dvc_command(), "repro", "-q", "corrections"]):
        subprocess.run(cmd, cwd=ws, env=env, check=True, capture_output=True, timeout=300)
    lock = snapshot_lock(str(ws))
    assert lock is not None and "corrections" in lock
    labels = _write_store(ws / "data" / "pseudo" / "stage1", _stage1_maps(2))
    path, _ = _corrected_file(ws)
    import_corrections(path, labels, ws / "data" / "pseudo" / "corrections")
    imported = (ws / "data" / "pseudo" / "corrections" / CORRECTIONS_FILE).read_bytes()
    monkeypatch.setenv("PATH", env["PATH"])
    monkeypatch.setenv("PYTHONPATH", env["PYTHONPATH"])
    restore(str(ws), lock)
    assert (ws / "data" / "pseudo" / "corrections" / CORRECTIONS_FILE).read_bytes() == imported
    subprocess.run([dvc_command(), "repro", "-q", "corrections"], cwd=ws, env=env, check=True, capture_output=True,
                   timeout=300)
    assert (ws / "data" / "pseudo" / "corrections" / CORRECTIONS_FILE).read_bytes() == imported


def test_the_next_train_run_logs_how_many_images_were_corrected(tmp_path: Path, prefect_harness: str, mlflow_uri: str,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """`fmbseg features` and `fmbseg train` (mini models, features on the fly) after one image was corrected."""
    import mlflow

    from flows.balance import balance_flow
    from tests.flows.test_train import VOCABULARY, write_params, write_stage1

    monkeypatch.chdir(tmp_path)
    write_stage1(tmp_path)
    write_params(tmp_path, **{"features.cache": False, "train.epochs": 1})
    labels = PseudoLabels(tmp_path / "data" / "pseudo" / "stage1")
    image_id, image_path = labels.index[["image_id", "image_path"]].iloc[0]
    height, width = (int(v) for v in next(labels.iter_shards(["image_id", "height", "width"]))
                     .set_index("image_id").loc[image_id])
    path = _coco(tmp_path, images=[{"id": 1, "file_name": Path(image_path).name, "height": height, "width": width}],
                 annotations=[{"id": 1, "image_id": 1, "category_id": 10, "iscrowd": 0,
                               "segmentation": [[0, 0, width, 0, width, height / 2, 0, height / 2]]}],
                 categories=[VOCABULARY[1]])
    result = CliRunner().invoke(app, ["import-labels", str(path), "--params", "params.yaml"])
    assert result.exit_code == 0, result.output
    assert balance_flow.fn("params.yaml")["corrected"] == 1
    for stage in ("features", "train"):
        result = CliRunner().invoke(app, [stage, "--params", "params.yaml"])
        assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"
    run = mlflow.MlflowClient(mlflow_uri).search_runs([mlflow.get_experiment_by_name("fmbseg").experiment_id])[0]
    assert run.data.metrics["data/corrected_images"] == 1
