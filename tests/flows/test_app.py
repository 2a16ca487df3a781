"""`fmbseg app`'s user errors: one line on stderr and exit 2 before Gradio starts or anything is written."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
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


def test_the_page_resolves_paths_runs_and_registered_models(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             mlflow_uri: str) -> None:
    """The page's model box takes what `fmbseg predict --model` takes, through the same resolver; a
    segmenter is built once per checkpoint."""
    from components.config import parse_params
    from flows import model_registry, tracking
    from flows.app import ModelCache
    from tests.mini_checkpoint import write_mini_checkpoint

    monkeypatch.chdir(tmp_path)
    params = parse_params({"models": {"device": "cpu"}})
    with tracking.start_run(params, run_name="train", tags={}) as run_id:
        model = write_mini_checkpoint(tmp_path / "aligner.pt", run_id=run_id)
        tracking.log_checkpoint(params, run_id, model)
        model_registry.log_model(params, run_id, model)  # registers version 1, as `fmbseg train` does
    model_registry.promote_champion(params.tracking.registered_model, run_id, tracking_uri=mlflow_uri)
    models = ModelCache(params, default=str(model))
    first, path = models.get("")
    assert path == model and first.segment(np.zeros((8, 8, 3), np.uint8), ["a", "b"]).label_map.shape == (8, 8)
    assert models.get(str(model))[0] is first
    name = params.tracking.registered_model
    for reference in (f"runs:/{run_id}", f"models:/{name}@champion", f"models:/{name}/1"):
        segmenter, checkpoint = models.get(reference)
        assert checkpoint.read_bytes() == model.read_bytes() and segmenter is first  # the same bytes
    with pytest.raises(ValueError, match="no such registered model version"):
        models.get(f"models:/{name}@nightly")
