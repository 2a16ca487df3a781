"""End to end: `fmbseg features` + `fmbseg train` on the demo profile, with Stage 1 output written
through the labelling store (the real on-disk format) and a temporary SQLite MLflow store."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image
from typer.testing import CliRunner

from components.aligner.checkpoint import load_aligner
from components.aligner.data import AlignerSamples
from components.aligner.pooling import pool_labels
from components.config import apply_overrides, flatten, load_params
from components.features.cache import FeatureCache
from components.io import encode_label_png, file_sha256
from components.labelling.store import ImageEntry, PseudoLabels, ShardRecord, merge_outputs, write_shard
from components.models.registry import get_spec
from flows import tracking
from flows.common import profile_settings
from tests import REPO_ROOT

REPO = REPO_ROOT
VOCABULARY = ["sky", "tree", "road", "person"]
IMAGES = "data/datasets/coco_train/images/train"
DEMO = profile_settings("demo")  # the demo profile's settings (params.yaml + configs/demo.yaml) decide the sizes
LABEL_SIZE = DEMO["label"]["label_size"]
NUM_IMAGES = 7



def write_stage1(project: Path, num_images: int = NUM_IMAGES) -> None:
    """Images plus a Stage 1 output (two label maps per image) in the labelling store's format.

    Each image is split into horizontal bands of different classes and colours; Stage 1.1 leaves
    its lower quarter unlabelled (255)."""
    rng = np.random.default_rng(0)
    entries, rows = [], []
    for k in range(num_images):
        image_id = f"img{k:02d}"
        path = project / IMAGES / f"{image_id}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        classes = rng.permutation(len(VOCABULARY))[:3]
        band = np.repeat(classes, LABEL_SIZE // 3 + 1)[:LABEL_SIZE]
        label = np.repeat(band[:, None], LABEL_SIZE, axis=1).astype(np.uint8)  # [L, L]
        colours = np.array([[90, 160, 250], [30, 140, 40], [120, 120, 120], [220, 180, 150]], np.uint8)
        height, width = 90 + 10 * k, 120
        picture = np.asarray(Image.fromarray(colours[label]).resize((width, height)))
        Image.fromarray(picture).save(path, quality=95)
        stage1_1 = label.copy()
        stage1_1[3 * LABEL_SIZE // 4 :] = 255
        entry = ImageEntry(image_id, path.relative_to(project).as_posix(), file_sha256(path))
        entries.append(entry)
        rows.append({"image_id": image_id, "image_path": entry.path, "sha256": entry.sha256, "height": height,
                     "width": width, "stage1_1": encode_label_png(stage1_1), "stage1_2": encode_label_png(label),
                     "sam_size": 128, "amg_masks": []})
    root = project / "data" / "pseudo" / "stage1"
    record = ShardRecord(shard_id="s0", settings_hash="test", mask_settings_hash="test", images=entries,
                         rows={e.image_id: i for i, e in enumerate(entries)})
    write_shard(root, record, rows, [])
    merge_outputs(root, entries=entries, done=[record], skipped=[], vocabulary=VOCABULARY)


# the random miniatures (params.yaml's `mini` profile): these tests check the stage's mechanics,
# whatever the models see
MINI = load_params(REPO / "params.yaml").models.profiles["mini"]
DINO_DIM, CLIP_DIM = get_spec(MINI.dino).embed_dim, get_spec(MINI.clip).embed_dim
# the demo profile's Stage 2 input size and the patch grid it gives mini-dino
IMAGE_SIZE = DEMO["features"]["image_size"]
GRID = [IMAGE_SIZE // get_spec(MINI.dino).patch_size] * 2


def write_params(project: Path, **overrides: object) -> Path:
    # the mini profile and the small batches and shards these tests count with (the demo itself
    # trains 8 epochs, batches of 8)
    small = {"models.profile": "mini", "train.epochs": 2, "train.batch_size": 4, "features.batch_size": 4,
             "features.shard_size": 8}
    raw = apply_overrides(DEMO, {**small, **overrides})
    path = project / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    load_params(path)  # valid settings
    return path


@pytest.fixture
def project(tmp_path, monkeypatch) -> Path:
    """A demo-profile project root (the working directory) with Stage 1 output and a train index."""
    from flows.balance import balance_flow

    monkeypatch.chdir(tmp_path)
    write_stage1(tmp_path)
    write_params(tmp_path)
    balance_flow.fn("params.yaml")
    return tmp_path


def fmbseg(*args: str) -> None:
    from flows.cli import app

    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"


def test_samples_pool_the_label_maps_to_the_patch_grid(project) -> None:
    labels = PseudoLabels(project / "data" / "pseudo" / "stage1")
    index = pd.read_parquet(project / "data" / "pseudo" / "train_index.parquet")
    inputs = type("Zeros", (), {"sample": lambda self, i, p: {"features": torch.zeros(8, 8, 3)}})()
    samples = AlignerSamples(index, inputs=inputs, labels=labels, grid=(8, 8), num_classes=len(VOCABULARY))
    assert len(samples) == len(index) == NUM_IMAGES + round(0.75 * NUM_IMAGES)
    for i in (0, 1, len(index) - 1):
        row = index.iloc[i]
        item = samples[i]
        label_map = torch.from_numpy(labels.read(row["image_id"], row["variant"]))
        assert item["labels"].dtype == torch.int64 and item["labels"].shape == (8, 8)
        assert torch.equal(item["labels"], pool_labels(label_map, (8, 8)))
    stage1_1 = samples[int(np.flatnonzero(index["variant"] == "stage1_1")[0])]["labels"]
    assert (stage1_1[6:] == 255).all() and (stage1_1[:6] != 255).all()  # the unlabelled lower quarter
    with pytest.raises(ValueError, match="lacks columns"):
        AlignerSamples(index.drop(columns="variant"), inputs=inputs, labels=labels, grid=(8, 8), num_classes=4)


def test_features_and_train_produce_the_checkpoint_and_one_mlflow_run(project, prefect_harness, mlflow_uri) -> None:
    fmbseg("features", "--params", "params.yaml")
    features = project / "data" / "features"
    manifest = json.loads((features / "manifest.json").read_text())
    assert manifest["cache"] and manifest["num_images"] == NUM_IMAGES and manifest["grid"] == GRID
    shards = sorted(features.glob("shards/*.npy"))
    assert len(shards) == 1 and FeatureCache(features).read("img03").shape == (*GRID, DINO_DIM)
    stamps = [p.stat().st_mtime_ns for p in shards]
    fmbseg("features", "--params", "params.yaml")  # nothing new: no shard is rewritten
    assert [p.stat().st_mtime_ns for p in sorted(features.glob("shards/*.npy"))] == stamps

    fmbseg("train", "--params", "params.yaml")
    loaded = load_aligner(project / "models" / "aligner.pt")
    assert not (project / "models" / "train_state.pt").exists()
    curve = (project / "metrics" / "train_epochs.csv").read_text().splitlines()  # the dvc plots loss curve
    assert curve[0].startswith("epoch,loss") and [line.split(",")[0] for line in curve[1:]] == ["0", "1"]
    assert loaded.class_names == VOCABULARY and loaded.prototypes.shape == (4, CLIP_DIM)
    assert (loaded.encoder_spec, loaded.image_size, loaded.text_spec) == ("mini-dino", IMAGE_SIZE, "mini-clip")
    params = load_params("params.yaml")
    assert loaded.params == flatten(params)

    client = mlflow.MlflowClient(mlflow_uri)
    runs = tracking.model_runs(params)
    assert runs["run_id"].tolist() == [loaded.run_id]
    run = client.get_run(loaded.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["aligner.kind"] == "transformer" and run.data.params["train.epochs"] == "2"
    assert run.data.tags[tracking.STAGE_TAG] == "train" and "git.commit" in run.data.tags
    steps_per_epoch = -(-(NUM_IMAGES + 5) // 4)  # 12 samples, 4 a batch (demo)
    history = client.get_metric_history(loaded.run_id, "loss")
    assert sorted(m.step for m in history) == list(range(2 * steps_per_epoch))
    assert sorted(m.step for m in client.get_metric_history(loaded.run_id, "epoch/loss")) == [0, 1]
    assert [a.path for a in client.list_artifacts(loaded.run_id, "model")] == ["model/aligner.pt"]
    version = client.get_model_version(params.tracking.registered_model, "1")  # the run's pyfunc model
    assert version.run_id == loaded.run_id
    assert mlflow.pyfunc.load_model(f"models:/{params.tracking.registered_model}/1").metadata.run_id == loaded.run_id


class Interrupt(Exception):
    pass


def test_interrupted_training_resumes_into_the_same_run(project, prefect_harness, mlflow_uri, monkeypatch) -> None:
    from flows.features import features_flow
    from flows.train import train_flow

    write_params(project, **{"features.cache": False, "train.epochs": 3})  # features on the fly, this time
    manifest = features_flow("params.yaml")
    assert manifest["cache"] is False and not (project / "data" / "features" / "index.parquet").exists()

    log_epoch = tracking.log_epoch

    def killed_after_first_epoch(params, run_id, epoch, summary):
        log_epoch(params, run_id, epoch, summary)
        if epoch == 0:
            raise Interrupt

    monkeypatch.setattr(tracking, "log_epoch", killed_after_first_epoch)
    with pytest.raises(Interrupt):
        train_flow("params.yaml")
    assert (project / "models" / "train_state.pt").exists() and not (project / "models" / "aligner.pt").exists()
    monkeypatch.setattr(tracking, "log_epoch", log_epoch)

    summary = train_flow("params.yaml")
    assert summary["resumed_at_epoch"] == 1
    client = mlflow.MlflowClient(mlflow_uri)
    run = client.get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED" and load_aligner("models/aligner.pt").run_id == run.info.run_id
    assert len(tracking.model_runs(load_params("params.yaml"))) == 1  # one run per model, resumed
    [version] = client.search_model_versions("name = 'fmbseg-aligner'")  # registered once, when it finished
    assert version.run_id == run.info.run_id and summary["model_version"] == "fmbseg-aligner/1"
    steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "loss"))
    assert steps == list(range(3 * 3))  # every step logged exactly once across the two attempts


@pytest.mark.slow
def test_a_sigkill_right_after_an_epochs_state_save_loses_nothing_in_mlflow(
    project, prefect_harness, mlflow_uri, monkeypatch
) -> None:
    """A real SIGKILL at the epoch boundary (state saved, epoch not yet logged, steps still in the
    logger's buffer); the resumed run's MLflow history equals an uninterrupted run's."""
    import os
    import signal
    import subprocess
    import sys

    from flows.features import features_flow
    from flows.train import train_flow

    write_params(project, **{"features.cache": False, "train.epochs": 3})
    features_flow("params.yaml")
    code = (
        "import os, signal\n"
        "from flows import tracking\n"
        "from flows.train import train_flow\n"
        "tracking.log_epoch = lambda *a: os.kill(os.getpid(), signal.SIGKILL)\n"
        "train_flow('params.yaml')\n"
    )
    killed = subprocess.run([sys.executable, "-c", code], cwd=project, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert (project / "models" / "train_state.pt").exists()
    resumed = train_flow("params.yaml")
    assert resumed["resumed_at_epoch"] == 1

    client = mlflow.MlflowClient(mlflow_uri)

    def history(run_id: str) -> dict[str, list[tuple[int, float]]]:
        return {key: sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
                for key in ("loss", "epoch/loss", "epoch/valid_patch_fraction", "epoch/lr")}

    (project / "models" / "aligner.pt").unlink()
    monkeypatch.setattr("flows.train._run_name", lambda params, changed: "uninterrupted")
    reference = train_flow("params.yaml")
    assert reference["resumed_at_epoch"] == 0 and reference["mlflow_run_id"] != resumed["mlflow_run_id"]
    got, want = history(resumed["mlflow_run_id"]), history(reference["mlflow_run_id"])
    assert [s for s, _ in got["loss"]] == list(range(9)) and [s for s, _ in got["epoch/loss"]] == [0, 1, 2]
    assert {k: [s for s, _ in v] for k, v in got.items()} == {k: [s for s, _ in v] for k, v in want.items()}
    for key in got:  # same values (up to float reduction order: features are computed on the fly)
        assert [v for _, v in got[key]] == pytest.approx([v for _, v in want[key]], rel=1e-5), key
