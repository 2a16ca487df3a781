"""`fmbseg evaluate` (the evaluate@<benchmark> DVC stage): the aligner scored (Table 1).

The aligner checkpoint (self-describing: the DINOv2 and CLIP specs travel in it) scored on one
canonical benchmark, base and SAM-refined (paper §4.2, Table 1). Outputs:
``${paths.metrics}/<benchmark>.json`` (DVC metrics), ``${paths.metrics}/<benchmark>_per_class.csv``
and its bar chart ``_per_class.png`` (a DVC image plot), overlay pictures in ``${paths.overlays}/<benchmark>/``, all attached to the checkpoint's MLflow run.

Batches of ``evaluate.batch_size`` ids go to tasks and the run resumes as flows/scoring.py says
(Stage 1's scoring, `fmbseg evaluate-stage1`, is flows/evaluate_stage1.py).
"""

from __future__ import annotations

import functools
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from components.config import Params
from components.io import file_sha256
from flows.common import (
    cached_clip,
    cached_dino,
    cached_sam,
    inference_spec,
    project_path,
    stage_params,
    table_artifact,
)
from flows.deferred import flow, get_run_logger
from flows.plots import bars_png
from flows.scoring import (
    ScoringContext,
    artifact_key,
    dataset_identity,
    echo_metrics,
    open_dataset,
    score,
    state_path,
    write_missing_overlays,
)

if TYPE_CHECKING:
    from components.aligner.checkpoint import InferenceSpec

__all__ = [
    "Stage2Job",
    "evaluate_flow",
    "inference_spec",
    "score_files",
    "register",
]

BASE_VARIANTS = ("base",)
REFINED_VARIANTS = ("base", "refined")


# ------------------------------------------------------------------------------ evaluate (Stage 2)
@dataclass(frozen=True)
class Stage2Job:
    """What a task needs to rebuild the evaluation of one benchmark. ``sam``: the refining SAM,
    None when ``evaluate.refine`` is off."""

    dataset: str
    root: str
    split: str
    model_path: str
    model_sha256: str
    sam: str | None
    device: str
    dtype: str
    weights_dir: str | None
    inference: InferenceSpec
    bg_threshold: float | None
    logit_scale: float | None
    synonyms: str
    bg_prompts: bool

    @classmethod
    def of(cls, params: Params, dataset: str, root: Path, model_path: Path) -> Stage2Job:
        ev = params.evaluate.for_benchmark(dataset)
        return cls(
            dataset=dataset, root=str(root), split=ev.split, model_path=str(model_path),
            model_sha256=file_sha256(model_path), sam=params.models.selected.sam if ev.refine else None,
            device=params.models.device, dtype=params.models.dtype, weights_dir=params.models.weights_dir,
            inference=inference_spec(params, dataset), bg_threshold=ev.bg_threshold, logit_scale=ev.logit_scale,
            synonyms=ev.synonyms, bg_prompts=ev.bg_prompts,
        )

    def resume_settings(self) -> dict[str, Any]:
        """The settings that change the counts (the model is the key's other half; where files
        are, the device and the weights' folder do not count); without refinement, the SAM and
        automatic-mask settings of the inference protocol do not either."""
        inference = self.inference.to_dict()
        if self.sam is None:
            inference = {k: v for k, v in inference.items() if k not in ("amg", "sam")}
        return {"kind": "stage2", "dataset": self.dataset, "split": self.split, "sam": self.sam, "dtype": self.dtype,
                "inference": inference, "bg_threshold": self.bg_threshold, "logit_scale": self.logit_scale,
                "synonyms": self.synonyms, "bg_prompts": self.bg_prompts}

    def build(self) -> ScoringContext:
        from components.aligner.checkpoint import load_aligner
        from components.datasets.readers import CanonicalDataset
        from components.evaluation.prompts import display_names
        from components.models import get_spec, resolve_device
        from components.segmenter import Segmenter, VocabularySegmenter

        device = resolve_device(self.device)
        dataset = CanonicalDataset(self.root, self.split)
        loaded = load_aligner(self.model_path, map_location=device)
        segmenter = Segmenter(
            aligner=loaded.model,
            dino=cached_dino(loaded.encoder_spec, str(device), self.weights_dir),
            dino_spec=get_spec(loaded.encoder_spec),
            clip=cached_clip(loaded.text_spec, str(device), self.weights_dir),
            inference=self.inference,
            sam=functools.partial(cached_sam, self.sam, str(device), self.weights_dir) if self.sam is not None else None,
            device=device,
            dtype=self.dtype,
        )
        segment = VocabularySegmenter.for_benchmark(
            segmenter, dataset.classes, dataset.meta, refine=self.sam is not None, synonyms=self.synonyms,
            bg_prompts=self.bg_prompts, bg_threshold=self.bg_threshold, logit_scale=self.logit_scale,
        )
        variants = REFINED_VARIANTS if self.sam is not None else BASE_VARIANTS
        return ScoringContext(dataset, segment, len(dataset.classes), display_names(dataset.classes), variants, False)


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
    data, root, ids = open_dataset(params, dataset)
    if ev.bg_threshold is not None and background_index(data.meta) is None:
        raise ValueError(f"evaluate.bg_threshold is set but {dataset} has no background class to assign")
    job = Stage2Job.of(params, dataset, root, model)
    overlay_dir = project_path(params, "overlays") / dataset
    overlay_dir.mkdir(parents=True, exist_ok=True)  # a DVC out, even with evaluate.overlays 0
    overlay_ids = ids[: ev.overlays]
    state_file = state_path(params, dataset)
    state = score(
        job, ids,
        key=state_key(job.model_sha256, {**job.resume_settings(), **dataset_identity(root)}),
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
    table_artifact(summary.per_class, key=artifact_key("evaluate", dataset, "per-class"),
                   description=f"{dataset}: per-class IoU / Acc (percent)")
    named = {f"{dataset}/{k}": float(v) for k, v in summary.metrics.items()}
    with tempfile.TemporaryDirectory() as tmp:  # the settings that made these numbers, beside them
        settings_file = Path(tmp) / "settings.json"
        record = {"protocol": params.evaluate.protocol, **ev.model_dump(mode="json")}
        settings_file.write_text(json.dumps(record, indent=2, sort_keys=True), encoding="utf-8")
        _attach(params, run_id, named, [metrics_file, per_class_file, settings_file], overlays, dataset)
    state_file.unlink(missing_ok=True)  # done: a later run (new data, new model) starts from scratch
    return dict(summary.metrics)


# -------------------------------------------------------------------------------------- the CLI
def register(app: typer.Typer) -> None:
    @app.command("evaluate")
    def evaluate_cmd(
        dataset: str = typer.Option(..., "--dataset", help="benchmark name (pv21, pv20, pc59, co80, cs171, ...)"),
        params: Path = typer.Option(Path("params.yaml"), help="settings file"),
        model: Path = typer.Option(None, show_default="${paths.checkpoint}", help="aligner checkpoint"),
    ) -> None:
        """Score the aligner on one benchmark, base and SAM-refined (the evaluate@<dataset> stage)."""
        from flows.runners import make_task_runner

        runner = make_task_runner(stage_params(params).orchestration)
        metrics = evaluate_flow.with_options(task_runner=runner)(dataset, str(params), str(model) if model else None)
        echo_metrics(dataset, metrics)


