"""Shared fixtures. Tests run on the CPU with miniature models and synthetic data only."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Telemetry off and no network: set before prefect / mlflow / huggingface are imported anywhere.
os.environ.update(
    DO_NOT_TRACK="true",
    MLFLOW_DISABLE_TELEMETRY="true",
    DVC_NO_ANALYTICS="1",
    PREFECT_SERVER_ANALYTICS_ENABLED="false",
    HF_HUB_OFFLINE="1",
    TOKENIZERS_PARALLELISM="false",
)

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT
