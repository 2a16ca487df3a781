"""`fmbseg evaluate` (the evaluate@<benchmark> DVC stage) and `fmbseg evaluate-stage1`.

evaluate: the aligner checkpoint (self-describing: the DINOv2 and CLIP specs travel in it) scored
on one canonical benchmark, base and SAM-refined (paper §4.2, Table 1). Outputs:
``${paths.metrics}/<benchmark>.json`` (DVC metrics), ``${paths.metrics}/<benchmark>_per_class.csv``
and its bar chart ``_per_class.png`` (a DVC image plot), overlay pictures in ``${paths.overlays}/<benchmark>/``, all attached to the checkpoint's MLflow run.

evaluate-stage1: Stage 1's pseudo labels of the benchmark's images, with the benchmark's own
vocabulary, scored against the ground truth (Table 2), every variant in one pass over the images:
``${paths.stage1_metrics}/<benchmark>_<variant>.json`` and its per-class CSV per variant, each logged to an
MLflow run ``stage1-<variant>`` of its own, in the experiment ``<tracking.experiment>-stage1``.

Both send images to tasks in batches of ``evaluate.batch_size`` ids. A task builds its models once
per worker process and returns only partial confusion matrices; the flow adds them into a state
file saved atomically after every batch, so a killed run resumes where it stopped (the state is
keyed by the model and every setting that changes the counts, and removed once the outputs are
written).
"""

from __future__ import annotations

import functools
import json
import re
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, NamedTuple

import typer
from prefect import flow, get_run_logger, task

from components.config import ConfigError, OrchestrationConfig, Params
from components.io import bytes_sha256, file_sha256
from flows.common import (
    Progress,
    cached_clip,
    cached_dino,
    cached_sam,
    inference_spec,
    project_path,
    stage1_settings,
    stage_params,
    table_artifact,
)
from flows.plots import bars_png
from flows.runners import shard_resources

__all__ = [
    "evaluate_flow",
    "evaluate_stage1_flow",
    "inference_spec",
    "evaluate_images",
    "write_missing_overlays",
    "state_path",
    "score_files",
    "register",
]

BASE_VARIANTS = ("base",)
REFINED_VARIANTS = ("base", "refined")


def state_path(params: Params, name: str) -> Path:
    """Where the resume state of one evaluation lives (``name``: a benchmark, or stage1/<benchmark>)."""
    return project_path(params, "eval_state") / f"{name}.pt"


def _artifact_key(*parts: str) -> str:
    """A Prefect artifact key (lowercase letters, digits and dashes)."""
    return re.sub(r"[^a-z0-9-]+", "-", "-".join(parts).lower())


# ----------------------------------------------------------------------- per-worker model context
class _Context(NamedTuple):
    dataset: Any  # CanonicalDataset
    segment: Any  # VocabularySegmenter | Stage1Segmenter
    num_classes: int  # columns of the confusion matrix
    class_names: list[str]
    variants: tuple[str, ...]
    image_level_labels: bool


def _stage2_context(job: dict[str, Any]) -> _Context:
    from components.aligner.checkpoint import InferenceSpec, load_aligner
    from components.datasets.readers import CanonicalDataset
    from components.evaluation.prompts import display_names
    from components.models import get_spec, resolve_device
    from components.segmenter import Segmenter, VocabularySegmenter

    device = resolve_device(job["device"])
    dataset = CanonicalDataset(job["root"], job["split"])
    loaded = load_aligner(job["model_path"], map_location=device)
    refine = job["sam"] is not None
    segmenter = Segmenter(
        aligner=loaded.model,
        dino=cached_dino(loaded.encoder_spec, str(device), job["weights_dir"]),
        dino_spec=get_spec(loaded.encoder_spec),
        clip=cached_clip(loaded.text_spec, str(device), job["weights_dir"]),
        inference=InferenceSpec.from_dict(job["inference"]),
        sam=functools.partial(cached_sam, job["sam"], str(device), job["weights_dir"]) if refine else None,
        device=device,
        dtype=job["dtype"],
    )
    segment = VocabularySegmenter.for_benchmark(
        segmenter, dataset.classes, dataset.meta, refine=refine, synonyms=job["synonyms"],
        bg_prompts=job["bg_prompts"], bg_threshold=job["bg_threshold"], logit_scale=job["logit_scale"],
    )
    variants = REFINED_VARIANTS if refine else BASE_VARIANTS
    return _Context(dataset, segment, len(dataset.classes), display_names(dataset.classes), variants, False)


def _stage1_context(job: dict[str, Any]) -> _Context:
    from components.datasets.readers import CanonicalDataset
    from components.evaluation.prompts import benchmark_prompts, display_names
    from components.evaluation.stage1 import Stage1Segmenter
    from components.labelling.settings import Stage1Settings
    from components.models import prototypes, resolve_device

    device = resolve_device(job["device"])
    dataset = CanonicalDataset(job["root"], job["split"])
    clip = cached_clip(job["clip"], str(device), job["weights_dir"])
    sam = cached_sam(job["sam"], str(device), job["weights_dir"])
    prompts = benchmark_prompts(dataset.classes, dataset.meta)
    segment = Stage1Segmenter(
        variants=job["variants"],
        clip_model=clip.model,
        clip_mean=clip.spec.mean,
        clip_std=clip.spec.std,
        clip_image_size=clip.spec.image_size,
        sam=sam,
        prototypes=prototypes(clip.model, clip.tokenizer, prompts.names, job["templates"]),
        class_map=prompts.class_map,
        num_classes=len(dataset.classes),
        settings=Stage1Settings.from_dict(job["stage1"]),
        teacher=_stage1_teacher(job, prompts.names, str(device)),
    )
    # one column more than classes: Stage 1's unlabelled pixels (summarize(unlabelled_column=True))
    return _Context(dataset, segment, len(dataset.classes) + 1, display_names(dataset.classes),
                    tuple(job["variants"]), segment.needs_image_classes)


def _stage1_teacher(job: dict[str, Any], prompts: list[str], device: str) -> Any:
    """The concept teacher over the benchmark's prompts (each prompt its own class), when a teacher
    variant is scored; else None."""
    if not job.get("teacher"):
        return None
    from components.labelling.concepts import ConceptSettings, ConceptTeacher
    from flows.common import cached_teacher

    return ConceptTeacher.for_vocabulary(cached_teacher(job["teacher"], device, job["weights_dir"]),
                                         ConceptSettings(**job["concepts"]), prompts)


_context_lock = threading.Lock()


@functools.lru_cache(maxsize=2)
def _build_context(job_json: str) -> _Context:
    job = json.loads(job_json)
    return _stage1_context(job) if job["kind"] == "stage1" else _stage2_context(job)


def _context(job: dict[str, Any]) -> _Context:
    """The models, prompts and segmenter of one job, built once per worker process."""
    with _context_lock:
        return _build_context(json.dumps(job, sort_keys=True))


# ------------------------------------------------------------------------------------ the tasks
@task(name="evaluate-images")
def evaluate_images(job: dict[str, Any], ids: list[str], overlay_ids: list[str], overlay_dir: str | None) -> Any:
    """Score one batch of images; returns a BatchResult (ids done, ids skipped, confusion counts)."""
    from components.evaluation.benchmark import evaluate_batch

    ctx = _context(job)
    return evaluate_batch(
        ctx.dataset,
        ids,
        segment=ctx.segment,
        num_classes=ctx.num_classes,
        variants=ctx.variants,
        class_names=ctx.class_names,
        overlay_ids=overlay_ids,
        overlay_dir=overlay_dir,
        image_level_labels=ctx.image_level_labels,
    )


@task(name="write-overlays")
def write_missing_overlays(job: dict[str, Any], ids: list[str], overlay_dir: str) -> list[str]:
    """Overlay pictures of images an earlier, interrupted run scored (their files are gone)."""
    from components.evaluation.benchmark import write_overlays

    ctx = _context(job)
    paths = write_overlays(ctx.dataset, ids, segment=ctx.segment, variants=ctx.variants,
                           class_names=ctx.class_names, overlay_dir=overlay_dir)
    return [str(p) for p in paths]


# ----------------------------------------------------------------------------- shared flow parts
def _dataset_root(params: Params, dataset: str) -> Path:
    """``${paths.datasets}/<dataset>``; a missing one is an error naming those that exist."""
    from components.datasets.registry import BENCHMARKS

    base = project_path(params, "datasets")
    root = base / dataset
    if not root.is_dir() and dataset not in BENCHMARKS:
        raise ConfigError(f"unknown dataset {dataset!r} (evaluate --dataset); known datasets: {', '.join(sorted(BENCHMARKS))}")
    if not root.is_dir():
        present = sorted(p.name for p in base.iterdir() if p.is_dir()) if base.is_dir() else []
        raise FileNotFoundError(
            f"no dataset {dataset!r} at {root} (datasets there: {present or 'none'}); "
            f"fetch it with `fmbseg download {dataset}` (or `dvc repro download@{dataset}`)"
        )
    return root


def _open_dataset(params: Params, dataset: str) -> tuple[Any, Path, list[str]]:
    """The labelled split of a benchmark, its root and the ids to score (``evaluate.limit``)."""
    from components.datasets.readers import CanonicalDataset

    ev = params.evaluate.for_benchmark(dataset)
    root = _dataset_root(params, dataset)
    data = CanonicalDataset(root, ev.split)
    if not data.has_labels:
        raise ValueError(f"{root} has no labels for split {ev.split!r}: it cannot be evaluated")
    ids = data.ids[: ev.limit]
    if not ids:
        raise ValueError(f"{root} has no images in split {ev.split!r}")
    return data, root, ids


def _dataset_identity(root: Path) -> dict[str, str]:
    """Hashes of meta.json and classes.txt: a re-converted dataset gets a new resume key."""
    return {"meta": bytes_sha256((root / "meta.json").read_bytes()),
            "classes": bytes_sha256((root / "classes.txt").read_bytes())}


def _chunks(items: Sequence[str], size: int) -> list[list[str]]:
    return [list(items[i : i + size]) for i in range(0, len(items), size)]


def _score(
    job: dict[str, Any],
    ids: list[str],
    *,
    key: str,
    state_file: Path,
    num_classes: int,
    variants: tuple[str, ...],
    batch_size: int,
    label: str,
    orchestration: OrchestrationConfig,
    overlay_ids: Sequence[str] = (),
    overlay_dir: Path | None = None,
) -> Any:
    """Score ``ids`` batch by batch on the task runner, resuming from ``state_file``; returns the
    complete EvalState (saved after every batch)."""
    from components.evaluation.benchmark import load_state, save_state

    logger = get_run_logger()
    state = load_state(state_file, key, num_classes, variants)
    covered = state.covered()
    todo = [i for i in ids if i not in covered]
    if len(todo) < len(ids):
        logger.info("resuming %s: %d of %d images already scored", label, len(ids) - len(todo), len(ids))
    wanted = set(overlay_ids)
    with Progress(len(ids), desc=f"evaluate {label}", key=_artifact_key("evaluate", label)) as bar:
        bar.update(len(ids) - len(todo))
        with shard_resources(orchestration):  # on Ray: gpus_per_task GPUs per batch task
            futures = [
                evaluate_images.submit(job, batch, [i for i in batch if i in wanted],
                                       str(overlay_dir) if overlay_dir else None)
                for batch in _chunks(todo, batch_size)
            ]
        for future in futures:
            result = future.result()
            state.add(result)
            save_state(state_file, state)
            bar.update(len(result.done) + len(result.skipped))
    for image_id, why in sorted(state.skipped.items()):
        logger.warning("%s: image %s left out of the metric: %s", label, image_id, why)
    if state.skipped:
        table_artifact([{"image": i, "error": why} for i, why in sorted(state.skipped.items())],
                       key=_artifact_key("evaluate", label, "skipped"),
                       description=f"{label}: images that could not be read, left out of the metric")
    return state


# ------------------------------------------------------------------------------ evaluate (Stage 2)
def _stage2_job(params: Params, dataset: str, root: Path, model_path: Path) -> dict[str, Any]:
    """What a task needs to rebuild the evaluation (plain JSON types)."""
    ev = params.evaluate.for_benchmark(dataset)
    return {
        "kind": "stage2",
        "dataset": dataset,
        "root": str(root),
        "split": ev.split,
        "model_path": str(model_path),
        "model_sha256": file_sha256(model_path),
        "sam": params.models.selected.sam if ev.refine else None,
        "device": params.models.device,
        "dtype": params.models.dtype,
        "weights_dir": params.models.weights_dir,
        "inference": inference_spec(params, dataset).to_dict(),
        "bg_threshold": ev.bg_threshold,
        "logit_scale": ev.logit_scale,
        "synonyms": ev.synonyms,
        "bg_prompts": ev.bg_prompts,
    }


def _attach(params: Params, run_id: str | None, metrics: dict[str, float], files: list[Path],
            overlays: list[Path], dataset: str) -> bool:
    """Attach to the model's MLflow run; False (and a warning) when the checkpoint names none."""
    from flows import tracking

    if run_id is None or not tracking.run_exists(params, run_id):
        get_run_logger().warning(
            "the checkpoint's MLflow run %s is not in %s: the %s metrics are in their files only, not attached",
            run_id, tracking.tracking_uri(params), dataset,
        )
        return False
    tracking.attach_metrics(run_id, metrics, files, artifact_path=f"evaluate/{dataset}", params=params)
    if overlays:
        tracking.attach_metrics(run_id, {}, overlays, artifact_path=f"evaluate/{dataset}/overlays", params=params)
    return True


def score_files(params: Params, dataset: str) -> tuple[Path, Path, Path]:
    """What evaluate@<dataset> writes about the model it scored: ``${paths.metrics}/<dataset>.json``
    (the DVC metrics), ``<dataset>_per_class.csv`` and its chart ``<dataset>_per_class.png``."""
    metrics_dir = project_path(params, "metrics")
    return (metrics_dir / f"{dataset}.json", metrics_dir / f"{dataset}_per_class.csv",
            metrics_dir / f"{dataset}_per_class.png")


@flow(name="evaluate", flow_run_name="evaluate-{dataset}")
def evaluate_flow(dataset: str, params_path: str = "params.yaml", model_path: str | None = None) -> dict[str, float]:
    """The evaluate@<dataset> stage: metrics/<dataset>.json and friends; returns the metrics."""
    from components.aligner.checkpoint import load_aligner
    from components.evaluation.benchmark import state_key
    from components.evaluation.prompts import background_index, display_names
    from components.evaluation.summary import summarize, write_summary

    params = stage_params(params_path)
    ev = params.evaluate.for_benchmark(dataset)  # evaluate's settings with the benchmark's overrides
    model = Path(model_path) if model_path else project_path(params, "checkpoint")
    run_id = load_aligner(model).run_id  # fails early, naming the stage to run, when there is no model
    data, root, ids = _open_dataset(params, dataset)
    if ev.bg_threshold is not None and background_index(data.meta) is None:
        raise ValueError(f"evaluate.bg_threshold is set but {dataset} has no background class to assign")
    job = _stage2_job(params, dataset, root, model)
    counted = {k: v for k, v in job.items() if k not in ("root", "model_path", "model_sha256", "device", "weights_dir")}
    if not ev.refine:
        counted["inference"] = {k: v for k, v in counted["inference"].items() if k not in ("amg", "sam")}
    overlay_dir = project_path(params, "overlays") / dataset
    overlay_dir.mkdir(parents=True, exist_ok=True)  # a DVC out, even with evaluate.overlays 0
    overlay_ids = ids[: ev.overlays]
    state_file = state_path(params, dataset)
    state = _score(
        job, ids,
        key=state_key(job["model_sha256"], {**counted, **_dataset_identity(root)}),
        state_file=state_file,
        num_classes=len(data.classes),
        variants=REFINED_VARIANTS if ev.refine else BASE_VARIANTS,
        batch_size=ev.batch_size,
        label=dataset,
        orchestration=params.orchestration,
        overlay_ids=overlay_ids,
        overlay_dir=overlay_dir,
    )

    # A resumed run's earlier batches drew their pictures in a run whose outputs DVC has since
    # removed: draw what is missing, and drop pictures of images no longer chosen.
    missing = [i for i in overlay_ids if i in state.done and not (overlay_dir / f"{i}.png").exists()]
    if missing:
        write_missing_overlays(job, missing, str(overlay_dir))
    overlays = [overlay_dir / f"{i}.png" for i in overlay_ids if i in state.done]
    for stale in set(overlay_dir.glob("*.png")) - set(overlays):
        stale.unlink()

    summary = summarize(state, display_names(data.classes))
    metrics_file, per_class_file, per_class_plot = score_files(params, dataset)
    write_summary(summary, metrics_file, per_class_file)
    variants = [v for v in ("base", "refined") if f"IoU_{v}" in summary.per_class[0]]
    bars_png(per_class_plot, [str(row["class"]) for row in summary.per_class],
             {v: [float(row[f"IoU_{v}"]) for row in summary.per_class] for v in variants},
             xlabel="IoU (%)", title=f"{dataset}: per-class IoU")
    table_artifact(summary.per_class, key=_artifact_key("evaluate", dataset, "per-class"),
                   description=f"{dataset}: per-class IoU / Acc (percent)")
    named = {f"{dataset}/{k}": float(v) for k, v in summary.metrics.items()}
    with tempfile.TemporaryDirectory() as tmp:  # the settings that made these numbers, beside them
        settings_file = Path(tmp) / "settings.json"
        record = {"protocol": params.evaluate.protocol, **ev.model_dump(mode="json")}
        settings_file.write_text(json.dumps(record, indent=2, sort_keys=True), encoding="utf-8")
        _attach(params, run_id, named, [metrics_file, per_class_file, settings_file], overlays, dataset)
    state_file.unlink(missing_ok=True)  # done: a later run (new data, new model) starts from scratch
    return dict(summary.metrics)


# -------------------------------------------------------------------------- evaluate-stage1 (Table 2)
def _stage1_job(params: Params, dataset: str, root: Path, variants: Sequence[str]) -> dict[str, Any]:
    """What a task needs to run Stage 1 on the benchmark (plain JSON types)."""

    from components.labelling.settings import TEACHER_EVAL_VARIANTS

    settings = stage1_settings(params.label)
    job = {
        "kind": "stage1",
        "variants": list(variants),
        "dataset": dataset,
        "root": str(root),
        "split": params.evaluate.for_benchmark(dataset).split,
        "clip": params.models.selected.clip,
        "sam": params.models.selected.sam,
        "device": params.models.device,
        "weights_dir": params.models.weights_dir,
        "templates": list(params.label.templates),
        "stage1": asdict(settings),
    }
    if set(variants) & set(TEACHER_EVAL_VARIANTS):  # absent otherwise: the paper's resume key is unchanged
        job.update(teacher=params.models.teacher, concepts=params.label.concepts.model_dump())
    return job


@flow(name="evaluate-stage1", flow_run_name="evaluate-stage1-{dataset}")
def evaluate_stage1_flow(dataset: str, variants: Sequence[str] | None = None,
                         params_path: str = "params.yaml") -> dict[str, dict[str, float]]:
    """Stage 1's pseudo labels of a benchmark against its ground truth, ``variants`` (default: all
    of STAGE1_VARIANTS) scored in one pass over the images; returns variant -> metrics."""
    from components.evaluation.benchmark import state_key
    from components.evaluation.prompts import display_names
    from components.evaluation.summary import EvalSummary, summarize, write_summary
    from components.labelling.settings import stage1_variants
    from flows import tracking

    params = stage_params(params_path)
    variants = stage1_variants(variants, teacher=params.models.teacher is not None)
    data, root, ids = _open_dataset(params, dataset)
    job = _stage1_job(params, dataset, root, variants)
    counted = {k: v for k, v in job.items() if k not in ("root", "device", "weights_dir")}
    state_file = state_path(params, f"stage1/{dataset}")
    state = _score(
        job, ids,
        key=state_key("stage1", {**counted, **_dataset_identity(root)}),
        state_file=state_file,
        num_classes=len(data.classes) + 1,
        variants=variants,
        batch_size=params.evaluate.for_benchmark(dataset).batch_size,
        label=f"stage1 {dataset}",
        orchestration=params.orchestration,
    )
    summary = summarize(state, display_names(data.classes), unlabelled_column=True)
    stage1_dir = project_path(params, "stage1_metrics")
    results: dict[str, dict[str, float]] = {}
    for variant in variants:
        # one prediction per variant: plain names ("mIoU", "IoU") in its own files
        suffix = f"_{variant}"
        metrics = {k.removesuffix(suffix): v for k, v in summary.metrics.items()
                   if k.endswith(suffix) or k in ("images", "skipped")}
        per_class = [{k.removesuffix(suffix): v for k, v in row.items() if k == "class" or k.endswith(suffix)}
                     for row in summary.per_class]
        name = f"{dataset}_{variant}"
        metrics_file, per_class_file = stage1_dir / f"{name}.json", stage1_dir / f"{name}_per_class.csv"
        write_summary(EvalSummary(metrics, per_class), metrics_file, per_class_file)
        table_artifact(per_class, key=_artifact_key("stage1", name, "per-class"),
                       description=f"Stage 1 ({variant}) on {dataset}: per-class IoU / Acc (percent)")
        tags = {**tracking.standard_tags(params, [root]), "dataset": dataset, "variant": variant,
                "protocol": str(params.evaluate.protocol), tracking.STAGE_TAG: "evaluate-stage1"}
        # apart from the trained models: Stage 1's scores have an experiment of their own
        with tracking.start_run(params, run_name=f"stage1-{variant}", tags=tags,
                                settings=tracking.stage_settings(params, "evaluate-stage1"),
                                experiment=tracking.stage1_experiment(params)) as run_id:
            tracking.attach_metrics(run_id, {f"{dataset}/{k}": float(v) for k, v in metrics.items()},
                                    [metrics_file, per_class_file], artifact_path=f"stage1/{dataset}", params=params)
        results[variant] = metrics
    state_file.unlink(missing_ok=True)
    return results


# -------------------------------------------------------------------------------------- the CLI
def register(app: typer.Typer) -> None:
    @app.command("evaluate")
    def evaluate_cmd(
        dataset: str = typer.Option(..., "--dataset", help="benchmark name (pv21, pv20, pc59, co80, cs171, ...)"),
        params: Path = typer.Option(Path("params.yaml"), help="settings file"),
        model: Path = typer.Option(None, help="aligner checkpoint (default: ${paths.checkpoint})"),
    ) -> None:
        """Score the aligner on one benchmark, base and SAM-refined (the evaluate@<dataset> stage)."""
        from flows.runners import make_task_runner

        runner = make_task_runner(stage_params(params).orchestration)
        metrics = evaluate_flow.with_options(task_runner=runner)(dataset, str(params), str(model) if model else None)
        _echo(dataset, metrics)

    @app.command("evaluate-stage1")
    def evaluate_stage1_cmd(
        dataset: str = typer.Option(..., "--dataset", help="benchmark name (pv21, pv20, pc59, co80, cs171, ...)"),
        variant: list[str] = typer.Option(None, help="stage1_1 | stage1_2 | semi (Stage 1.1 with ground-truth "
                                                    "image labels) | stage1_sam3 | stage1_sam3_semi (with "
                                                    "models.teacher); repeatable; default: all, in one pass"),
        params: Path = typer.Option(Path("params.yaml"), help="settings file"),
    ) -> None:
        """Score Stage 1's pseudo labels of a benchmark against its ground truth (paper Table 2)."""
        from components.labelling.settings import stage1_variants
        from flows.runners import make_task_runner

        settings = stage_params(params)
        try:
            variants = stage1_variants(variant, teacher=settings.models.teacher is not None)
        except ValueError as err:
            raise typer.BadParameter(str(err), param_hint="--variant") from None
        runner = make_task_runner(settings.orchestration)
        results = evaluate_stage1_flow.with_options(task_runner=runner)(dataset, variants, str(params))
        for name, metrics in results.items():
            _echo(f"{dataset} {name}", metrics)


def _echo(label: str, metrics: dict[str, float]) -> None:
    typer.echo(json.dumps({label: metrics}, indent=2))
    if metrics.get("skipped"):
        typer.echo(f"WARNING: {int(metrics['skipped'])} image(s) of {label} could not be scored (unreadable, or a bad label) and were left out "
                   "of the metric (listed in the log above)", err=True)
