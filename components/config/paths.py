"""``paths``: where every stage reads and writes, each place written once."""

from __future__ import annotations

from pathlib import PurePosixPath
from typing import Any

from pydantic import model_validator

from components.config.base import Section

# ----------------------------------------------------------------------------------------- paths
# Each stage's own output (and the files inside one that a later stage reads), as a place under a
# base path: key -> (the base's key, its name there). A params file that leaves a key out gets
# this place under its own base: an overlay (configs/<profile>.yaml, `label --images`) that moves a
# base moves these with it (profile settings drop the restated ones: without_derived_paths).
SUB_PATHS: dict[str, tuple[str, str]] = {
    "stage1": ("pseudo", "stage1"),                      # label: the Stage 1 store
    "train_index": ("pseudo", "train_index.parquet"),    # balance: the training index
    "corrections": ("pseudo", "corrections"),            # import-labels: corrected maps (balance, train read them)
    "checkpoint": ("models", "aligner.pt"),              # train: the self-describing checkpoint
    "train_state": ("models", "train_state.pt"),         # train: end-of-epoch state while it runs
    "train_epochs": ("metrics", "train_epochs.csv"),     # train: one row per epoch
    "train_loss_plot": ("metrics", "train_loss.png"),    # train: the loss curve (dvc plots)
    "stage1_metrics": ("metrics", "stage1"),             # evaluate-stage1: <benchmark>_<variant>.json
    "overlays": ("reports", "overlays"),                 # evaluate: <benchmark>/<image>.png
    "eval_state": ("reports", ".eval_state"),            # evaluate: resume state of a run
    "report_md": ("reports", "report.md"),               # report: the tables
    "report_csv": ("reports", "report.csv"),
    "stage1_csv": ("reports", "stage1.csv"),
}


class PathsConfig(Section):
    """Where every stage reads and writes, relative to the project root. Written once, here;
    dvc.yaml templates them (``${paths.stage1}``) and the code reads them from this object, never
    composing one from another. The keys of :data:`SUB_PATHS` left out follow their base."""

    data: str = "data"
    raw: str = "data/raw"
    datasets: str = "data/datasets"
    images: str = "data/datasets/coco_train/images/train"
    incoming: str = "data/incoming"
    pseudo: str = "data/pseudo"
    features: str = "data/features"
    models: str = "models"
    metrics: str = "metrics"
    reports: str = "reports"
    # filled from SUB_PATHS when absent (:meth:`_sub_paths_follow_their_base`)
    stage1: str
    train_index: str
    corrections: str
    checkpoint: str
    train_state: str
    train_epochs: str
    train_loss_plot: str
    stage1_metrics: str
    overlays: str
    eval_state: str
    report_md: str
    report_csv: str
    stage1_csv: str

    @model_validator(mode="before")
    @classmethod
    def _sub_paths_follow_their_base(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        return {**derived_paths(data), **data}


def derived_paths(paths: dict[str, Any]) -> dict[str, str]:
    """The keys of :data:`SUB_PATHS`, each placed under its base as ``paths`` (a raw ``paths``
    section) gives it, or under the base's default: ``{"stage1": "<pseudo>/stage1", ...}``."""
    out = {}
    for key, (base, name) in SUB_PATHS.items():
        root = paths.get(base, PathsConfig.model_fields[base].default)
        out[key] = (PurePosixPath(str(root)) / name).as_posix()
    return out


def without_derived_paths(raw: dict[str, Any]) -> dict[str, Any]:
    """Raw params without the sub-paths that only restate :data:`SUB_PATHS` (``paths.stage1`` =
    ``<paths.pseudo>/stage1``); the same settings once parsed, but an overlay merged on top of them
    that moves a base (``paths.pseudo``) then moves those sub-paths with it."""
    paths = raw.get("paths")
    if not isinstance(paths, dict):
        return raw
    derived = derived_paths(paths)
    kept = {k: v for k, v in paths.items() if not (k in derived and v == derived[k])}
    return {**raw, "paths": kept}
