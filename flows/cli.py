"""`fmbseg`: one subcommand per DVC stage (each runs that stage's Prefect flow) plus tools.

Commands load lazily: `fmbseg <command>` imports only the module that defines it (each module's
`register(app)` adds its commands), so a DVC stage like `fmbseg sync` does not pay for importing
torch, transformers and mlflow, and `fmbseg --help` is instant.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

import click
import typer
from typer.core import TyperGroup

# command -> (module under flows/, one-line help shown by `fmbseg --help`)
COMMANDS: dict[str, tuple[str, str]] = {
    "download": ("download", "Download (or locate) a dataset's sources, verify them and convert them."),
    "sync": ("nightly", "Copy new images from nightly.source_dir into paths.incoming (the sync stage)."),
    "label": ("label", "Stage 1: pseudo labels from CLIP + SAM for every image (resumable)."),
    "export": ("export", "A Stage 1 store as PNG label maps and a COCO JSON file per variant."),
    "show": ("label", "Write a picture of one image's Stage 1.1 and Stage 1.2 labels."),
    "balance": ("balance", "The training index: every Stage 1.1 map + a seeded share of Stage 1.2 maps."),
    "features": ("features", "Cache frozen DINOv2 patch features for the training images."),
    "train": ("train", "Train the aligner with TSupCon (one MLflow run per model)."),
    "evaluate": ("evaluate", "Evaluate the model on one benchmark, base and SAM-refined."),
    "evaluate-stage1": ("evaluate", "Score Stage 1's pseudo labels on a benchmark (paper Table 2)."),
    "predict": ("predict", "Segment new images with a trained model, for any class names (resumable)."),
    "report": ("report", "The benchmark table next to the paper's numbers (markdown + CSV)."),
    "compare": ("compare", "The side-by-side table of trained models (ablations) from MLflow."),
    "weights": ("weights", "Model weights: what a profile needs, and fetching it."),
    "pipeline": ("pipeline", "Run the whole pipeline (dvc repro) as one Prefect flow."),
    "demo": ("pipeline", "The whole pipeline on synthetic data with miniature models."),
    "nightly": ("nightly", "Run the nightly relabel-and-retrain job once, now."),
    "schedule": ("nightly", "Schedule the nightly job as a Prefect deployment (or serve it)."),
}


class _LazyGroup(TyperGroup):
    """A click group whose commands are built from their module on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in COMMANDS:
            return None
        module = importlib.import_module(f"flows.{COMMANDS[cmd_name][0]}")
        sub = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
        sub.callback()(lambda: None)  # always a group, so one-command modules resolve the same way
        module.register(sub)
        group = typer.main.get_group(sub)
        return group.get_command(ctx, cmd_name)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        with formatter.section("Commands"):
            formatter.write_dl([(name, help_) for name, (_, help_) in COMMANDS.items()])


app = typer.Typer(
    name="fmbseg",
    cls=_LazyGroup,
    help="Annotation-free open-vocabulary semantic segmentation from CLIP, SAM and DINOv2.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


@app.callback()
def _main(ctx: typer.Context) -> None:
    """Annotation-free open-vocabulary semantic segmentation from CLIP, SAM and DINOv2."""
    parent = os.environ.get("FMBSEG_PARENT_FLOW_RUN")
    if parent:  # a stage started by the pipeline/nightly flow: its flow run carries the parent's id
        from prefect import tags

        ctx.with_resource(tags(f"parent-flow-run:{parent}"))


def main(*args: Any) -> None:
    """Console-script entry point."""
    app(*args)


if __name__ == "__main__":
    app()
