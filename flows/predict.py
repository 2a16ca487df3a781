"""`fmbseg predict`: segment new images with a trained model, for any class names (the `predict` flow).

The model is a checkpoint path, ``runs:/<run_id>``, ``models:/<name>@<alias>`` or ``models:/<name>/latest`` (resolved by
``model_registry.resolve_model_uri``; default: the registered champion when the store has one, else
``${paths.checkpoint}``). The checkpoint describes itself (DINOv2, CLIP, SAM, window
protocol), so a model of any profile runs from any project; params.yaml supplies only the device,
dtype and weights folder. What lands in the output folder, and how a rerun resumes, is
``components.predictions``. Everything a user can get wrong (sources, classes, model, an output
folder that holds a source or files fmbseg did not write: components.outputs) is checked before
any model loads and before any write; the command prints one line and exits 2 for it. A run holds
the lock ``label`` takes on its output (components.io.output_lock): a second run on the same
``--out`` exits 75 naming the holder. The flow is a Prefect flow run only with a Prefect server
configured (flows.runmode), else plain calls of the same functions: no server starts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from components.config import Params
from flows import runmode
from flows.common import PARAMS_FILE, Progress, class_lines, stage_params
from flows.deferred import NO_CACHE, flow, task

__all__ = ["class_lines", "prepare", "segment_images", "predict_flow", "run_predict", "register"]

READ_WORKERS = 2  # decoding threads ahead of the model


def prepare(params: Params, sources: list[str], out: str, *, classes: str | None, vocabulary: str | None,
            model: str | None, refine: bool, overlays: bool, batch_size: int, overwrite: bool = False,
            max_pixels: int | None = None, overlay_size: str | None = None) -> dict[str, Any]:
    """Check every user input and resolve it, loading no foundation model and writing nothing: the
    job of the task (plain types). max_pixels None: components.predictions.DEFAULT_MAX_PIXELS;
    overlay_size: ``full`` or a panel height in pixels (None: the overlays' default height).
    Raises FileNotFoundError / ValueError with a message for the user."""
    from components.aligner.checkpoint import load_aligner
    from components.io import file_sha256
    from components.models import resolve_device
    from components.outputs import check_apart, check_output_folder
    from components.overlay import PANEL_HEIGHT, overlay_height
    from components.predictions import DEFAULT_MAX_PIXELS, list_sources, planned_outputs, settings_key
    from flows.model_registry import resolve_model_uri

    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    max_pixels = DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels
    if max_pixels < 1:
        raise ValueError(f"--max-pixels must be >= 1, got {max_pixels}")
    height = PANEL_HEIGHT if overlay_size is None else overlay_height(overlay_size)
    if overlay_size is not None and not overlays:
        raise ValueError("--overlay-size goes with --overlays")
    lines = class_lines(classes, vocabulary)
    if overlays and len(lines) > 255:
        raise ValueError(f"--overlays colours at most 255 classes; the vocabulary has {len(lines)}")
    listed, pre_skipped, folders = list_sources(sources, external_symlinks=params.label.external_symlinks)
    check_apart(out, folders, files=[s.path for s in listed])
    planned = planned_outputs(listed, overlays=overlays)
    check_output_folder(out, planned, overwrite=overwrite)
    checkpoint = resolve_model_uri(model, params)
    loaded = load_aligner(checkpoint)  # a checkpoint of another format is refused here, with the fix
    device = resolve_device(params.models.device)
    dtype = params.models.dtype if device.type == "cuda" else "fp32"  # the CPU always runs fp32
    model_sha = file_sha256(checkpoint)
    key = settings_key({"model": model_sha, "classes": lines, "refine": refine,
                        "inference": loaded.inference.to_dict(), "dtype": dtype})
    return {
        "checkpoint": str(checkpoint), "model_sha256": model_sha, "classes": lines,
        "sources": [[s.path.as_posix(), s.relative.as_posix()] for s in listed], "out": out, "key": key,
        "skipped": [list(row) for row in pre_skipped], "planned": planned, "overwrite": overwrite,
        "max_pixels": max_pixels,
        "refine": refine, "overlays": overlays, "overlay_height": height, "batch_size": batch_size, "device": str(device), "dtype": dtype,
        "weights_dir": params.models.weights_dir,
    }


@task(name="segment-images", cache_policy=NO_CACHE)
def segment_images(job: dict[str, Any]) -> dict[str, int]:
    """Build the segmenter from the checkpoint and segment the job's images into its folder."""
    from pathlib import PurePosixPath

    from components.hashcache import HashCache
    from components.predictions import Source, predict_images
    from components.segmenter import Segmenter

    segmenter = Segmenter.from_checkpoint(job["checkpoint"], device=job["device"], dtype=job["dtype"],
                                          weights_dir=job["weights_dir"])
    if job["refine"]:
        segmenter.load_sam()  # absent SAM weights fail now, not after the first batch
    sources = [Source(Path(path), PurePosixPath(rel)) for path, rel in job["sources"]]
    with Progress(len(sources), desc="predict", key="predict", unit="img") as bar, HashCache() as hashes:
        summary = predict_images(
            segmenter, sources, job["classes"], job["out"], key=job["key"], refine=job["refine"],
            overlays=job["overlays"], overlay_height=job["overlay_height"], batch_size=job["batch_size"],
            num_workers=READ_WORKERS, on_image=bar.update,
            sha256=hashes.sha256, max_pixels=job["max_pixels"], skipped=[tuple(row) for row in job["skipped"]],
        )
    return summary._asdict()


@flow(name="predict", flow_run_name="predict")
def predict_flow(
    sources: list[str],
    out: str,
    classes: str | None = None,
    vocabulary: str | None = None,
    model: str | None = None,
    refine: bool = False,
    overlays: bool = False,
    batch_size: int = 8,
    params_path: str = PARAMS_FILE,
    overwrite: bool = False,
    max_pixels: int | None = None,
    overlay_size: str | None = None,
) -> dict[str, Any]:
    """Segment the images of `sources` into `out` (resumable); returns what was done. The caller
    holds the output's lock (:func:`run_predict`)."""
    from components.outputs import check_output_folder, claim_outputs

    params = stage_params(params_path)
    job = prepare(params, sources, out, classes=classes, vocabulary=vocabulary, model=model, refine=refine,
                  overlays=overlays, batch_size=batch_size, overwrite=overwrite, max_pixels=max_pixels,
                  overlay_size=overlay_size)
    check_output_folder(out, job["planned"], overwrite=overwrite)  # again, under the lock
    claim_outputs(out, job["planned"])  # the first write
    log = runmode.logger()
    log.info("model %s (sha256 %s), %d classes, %d images -> %s", job["checkpoint"], job["model_sha256"][:12],
             len(job["classes"]), len(job["sources"]), out)
    summary = runmode.call(segment_images, job)
    if summary["skipped"]:
        from components.skipped import SKIPPED_FILE

        log.warning("%d entries skipped: listed with the reason in %s", summary["skipped"], Path(out) / SKIPPED_FILE)
    return {**summary, "model": job["checkpoint"], "out": out}


def run_predict(sources: list[str], out: str, **options: Any) -> dict[str, Any]:
    """:func:`predict_flow` (a flow run only with a Prefect server configured: flows.runmode)
    holding the lock on ``out`` that ``label`` takes on its output: a second run fails at once
    (OutputBusyError) instead of doing the same work beside the first."""
    from components.io import output_lock

    with output_lock(out, stage="predict"):
        return runmode.run(predict_flow, sources, out, **options)


def register(app: typer.Typer) -> None:
    @app.command("predict")
    def predict_cmd(
        sources: list[str] = typer.Argument(..., help="image files, folders (recursive) or globs"),
        out: Path = typer.Option(..., "--out", help="output folder"),
        classes: str = typer.Option(None, "--classes", help='class names, comma-separated: "sky,grass,car"'),
        vocabulary: str = typer.Option(None, "--vocabulary",
                                       help="a shipped class list (e.g. cocostuff171) or a class file, one class "
                                            "per line, comma-separated synonyms"),
        model: str = typer.Option(None, "--model",
                                  show_default="the registered champion, else ${paths.checkpoint}",
                                  help="checkpoint path, runs:/<run_id>, models:/<name>@<alias>, models:/<name>/<version or latest>"),
        refine: bool = typer.Option(False, "--refine", help="SAM-refined label maps"),
        overlays: bool = typer.Option(False, "--overlays", help="also write <name>_overlay.jpg with a legend"),
        overlay_size: str = typer.Option(None, "--overlay-size",
                                         show_default="320", help="with --overlays: full (the image's own size) or a panel height in pixels"),
        batch_size: int = typer.Option(8, "--batch-size", help="images per model batch"),
        params: Path = typer.Option(Path(PARAMS_FILE), help="settings file (device, dtype, weights folder, "
                                                            "label.external_symlinks)"),
        overwrite: bool = typer.Option(False, "--overwrite",
                                       help="write into a non-empty folder fmbseg did not create (its files are "
                                            "never replaced)"),
        max_pixels: int = typer.Option(None, "--max-pixels",
                                       show_default="50 megapixels",
                                       help="pixel budget of one image, larger ones are skipped (listed in skipped.parquet)"),
    ) -> None:
        """Segment new images with a trained model, for any class names (resumable)."""
        import json

        from components.io import OutputBusyError

        options = {"classes": classes, "vocabulary": vocabulary, "model": model, "refine": refine,
                   "overlays": overlays, "batch_size": batch_size, "overwrite": overwrite, "max_pixels": max_pixels,
                   "overlay_size": overlay_size}
        try:
            settings = stage_params(params)
            prepare(settings, sources, str(out), **options)
        except (FileNotFoundError, ValueError) as err:
            typer.echo(f"fmbseg predict: {err}", err=True)
            raise typer.Exit(2) from None
        try:
            result = run_predict(sources, str(out), params_path=str(params), **options)
        except OutputBusyError as err:
            typer.echo(f"fmbseg predict: {err}", err=True)
            raise typer.Exit(err.exit_code) from None
        typer.echo(json.dumps(result, indent=2))
