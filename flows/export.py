"""`fmbseg export`: a Stage 1 store as PNG label maps + COCO JSON (the `export` flow), or a store
or a `fmbseg predict` folder in a labelling tool's format (``--format``, the `export-format` flow).

The store is ``${paths.stage1}`` of params.yaml, or ``--store``. What lands in the output
folder is ``components.labelling.export``; with ``--format coco-polygons|yolo-seg|label-studio``
(or ``--predictions DIR``) it is ``components.labelling.formats``: one folder per variant,
``OUT/<variant>/``, or ``OUT/predictions/`` for a predict folder. A missing store, an unknown variant
or format, a store of more classes than a 16-bit map holds, or an output folder holding files fmbseg
did not write at the paths the export replaces (components.outputs: never replaced, even with
``--overwrite``, which only allows writing into a non-empty folder of the user's) is reported in one
line before anything is written (exit 2). The command runs its flow as a Prefect flow run only with
a Prefect server configured (flows.runmode), else as plain calls of the same functions.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from flows import runmode
from flows.common import PARAMS_FILE, Progress
from flows.deferred import NO_CACHE, flow, task

__all__ = ["VARIANT_HELP", "check_export", "export_variant_task", "export_flow", "check_format_export",
           "export_format_task", "export_format_flow", "register"]

VARIANT_HELP = ("stage1_1 (SAM prompted by CLIP), stage1_2 (SAM's automatic masks labelled by CLIP), both, or "
                "stage1_sam3 (the SAM 3 concept teacher's maps: a store labelled with models.teacher)")


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
    for name in variants:
        if not labels.has_variant(name):
            raise ValueError(f"{store} holds no {name} maps: label with models.teacher set (e.g. sam3)")
    files, trees = export_outputs(labels, variants)
    check_output_folder(out, files, overwrite=overwrite, trees=trees)
    return variants, files


@task(name="export-variant", cache_policy=NO_CACHE, task_run_name="export-{variant}")
def export_variant_task(store: str, out: str, variant: str) -> dict[str, Any]:
    """One variant's label maps and COCO file (components.labelling.export.export_variant)."""
    from components.labelling.export import export_variant
    from components.labelling.store import PseudoLabels

    labels = PseudoLabels(store)
    key = f"export-{variant}".replace("_", "-")  # a Prefect artifact key: lowercase letters, digits, dashes
    with Progress(len(labels.image_ids), desc=f"export {variant}", key=key) as bar:
        return export_variant(labels, out, variant, on_image=bar.update)._asdict()


@flow(name="export", flow_run_name="export-{variant}", log_prints=True)
def export_flow(store: str, out: str, variant: str = "both", overwrite: bool = False) -> dict[str, Any]:
    """Export the Stage 1 store ``store`` into ``out``: classes.txt, then each variant."""
    from components.labelling.export import write_classes
    from components.labelling.store import PseudoLabels
    from components.outputs import claim_outputs

    variants, files = check_export(store, variant, out, overwrite=overwrite)
    claim_outputs(out, files)
    classes = write_classes(PseudoLabels(store), out)
    log = runmode.logger()
    results = {}
    for name in variants:
        results[name] = runmode.call(export_variant_task, store, out, name)
        log.info("%s: %d label maps in %s, %d annotations in %s", name, results[name]["images"],
                 results[name]["labels_dir"], results[name]["annotations"], results[name]["coco_json"])
    return {"store": store, "out": out, "classes": classes.as_posix(), "variants": results}


PREDICTIONS_FOLDER = "predictions"  # OUT/<this>/: where a predict folder's export goes


def check_format_export(fmt: str, out: str, *, store: str | None, predictions: str | None, variant: str,
                        overwrite: bool) -> list[tuple[str | None, str]]:
    """(variant, target folder) pairs to write (variant None for a predict folder, written to
    ``OUT/predictions/``), after checking the format, the source and that ``out`` may take them
    (components.outputs: each target is replaced whole, so it may hold only what fmbseg wrote).
    Writes nothing. Raises FileNotFoundError / ValueError with a message for the user."""
    from components.labelling.export import check_variants, store_vocabulary
    from components.labelling.formats import writer
    from components.labelling.formats.source import is_predict_folder
    from components.labelling.store import PseudoLabels
    from components.outputs import check_output_folder

    writer(fmt)
    if predictions is not None:
        if not is_predict_folder(predictions):
            raise FileNotFoundError(f"{predictions} is not a `fmbseg predict` output folder (no predictions.jsonl)")
        names: list[str | None] = [None]
    else:
        assert store is not None
        names = list(check_variants([variant]))
        labels = PseudoLabels(store)
        store_vocabulary(labels)
        for name in names:
            if not labels.has_variant(name):
                raise ValueError(f"{store} holds no {name} maps: label with models.teacher set (e.g. sam3)")
    folders = [name or PREDICTIONS_FOLDER for name in names]
    check_output_folder(out, [f"{folder}/" for folder in folders], overwrite=overwrite, trees=folders)
    return [(name, (Path(out) / folder).as_posix()) for name, folder in zip(names, folders, strict=True)]


@task(name="export-format", cache_policy=NO_CACHE, task_run_name="export-{fmt}-{variant}")
def export_format_task(fmt: str, target: str, *, store: str | None, predictions: str | None,
                       variant: str | None) -> dict[str, Any]:
    """One folder in format ``fmt`` (components.labelling.formats), written whole into ``target``
    (checked and claimed by the flow first)."""
    from components.labelling.formats import writer
    from components.labelling.formats.source import predict_classes, predict_images, store_images
    from components.labelling.formats.target import fresh_folder
    from components.labelling.store import PseudoLabels

    if predictions is not None:
        classes, images, what = predict_classes(predictions), predict_images(predictions), f"fmbseg predict {predictions}"
    else:
        labels = PseudoLabels(str(store))
        classes, images, what = labels.vocabulary, store_images(labels, str(variant)), f"fmbseg {variant} {store}"
    with fresh_folder(target) as partial:
        summary = writer(fmt)(images, classes, str(partial), what)
    return {"format": fmt, "out": target, **summary}


@flow(name="export-format", flow_run_name="export-{fmt}", log_prints=True)
def export_format_flow(fmt: str, out: str, store: str | None = None, predictions: str | None = None,
                       variant: str = "both", overwrite: bool = False) -> dict[str, Any]:
    """Export a store's variants (or a predict folder) in format ``fmt`` into ``out``."""
    from components.outputs import claim_outputs

    targets = check_format_export(fmt, out, store=store, predictions=predictions, variant=variant,
                                  overwrite=overwrite)
    claim_outputs(out, [f"{Path(target).name}/" for _, target in targets])
    log = runmode.logger()
    results = {}
    for name, target in targets:
        results[name or "predictions"] = result = runmode.call(
            export_format_task, fmt, target, store=store, predictions=predictions, variant=name)
        log.info("%s: %s", target, result)
    return {"format": fmt, "out": out, "results": results}


def register(app: typer.Typer) -> None:
    @app.command("export")
    def export_cmd(
        out: Path = typer.Option(..., "--out", help="output folder"),
        store: Path = typer.Option(None, "--store", show_default="${paths.stage1}", help="a Stage 1 store"),
        variant: str = typer.Option("both", "--variant", help=VARIANT_HELP),
        params: Path = typer.Option(Path(PARAMS_FILE), help="settings file (for the default store)"),
        fmt: str = typer.Option("coco", "--format", help="coco (PNG maps + COCO RLE), coco-polygons, yolo-seg "
                                "or label-studio"),
        predictions: Path = typer.Option(None, "--predictions", help="export a `fmbseg predict` output folder "
                                         "instead of a store (into OUT/predictions/)"),
        overwrite: bool = typer.Option(False, "--overwrite",
                                       help="write into a non-empty folder fmbseg did not create (its files are "
                                            "never replaced)"),
    ) -> None:
        """Write a Stage 1 store as PNG label maps and a COCO JSON file per variant, or a store or a
        predict folder in a labelling tool's format (--format)."""
        if fmt != "coco" or predictions is not None:
            try:
                if predictions is not None and store is not None:
                    raise ValueError("give --store or --predictions, not both")
                if predictions is None and store is None:
                    from flows.common import output_root, stage_params

                    store = output_root(stage_params(params))
                kwargs: dict[str, Any] = {"store": None if store is None else str(store),
                                          "predictions": None if predictions is None else str(predictions),
                                          "variant": variant, "overwrite": overwrite}
                check_format_export(fmt, str(out), **kwargs)
            except (FileNotFoundError, ValueError) as err:  # ConfigError is a ValueError
                typer.echo(f"fmbseg export: {err}", err=True)
                raise typer.Exit(2) from None
            typer.echo(json.dumps(runmode.run(export_format_flow, fmt, str(out), **kwargs), indent=2))
            return
        try:
            if store is None:
                from flows.common import output_root, stage_params

                store = output_root(stage_params(params))
            check_export(str(store), variant, str(out), overwrite=overwrite)
        except (FileNotFoundError, ValueError) as err:  # ConfigError is a ValueError
            typer.echo(f"fmbseg export: {err}", err=True)
            raise typer.Exit(2) from None
        typer.echo(json.dumps(runmode.run(export_flow, str(store), str(out), variant, overwrite), indent=2))
