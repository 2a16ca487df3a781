"""`fmbseg export`: a Stage 1 store as PNG label maps + COCO JSON (the `export` flow).

The store is ``${paths.stage1}`` of params.yaml, or ``--store``. What lands in the output
folder is ``components.labelling.export``. A missing store, an unknown variant, a store of more
classes than a 16-bit map holds, or an output folder holding files fmbseg did not write at the
paths the export replaces (components.outputs: never replaced, even with ``--overwrite``, which only
allows writing into a non-empty folder of the user's) is reported in one line before anything is
written (exit 2).
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

VARIANT_HELP = "stage1_1 (SAM prompted by CLIP), stage1_2 (SAM's automatic masks labelled by CLIP) or both"


def check_export(store: str, variant: str, out: str, *, overwrite: bool = False) -> tuple[list[str], list[str]]:
    """(variants to export from ``store``, files the export writes under ``out``), after checking
    that the store can be exported and ``out`` may take them. Writes nothing. Raises
    FileNotFoundError / ValueError with a message for the user."""
    from components.labelling.export import check_variants, export_outputs, store_vocabulary
    from components.labelling.store import PseudoLabels
    from components.outputs import check_output_folder

    variants = check_variants([variant])
    labels = PseudoLabels(store)
    store_vocabulary(labels)
    files, trees = export_outputs(labels, variants)
    check_output_folder(out, files, overwrite=overwrite, trees=trees)
    return variants, files


@task(name="export-variant", cache_policy=NO_CACHE, task_run_name="export-{variant}")
def export_variant_task(store: str, out: str, variant: str) -> dict[str, Any]:
    """One variant's label maps and COCO file (components.labelling.export.export_variant)."""
    from components.labelling.export import export_variant
    from components.labelling.store import PseudoLabels

    return export_variant(PseudoLabels(store), out, variant)._asdict()


@flow(name="export", log_prints=True)
def export_flow(store: str, out: str, variant: str = "both", overwrite: bool = False) -> dict[str, Any]:
    """Export the Stage 1 store ``store`` into ``out``: classes.txt, then each variant."""
    from components.labelling.export import write_classes
    from components.labelling.store import PseudoLabels
    from components.outputs import claim_outputs

    variants, files = check_export(store, variant, out, overwrite=overwrite)
    claim_outputs(out, files)
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
        overwrite: bool = typer.Option(False, "--overwrite",
                                       help="write into a non-empty folder fmbseg did not create (its files are "
                                            "never replaced)"),
    ) -> None:
        """Write a Stage 1 store as PNG label maps and a COCO JSON file per variant."""
        try:
            if store is None:
                from flows.common import output_root, stage_params

                store = output_root(stage_params(params))
            check_export(str(store), variant, str(out), overwrite=overwrite)
        except (FileNotFoundError, ValueError) as err:  # ConfigError is a ValueError
            typer.echo(f"fmbseg export: {err}", err=True)
            raise typer.Exit(2) from None
        typer.echo(json.dumps(export_flow(str(store), str(out), variant, overwrite), indent=2))
