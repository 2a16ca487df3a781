"""The user-facing commands work from any folder: without a params.yaml there, the settings of the
checkout fmbseg runs from apply."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image
from typer.testing import CliRunner

from tests.mini_checkpoint import write_mini_checkpoint


def test_predict_runs_in_a_folder_without_params_yaml(tmp_path, monkeypatch, prefect_harness, mlflow_uri):
    from flows.cli import app

    monkeypatch.chdir(tmp_path)
    (tmp_path / "photos").mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(tmp_path / "photos" / f"p{i}.jpg")
    model = write_mini_checkpoint(tmp_path / "m.pt")
    result = CliRunner().invoke(app, ["predict", "photos", "--model", str(model), "--classes", "sky,grass",
                                      "--out", "out"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout[result.stdout.index("{"):])["segmented"] == 2
    assert sorted(p.name for p in (tmp_path / "out").glob("*.png")) == ["p0.png", "p1.png"]
    assert not (tmp_path / "params.yaml").exists()
