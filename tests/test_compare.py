"""`fmbseg compare`: the ablation axes are found (the params that differ), metrics side by side."""

from __future__ import annotations

import math

import pandas as pd

from components.evaluation.ablation import ablation_table


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
