"""`fmbseg import-labels FILE`: a COCO file of corrected masks (from CVAT, Label Studio, ...) into the
corrections folder, where `balance` prefers them over Stage 1's maps (components.labelling.corrections).

The store is ``${paths.stage1}`` and the corrections folder ``${paths.corrections}`` of params.yaml,
or ``--store S`` and the folder ``corrections`` next to it. ``--init`` only makes sure the folder
holds a corrections file (the DVC stage ``corrections``, whose output the folder is). Any problem
with the file (images or ids that match nothing in the store, classes not in its vocabulary, sizes
that differ) is one line on stderr, exit 2, and nothing is imported.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from flows.common import PARAMS_FILE

__all__ = ["register"]


def _folders(store: Path | None, params: Path) -> tuple[Path, Path]:
    """(Stage 1 store, corrections folder)."""
    if store is not None:
        return store, store.parent / "corrections"
    from flows.common import output_root, project_path, stage_params

    settings = stage_params(params)
    return output_root(settings), project_path(settings, "corrections")


def register(app: typer.Typer) -> None:
    @app.command("import-labels")
    def import_labels_cmd(
        file: Path = typer.Argument(None, help="a COCO JSON file of corrected masks"),
        store: Path = typer.Option(None, "--store", show_default="${paths.stage1}",
                                   help="a Stage 1 store; its corrections go in the folder `corrections` next to it"),
        init: bool = typer.Option(False, "--init", help="only create an empty corrections file if there is none"),
        params: Path = typer.Option(Path(PARAMS_FILE), help="settings file (for the default folders)"),
    ) -> None:
        """Import corrected masks (COCO) for some images; `balance` then prefers them over Stage 1's maps."""
        from components.labelling.corrections import CORRECTIONS_FILE, empty_corrections, import_corrections

        try:
            if (file is None) == (not init):
                raise ValueError("give a COCO FILE to import, or --init")
            store_root, root = _folders(store, params)
            if init:
                if not (root / CORRECTIONS_FILE).exists():
                    empty_corrections(root)
                typer.echo(f"{root / CORRECTIONS_FILE}")
                return
            from components.labelling.store import PseudoLabels

            if not file.is_file():
                raise FileNotFoundError(f"no such file: {file}")
            report = import_corrections(file, PseudoLabels(store_root), root)
        except (FileNotFoundError, ValueError) as err:
            typer.echo(f"fmbseg import-labels: {err}", err=True)
            raise typer.Exit(2) from None
        for line in report.clipped:
            typer.echo(f"clipped to its image: {line}", err=True)
        if report.unannotated:
            typer.echo(f"not imported, no annotation: {', '.join(report.unannotated)}", err=True)
        typer.echo(json.dumps({"imported": len(report.images), "images": report.images, "clipped": len(report.clipped),
                               "unannotated": len(report.unannotated), "corrections": str(root / CORRECTIONS_FILE),
                               "source": report.source}, indent=2))
