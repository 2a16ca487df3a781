"""`fmbseg compare`: the ablation axes are found (the params that differ), metrics side by side; and
`dvc exp show` gives an ablation only the scores it computed."""

from __future__ import annotations

import math

import pandas as pd

from components.evaluation.ablation import ablation_table
from tests import REPO_ROOT

REPO = REPO_ROOT


def test_ablation_table_shows_the_varying_params_and_every_miou():
    runs = pd.DataFrame({
        "run_id": ["r1", "r2", "r3"],
        "tags.mlflow.runName": ["linear", "mlp", "transformer"],
        "params.aligner.kind": ["linear", "mlp", "transformer"],
        "params.train.lr": ["0.1", "0.1", "0.1"],
        "metrics.pv21/mIoU_base": [10.0, 20.0, 30.0],
        "metrics.cs171/mIoU_base": [1.0, 2.0, 3.004],
        "metrics.pv21/mIoU_refined": [11.0, 21.0, 31.0],
        "metrics.pv21/aAcc_base": [90.0, 91.0, 92.0],
        "metrics.mean/mIoU_base": [5.5, 11.0, 16.5],  # logged by evaluate: not a benchmark column
    })
    table = ablation_table(runs)
    assert list(table.columns) == ["run", "aligner.kind", "cs171/mIoU_base", "pv21/mIoU_base",
                                   "pv21/mIoU_refined", "mean/mIoU_base", "mean/mIoU_refined"]
    assert table["aligner.kind"].tolist() == ["linear", "mlp", "transformer"]
    assert table["mean/mIoU_base"].tolist() == [5.5, 11.0, 16.5]
    assert math.isclose(table["cs171/mIoU_base"][2], 3.0)


def test_a_run_evaluated_on_some_benchmarks_gets_no_mean():
    """The demo's ablation is evaluated on pv21 alone: a mean of one benchmark beside the mean of
    seven would read as comparable."""
    runs = pd.DataFrame({
        "run_id": ["r1", "r2"],
        "params.aligner.kind": ["linear", "transformer"],
        "metrics.pv21/mIoU_base": [10.0, 30.0],
        "metrics.cs171/mIoU_base": [float("nan"), 3.0],
    })
    table = ablation_table(runs)
    assert math.isnan(table["mean/mIoU_base"][0]) and table["mean/mIoU_base"][1] == 16.5
    assert table["pv21/mIoU_base"].tolist() == [10.0, 30.0]


def test_no_runs_no_table():
    assert ablation_table(pd.DataFrame()).empty


TRAIN = """\
from components.config import load_params
from flows.train import drop_stale_scores
params = load_params("params.yaml")
open("model.txt", "w").write(params.aligner.kind)
drop_stale_scores(params)
"""
EVALUATE = """\
import json, sys
from components.config import load_params
from flows.evaluate import score_files
metrics, _, _ = score_files(load_params("params.yaml"), sys.argv[1])
metrics.parent.mkdir(exist_ok=True)
metrics.write_text(json.dumps({"mIoU_base": len(open("model.txt").read()) + len(sys.argv[1])}))
"""


def test_dvc_exp_show_gives_an_ablation_no_scores_it_did_not_compute(tmp_path) -> None:
    """`dvc exp run -S aligner.kind=linear train evaluate@pv21`: the experiment's row shows its own pv21
    score and no pv20 score, not its baseline's (the train stage removes the replaced model's scores)."""
    import csv
    import io
    import os
    import subprocess
    import sys

    import yaml

    from flows.pipeline import dvc_command

    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"aligner": {"kind": "transformer"},
                                                              "evaluate": {"benchmarks": ["pv21", "pv20"]}}))
    (tmp_path / "train.py").write_text(TRAIN)
    (tmp_path / "evaluate.py").write_text(EVALUATE)
    python = sys.executable
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {
        "train": {"cmd": f"{python} train.py", "deps": ["train.py"], "params": ["aligner"], "outs": ["model.txt"]},
        "evaluate": {"foreach": "${evaluate.benchmarks}", "do": {
            "cmd": f"{python} evaluate.py ${{item}}", "deps": ["model.txt", "evaluate.py"],
            "metrics": [{"metrics/${item}.json": {"cache": False}}]}},
    }}))
    env = {**os.environ, "PYTHONPATH": str(REPO), "DVC_NO_ANALYTICS": "1"}

    def run(*args: str) -> str:
        done = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    git = ("git", "-c", "user.email=t@t", "-c", "user.name=t")
    run(*git, "init", "-q")
    run(dvc_command(), "init", "-q")
    run(dvc_command(), "repro", "-q")
    run(*git, "add", "-A")
    run(*git, "commit", "-qm", "baseline")
    run(dvc_command(), "exp", "run", "-q", "--temp", "-S", "aligner.kind=linear", "evaluate@pv21")
    rows = list(csv.DictReader(io.StringIO(run(dvc_command(), "exp", "show", "--csv", "--no-pager"))))
    baseline = next(r for r in rows if r["typ"] == "baseline" and r["rev"] != "workspace")
    ablation = next(r for r in rows if r["typ"] != "baseline")
    assert (baseline["metrics/pv21.json:mIoU_base"], baseline["metrics/pv20.json:mIoU_base"]) == ("15", "15")
    assert ablation["aligner.kind"] == "linear" and ablation["metrics/pv21.json:mIoU_base"] == "10"
    assert ablation["metrics/pv20.json:mIoU_base"] in ("!", "-", "")  # no number: pv20 was not evaluated
