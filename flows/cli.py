"""`fmbseg`: one subcommand per DVC stage (each runs that stage's Prefect flow) plus tools.

Heavy imports (torch, prefect, mlflow) happen inside the commands, so `fmbseg --help` is instant.
"""

from __future__ import annotations

import importlib
import os

import typer

app = typer.Typer(
    name="fmbseg",
    help="Annotation-free open-vocabulary semantic segmentation from CLIP, SAM and DINOv2.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _main(ctx: typer.Context) -> None:
    """Annotation-free open-vocabulary semantic segmentation from CLIP, SAM and DINOv2."""
    parent = os.environ.get("FMBSEG_PARENT_FLOW_RUN")
    if parent:  # a stage started by the pipeline/nightly flow: its flow run carries the parent's id
        from prefect import tags

        ctx.with_resource(tags(f"parent-flow-run:{parent}"))


# Each module defines `register(app)`, adding its commands; one module per stage or tool.
_COMMAND_MODULES: tuple[str, ...] = ("weights", "download", "pipeline", "nightly", "evaluate", "report", "features", "train", "label", "balance", "compare")

for _name in _COMMAND_MODULES:
    importlib.import_module(f"flows.{_name}").register(app)


if __name__ == "__main__":
    app()
