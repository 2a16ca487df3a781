"""`fmbseg app`'s user errors: one line on stderr and exit 2 before Gradio starts or anything is written."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flows.cli import app


@pytest.mark.parametrize(("args", "message"), [
    (["app", "--store", "nowhere"], "run `fmbseg label` first"),
    (["app", "--model", "missing.pt"], "no model checkpoint at missing.pt"),
    (["app", "--model", "s3://bucket/model"], "unsupported model URI"),
    (["app", "--port", "70000"], "--port must be in 0..65535"),
    (["app", "--max-pixels", "0"], "--max-pixels must be >= 1"),
])
def test_user_errors_exit_2_with_one_line(args: list[str], message: str, tmp_path: Path, repo_root: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, [*args, "--params", str(repo_root / "params.yaml")])
    assert result.exit_code == 2, result.output
    assert message in result.output and len(result.output.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_without_gradio_it_names_the_extra(tmp_path: Path, repo_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "gradio", None)  # what an environment without the extra imports
    result = CliRunner().invoke(app, ["app", "--params", str(repo_root / "params.yaml")])
    assert result.exit_code == 2
    assert result.output.strip() == "fmbseg app: the web page needs Gradio: pip install 'fmbseg[app]'"
