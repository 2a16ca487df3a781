"""`fmbseg` answers at once: a user error is one line on stderr and exit status 2 within 2 seconds
(before torch, the model libraries, mlflow or Prefect load), and every command's help within 2 seconds.

Each case runs the real command line in a subprocess; only the subprocess is timed, by the CPU time
it used (user + system): on a machine shared with other builds its wall time measures their load too
(bench/startup.py reports the wall time on a quiet machine).
"""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from flows.cli import COMMANDS, SET_HELP

FAST_S = 2.0


def fmbseg(args: list[str], cwd: Path, repo_root: Path, **env: str) -> tuple[subprocess.CompletedProcess, float]:
    """``python -m flows.cli ARGS`` in ``cwd``, with this checkout's code; (the process, its CPU time in s)."""
    full_env = {**os.environ, "PYTHONPATH": str(repo_root), "PREFECT_API_URL": "", **env}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=300)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return done, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


@pytest.fixture
def project(tmp_path: Path, repo_root: Path) -> Path:
    """A folder with the project's params.yaml, two images and an empty weights folder."""
    shutil.copy(repo_root / "params.yaml", tmp_path / "params.yaml")
    (tmp_path / "photos").mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "photos" / f"p{i}.jpg")
    return tmp_path


USER_ERRORS = {
    "misspelled command": (["lable"], "did you mean 'label'?"),
    "missing path": (["predict", "/nonexistent", "--out", "out", "--classes", "sky"], "/nonexistent"),
    "unknown vocabulary": (["predict", "photos", "--out", "out", "--vocabulary", "cocostuf171"],
                           "did you mean 'cocostuff171'?"),
    "unknown -S key": (["train", "-S", "train.nope=1"], "unknown key 'train.nope'"),
    "bad -S YAML": (["train", "-S", "train.lr=[1"], "not valid YAML"),
    "-S without =": (["train", "-S", "train.lr"], "expected KEY=VALUE"),
    "unknown benchmark": (["evaluate", "--dataset", "pv22"], "did you mean 'pv21'?"),
    "unknown Stage 1 benchmark": (["evaluate-stage1", "--dataset", "pv22"], "did you mean 'pv21'?"),
    "unknown dataset to download": (["download", "nope"], "unknown dataset 'nope'"),
    "no checkpoint": (["evaluate", "--dataset", "pv21"], "no aligner checkpoint at models/aligner.pt"),
    "missing --model file": (["predict", "photos", "--out", "out", "--classes", "sky", "--model", "no.pt"],
                             "--model no.pt"),
    "unknown image id": (["show", "nope"], "fmbseg label"),
    "weights fetch offline": (["weights", "fetch", "--profile", "paper"], "HF_HUB_OFFLINE"),
}


@pytest.mark.parametrize("case", list(USER_ERRORS))
def test_a_user_error_is_one_line_and_exit_2_at_once(case, project, repo_root, tmp_path):
    args, expected = USER_ERRORS[case]
    done, seconds = fmbseg(args, project, repo_root, HF_HUB_OFFLINE="1", FMBSEG_WEIGHTS_DIR=str(tmp_path / "w"))
    output = (done.stdout + done.stderr).strip()
    assert done.returncode == 2, output
    assert len(output.splitlines()) == 1 and output.startswith("fmbseg"), output
    assert expected in output, output
    assert seconds < FAST_S, f"{case}: {seconds:.1f} s"
    assert not (project / "out").exists(), "nothing is written before the checks pass"


def test_missing_weights_name_the_file_and_the_fetch_command(project, repo_root, tmp_path):
    """Stage 1 of the paper profile without its weights: one line, before any model or Prefect
    starts. (Not timed: the model registry still imports the model libraries.)"""
    env = {"FMBSEG_WEIGHTS_DIR": str(tmp_path / "w"), "HF_HOME": str(tmp_path / "hf"),
           "HF_HUB_CACHE": str(tmp_path / "hf" / "hub")}
    done, _ = fmbseg(["label", "--images", "photos", "--out", "labels", "--classes", "sky,grass",
                      "--profile", "paper"], project, repo_root, **env)
    output = (done.stdout + done.stderr).strip()
    assert done.returncode == 2, output
    assert len(output.splitlines()) == 1, output
    assert "open_clip" in output and "fmbseg weights fetch --profile paper" in output, output
    assert not (project / "labels").exists()


def test_an_escaping_user_error_is_one_line_unless_a_traceback_is_asked_for(project, repo_root):
    """A FileNotFoundError / ValueError that a command raises past its own checks: one line, exit 2;
    FMBSEG_TRACEBACK=1 shows the traceback."""
    args = ["weights", "status", "--params", "missing.yaml"]
    done, _ = fmbseg(args, project, repo_root)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    shown, _ = fmbseg(args, project, repo_root, FMBSEG_TRACEBACK="1")
    assert shown.returncode == 1 and "Traceback" in shown.stderr


HELPS = [[name] for name in COMMANDS] + [["weights", "status"], ["weights", "fetch"], ["weights", "train-demo"], []]


@pytest.mark.parametrize("args", HELPS, ids=lambda a: " ".join(a) or "fmbseg")
def test_every_help_answers_at_once_in_one_style(args, repo_root, tmp_path):
    done, seconds = fmbseg([*args, "-h"], tmp_path, repo_root)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("Usage:") and "-h, --help" in done.stdout, done.stdout
    assert "<bool>" not in done.stdout and "╭" not in done.stdout, done.stdout
    assert seconds < FAST_S, f"{args}: {seconds:.1f} s"


@pytest.mark.parametrize("command", ["label", "train", "evaluate", "features", "predict"])
def test_a_stage_command_help_shows_set(command, repo_root, tmp_path):
    done, _ = fmbseg([command, "-h"], tmp_path, repo_root)
    assert " ".join(SET_HELP.split()) in " ".join(done.stdout.split())


def test_demo_help_shows_a_relative_workspace(repo_root, tmp_path):
    done, _ = fmbseg(["demo", "-h"], tmp_path, repo_root)
    assert "[default: ./demo]" in done.stdout and str(repo_root) not in done.stdout


def test_check_online_refuses_an_unreachable_host(monkeypatch):
    from flows.preflight import check_online

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(ConnectionError, match="cannot reach no-such-host.invalid"):
        check_online(("no-such-host.invalid",))
