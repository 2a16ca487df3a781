"""The `fmbseg` command line: every stage is a subcommand; weights status names what is missing."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

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


def test_weights_status_demo_finds_the_bundled_stand_ins(repo_root, tmp_path, monkeypatch):
    monkeypatch.setenv("FMBSEG_WEIGHTS_DIR", str(tmp_path))  # empty: only the copies bundled with the project
    result = runner.invoke(app, ["weights", "status", "--profile", "demo", "--params", str(repo_root / "params.yaml")])
    assert result.exit_code == 0, result.output
    bundled = repo_root / "components" / "models" / "standins" / "weights"
    for name in ("world-clip", "world-sam"):
        assert f"present  {name}" in result.output and str(bundled / f"{name}.safetensors") in result.output


def test_weights_status_names_train_demo_for_a_missing_stand_in(repo_root, tmp_path, monkeypatch):
    import components.models.registry as registry

    spec = registry.get_spec("world-clip")
    file = spec.weights[0]
    moved = dataclasses.replace(spec, weights=(dataclasses.replace(file, bundled=tmp_path / "absent.safetensors"),))
    monkeypatch.setitem(registry._SPECS, "world-clip", moved)
    monkeypatch.setenv("FMBSEG_WEIGHTS_DIR", str(tmp_path))
    result = runner.invoke(app, ["weights", "status", "--profile", "demo", "--params", str(repo_root / "params.yaml")])
    assert result.exit_code == 1
    assert "MISSING  world-clip" in result.output
    assert result.output.strip().endswith("missing: fmbseg weights train-demo")  # trained, not fetched


@pytest.mark.parametrize("profile", ["nope"])
def test_unknown_profile_is_refused(profile, repo_root):
    result = runner.invoke(app, ["weights", "status", "--profile", profile, "--params", str(repo_root / "params.yaml")])
    assert result.exit_code != 0
    assert "demo" in result.output and "paper" in result.output


def test_commands_load_only_their_own_module():
    """`fmbseg --help` imports no heavy library, and a stage imports only its module's needs:
    `fmbseg sync` (a DVC stage on every run) must not pay for torch or mlflow, and a command's help
    not even for Prefect (its flows build on first use: flows/deferred.py)."""
    code = (
        "import sys; from typer.testing import CliRunner; from flows.cli import app; "
        "CliRunner().invoke(app, sys.argv[1:]); "
        "print(sorted(m for m in ('torch', 'mlflow', 'prefect') if m in sys.modules))"
    )
    help_out = subprocess.run([sys.executable, "-c", code, "--help"], capture_output=True, text=True, check=True)
    assert help_out.stdout.strip().endswith("[]")
    sync_out = subprocess.run([sys.executable, "-c", code, "sync", "--help"], capture_output=True, text=True, check=True)
    assert sync_out.stdout.strip().endswith("[]")


def test_a_stage_run_alone_waits_for_the_ephemeral_prefect_server():
    """Without PREFECT_API_URL a stage starts Prefect's ephemeral server: its 20 s default start-up
    limit failed a `fmbseg label` on a loaded CI machine, so the CLI raises it (a user's value stays)."""
    import os

    from flows.cli import EPHEMERAL_STARTUP_S

    code = ("import flows.cli; from prefect.settings import get_current_settings; "
            "print(get_current_settings().server.ephemeral.startup_timeout_seconds)")
    key = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"
    env = {k: v for k, v in os.environ.items() if k != key}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert out.stdout.strip() == str(EPHEMERAL_STARTUP_S)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env={**env, key: "7"})
    assert out.stdout.strip() == "7"


def test_version_and_short_help():
    from importlib import metadata

    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"fmbseg {metadata.version('fmbseg')}"
    assert runner.invoke(app, ["-h"]).exit_code == 0
    assert "--params" in runner.invoke(app, ["train", "-h"]).output


def test_set_items_are_split_from_the_command_args():
    from flows.cli import parse_set, split_set_args

    rest, items = split_set_args(["--params", "p.yaml", "-S", "train.lr=0.05", "--set=a.b=[1, 2]", "-Sx.y=z"])
    assert rest == ["--params", "p.yaml"] and items == ["train.lr=0.05", "a.b=[1, 2]", "x.y=z"]
    assert parse_set(items) == {"train.lr": 0.05, "a.b": [1, 2], "x.y": "z"}
    for bad in (["train.lr"], ["=1"], ["a..b=1"], ["a=[1"]):
        with pytest.raises(ValueError, match="-S"):
            parse_set(bad)


@pytest.mark.parametrize(("args", "message"), [
    (["-S", "train.lr=abc"], "train.lr"),
    (["-S", "nosuch.key=1"], "unknown key 'nosuch'"),
    (["-S", "train.lr"], "expected KEY=VALUE"),
    (["--params", "missing.yaml"], "missing.yaml does not exist"),
])
def test_a_bad_setting_is_one_message_and_exit_2_before_any_start_up(args, message, repo_root, monkeypatch):
    import flows.train

    monkeypatch.chdir(repo_root)
    monkeypatch.setattr(flows.train, "train_flow", lambda *a: pytest.fail("the stage started"))
    result = runner.invoke(app, ["train", *args])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output


def test_set_overrides_reach_the_stage_and_leave_params_yaml_alone(tmp_path, repo_root, monkeypatch):
    import flows.train
    from components.config import load_params

    params = tmp_path / "params.yaml"
    params.write_bytes((repo_root / "params.yaml").read_bytes())
    seen = {}

    def fake_flow(path):
        seen["lr"], seen["path"] = load_params(path).train.lr, path

    monkeypatch.setattr(flows.train, "train_flow", fake_flow)
    result = runner.invoke(app, ["train", "--params", str(params), "-S", "train.lr=0.125"])
    assert result.exit_code == 0, result.output
    assert seen["lr"] == 0.125 and seen["path"] != str(params) and not Path(seen["path"]).exists()
    assert params.read_bytes() == (repo_root / "params.yaml").read_bytes()
    assert runner.invoke(app, ["weights", "status", "-S", "a.b=1"]).exit_code == 2
