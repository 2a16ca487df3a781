"""flows/tracking.py against a real (temporary, pre-migrated) SQLite MLflow store."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch

from components.aligner.checkpoint import InferenceSpec, save_checkpoint
from components.aligner.model import Aligner
from components.config import flatten, parse_params
from components.labelling.settings import AmgSettings
from flows import model_registry, tracking
from tests import REPO_ROOT
from tests.mini_checkpoint import write_mini_checkpoint

REPO = REPO_ROOT


def test_project_root_leaves_dvc_queued_experiment_copies(tmp_path) -> None:
    assert tracking.project_root(tmp_path) == tmp_path.resolve()
    copy = tmp_path / "proj" / ".dvc" / "tmp" / "exps" / "tmpab12" / "sub"
    copy.mkdir(parents=True)
    assert tracking.project_root(copy) == (tmp_path / "proj").resolve()


def test_tracking_uri_resolution(tmp_path, monkeypatch) -> None:
    params = parse_params({})
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    assert tracking.tracking_uri(params) == "http://mlflow.example:5000"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    copy = tmp_path / ".dvc" / "tmp" / "exps" / "tmpxyz"
    copy.mkdir(parents=True)
    monkeypatch.chdir(copy)
    root = tmp_path.resolve()
    assert tracking.tracking_uri(params) == f"sqlite:///{root / 'mlflow.db'}"
    assert tracking.tracking_uri(parse_params({"tracking": {"tracking_uri": "sqlite:///runs/m.db"}})) == (
        f"sqlite:///{root / 'runs' / 'm.db'}"
    )
    assert tracking.tracking_uri(parse_params({"tracking": {"tracking_uri": "http://h:1"}})) == "http://h:1"
    assert tracking.tracking_uri(params, tmp_path / "elsewhere") == f"sqlite:///{root / 'elsewhere' / 'mlflow.db'}"


def test_run_params_steps_epochs_artifacts(tmp_path, mlflow_uri) -> None:
    params = parse_params({"train": {"lr": 0.2}})
    uri = tracking.tracking_uri(params)
    assert uri == mlflow_uri
    artifact = tmp_path / "aligner.pt"
    artifact.write_bytes(b"weights")
    settings = tracking.stage_settings(params, "train")
    with tracking.start_run(params, run_name="train", tags={"git.commit": "abc"}, settings=settings) as run_id:
        with tracking.StepLogger(params, run_id, every=4) as steps:
            for step in range(10):
                steps.log_step(step, {"loss": 1.0 / (step + 1)})
        tracking.log_epoch(params, run_id, 0, {"loss": 0.5, "seconds": 2.0})
        tracking.log_checkpoint(params, run_id, artifact)
    client = mlflow.MlflowClient(uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    # the UI opens the experiment on its runs, not on MLflow 3's GenAI overview, and offers the
    # headline view: the headline metrics as columns, sorted by the mean
    experiment_tags = client.get_experiment(run.info.experiment_id).tags
    assert experiment_tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"
    view = json.loads(experiment_tags[f"mlflow.sharedViewState.{tracking.HEADLINE_VIEW}"])
    assert view["orderByKey"] == "metrics.`mean/mIoU_base`" and not view["orderByAsc"]
    assert {"metrics.`mean/mIoU_base`", "metrics.`mean/mIoU_refined`", "metrics.`pv21/mIoU_base`",
            "metrics.`pv21/mIoU_refined`"} <= set(view["selectedColumns"])
    # the train stage's settings (dvc.yaml), not all of params.yaml
    assert run.data.params["train.lr"] == "0.2" and run.data.params["aligner.kind"] == "transformer"
    assert set(run.data.params) == set(settings) and len(settings) < len(flatten(params)) / 4
    assert "evaluate.window" not in run.data.params and "models.profiles.demo.clip" not in run.data.params
    assert run.data.tags["git.commit"] == "abc"
    history = client.get_metric_history(run_id, "loss")
    assert sorted((m.step, m.value) for m in history) == [(s, 1.0 / (s + 1)) for s in range(10)]
    assert run.data.metrics["epoch/loss"] == 0.5
    assert [a.path for a in client.list_artifacts(run_id, "model")] == ["model/aligner.pt"]
    # artifacts live next to the SQLite file, not in the working directory
    assert Path(client.download_artifacts(run_id, "model/aligner.pt")).read_bytes() == b"weights"
    assert (tmp_path / "mlartifacts").is_dir()

    tracking.attach_metrics(run_id, {"pv21/mIoU_base": 41.5}, [artifact], "tables/pv21", params=params)
    run = client.get_run(run_id)
    assert run.data.metrics["pv21/mIoU_base"] == 41.5
    assert [a.path for a in client.list_artifacts(run_id, "tables/pv21")] == ["tables/pv21/aligner.pt"]


def test_failed_run_and_resumed_run(mlflow_uri) -> None:
    params = parse_params({})
    with pytest.raises(RuntimeError):
        with tracking.start_run(params, run_name="t", tags={}, settings=flatten(params)) as run_id:
            raise RuntimeError("boom")
    client = mlflow.MlflowClient(mlflow_uri)
    assert client.get_run(run_id).info.status == "FAILED"
    assert tracking.run_exists(params, run_id)
    assert not tracking.run_exists(params, "0" * 32)
    edited = parse_params({"evaluate": {"window": 224}})  # edited while the training was down
    with tracking.start_run(edited, run_name="t", tags={}, settings=flatten(edited), resume_run_id=run_id) as again:
        assert again == run_id
        assert client.get_run(run_id).info.status == "RUNNING"
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["evaluate.window"] == "448"  # MLflow keeps the first value ...
    assert run.data.tags[tracking.RESUME_CHANGES_TAG] == "evaluate.window"  # ... and the change is named
    assert len(client.search_runs([client.get_run(run_id).info.experiment_id])) == 1


def _git(cwd: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True)


def test_standard_tags(tmp_path, monkeypatch) -> None:
    params = parse_params({"models": {"profile": "demo"}})
    monkeypatch.chdir(tmp_path)
    for var in ("DVC_EXP_NAME", "DVC_EXP_BASELINE_REV", tracking.GROUP_ENV):
        monkeypatch.delenv(var, raising=False)
    assert tracking.standard_tags(params)["git.commit"] == "unknown"

    _git(tmp_path, "init", "-q")
    (tmp_path / "a.txt").write_text("a")
    _git(tmp_path, "add", "a.txt")
    _git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "x")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True, text=True).stdout.strip()
    (tmp_path / "dvc.lock").write_text(
        "schema: '2.0'\nstages:\n"
        "  balance:\n    cmd: fmbseg balance\n    deps:\n    - path: data/pseudo/stage1\n      hash: md5\n"
        "      md5: aaa.dir\n    outs:\n    - path: data/pseudo/train_index.parquet\n      hash: md5\n      md5: bbb\n"
        "  features:\n    cmd: fmbseg features\n    deps:\n    - path: data/pseudo/train_index.parquet\n"
        "      hash: md5\n      md5: stale\n    outs:\n    - path: data/features\n      hash: md5\n      md5: ccc.dir\n"
    )
    monkeypatch.setenv("DVC_EXP_NAME", "exp-1")
    monkeypatch.setenv("DVC_EXP_BASELINE_REV", "base")
    tags = tracking.standard_tags(params, ["data/pseudo/train_index.parquet", "data/features/", "data/other"])
    assert tags == {
        "git.commit": head,
        "mlflow.source.git.commit": head,
        "fmbseg.profile": "demo",
        "dvc.exp_name": "exp-1",
        "fmbseg.group": "base",
        "dvc.md5/data/pseudo/train_index.parquet": "bbb",  # the producer's record, not a reader's
        "dvc.md5/data/features": "ccc.dir",
    }
    monkeypatch.setenv(tracking.GROUP_ENV, "sweep-7")
    assert tracking.standard_tags(params)["fmbseg.group"] == "sweep-7"


INFERENCE = InferenceSpec(sam="mini-sam", templates=("{}",), short_side=56, window=56, stride=28,
                          amg=AmgSettings(min_area_frac=0.0, max_area_frac=1.0))


def test_champion_promotion(tmp_path, mlflow_uri) -> None:
    params = parse_params({})
    model = params.tracking.registered_model
    ckpt = save_checkpoint(
        tmp_path / "aligner.pt", model=Aligner(4, 2, kind="linear"), encoder_spec="mini-dino", image_size=56,
        text_spec="mini-clip", templates=["{}"], class_names=["a"], prototypes=torch.ones(1, 2), inference=INFERENCE, params={},
        mlflow_run_id=None,
    )
    with pytest.raises(ValueError, match="no MLflow run id"):
        model_registry.checkpoint_run_id(ckpt)
    runs = {}
    for name, score in (("first", 30.0), ("second", 40.0)):
        with tracking.start_run(params, run_name=name, tags={}) as run_id:
            model_registry.log_model(params, run_id, ckpt)  # registers versions 1 and 2
        tracking.attach_metrics(run_id, {"pv21/mIoU_base": score, "cs171/mIoU_base": score + 2},
                                params=params)
        runs[name] = run_id
    assert model_registry.champion_scores(model, ["pv21"], "mIoU_base", tracking_uri=mlflow_uri) is None
    scores = model_registry.run_scores(runs["first"], ["pv21", "cs171"], "mIoU_base", tracking_uri=mlflow_uri)
    assert scores == {"run_id": runs["first"], "score": 31.0, "metrics": {"pv21": 30.0, "cs171": 32.0}}
    with pytest.raises(KeyError, match="ade20k/mIoU_base"):
        model_registry.run_scores(runs["first"], ["ade20k"], "mIoU_base", tracking_uri=mlflow_uri)
    assert model_registry.promote_champion(model, runs["first"], tracking_uri=mlflow_uri) == "1"
    assert model_registry.champion_scores(model, ["pv21"], "mIoU_base", tracking_uri=mlflow_uri)["run_id"] == runs["first"]
    assert model_registry.promote_champion(model, runs["second"], tracking_uri=mlflow_uri) == "2"
    assert model_registry.champion_scores(model, ["pv21"], "mIoU_base", tracking_uri=mlflow_uri)["score"] == 40.0
    save_checkpoint(
        ckpt, model=Aligner(4, 2, kind="linear"), encoder_spec="mini-dino", image_size=56, text_spec="mini-clip",
        templates=["{}"], class_names=["a"], prototypes=torch.ones(1, 2), inference=INFERENCE, params={}, mlflow_run_id=runs["second"],
    )
    assert model_registry.checkpoint_run_id(ckpt) == runs["second"]


def test_model_runs_lists_trained_models_newest_first(mlflow_uri) -> None:
    params = parse_params({})
    assert tracking.model_runs(params).empty
    ids = []
    for lr in (0.1, 0.2):
        p = parse_params({"train": {"lr": lr}})
        with tracking.start_run(p, run_name=f"lr{lr}", tags={tracking.STAGE_TAG: "train"},
                                settings=tracking.stage_settings(p, "train")) as run_id:
            ids.append(run_id)
        tracking.attach_metrics(run_id, {"pv21/mIoU_base": 10 * lr}, params=p)
    with tracking.start_run(params, run_name="other", tags={}):
        pass
    runs = tracking.model_runs(params)
    assert runs["run_id"].tolist() == ids[::-1]
    assert runs["params.train.lr"].tolist() == ["0.2", "0.1"]
    assert runs["metrics.pv21/mIoU_base"].tolist() == [2.0, 1.0]
    assert runs["tags.mlflow.runName"].tolist() == ["lr0.2", "lr0.1"]
    assert len(tracking.model_runs(params, max_results=1)) == 1
    assert tracking.model_runs(params, experiment="nope").empty


def test_runs_are_named_after_the_settings_that_differ_from_the_baseline(tmp_path) -> None:
    import subprocess

    import yaml

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True, text=True).stdout

    git("init", "-q")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"train": {"lr": 0.05}}))
    git("add", "params.yaml")
    git("-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "baseline")
    rev = git("rev-parse", "HEAD").strip()
    params = parse_params({"train": {"lr": 0.05}, "aligner": {"kind": "linear"}})
    changed = tracking.changed_settings(params, rev, cwd=tmp_path)
    assert changed == {"aligner.kind": "linear"}
    assert tracking.run_name_of(changed, "fallback") == "aligner.kind=linear"
    assert tracking.run_name_of({}, "fallback") == "fallback"
    assert tracking.changed_settings(params, "nosuchrev", cwd=tmp_path) == {}
    assert len(tracking.run_name_of({f"k{i}": "v" * 20 for i in range(20)}, "f")) == 120


def test_stage_settings_follow_dvc_yaml(tmp_path) -> None:
    params = parse_params({"models": {"profile": "demo"}})
    stage1 = tracking.stage_settings(params, "evaluate-stage1")  # a foreach stage: params under do:
    assert stage1["evaluate.split"] == "val" and stage1["label.grid"] == 4
    assert stage1["models.profiles.demo.sam"] == "world-sam" and "models.profiles.paper.sam" not in stage1
    assert "train.lr" not in stage1
    # an ablation's axes are logged even when an upstream stage owns them
    assert tracking.stage_settings(params, "train", {"balance.ratio": 0.33})["balance.ratio"] == 0.33
    with pytest.raises(KeyError, match="no stage 'nope'"):
        tracking.stage_settings(params, "nope")


def _registered_run(params, checkpoint: Path, name: str, changed: dict) -> str:
    """A train-like run that logs and registers ``checkpoint`` as `fmbseg train` does."""
    tags = {tracking.STAGE_TAG: "train", **({tracking.CHANGED_TAG: tracking.run_name_of(changed, "")} if changed else {})}
    with tracking.start_run(params, run_name=name, tags=tags, settings=tracking.stage_settings(params, "train", changed)
                            ) as run_id:
        model_registry.log_model(params, run_id, checkpoint, registered_model=model_registry.registered_model_for(params, changed))
    return run_id


def test_ablations_never_become_versions_of_the_production_model(tmp_path, mlflow_uri, monkeypatch) -> None:
    params = parse_params({})
    name = params.tracking.registered_model
    checkpoint = write_mini_checkpoint(tmp_path / "aligner.pt", class_names=("sky", "tree"))
    pipeline = _registered_run(params, checkpoint, "pipeline", {})
    tracking.attach_metrics(pipeline, {"pv21/mIoU_base": 15.9, "pv21/mIoU_refined": 17.0}, params=params)
    model_registry.promote_champion(name, pipeline, tracking_uri=mlflow_uri)  # what the demo's first night does
    ablation = _registered_run(params, checkpoint, "aligner.kind=linear", {"aligner.kind": "linear"})  # newer
    tracking.attach_metrics(ablation, {"pv21/mIoU_base": 10.8}, params=params)

    client = mlflow.MlflowClient(mlflow_uri)
    assert [v.run_id for v in client.search_model_versions(f"name = '{name}'")] == [pipeline]
    assert [v.run_id for v in client.search_model_versions(f"name = '{name}-ablations'")] == [ablation]
    with pytest.raises(LookupError, match="registered no version"):
        model_registry.promote_champion(name, ablation, tracking_uri=mlflow_uri)
    assert model_registry.champion_run_id(name, tracking_uri=mlflow_uri) == pipeline

    # what the model page says: its input, and per version the profile and the scores
    model = client.get_registered_model(name)
    assert "base64" in model.description and "`classes`" in model.description and "@champion" in model.description
    assert "never become" in client.get_registered_model(f"{name}-ablations").description
    described = client.get_model_version(name, "1").description
    assert "**Profile** `paper`" in described and "pv21 15.9 / 17.0" in described
    assert client.get_run(pipeline).data.tags["mlflow.note.content"] == described  # the run page says it too
    assert "**Ablation**: aligner.kind=linear" in client.get_model_version(f"{name}-ablations", "1").description

    # the README's snippet: the champion, loaded by name and alias, segments a picture
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_uri)
    loaded = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    assert loaded.metadata.run_id == pipeline
    assert mlflow.pyfunc.load_model(f"models:/{name}/latest").metadata.run_id == pipeline
    from flows import serving

    image = serving.encode_image(np.full((40, 56, 3), 120, np.uint8))
    out = loaded.predict(pd.DataFrame({"image": [image], "classes": ["sky, tree, person"]}))
    assert serving.decode_label_map(out["label_map"][0]).shape == (40, 56)


def test_training_with_changed_settings_is_an_ablation(tmp_path, monkeypatch) -> None:
    from flows.train import _changed_settings

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DVC_EXP_BASELINE_REV", raising=False)
    (tmp_path / "params.yaml").write_text("train: {lr: 0.1}\n")
    (tmp_path / ".params-set-x.yaml").write_text("train: {lr: 0.05}\n")  # what `fmbseg train -S train.lr=0.05` reads
    from components.config import load_params

    assert _changed_settings(load_params("params.yaml"), "params.yaml") == {}
    changed = _changed_settings(load_params(".params-set-x.yaml"), ".params-set-x.yaml")
    assert changed == {"train.lr": 0.05}
    params = load_params("params.yaml")
    assert model_registry.registered_model_for(params, changed) == "fmbseg-aligner-ablations"
    assert model_registry.registered_model_for(params, {}) == "fmbseg-aligner"


def _db_text(db: Path) -> str:
    with sqlite3.connect(db) as con:
        return "\n".join(con.iterdump())


def test_a_copied_or_moved_workspace_keeps_working(tmp_path, _migrated_mlflow_db, monkeypatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the project's own store: <root>/mlflow.db
    params = parse_params({})
    name = params.tracking.registered_model
    old = tmp_path / "old"
    old.mkdir()
    shutil.copy(_migrated_mlflow_db, old / "mlflow.db")
    checkpoint = write_mini_checkpoint(tmp_path / "aligner.pt")
    monkeypatch.chdir(old)
    run_id = _registered_run(params, checkpoint, "pipeline", {})
    tracking.log_checkpoint(params, run_id, checkpoint)
    model_registry.promote_champion(name, run_id, tracking_uri=tracking.tracking_uri(params))
    table = tmp_path / "pv21_per_class.csv"
    table.write_text("class,IoU\nsky,1\n")

    # a copy logs into its own folder (a later stage process working in it); the original is left as it was
    copy = tmp_path / "copy"
    shutil.copytree(old, copy)
    monkeypatch.chdir(copy)
    script = (
        "import sys\n"
        "from components.config import parse_params\n"
        "from flows import tracking\n"
        "params = parse_params({})\n"
        f"tracking.attach_metrics({run_id!r}, {{'pv21/mIoU_base': 1.0}}, [{str(table)!r}], 'evaluate/pv21', params=params)\n"
        "with tracking.start_run(params, run_name='next', tags={}) as new_run:\n"
        f"    tracking.log_checkpoint(params, new_run, {str(checkpoint)!r})\n"
        "print(new_run)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=copy, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr
    new_run = done.stdout.split()[-1]
    assert (copy / "mlartifacts" / run_id / "artifacts" / "evaluate" / "pv21" / "pv21_per_class.csv").is_file()
    assert (copy / "mlartifacts" / new_run / "artifacts" / "model" / "aligner.pt").is_file()
    assert (old / "mlartifacts" / run_id / "artifacts" / "model").is_dir()  # the original: as it was
    assert not (old / "mlartifacts" / run_id / "artifacts" / "evaluate").exists()
    assert not (old / "mlartifacts" / new_run).exists()
    assert str(old) not in _db_text(copy / "mlflow.db")

    # a moved one (the old folder gone) still serves its runs and its registered model
    moved = tmp_path / "moved"
    shutil.move(old, moved)
    monkeypatch.chdir(moved)
    uri = tracking.tracking_uri(params)
    assert model_registry.champion_run_id(name, tracking_uri=uri) == run_id
    assert str(old) not in _db_text(moved / "mlflow.db")
    client = mlflow.MlflowClient(uri)
    assert Path(client.download_artifacts(run_id, "model/aligner.pt", str(tmp_path / "dl"))).read_bytes() == (
        checkpoint.read_bytes())
    files = Path(mlflow.artifacts.download_artifacts(f"models:/{name}@champion", dst_path=str(tmp_path / "m"),
                                                     tracking_uri=uri))
    assert (files / "artifacts" / "aligner.pt").read_bytes() == checkpoint.read_bytes()


def test_headline_url_opens_the_model_training_view_on_the_headline_view(mlflow_uri) -> None:
    params = parse_params({})
    assert tracking.headline_url(params) is None  # no runs yet
    with tracking.start_run(params, run_name="train", tags={}):
        pass
    experiment_id = mlflow.MlflowClient(mlflow_uri).get_experiment_by_name("fmbseg").experiment_id
    assert tracking.headline_url(params, "http://127.0.0.1:5078/") == (
        f"http://127.0.0.1:5078/#/experiments/{experiment_id}/runs?workflowType=machine_learning&viewStateShareKey=headline")
