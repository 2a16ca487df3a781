"""`fmbseg report` (the report DVC stage): every benchmark x {base, refined}, next to the paper.

Reads ``${paths.metrics}/<benchmark>.json`` for each of ``evaluate.benchmarks`` (and, when
present, the Stage 1 scores ``${paths.stage1_metrics}/<benchmark>_<variant>.json``), writes
``${paths.report_md}``, ``${paths.report_csv}`` and ``${paths.stage1_csv}`` (benchmark, variant,
mIoU, paper), prints the markdown. With ``--model`` the three files are also attached to that
checkpoint's MLflow run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from components.config import Params
from components.io import atomic_write_text
from flows.common import markdown_artifact, project_path, stage_params
from flows.deferred import flow, get_run_logger

__all__ = ["report_flow", "read_metrics", "read_stage1_metrics", "register"]


def read_metrics(params: Params) -> dict[str, dict[str, float] | None]:
    """benchmark -> its metrics JSON, None where the benchmark was not evaluated."""
    metrics_dir = project_path(params, "metrics")
    out: dict[str, dict[str, float] | None] = {}
    for name in params.evaluate.benchmarks:
        path = metrics_dir / f"{name}.json"
        out[name] = json.loads(path.read_text(encoding="utf-8")) if path.exists() else None
    return out


def read_stage1_metrics(params: Params) -> dict[tuple[str, str], dict[str, float]]:
    """(benchmark, variant) -> the evaluate-stage1 metrics JSON, for every such file present."""
    from components.labelling.settings import STAGE1_VARIANTS, TEACHER_EVAL_VARIANTS

    stage1_dir = project_path(params, "stage1_metrics")
    out: dict[tuple[str, str], dict[str, float]] = {}
    for name in dict.fromkeys([*params.evaluate.stage1_benchmarks, *params.evaluate.benchmarks]):
        for variant in STAGE1_VARIANTS + TEACHER_EVAL_VARIANTS:
            path = stage1_dir / f"{name}_{variant}.json"
            if path.exists():
                out[(name, variant)] = json.loads(path.read_text(encoding="utf-8"))
    return out


@flow(name="report", flow_run_name="report")
def report_flow(params_path: str = "params.yaml", model_path: str | None = None) -> str:
    """The report stage; returns the markdown."""
    from components.evaluation.report import (
        REPORT_COLUMNS,
        STAGE1_COLUMNS,
        report_rows,
        settings_label,
        stage1_rows,
        to_csv,
        to_markdown,
    )

    logger = get_run_logger()
    params = stage_params(params_path)
    metrics = read_metrics(params)
    missing = [name for name, values in metrics.items() if values is None]
    if missing:
        logger.warning("not evaluated yet (shown as —): %s", ", ".join(missing))
    ev = params.evaluate
    settings = {name: settings_label(ev.for_benchmark(name).model_dump(mode="json"), ev.protocol)
                for name in ev.benchmarks}
    rows = report_rows(metrics, ev.benchmarks, settings, protocol=ev.protocol)
    title = f"# fmbseg results ({params.models.profile} profile)"
    parts = [title, "", "mIoU (%), ours and the paper's Table 1 (FMbSeg-Stage 2); published: what the authors of "
             f"the protocol ({ev.protocol or 'none named'}) publish for their own method under it.", "",
             to_markdown(rows, REPORT_COLUMNS)]
    stage1 = read_stage1_metrics(params)
    if stage1:
        parts += ["## Stage 1 pseudo labels", "", "mIoU (%), ours and the paper's Table 2.", "",
                  to_markdown(stage1_rows(stage1), STAGE1_COLUMNS)]
    markdown = "\n".join(parts)
    md_path, csv_path, stage1_path = (project_path(params, key) for key in ("report_md", "report_csv", "stage1_csv"))
    atomic_write_text(md_path, markdown)
    atomic_write_text(csv_path, to_csv(rows, REPORT_COLUMNS))
    atomic_write_text(stage1_path, to_csv(stage1_rows(stage1), STAGE1_COLUMNS))
    markdown_artifact(markdown, key="report", description="every benchmark x {base, refined}, next to the paper")
    if model_path is not None:
        _attach_report(params, Path(model_path), [md_path, csv_path, stage1_path])
    return markdown


def _attach_report(params: Params, model_path: Path, files: list[Path]) -> None:
    """The report files as artifacts of the checkpoint's MLflow run (an error when it has none)."""
    from components.aligner.checkpoint import load_aligner
    from flows import tracking

    run_id: Any = load_aligner(model_path).run_id
    if run_id is None or not tracking.run_exists(params, run_id):
        raise ValueError(f"{model_path} names MLflow run {run_id!r}, which is not in {tracking.tracking_uri(params)}")
    tracking.attach_metrics(run_id, {}, files, artifact_path="report", params=params)


def register(app: typer.Typer) -> None:
    @app.command("report")
    def report_cmd(
        params: Path = typer.Option(Path("params.yaml"), help="settings file"),
        model: Path = typer.Option(None, help="also attach the report to this checkpoint's MLflow run"),
    ) -> None:
        """One table of every benchmark x {base, refined}, next to the paper's numbers (the report stage)."""
        typer.echo(report_flow(str(params), str(model) if model else None))
