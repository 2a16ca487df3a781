"""`fmbseg export`: a Stage 1 store as PNG label maps + COCO JSON (the `export` flow).

The store is ``${paths.stage1}`` of params.yaml, or ``--store``. What lands in the output
folder is ``components.labelling.export``. A missing store, an unknown variant or a store of more
classes than a uint8 map holds is reported in one line before anything is written (exit 2).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.common import PARAMS_FILE

__all__ = ["VARIANT_HELP", "check_export", "export_variant_task", "export_flow", "register"]

VARIANT_HELP = ("stage1_1 (SAM prompted by CLIP), stage1_2 (SAM's automatic masks labelled by CLIP), both, or "
                "stage1_sam3 (the SAM 3 concept teacher's maps: a store labelled with models.teacher)")


def check_export(store: str, variant: str) -> list[str]:
    """The variants to export from ``store``, after checking that the store can be exported.
    Raises FileNotFoundError / ValueError with a message for the user."""
    from components.labelling.export import check_variants, store_vocabulary
    from components.labelling.store import PseudoLabels

    variants = check_variants([variant])
    labels = PseudoLabels(store)
    store_vocabulary(labels)
    for name in variants:
        if not labels.has_variant(name):
            raise ValueError(f"{store} holds no {name} maps: label with models.teacher set (e.g. sam3)")
    return variants


@task(name="export-variant", cache_policy=NO_CACHE, task_run_name="export-{variant}")
def export_variant_task(store: str, out: str, variant: str) -> dict[str, Any]:
    """One variant's label maps and COCO file (components.labelling.export.export_variant)."""
    from components.labelling.export import export_variant
    from components.labelling.store import PseudoLabels

    return export_variant(PseudoLabels(store), out, variant)._asdict()


@flow(name="export", log_prints=True)
def export_flow(store: str, out: str, variant: str = "both") -> dict[str, Any]:
    """Export the Stage 1 store ``store`` into ``out``: classes.txt, then each variant."""
    from components.labelling.export import write_classes
    from components.labelling.store import PseudoLabels

    variants = check_export(store, variant)
    classes = write_classes(PseudoLabels(store), out)
    log = get_run_logger()
    results = {}
    for name in variants:
        results[name] = export_variant_task(store, out, name)
        log.info("%s: %d label maps in %s, %d annotations in %s", name, results[name]["images"],
                 results[name]["labels_dir"], results[name]["annotations"], results[name]["coco_json"])
    return {"store": store, "out": out, "classes": classes.as_posix(), "variants": results}


def register(app: typer.Typer) -> None:
    @app.command("export")
    def export_cmd(
        out: Path = typer.Option(..., "--out", help="output folder"),
        store: Path = typer.Option(None, "--store", help="a Stage 1 store (default: ${paths.stage1})"),
        variant: str = typer.Option("both", "--variant", help=VARIANT_HELP),
        params: Path = typer.Option(Path(PARAMS_FILE), help="settings file (for the default store)"),
    ) -> None:
        """Write a Stage 1 store as PNG label maps and a COCO JSON file per variant."""
        try:
            if store is None:
                from flows.common import output_root, stage_params

                store = output_root(stage_params(params))
            check_export(str(store), variant)
        except (FileNotFoundError, ValueError) as err:  # ConfigError is a ValueError
            typer.echo(f"fmbseg export: {err}", err=True)
            raise typer.Exit(2) from None
        typer.echo(json.dumps(export_flow(str(store), str(out), variant), indent=2))
