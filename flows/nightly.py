"""Nightly relabel-and-retrain (the `sync` stage that feeds it is flows/sync.py).

`nightly` runs `dvc exp run` (the `sync` stage copies new images from ``nightly.source_dir`` into
``paths.incoming``; Stage 1 labels only those, the aligner retrains, every benchmark is
evaluated), compares the new model with the MLflow champion on ``nightly.benchmarks``, promotes it
(registered-model alias ``champion``) only when it is better, and pushes the DVC cache. A failed
night restores dvc.lock and the DVC-tracked data to what they were before it started, never
touches the champion, and ends as a failed flow run.
"""

from __future__ import annotations

import os
import subprocess
from datetime import datetime, timezone
from pathlib import Path

import typer

from components.config import load_params
from flows.deferred import flow, get_run_logger, task
from flows.parent import PARENT_ENV
from flows.pipeline import dvc_command, run_logged, stage_env

__all__ = ["nightly_flow", "schedule_nightly", "register"]


def _nightly_run_name() -> str:
    """``nightly-<UTC date>``: one night, one readable name in the Prefect UI."""
    return f"nightly-{datetime.now(timezone.utc):%Y-%m-%d}"


# --------------------------------------------------------------------------------------- nightly
@task
def snapshot_lock(project_dir: str) -> str | None:
    """dvc.lock as it is before the night (None when the pipeline never ran)."""
    lock = Path(project_dir) / "dvc.lock"
    return lock.read_text() if lock.exists() else None


@task
def dvc_exp_run(project_dir: str, name: str) -> str:
    """`dvc exp run`: DVC reruns exactly the stages the new images (or settings) made stale."""
    from prefect import runtime  # here, not at the top: Prefect loads when a flow runs (flows/deferred.py)

    env = stage_env({PARENT_ENV: str(runtime.flow_run.id)})
    return run_logged([dvc_command(), "exp", "run", "--name", name], Path(project_dir), env, get_run_logger())


@task(retries=2, retry_delay_seconds=10)
def candidate_scores(project_dir: str, benchmarks: list[str], metric: str) -> dict:
    """The new model's MLflow run id and its mean ``metric`` over ``benchmarks``."""
    from flows import model_registry, tracking

    params = load_params(Path(project_dir) / "params.yaml")
    model_path = Path(project_dir) / params.paths.checkpoint
    return model_registry.run_scores(model_registry.checkpoint_run_id(model_path), benchmarks, metric,
                                     tracking_uri=tracking.tracking_uri(params, Path(project_dir)))


@task(retries=2, retry_delay_seconds=10)
def champion_scores(project_dir: str, benchmarks: list[str], metric: str) -> dict | None:
    """The current champion's run id and mean score (None when there is no champion yet)."""
    from flows import model_registry, tracking

    params = load_params(Path(project_dir) / "params.yaml")
    return model_registry.champion_scores(params.tracking.registered_model, benchmarks, metric,
                                          tracking_uri=tracking.tracking_uri(params, Path(project_dir)))


@task(retries=2, retry_delay_seconds=10)
def promote(project_dir: str, run_id: str) -> str:
    """Register the run's checkpoint and point the ``champion`` alias at it; returns the version."""
    from flows import model_registry, tracking

    params = load_params(Path(project_dir) / "params.yaml")
    return model_registry.promote_champion(params.tracking.registered_model, run_id,
                                           tracking_uri=tracking.tracking_uri(params, Path(project_dir)))


@task(retries=3, retry_delay_seconds=[10, 60, 300])
def dvc_push(project_dir: str, remote: str) -> None:
    """Push the DVC cache to ``remote`` (a path or URL; registered as the local remote 'nightly')."""
    env = stage_env()
    cwd = Path(project_dir)
    subprocess.run([dvc_command(), "remote", "add", "--local", "--force", "nightly", remote],
                   cwd=cwd, env=env, check=True, capture_output=True, text=True)
    run_logged([dvc_command(), "push", "--remote", "nightly"], cwd, env, get_run_logger())


@task
def restore(project_dir: str, lock_text: str | None) -> None:
    """Put dvc.lock and the DVC-tracked outputs back as they were before the night."""
    lock = Path(project_dir) / "dvc.lock"
    if lock_text is None:
        lock.unlink(missing_ok=True)
        return
    lock.write_text(lock_text)
    subprocess.run([dvc_command(), "checkout", "--force"], cwd=project_dir, env=stage_env(),
                   check=False, capture_output=True, text=True)


@flow(name="nightly", flow_run_name=_nightly_run_name)
def nightly_flow(project_dir: str = ".") -> dict:
    """Relabel new images, retrain, evaluate, promote if better, push. Returns a summary."""
    logger = get_run_logger()
    project_dir = str(Path(project_dir).resolve())
    params = load_params(Path(project_dir) / "params.yaml")
    benchmarks, metric = list(params.nightly.benchmarks), params.nightly.metric
    name = "nightly-" + datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    lock_text = snapshot_lock(project_dir)
    try:
        dvc_exp_run(project_dir, name)
        new = candidate_scores(project_dir, benchmarks, metric)
        champ = champion_scores(project_dir, benchmarks, metric)
    except BaseException:
        logger.error("the night failed: restoring dvc.lock and the data; the champion is untouched")
        restore(project_dir, lock_text)
        raise
    better = champ is None or new["score"] > champ["score"]
    version = promote(project_dir, new["run_id"]) if better else None
    if params.nightly.dvc_remote:
        dvc_push(project_dir, params.nightly.dvc_remote)
    summary = {"experiment": name, "candidate": new, "champion": champ, "promoted": better, "version": version}
    logger.info("nightly summary: %s", summary)
    return summary


# -------------------------------------------------------------------------------------- schedule
def schedule_nightly(project_dir: Path, cron: str, pool: str, name: str = "nightly") -> str:
    """Create (or update) a deployment of ``nightly`` on a process work pool with a cron schedule.

    Needs a Prefect server (``PREFECT_API_URL``); returns the deployment id.
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists

    if not os.environ.get("PREFECT_API_URL"):
        raise RuntimeError(
            "a schedule needs a Prefect server: start one with `prefect server start` and "
            "`export PREFECT_API_URL=http://127.0.0.1:4200/api`, or use `fmbseg schedule --serve`"
        )
    with get_client(sync_client=True) as client:
        try:
            client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
        except ObjectAlreadyExists:
            pass
    project_dir = project_dir.resolve()
    deployment_id = nightly_flow.from_source(source=str(project_dir), entrypoint="flows/nightly.py:nightly_flow").deploy(
        name=name,
        work_pool_name=pool,
        cron=cron,
        parameters={"project_dir": str(project_dir)},
        description="fmbseg nightly relabel-and-retrain",
        print_next_steps=False,
    )
    return str(deployment_id)


def register(app: typer.Typer) -> None:
    @app.command("nightly")
    def nightly_cmd(project_dir: Path = typer.Option(Path("."), help="the project to run in")) -> None:
        """Run the nightly relabel-and-retrain job once, now."""
        nightly_flow(str(project_dir))

    @app.command("schedule")
    def schedule_cmd(
        cron: str = typer.Option("0 2 * * *", help="when to run, a cron expression (server time zone)"),
        pool: str = typer.Option("fmbseg", help="the process work pool a worker serves"),
        serve: bool = typer.Option(False, help="serve the schedule from this process instead of a deployment"),
        project_dir: Path = typer.Option(Path("."), help="the project the nightly job runs in"),
    ) -> None:
        """Schedule `nightly` (default 02:00 every day) as a Prefect deployment or serve it."""
        if serve:
            nightly_flow.serve(name="nightly", cron=cron, parameters={"project_dir": str(project_dir.resolve())})
            return
        deployment_id = schedule_nightly(project_dir, cron, pool)
        typer.echo(f"deployment nightly/nightly ({deployment_id}) scheduled '{cron}' on pool {pool!r}.\n"
                   f"Start a worker to run it: prefect worker start --pool {pool}")
