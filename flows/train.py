"""`fmbseg train`: Stage 2 training as a Prefect flow (the DVC stage `train`), tracked in MLflow.

The flow computes the text prototypes of Stage 1's vocabulary with the frozen CLIP text encoder,
opens one MLflow run for the model (reopening the interrupted run when training resumes), trains the
aligner on the training index -- features from the cache, or from DINOv2 on the fly when
``features.cache`` is false -- logging the loss per step and a summary per epoch, then writes the
self-describing checkpoint ``${paths.checkpoint}`` with the run id in it, logs it as the run's
artifact and as the run's MLflow pyfunc model (``flows/serving.py``), registered as a new version of
``tracking.registered_model`` -- or, for an ablation (settings that differ from the baseline commit
under `dvc exp run`, or from params.yaml with ``-S``), of ``<registered_model>-ablations``. The run
logs the train stage's settings (dvc.yaml) and an ablation's changed ones, not all of params.yaml. ``${paths.train_state}`` holds the end-of-epoch state while training
runs; ``${paths.train_epochs}`` gets one row per epoch, and ``${paths.train_loss_plot}`` the loss
curve (a DVC image plot: `dvc plots show` draws it offline). A new model makes the old one's
benchmark scores stale: they are removed (:func:`drop_stale_scores`) until evaluate scores it.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from components.config import Params, flatten
from components.io import file_sha256
from flows.common import (
    PARAMS_FILE,
    cached_clip,
    cached_dino,
    inference_spec,
    output_root,
    project_path,
    stage_params,
    table_artifact,
    train_settings,
)
from flows.deferred import NO_CACHE, flow, get_run_logger, task
from flows.plots import line_png

if TYPE_CHECKING:
    import torch

__all__ = [
    "checkpoint_path",
    "state_path",
    "text_prototypes",
    "fit_aligner",
    "train_flow",
    "drop_stale_scores",
    "register",
]

def checkpoint_path(params: Params) -> Path:
    """The stage's DVC out: ``${paths.checkpoint}``."""
    return project_path(params, "checkpoint")


def state_path(params: Params) -> Path:
    """Where an unfinished training keeps its end-of-epoch state: ``${paths.train_state}``."""
    return project_path(params, "train_state")


def _input_paths(params: Params) -> list[Path]:
    """The stage's data inputs (their dvc.lock hashes become tags of the run)."""
    return [project_path(params, "train_index"), output_root(params), project_path(params, "corrections"),
            project_path(params, "features")]


def _data_fingerprint(params: Params) -> str:
    """What the training data is: hashes of the training index, Stage 1's index and the feature
    manifest and index (the label maps and features are content-addressed by those)."""
    from components.features.cache import INDEX_FILE, MANIFEST_FILE
    from components.labelling.corrections import CORRECTIONS_FILE
    from components.labelling.store import INDEX_FILE as STAGE1_INDEX

    features = project_path(params, "features")
    files = [project_path(params, "train_index"), output_root(params) / STAGE1_INDEX,
             project_path(params, "corrections") / CORRECTIONS_FILE,
             features / MANIFEST_FILE, features / INDEX_FILE]
    h = hashlib.sha256()
    for path in files:
        h.update(f"{path.as_posix()}\0{file_sha256(path) if path.exists() else '-'}\0".encode())
    return h.hexdigest()


@task(name="text-prototypes", cache_policy=NO_CACHE)
def text_prototypes(clip: str, device: str, weights_dir: str | None, class_names: list[str],
                    templates: list[str]) -> torch.Tensor:
    """[K, D] float32 L2-normalised text prototypes t_k from the frozen CLIP text encoder."""
    import torch  # here, not at the top: torch takes 2-5 s to import

    from components.models.clip_dense import prototypes

    bundle = cached_clip(clip, device, weights_dir)
    with torch.no_grad():  # not inference_mode: the prototypes enter the (autograd-tracked) loss
        return prototypes(bundle.model, bundle.tokenizer, class_names, templates).float().cpu()


@task(name="fit-aligner", cache_policy=NO_CACHE)
def fit_aligner(params_path: str, prototypes: torch.Tensor, run_id: str) -> dict[str, Any]:
    """Train the aligner (resuming a matching interrupted run) and write the checkpoint with
    ``run_id``; returns {"checkpoint", "epochs", "start_epoch", "steps"}."""
    from components.aligner.checkpoint import save_checkpoint
    from components.aligner.train import train_aligner
    from components.labelling.corrections import CorrectedLabels, Corrections
    from components.labelling.store import PseudoLabels
    from flows import tracking  # here, not at the top: mlflow takes 2-4 s to import

    params = stage_params(params_path)
    labels = CorrectedLabels(PseudoLabels(output_root(params)), Corrections(project_path(params, "corrections")))
    dataset, encoder = _training_data(params, labels)
    settings = _train_settings(params, num_classes=prototypes.shape[0])
    log = get_run_logger()

    # A resumed run logs only what MLflow lacks: the state is saved before an epoch is logged, so a
    # kill in between leaves saved epochs unlogged (re-logged from the state in on_resume), and a
    # kill mid-epoch leaves steps logged that the resumed epoch computes again (not logged twice).
    logged_steps = tracking.logged_steps(params, run_id, "loss")
    logged_epochs = tracking.logged_steps(params, run_id, "epoch/loss")

    def on_step(step: int, loss: float) -> None:
        if step not in logged_steps:
            steps.log_step(step, {"loss": loss})

    def on_epoch(epoch: int, summary: dict[str, float]) -> None:
        steps.flush()
        if epoch not in logged_epochs:
            tracking.log_epoch(params, run_id, epoch, summary)
        log.info("epoch %d/%d: %s", epoch + 1, settings.epochs, epoch_line(summary))

    def on_resume(summaries: list[dict[str, float]], losses: list[float]) -> None:
        for step, loss in enumerate(losses):
            on_step(step, loss)
        steps.flush()
        for epoch, summary in enumerate(summaries):
            if epoch not in logged_epochs:
                tracking.log_epoch(params, run_id, epoch, summary)
                log.info("epoch %d: logged to MLflow from the saved state (the last run stopped first)", epoch + 1)

    with tracking.StepLogger(params, run_id) as steps:
        result = train_aligner(
            dataset, prototypes, settings,
            device=_device(params),
            num_workers=params.train.num_workers,
            encoder=encoder,
            state_path=state_path(params),
            data_fingerprint=_data_fingerprint(params),
            extra={"mlflow_run_id": run_id},
            on_step=on_step,
            on_epoch=on_epoch,
            on_resume=on_resume,
        )
    manifest = _manifest(params)
    path = save_checkpoint(
        checkpoint_path(params),
        model=result.model,
        encoder_spec=manifest["dino"],
        image_size=manifest["image_size"],
        text_spec=params.models.selected.clip,
        templates=list(params.label.templates),
        class_names=labels.vocabulary,
        prototypes=prototypes,
        inference=inference_spec(params),  # SAM, templates and window protocol of the segmenter
        params=flatten(params),
        mlflow_run_id=run_id,
    )
    return {"checkpoint": path.as_posix(), "epochs": result.epochs, "start_epoch": result.start_epoch,
            "steps": result.steps}


def drop_stale_scores(params: Params) -> list[Path]:
    """Remove the benchmark scores of the model this one replaces (evaluate's files of every benchmark
    in ``evaluate.benchmarks``); return those removed. A benchmark the new model is not evaluated on
    then has no numbers, rather than the old model's: `dvc exp show` gives an ablation evaluated on
    pv21 only ``!`` for the others, not its baseline's scores."""
    from flows.evaluate import score_files

    removed = [path for b in params.evaluate.benchmarks for path in score_files(params, b) if path.exists()]
    for path in removed:
        path.unlink()
    return removed


def epoch_line(summary: dict[str, float]) -> str:
    """An epoch summary as one readable line: ``loss 5.4261, lr 0.05, seconds 0.09``."""
    return ", ".join(f"{k} {v:.4g}" for k, v in summary.items())


def write_epochs_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    """The epochs of the run (resumed ones included) as CSV, atomically."""
    import csv
    import io

    from components.io import atomic_write_text

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def _device(params: Params) -> torch.device:
    from components.models.registry import resolve_device

    return resolve_device(params.models.device)


def _manifest(params: Params) -> dict[str, Any]:
    """The feature manifest, checked against the settings (a stale cache is an error, not a silent mix)."""
    from components.features.cache import read_manifest

    manifest = read_manifest(project_path(params, "features"))
    wanted = {"dino": params.models.selected.dino, "image_size": params.features.image_size,
              "cache": params.features.cache}
    found = {k: manifest[k] for k in wanted}
    if found != wanted:
        raise ValueError(f"{project_path(params, 'features')} holds features for {found}, the settings ask for {wanted}: "
                         "run `fmbseg features` (or `dvc repro features`) first")
    return manifest


def _train_settings(params: Params, *, num_classes: int) -> Any:
    """params.yaml ``train`` + ``aligner`` -> the component's TrainSettings; ``num_classes`` (the
    pseudo labels' vocabulary) sets the unlabelled value (255, or 65535 for 16-bit label maps)."""
    from components.io import unlabelled_for
    from components.models.registry import get_spec

    return train_settings(params.aligner, params.train, in_dim=get_spec(params.models.selected.dino).embed_dim,
                          ignore_index=unlabelled_for(num_classes))


def _training_data(params: Params, labels: Any) -> tuple[Any, Any]:
    """(dataset, encoder or None): cached features, or pixels that a DINOv2 encoder turns into
    features per batch (``features.cache: false``)."""
    import pandas as pd  # here, not at the top: pandas takes 1 s to import

    from components.aligner.data import AlignerSamples
    from components.features.cache import FeatureCache
    from components.features.encode import DinoEncoder, PixelSource
    from components.models.registry import get_spec

    manifest = _manifest(params)
    spec = get_spec(manifest["dino"])
    side = manifest["image_size"] // spec.patch_size
    encoder = None
    if manifest["cache"]:
        inputs: Any = FeatureCache(project_path(params, "features"))
    else:
        inputs = PixelSource(".", image_size=manifest["image_size"], mean=spec.mean, std=spec.std)
        device = _device(params)
        encoder = DinoEncoder(cached_dino(spec.name, str(device), params.models.weights_dir), device=device,
                              dtype=params.models.dtype)
    samples = pd.read_parquet(project_path(params, "train_index"))
    dataset = AlignerSamples(samples, inputs=inputs, labels=labels, grid=(side, side),
                             num_classes=len(labels.vocabulary))
    return dataset, encoder


def _corrected_images(params: Params) -> int:
    """How many training images have a person's corrected map (train index variant ``corrected``)."""
    import pandas as pd  # here, not at the top: pandas takes 1 s to import

    from components.labelling.balance import CORRECTED

    variants = pd.read_parquet(project_path(params, "train_index"), columns=["variant"])["variant"]
    return int((variants == CORRECTED).sum())


def _changed_settings(params: Params, params_path: str) -> dict[str, Any]:
    """What makes this training an ablation: under `dvc exp run`, the settings that differ from the
    baseline commit; with ``fmbseg train -S`` (a settings file other than ./params.yaml), those that
    differ from ./params.yaml. Empty for the pipeline's own model."""
    from components.config import load_params
    from flows import tracking  # here, not at the top: mlflow takes 2-4 s to import

    changed = tracking.changed_settings(params)
    project_file = Path(PARAMS_FILE)
    if project_file.exists() and Path(params_path).resolve() != project_file.resolve():
        base = flatten(load_params(project_file))
        changed.update({k: v for k, v in flatten(params).items() if base.get(k) != v})
    return changed


def _run_name(params: Params, changed: dict[str, Any]) -> str:
    """An ablation's run reads as its axes (``aligner.kind=linear``); else the experiment's name or the model."""
    from flows import tracking  # here, not at the top: mlflow takes 2-4 s to import

    a, t = params.aligner, params.train
    fallback = os.environ.get("DVC_EXP_NAME") or f"{a.kind}-{t.loss}-lr{t.lr}-tau{t.temperature}"
    return tracking.run_name_of(changed, fallback)


@flow(name="train", flow_run_name="train", log_prints=True)
def train_flow(params_path: str = PARAMS_FILE) -> dict[str, Any]:
    """Train the aligner into ``${paths.checkpoint}`` with one MLflow run that logs and
    registers it as a pyfunc model; returns a summary."""
    from components.aligner.train import pending_resume
    from components.labelling.store import PseudoLabels
    from flows import model_registry, tracking  # here, not at the top: mlflow takes 2-4 s to import

    params = stage_params(params_path)
    labels = PseudoLabels(output_root(params))
    device = _device(params)
    prototypes = text_prototypes(params.models.selected.clip, str(device), params.models.weights_dir,
                                 labels.vocabulary, list(params.label.templates))
    resume = pending_resume(state_path(params), _train_settings(params, num_classes=prototypes.shape[0]), prototypes, _data_fingerprint(params))
    run_to_resume = (resume or {}).get("mlflow_run_id")
    if run_to_resume is not None and not tracking.run_exists(params, run_to_resume):
        run_to_resume = None
    changed = _changed_settings(params, params_path)
    tags = {**tracking.standard_tags(params, _input_paths(params)), tracking.STAGE_TAG: "train"}
    if changed:
        tags[tracking.CHANGED_TAG] = tracking.run_name_of(changed, "", limit=5000)
    model_name = model_registry.registered_model_for(params, changed)
    with tracking.start_run(params, run_name=_run_name(params, changed), tags=tags, resume_run_id=run_to_resume,
                            settings=tracking.stage_settings(params, "train", changed)) as run_id:
        tracking.log_data_counts(params, run_id, {"corrected_images": _corrected_images(params)})
        result = fit_aligner(params_path, prototypes, run_id)
        tracking.log_checkpoint(params, run_id, result["checkpoint"])
        version = model_registry.log_model(params, run_id, result["checkpoint"], registered_model=model_name)
    state_path(params).unlink(missing_ok=True)
    drop_stale_scores(params)
    last = result["epochs"][-1]
    summary = {"checkpoint": result["checkpoint"], "mlflow_run_id": run_id, "steps": result["steps"],
               "model_version": f"{model_name}/{version}",
               "resumed_at_epoch": result["start_epoch"], "final_loss": last["loss"]}
    rows = [{"epoch": e, **{k: round(v, 5) for k, v in s.items()}} for e, s in enumerate(result["epochs"])]
    write_epochs_csv(project_path(params, "train_epochs"), rows)
    line_png(project_path(params, "train_loss_plot"), [r["epoch"] for r in rows], [r["loss"] for r in rows],
             xlabel="epoch", ylabel="loss", title=f"{params.train.loss} loss, MLflow run {run_id[:8]}")
    print("\n".join(f"{k:>18}  {v}" for k, v in summary.items()))
    table_artifact(rows, key="train-epochs", description=f"aligner training, MLflow run {run_id}")
    return summary


def register(app: typer.Typer) -> None:
    @app.command("train")
    def train_cmd(params: Path = typer.Option(Path(PARAMS_FILE), help="settings file")) -> None:
        """Stage 2: train the aligner on the pseudo labels (resumable), tracked as one MLflow run."""
        train_flow(str(params))
