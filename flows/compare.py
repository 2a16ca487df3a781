"""`fmbseg compare`: the ablation table (components/evaluation/ablation.py) of the tracked runs."""

from __future__ import annotations

from pathlib import Path

import typer

from components.config import load_params

__all__ = ["register"]


def register(app: typer.Typer) -> None:
    @app.command("compare")
    def compare_cmd(
        params: Path = typer.Option(Path("params.yaml"), "--params", help="settings file"),
        experiment: str = typer.Option(None, show_default="tracking.experiment", help="MLflow experiment"),
        last: int = typer.Option(50, help="the most recent N trained-model runs"),
        out: Path = typer.Option(None, help="also write the table as CSV here"),
    ) -> None:
        """Print the side-by-side table of trained models (ablations) from MLflow."""
        import pandas as pd  # here, not at the top (as mlflow and torch below): `compare -h` answers at once

        from components.evaluation.ablation import ablation_table
        from flows import tracking

        settings = load_params(params)
        runs = tracking.model_runs(settings, experiment=experiment, max_results=last)
        table = ablation_table(runs)
        if table.empty:
            typer.echo("no trained-model runs yet in " + tracking.tracking_uri(settings))
            raise typer.Exit(0)
        with pd.option_context("display.max_columns", None, "display.width", 200):
            typer.echo(table.to_string(index=False))
        typer.echo(f"in the MLflow UI (`make ui`): {tracking.headline_url(settings, experiment=experiment)}", err=True)
        if out is not None:
            from components.io import atomic_write_text

            atomic_write_text(out, table.to_csv(index=False))
