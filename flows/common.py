"""What every stage flow shares: settings, per-worker model caches, progress (the task runner:
flows/runners.py).

Flows hold no math: they read params.yaml once (:func:`stage_params`), pick the fields each
component needs, and put tasks in order. Tasks take and return paths and small records, never
tensors, so the same flow runs on threads, a Dask cluster or a Ray cluster.
"""

from __future__ import annotations

import functools
import os
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from components.config import (
    SUB_PATHS,
    AlignerConfig,
    LabelConfig,
    Params,
    TrainConfig,
    load_params,
)

if TYPE_CHECKING:
    from components.aligner.settings import TrainSettings
    from components.labelling.settings import Stage1Settings

__all__ = [
    "PARAMS_FILE",
    "stage_params",
    "worker_cache",
    "cached_clip",
    "cached_sam",
    "cached_teacher",
    "cached_dino",
    "Progress",
    "table_artifact",
    "markdown_artifact",
    "in_flow_run",
    "project_path",
    "PROJECT_ROOT",
    "STAGE_DIR",
    "output_root",
    "stage1_settings",
    "train_settings",
    "inference_spec",
    "class_lines",
    "profile_settings",
    "check_models",
]

PARAMS_FILE = "params.yaml"
# the checkout this code runs from (configs/, the shipped params.yaml)
PROJECT_ROOT = Path(__file__).resolve().parents[1]


def profile_settings(profile: str | None, base: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Raw settings of ``base`` (default: this checkout's params.yaml) with the profile's overlay
    configs/<profile>.yaml merged on top where there is one (``demo``: what `make demo` runs, and
    `--profile demo` means; ``modern``: today's models in the three roles): settings to
    build on, so the sub-paths that only follow their base are left out (an overlay that moves
    ``paths.pseudo`` moves ``paths.stage1`` with it; :func:`components.config.without_derived_paths`)."""
    import yaml

    from components.config import deep_merge, without_derived_paths

    raw = yaml.safe_load(Path(base or PROJECT_ROOT / PARAMS_FILE).read_text(encoding="utf-8")) or {}
    overlay = PROJECT_ROOT / "configs" / f"{profile}.yaml"
    if profile is not None and overlay.is_file():
        raw = deep_merge(raw, yaml.safe_load(overlay.read_text(encoding="utf-8")))
    return without_derived_paths(raw)


# ------------------------------------------------------------------ where each stage writes, once
# Stage flows learn an upstream stage's output from params.yaml ``paths`` (components/config/paths.py
# declares each one once), never by importing its flow, so that editing one flow does not make DVC
# rerun the stages after it.
STAGE_DIR = SUB_PATHS["stage1"][1]  # the Stage 1 store's name under ``paths.pseudo``


def output_root(params: Params) -> Path:
    """The label stage's DVC out: ``${paths.stage1}``."""
    return Path(params.paths.stage1)


# ------------------------------------------------------- settings the components take, built once
def stage1_settings(label: LabelConfig) -> Stage1Settings:
    """params.yaml ``label`` -> the components' Stage1Settings: the fields they share, by name."""
    from dataclasses import fields

    from components.labelling.settings import AmgSettings, Stage1Settings

    shared = {f.name: getattr(label, f.name) for f in fields(Stage1Settings) if f.name != "amg"}
    return Stage1Settings(**shared, amg=AmgSettings.of(label.amg))


def train_settings(aligner: AlignerConfig, train: TrainConfig, *, in_dim: int, ignore_index: int) -> TrainSettings:
    """params.yaml ``aligner`` + ``train`` -> the components' TrainSettings: the fields they share,
    by name; ``in_dim`` (the encoder's width) and ``ignore_index`` (the label maps' unlabelled
    value) come from the models and the data, not from params.yaml."""
    from dataclasses import fields

    from components.aligner.settings import TrainSettings

    data = {**aligner.model_dump(), **train.model_dump(), "in_dim": in_dim, "ignore_index": ignore_index}
    return TrainSettings(**{f.name: data[f.name] for f in fields(TrainSettings)})


def inference_spec(params: Params, benchmark: str | None = None) -> Any:
    """The Stage 2 inference protocol of the settings (params.yaml ``evaluate`` and the profile's
    SAM) as a components.aligner.checkpoint.InferenceSpec: what train records in the checkpoint
    (benchmark None: the shared settings), and what evaluate runs a benchmark with (its effective
    settings, ``evaluate.overrides`` included, win over the checkpoint's record there)."""
    from components.aligner.checkpoint import InferenceSpec

    return InferenceSpec.from_settings(params.evaluate.for_benchmark(benchmark), params.models.selected.sam)


def check_models(params: Params, *, dense_text: bool = False) -> None:
    """The selected profile names registry specs of the right roles, and the features' input side
    is a multiple of the student's patch; with ``dense_text`` (Stage 1), the text space is one whose
    vision tower the dense detection runs. A ValueError saying which otherwise (before any model
    loads: the registry holds specs, building is separate)."""
    from components.models.registry import dense_text_specs, get_spec

    for role, name in params.models.selected.model_dump().items():
        try:
            family = get_spec(name).family
        except KeyError as err:
            raise ValueError(f"models.profiles.{params.models.profile}.{role}: {err.args[0]}") from None
        if family != role:
            raise ValueError(f"models.profiles.{params.models.profile}.{role}: {name!r} is a {family} model")
    spec = get_spec(params.models.selected.dino)
    if params.features.image_size % spec.patch_size:
        raise ValueError(f"features.image_size {params.features.image_size} must be a multiple of the patch size "
                         f"{spec.patch_size} of the student {spec.name!r}")
    text = params.models.selected.clip
    if dense_text and text not in dense_text_specs():
        raise ValueError(f"Stage 1's dense detection needs a text space with a class token and a projection; {text!r} "
                         f"has an attention-pool head (Stage 2 only). Text spaces for Stage 1: "
                         f"{', '.join(dense_text_specs())}")


def stage_params(params_path: str | os.PathLike[str] = PARAMS_FILE, overrides: dict[str, Any] | None = None) -> Params:
    """params.yaml of the project the command runs in (DVC runs every stage at the repo root)."""
    return load_params(params_path, overrides)


def worker_cache(maxsize: int | None = 4) -> Any:
    """Decorator: build a value once per worker process and argument tuple (hashable arguments).

    Threads share what is built, Dask/Ray workers each build theirs once. One lock per decorated
    builder keeps two threads from building the same thing twice; a builder may call another one
    (each has its own lock). maxsize: values kept (least recently used dropped; None: all)."""

    def decorate(builder: Any) -> Any:
        cached = functools.lru_cache(maxsize=maxsize)(builder)
        lock = threading.Lock()

        @functools.wraps(builder)
        def get(*args: Any, **kwargs: Any) -> Any:
            with lock:
                return cached(*args, **kwargs)

        get.cache_clear = cached.cache_clear  # type: ignore[attr-defined]
        return get

    return decorate


# One model of each kind per worker process.
@worker_cache()
def cached_clip(name: str, device: str = "cpu", weights_dir: str | None = None) -> Any:
    """The CLIP bundle (model, tokenizer, spec) for ``name``, built once per process."""
    from components.models.registry import build_clip

    return build_clip(name, device=device, weights_dir=weights_dir)


@worker_cache()
def cached_sam(name: str, device: str = "cpu", weights_dir: str | None = None) -> Any:
    """The SAM model for ``name``, built once per process."""
    from components.models.registry import build_sam

    return build_sam(name, device=device, weights_dir=weights_dir)


@worker_cache()
def cached_teacher(name: str, device: str = "cpu", weights_dir: str | None = None) -> Any:
    """The concept teacher (SAM 3) for ``name``, built once per process: the text features it
    caches per vocabulary then serve every shard and image of the worker."""
    from components.models.registry import build_teacher

    return build_teacher(name, device=device, weights_dir=weights_dir)


@worker_cache()
def cached_dino(name: str, device: str = "cpu", weights_dir: str | None = None) -> Any:
    """The DINOv2 model for ``name``, built once per process."""
    from components.models.registry import build_dino

    return build_dino(name, device=device, weights_dir=weights_dir)


def in_flow_run() -> bool:
    """True inside a Prefect flow or task run (artifacts can be created)."""
    try:
        from prefect.context import FlowRunContext, TaskRunContext
    except ImportError:
        return False
    return FlowRunContext.get() is not None or TaskRunContext.get() is not None


class Progress:
    """A progress bar on a terminal (components.progress.terminal_bar) and a Prefect progress
    artifact in the UI, updated together.

    The artifact is updated at most every ``artifact_every`` seconds so that a fast loop does not
    turn into a stream of API calls.
    """

    def __init__(self, total: int, desc: str, key: str | None = None, artifact_every: float = 2.0,
                 unit: str = "img") -> None:
        from components.progress import terminal_bar

        self.total = max(int(total), 0)
        self.done = 0
        self._bar = terminal_bar(self.total, desc, unit)
        self._artifact_id = None
        self._every = artifact_every
        self._last = 0.0
        if in_flow_run():
            from prefect.artifacts import create_progress_artifact

            self._artifact_id = create_progress_artifact(progress=0.0, key=key, description=desc)

    def update(self, n: int = 1) -> None:
        self.done += n
        self._bar.update(n)
        now = time.monotonic()
        if self._artifact_id is not None and (now - self._last >= self._every or self.done >= self.total):
            from prefect.artifacts import update_progress_artifact

            update_progress_artifact(self._artifact_id, progress=100.0 * self.done / max(self.total, 1))
            self._last = now

    def advance_to(self, done: int) -> None:
        """Move to ``done`` items, if that is ahead (counts polled from workers)."""
        if done > self.done:
            self.update(done - self.done)

    def close(self) -> None:
        if self._artifact_id is not None:
            from prefect.artifacts import update_progress_artifact

            update_progress_artifact(self._artifact_id, progress=100.0 * self.done / max(self.total, 1))
        self._bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def table_artifact(rows: list[dict[str, Any]], key: str | None, description: str) -> None:
    """A Prefect table artifact (no-op outside a flow run)."""
    if in_flow_run():
        from prefect.artifacts import create_table_artifact

        create_table_artifact(table=rows, key=key, description=description)


def markdown_artifact(markdown: str, key: str | None, description: str) -> None:
    """A Prefect markdown artifact (no-op outside a flow run)."""
    if in_flow_run():
        from prefect.artifacts import create_markdown_artifact

        create_markdown_artifact(markdown=markdown, key=key, description=description)


def project_path(params: Params, name: str) -> Path:
    """A path of the ``paths`` section, relative to the working directory (the project root)."""
    return Path(getattr(params.paths, name))


def class_lines(classes: str | None, vocabulary: str | None) -> list[str]:
    """The vocabulary: ``--classes "sky,grass,car"`` (one class per comma) or ``--vocabulary`` (a
    shipped class list's name or a class file, one class per line, comma-separated synonyms)."""
    from components.datasets.registry import read_class_list

    if (classes is None) == (vocabulary is None):
        raise ValueError("give the class names with exactly one of --classes and --vocabulary")
    if classes is not None:
        lines = [c.strip() for c in classes.split(",")]
        if not any(lines) or not all(lines):
            raise ValueError(f"--classes {classes!r} holds an empty class name")
        return lines
    assert vocabulary is not None
    lines = read_class_list(vocabulary, source="--vocabulary")
    if not lines:
        raise ValueError(f"vocabulary file {vocabulary} holds no class")
    return lines
