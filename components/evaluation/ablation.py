"""The ablation table: tracked runs side by side, as the MLflow UI compares them.

Each row is one trained model (one MLflow run); the columns are the settings that differ between
the runs shown (the ablation axes, found rather than configured), every benchmark's mIoU and the
mean over benchmarks.
"""

from __future__ import annotations

import pandas as pd

__all__ = ["ablation_table"]


def ablation_table(runs: pd.DataFrame, metric_suffixes: tuple[str, ...] = ("mIoU_base", "mIoU_refined")) -> pd.DataFrame:
    """Rows = runs; columns = run name, the params that vary, the matching metrics and their mean.

    ``runs`` is ``mlflow.search_runs`` output (``params.*``, ``metrics.*``, ``tags.*`` columns).
    """
    if runs.empty:
        return pd.DataFrame()
    param_cols = [c for c in runs.columns if c.startswith("params.")]
    varying = [c for c in param_cols if runs[c].astype(str).nunique(dropna=False) > 1]
    # per-benchmark scores; the run's own mean/* metrics are recomputed below, never averaged in
    metric_cols = sorted(c for c in runs.columns if c.startswith("metrics.") and c.endswith(metric_suffixes)
                         and not c.startswith("metrics.mean/"))
    table = pd.DataFrame({"run": runs.get("tags.mlflow.runName", runs["run_id"])})
    for col in varying:
        table[col.removeprefix("params.")] = runs[col]
    for col in metric_cols:
        table[col.removeprefix("metrics.")] = runs[col].round(2)
    for suffix in metric_suffixes:
        cols = [c for c in metric_cols if c.endswith(suffix)]
        if cols:
            # a run evaluated on some of the benchmarks only (the demo's ablation) gets no mean:
            # the mean of fewer benchmarks would read as comparable with the others'
            table[f"mean/{suffix}"] = runs[cols].mean(axis=1, skipna=False).round(2)
    return table.reset_index(drop=True)
