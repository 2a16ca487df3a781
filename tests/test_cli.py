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


def test_commands_load_only_their_own_module():
    """`fmbseg --help` imports no heavy library, and a stage imports only its module's needs:
    `fmbseg sync` (a DVC stage on every run) must not pay for torch or mlflow."""
    code = (
        "import sys; from typer.testing import CliRunner; from flows.cli import app; "
        "CliRunner().invoke(app, sys.argv[1:]); "
        "print(sorted(m for m in ('torch', 'mlflow', 'prefect') if m in sys.modules))"
    )
    help_out = subprocess.run([sys.executable, "-c", code, "--help"], capture_output=True, text=True, check=True)
    assert help_out.stdout.strip().endswith("[]")
    sync_out = subprocess.run([sys.executable, "-c", code, "sync", "--help"], capture_output=True, text=True, check=True)
    assert sync_out.stdout.strip().endswith("['prefect']")
