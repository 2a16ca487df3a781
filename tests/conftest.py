"""Shared fixtures. Tests run on the CPU with miniature models and synthetic data only."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests import REPO_ROOT

# Telemetry off and no network: set before prefect / mlflow / huggingface are imported anywhere.
os.environ.update(
    DO_NOT_TRACK="true",
    MLFLOW_DISABLE_TELEMETRY="true",
    DVC_NO_ANALYTICS="1",
    PREFECT_SERVER_ANALYTICS_ENABLED="false",
    HF_HUB_OFFLINE="1",
    TOKENIZERS_PARALLELISM="false",
)
# One intra-op thread in the stage subprocesses too (see pytest_configure): `make test` runs one pytest
# worker per core, so a process that took every core would only contend with the other worker.
os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_configure(config: pytest.Config) -> None:
    """One intra-op thread: the tiny models' forwards are dominated by thread hand-offs (2 threads
    made the miniature SAM decoder ~100x slower on a loaded 2-core machine), and every process -
    this one and Dask's workers (OMP_NUM_THREADS=1) - then computes bit-identical floats."""
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def prefect_harness(tmp_path_factory):
    """One Prefect test server for the whole session (a Prefect server start costs seconds).

    Its URL is exported as PREFECT_API_URL too, so that stage subprocesses (`dvc repro` running
    `fmbseg <stage>`) report to the same server instead of starting one each.
    """
    os.environ["PREFECT_HOME"] = str(tmp_path_factory.mktemp("prefect_home"))
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    previous = os.environ.get("PREFECT_API_URL")
    with prefect_test_harness(server_startup_timeout=120):
        os.environ["PREFECT_API_URL"] = PREFECT_API_URL.value()
        try:
            yield PREFECT_API_URL.value()
        finally:
            if previous is None:
                os.environ.pop("PREFECT_API_URL", None)
            else:
                os.environ["PREFECT_API_URL"] = previous


@pytest.fixture(scope="session")
def _migrated_mlflow_db(tmp_path_factory) -> Path:
    """An MLflow SQLite store, migrated once per session (migrations take seconds)."""
    import mlflow

    path = tmp_path_factory.mktemp("mlflow_template") / "mlflow.db"
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{path}")
    client.search_experiments()
    return path


@pytest.fixture
def mlflow_uri(tmp_path, _migrated_mlflow_db, monkeypatch) -> str:
    """A fresh, pre-migrated SQLite MLflow store for one test; MLFLOW_TRACKING_URI points to it."""
    import shutil

    db = tmp_path / "mlflow.db"
    shutil.copy(_migrated_mlflow_db, db)
    uri = f"sqlite:///{db}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """On pytest-xdist workers (`make test`: `--dist loadfile --no-loadscope-reorder`, a file's tests on
    one worker, so a module-scoped fixture such as the pipeline's workspace is built once): the files
    that hold slow end-to-end tests go first, so that the last minutes are short files that both
    workers share, not one long file that the other worker waits on. Stable: the order is kept
    otherwise."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_files)
