"""Nightly relabel-and-retrain on a real Prefect server: a cron deployment on a process work pool,
one run triggered now and executed by a real worker; its outputs and MLflow results checked."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from PIL import Image

from flows.pipeline import PROJECT_ROOT, prepare_workspace, stage_env

pytestmark = pytest.mark.slow


def _new_images(folder: Path, n: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img = Image.new("RGB", (96, 80), (40 * i % 255, 120, 200))
        img.paste((250, 30, 30), (10 + 5 * i, 10, 50 + 5 * i, 60))
        img.save(folder / f"new_{i}.jpg", quality=90)


def test_nightly_deployment_runs_on_a_worker(tmp_path, prefect_harness, monkeypatch):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId, FlowRunFilter
    from prefect.deployments import run_deployment

    from flows.nightly import schedule_nightly

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    source = tmp_path / "camera_uploads"
    _new_images(source, 2)
    ws = prepare_workspace(
        tmp_path / "ws",
        PROJECT_ROOT / "configs" / "demo.yaml",
        overrides={
            "download": {"datasets": ["coco_train", "pv21", "cs171"]},
            "evaluate": {"benchmarks": ["pv21", "cs171"], "refine": False},
            "nightly": {"source_dir": str(source), "benchmarks": ["pv21", "cs171"],
                        "dvc_remote": str(tmp_path / "remote")},
        },
    )

    deployment_id = schedule_nightly(ws, cron="0 2 * * *", pool="fmbseg-test")
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment(deployment_id)
        assert [s.schedule.cron for s in deployment.schedules] == ["0 2 * * *"]
        # the next run, as the server's scheduler service makes it (its REST endpoint, called now)
        httpx.post(f"{os.environ['PREFECT_API_URL']}/deployments/{deployment_id}/schedule",
                   json={"max_runs": 1}, timeout=30).raise_for_status()
        scheduled = client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id])),
            flow_run_filter=FlowRunFilter(state={"type": {"any_": ["SCHEDULED"]}}),
        )
        assert scheduled and all(r.next_scheduled_start_time.hour == 2 for r in scheduled)

    run = run_deployment(name="nightly/nightly", timeout=0)
    env = stage_env({"PREFECT_API_URL": os.environ["PREFECT_API_URL"]})
    worker = subprocess.run(
        [str(Path(sys.executable).with_name("prefect")), "worker", "start", "--pool", "fmbseg-test", "--run-once"],
        env=env, cwd=ws, capture_output=True, text=True, timeout=1500,
    )
    with get_client(sync_client=True) as client:
        deadline = time.monotonic() + 60
        state = client.read_flow_run(run.id).state
        while not state.is_final() and time.monotonic() < deadline:
            time.sleep(2)
            state = client.read_flow_run(run.id).state
    assert state.is_completed(), f"{state}\n{worker.stdout[-4000:]}\n{worker.stderr[-4000:]}"

    # the new images were synced and labelled; the model was trained, evaluated, promoted, pushed
    assert sorted(p.name for p in (ws / "data" / "incoming").iterdir()) == ["new_0.jpg", "new_1.jpg"]
    assert (ws / "models" / "aligner.pt").exists()
    assert (ws / "metrics" / "pv21.json").exists()
    assert any((tmp_path / "remote").rglob("*")), "dvc push sent nothing to the remote"

    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{ws / 'mlflow.db'}")
    champion = client.get_model_version_by_alias("fmbseg-aligner", "champion")
    metrics = client.get_run(champion.run_id).data.metrics
    assert {"pv21/mIoU_base", "cs171/mIoU_base"} <= set(metrics)


def test_a_failed_night_leaves_the_champion_and_the_data_untouched(tmp_path, prefect_harness, monkeypatch):
    import mlflow
    import yaml

    from flows import model_registry
    from flows.nightly import nightly_flow
    from flows.pipeline import dvc_command, run_logged

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    source = tmp_path / "camera_uploads"
    source.mkdir()
    ws = prepare_workspace(
        tmp_path / "ws",
        PROJECT_ROOT / "configs" / "demo.yaml",
        overrides={"download": {"datasets": ["coco_train"]}, "nightly": {"source_dir": str(source)}},
    )
    # yesterday: the data as it was, and a champion
    run_logged([dvc_command(), "repro", "download@coco_train", "sync"], ws, stage_env())
    lock_before = (ws / "dvc.lock").read_text()
    uri = f"sqlite:///{ws / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri)
    run = client.create_run(client.create_experiment("fmbseg")).info.run_id
    client.log_metric(run, "pv21/mIoU_base", 50.0)
    client.create_registered_model("fmbseg-aligner")
    client.create_model_version("fmbseg-aligner", f"{client.get_run(run).info.artifact_uri}/model", run_id=run)
    version = model_registry.promote_champion("fmbseg-aligner", run, tracking_uri=uri)

    # tonight: new images arrive, and labelling breaks (a vocabulary that does not exist)
    _new_images(source, 2)
    params = yaml.safe_load((ws / "params.yaml").read_text())
    params["label"]["vocabulary"] = "no-such-vocabulary"
    (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    state = nightly_flow(str(ws), return_state=True)
    assert state.is_failed()
    assert (ws / "dvc.lock").read_text() == lock_before
    assert not list((ws / "data" / "incoming").iterdir()), "the night's synced images must be rolled back"
    assert str(client.get_model_version_by_alias("fmbseg-aligner", "champion").version) == version


def test_prefect_yaml_declares_the_same_nightly_deployment(prefect_harness):
    """`prefect deploy --name nightly` from the project root builds the deployment `fmbseg schedule`
    makes: the nightly flow, 02:00 UTC, on the fmbseg process pool, run in this project."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists

    with get_client(sync_client=True) as client:
        try:
            client.create_work_pool(WorkPoolCreate(name="fmbseg", type="process"))
        except ObjectAlreadyExists:
            pass
    env = stage_env({"PREFECT_API_URL": os.environ["PREFECT_API_URL"], "PWD": str(PROJECT_ROOT)})
    done = subprocess.run(
        [str(Path(sys.executable).with_name("prefect")), "--no-prompt", "deploy", "--name", "nightly"],
        env=env, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name("nightly/nightly")
        try:
            assert deployment.entrypoint == "flows/nightly.py:nightly_flow"
            assert deployment.work_pool_name == "fmbseg"
            assert [(s.schedule.cron, s.schedule.timezone) for s in deployment.schedules] == [("0 2 * * *", "UTC")]
            step = deployment.pull_steps[0]["prefect.deployments.steps.set_working_directory"]
            assert Path(step["directory"]) == PROJECT_ROOT
        finally:
            client.delete_deployment(deployment.id)
