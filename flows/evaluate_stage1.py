"""`fmbseg evaluate-stage1` (the evaluate-stage1@<benchmark> DVC stage): Stage 1 scored (Table 2).

Stage 1's pseudo labels of the benchmark's images, with the benchmark's own vocabulary, scored
against the ground truth, every variant in one pass over the images:
``${paths.stage1_metrics}/<benchmark>_<variant>.json`` and its per-class CSV per variant, each logged to an
MLflow run ``stage1-<variant>`` of its own, in the experiment ``<tracking.experiment>-stage1``.
Batches of ``evaluate.batch_size`` ids go to tasks and the run resumes as flows/scoring.py says.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from components.config import Params
from flows.common import (
    cached_clip,
    cached_sam,
    cached_teacher,
    project_path,
    stage1_settings,
    stage_params,
    table_artifact,
)
from flows.deferred import flow
from flows.scoring import (
    ScoringContext,
    artifact_key,
    dataset_identity,
    echo_metrics,
    open_dataset,
    score,
    state_path,
)

if TYPE_CHECKING:
    from components.labelling.concepts import ConceptSettings
    from components.labelling.settings import Stage1Settings

__all__ = ["Stage1Job", "evaluate_stage1_flow", "register"]


@dataclass(frozen=True)
class Stage1Job:
    """What a task needs to run Stage 1 on a benchmark. ``teacher`` and ``concepts``: the concept
    teacher, set only when one of its variants is scored."""

    variants: tuple[str, ...]
    dataset: str
    root: str
    split: str
    clip: str
    sam: str
    device: str
    weights_dir: str | None
    templates: tuple[str, ...]
    stage1: Stage1Settings
    teacher: str | None = None
    concepts: ConceptSettings | None = None

    @classmethod
    def of(cls, params: Params, dataset: str, root: Path, variants: Sequence[str]) -> Stage1Job:
        from components.labelling.concepts import ConceptSettings
        from components.labelling.settings import TEACHER_EVAL_VARIANTS

        teacher = bool(set(variants) & set(TEACHER_EVAL_VARIANTS))
        return cls(
            variants=tuple(variants), dataset=dataset, root=str(root),
            split=params.evaluate.for_benchmark(dataset).split,
            clip=params.models.selected.clip, sam=params.models.selected.sam, device=params.models.device,
            weights_dir=params.models.weights_dir, templates=tuple(params.label.templates),
            stage1=stage1_settings(params.label),
            teacher=params.models.teacher if teacher else None,
            concepts=ConceptSettings(**params.label.concepts.model_dump()) if teacher else None,
        )

    def resume_settings(self) -> dict[str, Any]:
        """The settings that change the counts (where the images are, the device, the weights'
        folder and the CLIP crops per forward do not); the teacher's only when its variants are
        scored, so that the paper's resume key is the same with or without a teacher configured."""
        out: dict[str, Any] = {
            "kind": "stage1", "variants": list(self.variants), "dataset": self.dataset, "split": self.split,
            "clip": self.clip, "sam": self.sam, "templates": list(self.templates), "stage1": self.stage1.counted(),
        }
        if self.concepts is not None:
            out.update(teacher=self.teacher, concepts=asdict(self.concepts))
        return out

    def build(self) -> ScoringContext:
        from components.datasets.readers import CanonicalDataset
        from components.evaluation.prompts import benchmark_prompts, display_names
        from components.evaluation.stage1 import Stage1Segmenter
        from components.models import prototypes, resolve_device

        device = resolve_device(self.device)
        dataset = CanonicalDataset(self.root, self.split)
        clip = cached_clip(self.clip, str(device), self.weights_dir)
        sam = cached_sam(self.sam, str(device), self.weights_dir)
        prompts = benchmark_prompts(dataset.classes, dataset.meta)
        segment = Stage1Segmenter(
            variants=self.variants,
            clip_model=clip.model,
            clip_mean=clip.spec.mean,
            clip_std=clip.spec.std,
            clip_image_size=clip.spec.image_size,
            sam=sam,
            prototypes=prototypes(clip.model, clip.tokenizer, prompts.names, self.templates),
            class_map=prompts.class_map,
            num_classes=len(dataset.classes),
            settings=self.stage1,
            teacher=self._teacher(prompts.names, str(device)),
        )
        # one column more than classes: Stage 1's unlabelled pixels (summarize(unlabelled_column=True))
        return ScoringContext(dataset, segment, len(dataset.classes) + 1, display_names(dataset.classes),
                              self.variants, segment.needs_image_classes)

    def _teacher(self, prompts: list[str], device: str) -> Any:
        """The concept teacher over the benchmark's prompts (each prompt its own class), when a
        teacher variant is scored; else None."""
        if self.teacher is None or self.concepts is None:
            return None
        from components.labelling.concepts import ConceptTeacher

        return ConceptTeacher.for_vocabulary(cached_teacher(self.teacher, device, self.weights_dir), self.concepts,
                                             prompts)


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
    data, root, ids = open_dataset(params, dataset)
    job = Stage1Job.of(params, dataset, root, variants)
    state_file = state_path(params, f"stage1/{dataset}")
    state = score(
        job, ids,
        key=state_key("stage1", {**job.resume_settings(), **dataset_identity(root)}),
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
        table_artifact(per_class, key=artifact_key("stage1", name, "per-class"),
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


def register(app: typer.Typer) -> None:
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
            echo_metrics(f"{dataset} {name}", metrics)
