"""flows/tracking.py against a real (temporary, pre-migrated) SQLite MLflow store."""

from __future__ import annotations

import subprocess
from pathlib import Path

import mlflow
import pytest
import torch

from components.aligner.checkpoint import InferenceSpec, save_checkpoint
from components.aligner.model import Aligner
from components.config import flatten, parse_params
from flows import tracking


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
    with tracking.start_run(params, run_name="train", tags={"git.commit": "abc"}) as run_id:
        with tracking.StepLogger(params, run_id, every=4) as steps:
            for step in range(10):
                steps.log_step(step, {"loss": 1.0 / (step + 1)})
        tracking.log_epoch(params, run_id, 0, {"loss": 0.5, "seconds": 2.0})
        tracking.log_checkpoint(params, run_id, artifact)
    client = mlflow.MlflowClient(uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    # the UI opens the experiment on its runs, not on MLflow 3's GenAI overview
    assert client.get_experiment(run.info.experiment_id).tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"
    assert run.data.params["train.lr"] == "0.2"
    assert len(run.data.params) == len(flatten(params))
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
        with tracking.start_run(params, run_name="t", tags={}) as run_id:
            raise RuntimeError("boom")
    client = mlflow.MlflowClient(mlflow_uri)
    assert client.get_run(run_id).info.status == "FAILED"
    assert tracking.run_exists(params, run_id)
    assert not tracking.run_exists(params, "0" * 32)
    edited = parse_params({"evaluate": {"window": 224}})  # edited while the training was down
    with tracking.start_run(edited, run_name="t", tags={}, resume_run_id=run_id) as again:
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
                          amg={"min_area_frac": 0.0, "max_area_frac": 1.0})


def test_champion_promotion(tmp_path, mlflow_uri) -> None:
    params = parse_params({})
    model = params.tracking.registered_model
    ckpt = save_checkpoint(
        tmp_path / "aligner.pt", model=Aligner(4, 2, kind="linear"), encoder_spec="mini-dino", image_size=56,
        text_spec="mini-clip", templates=["{}"], class_names=["a"], prototypes=torch.ones(1, 2), inference=INFERENCE, params={},
        mlflow_run_id=None,
    )
    with pytest.raises(ValueError, match="no MLflow run id"):
        tracking.checkpoint_run_id(ckpt)
    runs = {}
    for name, score in (("first", 30.0), ("second", 40.0)):
        with tracking.start_run(params, run_name=name, tags={}) as run_id:
            tracking.log_model(params, run_id, ckpt)  # registers versions 1 and 2
        tracking.attach_metrics(run_id, {"pv21/mIoU_base": score, "cs171/mIoU_base": score + 2},
                                params=params)
        runs[name] = run_id
    assert tracking.champion_scores(model, ["pv21"], "mIoU_base", tracking_uri=mlflow_uri) is None
    scores = tracking.run_scores(runs["first"], ["pv21", "cs171"], "mIoU_base", tracking_uri=mlflow_uri)
    assert scores == {"run_id": runs["first"], "score": 31.0, "metrics": {"pv21": 30.0, "cs171": 32.0}}
    with pytest.raises(KeyError, match="ade20k/mIoU_base"):
        tracking.run_scores(runs["first"], ["ade20k"], "mIoU_base", tracking_uri=mlflow_uri)
    assert tracking.promote_champion(model, runs["first"], tracking_uri=mlflow_uri) == "1"
    assert tracking.champion_scores(model, ["pv21"], "mIoU_base", tracking_uri=mlflow_uri)["run_id"] == runs["first"]
    assert tracking.promote_champion(model, runs["second"], tracking_uri=mlflow_uri) == "2"
    assert tracking.champion_scores(model, ["pv21"], "mIoU_base", tracking_uri=mlflow_uri)["score"] == 40.0
    save_checkpoint(
        ckpt, model=Aligner(4, 2, kind="linear"), encoder_spec="mini-dino", image_size=56, text_spec="mini-clip",
        templates=["{}"], class_names=["a"], prototypes=torch.ones(1, 2), inference=INFERENCE, params={}, mlflow_run_id=runs["second"],
    )
    assert tracking.checkpoint_run_id(ckpt) == runs["second"]


def test_model_runs_lists_trained_models_newest_first(mlflow_uri) -> None:
    params = parse_params({})
    assert tracking.model_runs(params).empty
    ids = []
    for lr in (0.1, 0.2):
        p = parse_params({"train": {"lr": lr}})
        with tracking.start_run(p, run_name=f"lr{lr}", tags={tracking.STAGE_TAG: "train"}) as run_id:
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
