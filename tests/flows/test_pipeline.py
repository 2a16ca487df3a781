"""A profile as one DVC experiment: configs/<profile>.yaml over params.yaml becomes `dvc exp run -S`
items, which DVC's own parser (Hydra's override grammar) applies to params.yaml; the result must be
the merged settings that `fmbseg demo` and `--profile` use."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml
from dvc.utils.hydra import apply_overrides
from typer.testing import CliRunner

from components.config import deep_merge
from flows.cli import app
from flows.pipeline import PROJECT_ROOT, experiment_args, profile_overrides


@pytest.mark.parametrize("profile", ["modern", "demo"])
def test_dvc_applies_a_profiles_items_to_the_merged_settings(tmp_path: Path, profile: str) -> None:
    params = tmp_path / "params.yaml"
    shutil.copy(PROJECT_ROOT / "params.yaml", params)
    base = yaml.safe_load(params.read_text())
    overlay = yaml.safe_load((PROJECT_ROOT / "configs" / f"{profile}.yaml").read_text())
    items = profile_overrides(overlay, base)
    apply_overrides(params, items)  # what `dvc exp run -S item ...` does to params.yaml
    assert yaml.safe_load(params.read_text()) == deep_merge(base, overlay)


def test_profile_items_quote_strings_and_add_new_keys() -> None:
    base = {"a": {"b": 1, "d": {}}, "s": "x", "l": [1]}
    overlay = {"a": {"b": 2, "c": None, "d": {"k": 0.5}}, "s": "it's a {} photo", "l": ["p", True], "n": {"m": 1}}
    assert profile_overrides(overlay, base) == [
        "a.b=2", "+a.c=null", "+a.d.k=0.5", "s='it\\'s a {} photo'", "l=['p',true]", "+n={m:1}"]


def test_experiment_args_validate_the_merged_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {epochz: 3}\n")
    monkeypatch.chdir(tmp_path)
    shutil.copy(PROJECT_ROOT / "params.yaml", "params.yaml")
    runner = CliRunner()
    result = runner.invoke(app, ["pipeline", "--profile", str(bad)])
    assert result.exit_code == 2 and "epochz" in result.output
    result = runner.invoke(app, ["pipeline", "--profile", "moderne"])
    assert result.exit_code == 2 and "no profile 'moderne'" in result.output and "modern" in result.output
    result = runner.invoke(app, ["pipeline", "--temp"])
    assert result.exit_code == 2 and "--profile" in result.output
    args = experiment_args(Path("params.yaml"), "modern", name="modern", temp=True)
    assert args[:3] == ["--name", "modern", "--temp"] and "models.profile='modern'" in args
