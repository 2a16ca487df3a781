"""`fmbseg compare`: the ablation table of the tracked runs, as the MLflow UI compares them.

Each row is one trained model (one MLflow run); the columns are the settings that differ between
the runs shown (the ablation axes, found rather than configured) and every benchmark's mIoU.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import typer

from components.config import load_params

__all__ = ["ablation_table", "register"]


def ablation_table(runs: pd.DataFrame, metric_suffixes: tuple[str, ...] = ("mIoU_base", "mIoU_refined")) -> pd.DataFrame:
    """Rows = runs; columns = run name, the params that vary, the matching metrics and their mean.

    ``runs`` is ``mlflow.search_runs`` output (``params.*``, ``metrics.*``, ``tags.*`` columns).
    """
    if runs.empty:
        return pd.DataFrame()
    param_cols = [c for c in runs.columns if c.startswith("params.")]
    varying = [c for c in param_cols if runs[c].astype(str).nunique(dropna=False) > 1]
    metric_cols = sorted(c for c in runs.columns if c.startswith("metrics.") and c.endswith(metric_suffixes))
    table = pd.DataFrame({"run": runs.get("tags.mlflow.runName", runs["run_id"])})
    for col in varying:
        table[col.removeprefix("params.")] = runs[col]
    for col in metric_cols:
        table[col.removeprefix("metrics.")] = runs[col].round(2)
    for suffix in metric_suffixes:
        cols = [c for c in metric_cols if c.endswith(suffix)]
        if cols:
            table[f"mean/{suffix}"] = runs[cols].mean(axis=1).round(2)
    return table.reset_index(drop=True)


def register(app: typer.Typer) -> None:
    @app.command("compare")
    def compare_cmd(
        params: Path = typer.Option(Path("params.yaml"), "--params", help="settings file"),
        experiment: str = typer.Option(None, help="MLflow experiment (default: tracking.experiment)"),
        last: int = typer.Option(50, help="the most recent N trained-model runs"),
        out: Path = typer.Option(None, help="also write the table as CSV here"),
    ) -> None:
        """Print the side-by-side table of trained models (ablations) from MLflow."""
        from flows import tracking

        settings = load_params(params)
        runs = tracking.model_runs(settings, experiment=experiment, max_results=last)
        table = ablation_table(runs)
        if table.empty:
            typer.echo("no trained-model runs yet in " + tracking.tracking_uri(settings))
            raise typer.Exit(0)
        with pd.option_context("display.max_columns", None, "display.width", 200):
            typer.echo(table.to_string(index=False))
        if out is not None:
            from components.io import atomic_write_text

            atomic_write_text(out, table.to_csv(index=False))
