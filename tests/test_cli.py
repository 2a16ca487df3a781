"""The `fmbseg` command line: every stage is a subcommand; weights status names what is missing."""

from __future__ import annotations

import subprocess
import sys

import pytest
from typer.testing import CliRunner

from flows.cli import app

runner = CliRunner()


def test_every_stage_is_a_subcommand():
    out = runner.invoke(app, ["--help"]).output
    for command in ("download", "label", "balance", "features", "train", "evaluate", "report",
                    "weights", "pipeline", "demo", "sync", "nightly", "schedule", "show", "compare"):
        assert command in out, command


def test_weights_status_paper_lists_missing_files(tmp_path, repo_root, monkeypatch):
    monkeypatch.setenv("FMBSEG_WEIGHTS_DIR", str(tmp_path / "weights"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    result = runner.invoke(app, ["weights", "status", "--profile", "paper", "--params", str(repo_root / "params.yaml")])
    assert result.exit_code == 1
    assert "MISSING" in result.output and "sam_vit_h_4b8939.pth" in result.output
    assert "fmbseg weights fetch --profile paper" in result.output


def test_weights_status_demo_needs_nothing(repo_root):
    result = runner.invoke(app, ["weights", "status", "--profile", "demo", "--params", str(repo_root / "params.yaml")])
    assert result.exit_code == 0, result.output
    assert "no weight files needed" in result.output


@pytest.mark.parametrize("profile", ["nope"])
def test_unknown_profile_is_refused(profile, repo_root):
    result = runner.invoke(app, ["weights", "status", "--profile", profile, "--params", str(repo_root / "params.yaml")])
    assert result.exit_code != 0
    assert "demo" in result.output and "paper" in result.output


def test_console_script_help_is_fast_to_import():
    """`fmbseg --help` must not import torch, prefect or mlflow (they load inside the commands)."""
    code = "import sys, flows.cli; print(sorted(m for m in ('torch', 'mlflow') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
