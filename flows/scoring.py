"""Scoring a benchmark batch by batch on the task runner, resumable: what `fmbseg evaluate`
(flows/evaluate.py) and `fmbseg evaluate-stage1` (flows/evaluate_stage1.py) share.

A job is a frozen record of what a task needs to rebuild one evaluation (``Stage2Job``,
``Stage1Job``): typed settings, compared by value, built into models and a segmenter once per
worker process (:func:`context`). Tasks take a job and a batch of ids and return only partial
confusion matrices; :func:`score` adds them into a state file saved atomically after every batch,
so a killed run resumes where it stopped. The state is keyed by the model and the job's
``resume_settings()``: the settings that change the counts, listed by name.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import typer

from components.config import ConfigError, OrchestrationConfig, Params
from components.io import bytes_sha256
from flows.common import project_path, table_artifact, worker_cache
from flows.deferred import get_run_logger, task
from flows.shards import map_shards

__all__ = [
    "ScoringContext",
    "ScoringJob",
    "state_path",
    "artifact_key",
    "context",
    "evaluate_images",
    "write_missing_overlays",
    "dataset_root",
    "open_dataset",
    "dataset_identity",
    "score",
    "echo_metrics",
]


def state_path(params: Params, name: str) -> Path:
    """Where the resume state of one evaluation lives (``name``: a benchmark, or stage1/<benchmark>)."""
    return project_path(params, "eval_state") / f"{name}.pt"


def artifact_key(*parts: str) -> str:
    """A Prefect artifact key (lowercase letters, digits and dashes)."""
    return re.sub(r"[^a-z0-9-]+", "-", "-".join(parts).lower())


# ----------------------------------------------------------------------- per-worker model context
class ScoringContext(NamedTuple):
    dataset: Any  # CanonicalDataset
    segment: Any  # VocabularySegmenter | Stage1Segmenter
    num_classes: int  # columns of the confusion matrix
    class_names: list[str]
    variants: tuple[str, ...]
    image_level_labels: bool


class ScoringJob(Protocol):
    """What a task needs to rebuild one evaluation; equal jobs share their models in a worker."""

    def build(self) -> ScoringContext:
        """The dataset, models, prompts and segmenter of the job (loads the models)."""
        ...

    def resume_settings(self) -> Mapping[str, Any]:
        """The settings that change the counts (JSON types): with the model, the resume key."""
        ...


@worker_cache(maxsize=2)
def context(job: ScoringJob) -> ScoringContext:
    """The context of ``job``, built once per worker process (an equal job, a frozen record of
    hashable settings, reuses it; the last two are kept)."""
    return job.build()


# ------------------------------------------------------------------------------------ the tasks
@task(name="evaluate-images")
def evaluate_images(job: ScoringJob, batch: tuple[list[str], list[str], str | None], tally: str | None = None) -> Any:
    """Score one batch of images (ids, the ids to draw overlays of, the overlay folder), ticking
    the tally file ``tally`` per image; returns a BatchResult (ids done, ids skipped, confusion
    counts)."""
    from components.evaluation.benchmark import evaluate_batch
    from components.progress import counter

    ids, overlay_ids, overlay_dir = batch
    ctx = context(job)
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
        on_image=counter(tally),
    )


@task(name="write-overlays")
def write_missing_overlays(job: ScoringJob, ids: list[str], overlay_dir: str) -> list[str]:
    """Overlay pictures of images an earlier, interrupted run scored (their files are gone)."""
    from components.evaluation.benchmark import write_overlays

    ctx = context(job)
    paths = write_overlays(ctx.dataset, ids, segment=ctx.segment, variants=ctx.variants,
                           class_names=ctx.class_names, overlay_dir=overlay_dir)
    return [str(p) for p in paths]


# ----------------------------------------------------------------------------- shared flow parts
def dataset_root(params: Params, dataset: str) -> Path:
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


def open_dataset(params: Params, dataset: str) -> tuple[Any, Path, list[str]]:
    """The labelled split of a benchmark, its root and the ids to score (``evaluate.limit``)."""
    from components.datasets.readers import CanonicalDataset

    ev = params.evaluate.for_benchmark(dataset)
    root = dataset_root(params, dataset)
    data = CanonicalDataset(root, ev.split)
    if not data.has_labels:
        raise ValueError(f"{root} has no labels for split {ev.split!r}: it cannot be evaluated")
    ids = data.ids[: ev.limit]
    if not ids:
        raise ValueError(f"{root} has no images in split {ev.split!r}")
    return data, root, ids


def dataset_identity(root: Path) -> dict[str, str]:
    """Hashes of meta.json and classes.txt: a re-converted dataset gets a new resume key."""
    return {"meta": bytes_sha256((root / "meta.json").read_bytes()),
            "classes": bytes_sha256((root / "classes.txt").read_bytes())}


def _chunks(items: Sequence[str], size: int) -> list[list[str]]:
    return [list(items[i : i + size]) for i in range(0, len(items), size)]


def score(
    job: ScoringJob,
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

    def saved(_batch: Any, result: Any) -> None:
        state.add(result)
        save_state(state_file, state)

    overlays = str(overlay_dir) if overlay_dir else None
    map_shards(evaluate_images, job, [(batch, [i for i in batch if i in wanted], overlays)
                                      for batch in _chunks(todo, batch_size)],
               name=lambda shard: f"images {shard[0][0]} .. {shard[0][-1]}", size=lambda shard: len(shard[0]),
               out=state_file, orchestration=orchestration, desc=f"evaluate {label}",
               key=artifact_key("evaluate", label), done_before=len(ids) - len(todo), on_report=saved)
    for image_id, why in sorted(state.skipped.items()):
        logger.warning("%s: image %s left out of the metric: %s", label, image_id, why)
    if state.skipped:
        table_artifact([{"image": i, "error": why} for i, why in sorted(state.skipped.items())],
                       key=artifact_key("evaluate", label, "skipped"),
                       description=f"{label}: images that could not be read, left out of the metric")
    return state


def echo_metrics(label: str, metrics: dict[str, float]) -> None:
    """A command's result on stdout (JSON), and a warning on stderr for images left out."""
    typer.echo(json.dumps({label: metrics}, indent=2))
    if metrics.get("skipped"):
        typer.echo(f"WARNING: {int(metrics['skipped'])} image(s) of {label} could not be scored (unreadable, or a bad label) and were left out "
                   "of the metric (listed in the log above)", err=True)
