"""MLflow tracking: the only module of the project that writes to MLflow.

One run per trained model (docs/design.md §6). The train flow opens it with :func:`start_run`, logs the loss
per step through a :class:`StepLogger` (buffered: one SQLite write per step would cost more than
the step on a GPU), an epoch summary per epoch (:func:`log_epoch`), the checkpoint
(:func:`log_checkpoint`) and the model as an MLflow pyfunc model registered as a new version of
``tracking.registered_model`` (:func:`log_model`; the model class is ``flows/serving.py``'s); the
checkpoint carries the run id, and the evaluate stages attach their metrics and tables to the same
run with :func:`attach_metrics`. The nightly job compares a new model with the registered
``champion`` and moves the alias to the new model's version (:func:`run_scores`,
:func:`champion_scores`, :func:`promote_champion`).

Where runs go (:func:`tracking_uri`): ``$MLFLOW_TRACKING_URI``, else ``tracking.tracking_uri``, else
``sqlite:///<project root>/mlflow.db`` with artifacts in ``<project root>/mlartifacts``. A
``dvc exp run --queue`` experiment runs in a copy of the project under ``<root>/.dvc/tmp/exps/``;
its runs still land in ``<root>``'s store, so a grid of queued experiments compares in one UI.

What a reader of the UI sees: trained models in experiment ``tracking.experiment``, Stage 1's
scoring runs apart in ``<experiment>-stage1``; each run logs the settings of its own stage
(:func:`stage_settings`), not the whole params.yaml; the pipeline's model registers under
``tracking.registered_model``, an ablation (a run whose settings differ from its baseline) under
``<registered_model>-ablations`` (:func:`registered_model_for`), so ``latest`` and ``champion`` of the
production name only ever name pipeline models; both registered models and each version carry a
description (input, profile, scores). A SQLite store's artifacts live in ``mlartifacts/`` beside the
database; MLflow records them as absolute paths, so a copied or moved workspace is re-pointed at its
own ``mlartifacts/`` the first time fmbseg opens it (:func:`open_store`).
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import subprocess
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any

import pandas as pd
import yaml
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunStatus, RunTag
from mlflow.exceptions import MlflowException
from mlflow.utils.validation import MAX_METRICS_PER_BATCH, MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH

from components.aligner.checkpoint import load_aligner
from components.config import Params, flatten

__all__ = [
    "GROUP_ENV",
    "CHAMPION_ALIAS",
    "STAGE_TAG",
    "RESUME_CHANGES_TAG",
    "HEADLINE_VIEW",
    "project_root",
    "tracking_uri",
    "open_store",
    "stage_settings",
    "registered_model_for",
    "stage1_experiment",
    "headline_url",
    "standard_tags",
    "start_run",
    "run_exists",
    "StepLogger",
    "log_epoch",
    "logged_steps",
    "log_checkpoint",
    "log_model",
    "attach_metrics",
    "checkpoint_run_id",
    "run_scores",
    "champion_run_id",
    "champion_scores",
    "promote_champion",
    "model_runs",
    "resolve_model_uri",
]

# Set this to one value for a batch of runs (a nightly, a hand-made sweep) to group them in the UI;
# runs of one `dvc exp run --queue` grid are grouped by their baseline commit without it.
GROUP_ENV = "FMBSEG_RUN_GROUP"
_DVC_EXPS_DIR = (".dvc", "tmp", "exps")
CHAMPION_ALIAS = "champion"
STAGE_TAG = "fmbseg.stage"  # "train" on the one run of each trained model
RESUME_CHANGES_TAG = "fmbseg.params_changed_on_resume"
CHANGED_TAG = "fmbseg.changed"  # an ablation's settings that differ from its baseline (aligner.kind=linear)
CHECKPOINT_ARTIFACT_DIR = "model"
PYFUNC_MODEL_NAME = "segmenter"  # the logged pyfunc model of a train run


# per-benchmark quantities that count images: run tags, not metrics (attach_metrics)
COUNT_METRICS = frozenset({"images", "skipped"})
# MLflow 3's UI opens an experiment of this kind on its runs table (not the GenAI overview)
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"
ARTIFACTS_DIR = "mlartifacts"  # a SQLite store's artifacts: this folder beside the database
STAGE1_EXPERIMENT_SUFFIX = "-stage1"  # Stage 1's scoring runs: experiment <tracking.experiment>-stage1
ABLATION_MODEL_SUFFIX = "-ablations"  # an ablation's model: registered model <registered_model>-ablations
# The runs table of MLflow 3.17 shows no metric or param column until a reader picks some. A view
# shared as an experiment tag (what the UI's "Share" button writes) opens it on the headline
# numbers instead, sorted by the mean: <ui>/#/experiments/<id>/runs?viewStateShareKey=headline
HEADLINE_VIEW = "headline"
HEADLINE_METRICS = ("mean/mIoU_base", "mean/mIoU_refined", "pv21/mIoU_base", "pv21/mIoU_refined")
_SHARED_VIEW_TAG = "mlflow.sharedViewState."


def project_root(cwd: str | os.PathLike[str] | None = None) -> Path:
    """The project whose MLflow store runs belong to: the working directory, except inside a DVC
    queued-experiment copy ``<root>/.dvc/tmp/exps/<tmp>/...``, where it is ``<root>``."""
    path = Path(cwd if cwd is not None else os.getcwd()).resolve()
    parts = path.parts
    for i in range(len(parts) - len(_DVC_EXPS_DIR) + 1):
        if parts[i : i + len(_DVC_EXPS_DIR)] == _DVC_EXPS_DIR:
            return Path(*parts[:i])
    return path


def _sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (None for other stores)."""
    prefix = "sqlite:///"
    return Path(uri[len(prefix) :]) if uri.startswith(prefix) else None


def tracking_uri(params: Params, project_dir: str | os.PathLike[str] | None = None) -> str:
    """``$MLFLOW_TRACKING_URI``, else ``tracking.tracking_uri``, else the project's SQLite store.

    A relative SQLite path is taken relative to the project root (:func:`project_root` of
    ``project_dir``, default the working directory), never to a DVC temp copy.
    """
    root = project_root(project_dir)
    uri = os.environ.get("MLFLOW_TRACKING_URI") or params.tracking.tracking_uri
    if uri is None:
        return f"sqlite:///{root / 'mlflow.db'}"
    db = _sqlite_path(uri)
    if db is not None and not db.is_absolute():
        return f"sqlite:///{root / db}"
    return uri


# where MLflow writes a local artifact location (file URI): re-pointed when the store has moved
_ARTIFACT_COLUMNS = (("experiments", "artifact_location"), ("runs", "artifact_uri"),
                     ("logged_models", "artifact_location"), ("model_versions", "storage_location"))
_opened_stores: set[str] = set()


def open_store(uri: str) -> MlflowClient:
    """A client of the store at ``uri``. A SQLite store copied or moved from another folder is first
    re-pointed at its own ``mlartifacts/`` (once per process): MLflow records each experiment's, run's
    and model's artifact location as an absolute path, which would still name the old folder."""
    if uri not in _opened_stores:
        db = _sqlite_path(uri)
        if db is not None and db.exists():
            _relocate_artifacts(db)
        _opened_stores.add(uri)
    return MlflowClient(uri)


def _relocate_artifacts(db: Path) -> None:
    """Rewrite the artifact locations under another folder's ``mlartifacts/`` (the experiments fmbseg
    created there) to this database's ``mlartifacts/``; locations elsewhere (S3, a chosen folder)
    are left alone."""
    own = (db.parent / ARTIFACTS_DIR).resolve().as_uri()
    with closing(sqlite3.connect(db, timeout=60)) as con, con:
        tables = {row[0] for row in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if "experiments" not in tables:
            return  # a store MLflow has not set up yet
        stale = {loc for (loc,) in con.execute("SELECT artifact_location FROM experiments")
                 if loc and loc.startswith("file://") and loc.endswith("/" + ARTIFACTS_DIR) and loc != own}
        for old in stale:
            pattern = old.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "/%"
            for table, column in _ARTIFACT_COLUMNS:
                if table in tables:
                    con.execute(f"UPDATE {table} SET {column} = ? || substr({column}, ?) "
                                f"WHERE {column} = ? OR {column} LIKE ? ESCAPE '\\'",
                                (own, len(old) + 1, old, pattern))


def _client(params: Params) -> MlflowClient:
    return open_store(tracking_uri(params))


def _headline_view(experiment_name: str) -> str:
    """The shared view :data:`HEADLINE_VIEW` as the UI reads it (JSON): runs sorted by the mean
    mIoU, the headline metrics and the ablation axes as columns."""
    if experiment_name.endswith(STAGE1_EXPERIMENT_SUFFIX):  # Stage 1's scores: one run per variant
        columns, sort = ["tags.`variant`", "tags.`dataset`", "metrics.`pv21/mIoU`"], "attributes.start_time"
    else:
        columns = ["attributes.`Models`", *(f"metrics.`{m}`" for m in HEADLINE_METRICS),
                   "params.`aligner.kind`", "params.`train.loss`", f"tags.`{CHANGED_TAG}`"]
        sort = f"metrics.`{HEADLINE_METRICS[0]}`"
    return json.dumps({"orderByKey": sort, "orderByAsc": False, "selectedColumns": columns})


def _experiment_id(mlflow: MlflowClient, name: str) -> str:
    """The id of experiment ``name``, created when missing, opening on its runs in the UI's
    model-training view with the headline view shared. With a SQLite store its artifacts go to
    ``mlartifacts/`` next to the database (MLflow's default would be the working directory)."""
    tags = {EXPERIMENT_KIND_TAG: EXPERIMENT_KIND, _SHARED_VIEW_TAG + HEADLINE_VIEW: _headline_view(name)}
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is not None:
        for key, value in tags.items():
            if experiment.tags.get(key) != value:
                mlflow.set_experiment_tag(experiment.experiment_id, key, value)
        return experiment.experiment_id
    db = _sqlite_path(mlflow.tracking_uri)
    location = (db.parent / ARTIFACTS_DIR).resolve().as_uri() if db is not None else None
    return mlflow.create_experiment(name, artifact_location=location, tags=tags)


def _git_commit(cwd: Path) -> str:
    """``git rev-parse HEAD`` in ``cwd``, or "unknown" outside a git checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True, timeout=30
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() or "unknown"


def _lock_hashes(lock_file: Path, input_paths: Iterable[str | os.PathLike[str]]) -> dict[str, str]:
    """{path: md5} from dvc.lock for each input path, as recorded by the stage that wrote it
    (its ``outs``) or, for a source file, by a stage that reads it (its ``deps``)."""
    with open(lock_file, encoding="utf-8") as f:
        lock = yaml.safe_load(f) or {}
    recorded: dict[str, str] = {}
    for section in ("deps", "outs"):  # outs second: the producer's record wins
        for stage in (lock.get("stages") or {}).values():
            for entry in stage.get(section) or []:
                if "md5" in entry:
                    recorded[os.path.normpath(entry["path"])] = str(entry["md5"])
    wanted = [os.path.normpath(p) for p in input_paths]
    return {p: recorded[p] for p in wanted if p in recorded}


def standard_tags(params: Params, input_paths: Iterable[str | os.PathLike[str]] = ()) -> dict[str, str]:
    """Tags every fmbseg run carries.

    ``git.commit`` (also as ``mlflow.source.git.commit`` for the UI), ``fmbseg.profile``,
    ``dvc.exp_name`` ($DVC_EXP_NAME, under `dvc exp run`), ``fmbseg.group`` ($FMBSEG_RUN_GROUP, else
    $DVC_EXP_BASELINE_REV: the runs of one queued grid share it), and ``dvc.md5/<path>`` for each of
    ``input_paths`` (relative to the working directory) that dvc.lock records.
    """
    cwd = Path.cwd()
    commit = _git_commit(cwd)
    tags = {"git.commit": commit, "mlflow.source.git.commit": commit, "fmbseg.profile": params.models.profile}
    if os.environ.get("DVC_EXP_NAME"):
        tags["dvc.exp_name"] = os.environ["DVC_EXP_NAME"]
    group = os.environ.get(GROUP_ENV) or os.environ.get("DVC_EXP_BASELINE_REV")
    if group:
        tags["fmbseg.group"] = group
    lock_file = cwd / "dvc.lock"
    if lock_file.exists():
        for path, md5 in _lock_hashes(lock_file, input_paths).items():
            tags[f"dvc.md5/{Path(path).as_posix()}"] = md5
    return tags


def changed_settings(params: Params, baseline_rev: str | None = None, cwd: str | os.PathLike[str] | None = None
                     ) -> dict[str, Any]:
    """The settings that differ from params.yaml at git revision ``baseline_rev`` (default
    ``$DVC_EXP_BASELINE_REV``, which `dvc exp run` sets), as dotted keys with this run's values;
    {} when there is no baseline or it cannot be read."""
    from components.config import parse_params

    rev = baseline_rev or os.environ.get("DVC_EXP_BASELINE_REV")
    if not rev:
        return {}
    try:
        text = subprocess.run(["git", "show", f"{rev}:params.yaml"], cwd=cwd, check=True,
                              capture_output=True, text=True).stdout
        baseline = flatten(parse_params(yaml.safe_load(text)))
    except (OSError, subprocess.CalledProcessError, ValueError, yaml.YAMLError):
        return {}
    ours = flatten(params)
    return {k: v for k, v in ours.items() if baseline.get(k) != v}


def run_name_of(changed: Mapping[str, Any], fallback: str, limit: int = 120) -> str:
    """A run named after what differs from its baseline (``aligner.kind=linear train.lr=0.1``),
    else ``fallback``; long names are cut at ``limit`` characters."""
    if not changed:
        return fallback
    name = " ".join(f"{k}={v}" for k, v in sorted(changed.items()))
    return name if len(name) <= limit else name[: limit - 3] + "..."


def stage_settings(params: Params, stage: str, changed: Mapping[str, Any] | None = None,
                   dvc_file: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """The settings a run logs as its params: those the dvc.yaml ``stage`` lists under ``params``
    (a section such as ``train``, or a dotted key), flattened, with ``models.profiles`` cut to the
    selected profile; plus ``changed`` (:func:`changed_settings`), the ablation's axes even where
    they belong to an upstream stage (``balance.ratio``). ``dvc_file``: default the working
    directory's dvc.yaml (the pipeline that runs), else the one beside the code (a stage command
    run outside a DVC project)."""
    if dvc_file is None:
        dvc_file = "dvc.yaml" if Path("dvc.yaml").is_file() else Path(__file__).resolve().parents[1] / "dvc.yaml"
    with open(dvc_file, encoding="utf-8") as f:
        stages = (yaml.safe_load(f) or {}).get("stages") or {}
    if stage not in stages:
        raise KeyError(f"{dvc_file} has no stage {stage!r}; its stages: {', '.join(stages)}")
    spec = stages[stage].get("do", stages[stage])  # a foreach stage lists them under do:
    keys = [k if k != "models.profiles" else f"models.profiles.{params.models.profile}" for k in spec.get("params") or []]
    if not all(isinstance(k, str) for k in keys):
        raise ValueError(f"{dvc_file}: stage {stage!r} lists params of another file; fmbseg reads params.yaml only")
    flat = flatten(params)
    chosen = {k: v for k, v in flat.items() if any(k == key or k.startswith(key + ".") for key in keys)}
    return {**chosen, **(changed or {})}


def stage1_experiment(params: Params) -> str:
    """The experiment of Stage 1's scoring runs (evaluate-stage1): ``<tracking.experiment>-stage1``,
    apart from the trained models."""
    return params.tracking.experiment + STAGE1_EXPERIMENT_SUFFIX


def registered_model_for(params: Params, changed: Mapping[str, Any]) -> str:
    """The registered model a trained model becomes a version of: ``tracking.registered_model`` for
    the pipeline's model, ``<registered_model>-ablations`` for an ablation (``changed`` not empty), so
    that the production name's versions, ``latest`` and ``champion`` only ever name pipeline models."""
    name = params.tracking.registered_model
    return name + ABLATION_MODEL_SUFFIX if changed else name


def _param_value(value: Any) -> str:
    text = str(value)
    if len(text) > MAX_PARAM_VAL_LENGTH:
        raise ValueError(f"a parameter value is longer than MLflow's {MAX_PARAM_VAL_LENGTH} characters: {text[:80]}...")
    return text


def run_exists(params: Params, run_id: str) -> bool:
    """True when ``run_id`` is a run of the store :func:`tracking_uri` names."""
    try:
        _client(params).get_run(run_id)
    except MlflowException:
        return False
    return True


@contextmanager
def start_run(
    params: Params, *, run_name: str, tags: Mapping[str, str], settings: Mapping[str, Any] | None = None,
    resume_run_id: str | None = None, experiment: str | None = None,
) -> Iterator[str]:
    """Open a run in ``experiment`` (default ``tracking.experiment``); yield its id.

    Logs ``settings`` as params (dotted keys, ``train.lr`` ...: :func:`stage_settings`) and ``tags``.
    ``resume_run_id`` reopens that run instead (an interrupted training resuming): params it lacks
    are added, and params edited since are listed in the tag ``fmbseg.params_changed_on_resume``.
    The run ends FINISHED, or FAILED on an exception (KILLED on Ctrl-C).
    """
    mlflow = _client(params)
    values = {k: _param_value(v) for k, v in sorted((settings or {}).items())}
    tags = dict(tags)
    if resume_run_id is not None:
        run_id = resume_run_id
        logged = mlflow.get_run(run_id).data.params
        # MLflow never changes a logged param: settings that do not touch the training (those in
        # its resume key) may have been edited meanwhile; they are named in a tag instead.
        changed = sorted(k for k in values.keys() & logged.keys() if values[k] != logged[k])
        if changed:
            tags[RESUME_CHANGES_TAG] = ", ".join(changed)[:5000]
        values = {k: v for k, v in values.items() if k not in logged}
        mlflow.update_run(run_id, status="RUNNING")
    else:
        run_id = mlflow.create_run(_experiment_id(mlflow, experiment or params.tracking.experiment),
                                   run_name=run_name).info.run_id
    param_list = [Param(k, v) for k, v in values.items()]
    tag_list = [RunTag(k, str(v)) for k, v in tags.items()]
    for i in range(0, max(len(param_list), len(tag_list)), MAX_PARAMS_TAGS_PER_BATCH):
        mlflow.log_batch(
            run_id,
            params=param_list[i : i + MAX_PARAMS_TAGS_PER_BATCH],
            tags=tag_list[i : i + MAX_PARAMS_TAGS_PER_BATCH],
        )
    status = RunStatus.to_string(RunStatus.FAILED)
    try:
        yield run_id
        status = RunStatus.to_string(RunStatus.FINISHED)
    except KeyboardInterrupt:
        status = RunStatus.to_string(RunStatus.KILLED)
        raise
    finally:
        mlflow.set_terminated(run_id, status=status)


def _metrics(values: Mapping[str, float], step: int) -> list[Metric]:
    now_ms = int(time.time() * 1000)
    return [Metric(k, float(v), now_ms, step) for k, v in values.items()]


def _log_metrics(mlflow: MlflowClient, run_id: str, metrics: Sequence[Metric]) -> None:
    for i in range(0, len(metrics), MAX_METRICS_PER_BATCH):
        mlflow.log_batch(run_id, metrics=metrics[i : i + MAX_METRICS_PER_BATCH])


class StepLogger:
    """Per-step metrics of one run, written in batches (every ``every`` metrics or ``seconds``).

    Use as a context manager, or call :meth:`flush` before the run ends.
    """

    def __init__(self, params: Params, run_id: str, *, every: int = 100, seconds: float = 10.0) -> None:
        self._client = _client(params)
        self._run_id = run_id
        self._every = every
        self._seconds = seconds
        self._pending: list[Metric] = []
        self._last_flush = time.monotonic()

    def log_step(self, step: int, metrics: Mapping[str, float]) -> None:
        """Record ``metrics`` (e.g. ``{"loss": 1.3}``) at global step ``step``."""
        self._pending.extend(_metrics(metrics, step))
        if len(self._pending) >= self._every or time.monotonic() - self._last_flush >= self._seconds:
            self.flush()

    def flush(self) -> None:
        """Write what is pending."""
        _log_metrics(self._client, self._run_id, self._pending)
        self._pending = []
        self._last_flush = time.monotonic()

    def __enter__(self) -> StepLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.flush()


def logged_steps(params: Params, run_id: str, key: str) -> set[int]:
    """The steps at which metric ``key`` of the run has a value already."""
    return {m.step for m in _client(params).get_metric_history(run_id, key)}


def log_epoch(params: Params, run_id: str, epoch: int, summary: Mapping[str, float]) -> None:
    """An epoch summary as metrics ``epoch/<name>`` at step ``epoch`` (0-based)."""
    metrics = _metrics({f"epoch/{k}": v for k, v in summary.items()}, epoch)
    _log_metrics(_client(params), run_id, metrics)


def log_data_counts(params: Params, run_id: str, counts: Mapping[str, int]) -> None:
    """Counts that describe the training data as metrics ``data/<name>`` at step 0 (a resumed run
    logs them again, at the same step)."""
    _log_metrics(_client(params), run_id, _metrics({f"data/{k}": v for k, v in counts.items()}, 0))


def log_checkpoint(params: Params, run_id: str, path: str | os.PathLike[str]) -> None:
    """The checkpoint file as an artifact of the run, under ``model/``."""
    _client(params).log_artifact(run_id, str(path), artifact_path=CHECKPOINT_ARTIFACT_DIR)


@contextmanager
def _process_tracking_uri(uri: str) -> Iterator[None]:
    """MLflow's process-wide tracking URI set to ``uri`` for a block, then restored together with
    ``$MLFLOW_TRACKING_URI`` (which MLflow's own restore of an unset URI would delete)."""
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    saved = os.environ.get("MLFLOW_TRACKING_URI")
    try:
        with _use_tracking_uri(uri):
            yield
    finally:
        if saved is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = saved


_MODEL_IO = """**Input** (one row per image): `image`, the image file as base64 (PNG or JPEG bytes); `classes`,
the class names, comma-separated (`"sky, tree, person"`; `;` between classes when one has synonyms:
`"person, people; sky"`). Parameter `refine` (boolean, default false): the SAM-refined maps.

**Output**: `label_map`, a base64 grayscale PNG at the image's size, each pixel the index of its class
in the row's `classes` (255 = none); `present`, the names of the classes in it."""


def model_description(name: str, production: str) -> str:
    """The registered model's description (markdown): what it is, takes and returns, how to load it."""
    if name == production:
        what = (f"fmbseg's segmenter: open-vocabulary semantic segmentation trained without annotations "
                f"(a DINOv2 aligner on CLIP + SAM pseudo labels). Versions are the pipeline's models only; "
                f"the alias `{CHAMPION_ALIAS}` names the one the nightly job judged best.")
        load = f'mlflow.pyfunc.load_model("models:/{name}@{CHAMPION_ALIAS}")'
    else:
        what = (f"Ablations of `{production}`: models trained with settings that differ from the pipeline's "
                f"(each version names them). They never become `{production}`'s champion.")
        load = f'mlflow.pyfunc.load_model("models:/{name}/<version>")'
    return f"{what}\n\n{_MODEL_IO}\n\n**Load**: `{load}`; each version's description gives its profile and scores."


def version_description(run: Any) -> str:
    """A model version's description (markdown) from its training run: profile and models, the
    aligner and loss, an ablation's changed settings, and the mIoU scores evaluated so far."""
    data = run.data
    profile = data.params.get("models.profile", "?")
    models = ", ".join(data.params.get(f"models.profiles.{profile}.{m}", "?") for m in ("clip", "sam", "dino"))
    lines = [f"**Profile** `{profile}` ({models}); aligner `{data.params.get('aligner.kind', '?')}`, "
             f"loss `{data.params.get('train.loss', '?')}`, MLflow run `{run.info.run_id}`."]
    if data.tags.get(CHANGED_TAG):
        lines.append(f"**Ablation**: {data.tags[CHANGED_TAG]}.")
    scores = sorted({k.rsplit("/", 1)[0] for k in data.metrics if k.endswith(("/mIoU_base", "/mIoU_refined"))},
                    key=lambda b: (b != "mean", b))
    if not scores:
        lines.append("**Scores**: not evaluated yet.")
    else:
        def pair(bench: str) -> str:
            values = [data.metrics.get(f"{bench}/mIoU_{v}") for v in ("base", "refined")]
            return " / ".join("-" if x is None else f"{x:.1f}" for x in values)
        lines.append("**Scores** (mIoU %, base / refined): " + "; ".join(f"{b} {pair(b)}" for b in scores) + ".")
    return "\n\n".join(lines)


_RUN_NOTE_TAG = "mlflow.note.content"  # the run page's "Description"


def _describe_versions(mlflow: MlflowClient, run_id: str) -> None:
    """Bring the description of every model version the run registered, and the run's own, up to
    date (new scores)."""
    versions = mlflow.search_model_versions(f"run_id = '{run_id}'")
    if versions:
        run = mlflow.get_run(run_id)
        text = version_description(run)
        if run.data.tags.get(_RUN_NOTE_TAG) != text:
            mlflow.set_tag(run_id, _RUN_NOTE_TAG, text)
        for v in versions:
            if v.description != text:
                mlflow.update_model_version(v.name, v.version, description=text)


def log_model(params: Params, run_id: str, checkpoint: str | os.PathLike[str], *,
              registered_model: str | None = None) -> str:
    """Log the checkpoint as the run's pyfunc model (``flows.serving.SegmenterModel`` with its
    signature, input example, the project's code and pinned requirements) and register it as a new
    version of ``registered_model`` (default ``tracking.registered_model``; an ablation passes
    :func:`registered_model_for`'s name); return the version. The registered model and the version
    carry descriptions (:func:`model_description`, :func:`version_description`).

    Written with the store's client (MLflow's ``log_model`` would go through the process-wide
    tracking URI and active run): a logged model of the run's experiment, its files, the run's
    output link, then the registered version whose source is ``models:/<model id>``.
    """
    from mlflow import pyfunc
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus
    from mlflow.models import Model

    from flows import serving

    mlflow = _client(params)
    run = mlflow.get_run(run_id)
    logged = mlflow.create_logged_model(run.info.experiment_id, name=PYFUNC_MODEL_NAME, source_run_id=run_id,
                                        model_type="fmbseg-segmenter")
    try:
        with tempfile.TemporaryDirectory(prefix="fmbseg-model-") as staging:
            local = Path(staging) / "model"
            mlflow_model = Model(artifact_path=logged.artifact_location, run_id=run_id,
                                 model_uuid=logged.model_id, model_id=logged.model_id)
            pyfunc.save_model(
                local,
                mlflow_model=mlflow_model,
                python_model=Path(serving.__file__).with_name("serving_model.py"),
                artifacts={serving.CHECKPOINT_ARTIFACT: str(checkpoint)},
                model_config=serving.model_config(params),  # the budgets the served model enforces
                code_paths=serving.code_paths(Path(staging) / "code"),
                signature=serving.SIGNATURE,
                input_example=serving.input_example(),
                pip_requirements=serving.pip_requirements(),
            )
            mlflow.log_model_artifacts(logged.model_id, str(local))
    except BaseException:
        mlflow.finalize_logged_model(logged.model_id, LoggedModelStatus.FAILED)
        raise
    mlflow.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=0)])
    mlflow.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)
    name = registered_model or params.tracking.registered_model
    description = model_description(name, params.tracking.registered_model)
    try:
        if mlflow.get_registered_model(name).description != description:
            mlflow.update_registered_model(name, description=description)
    except MlflowException:
        mlflow.create_registered_model(name, description=description)
    # MLflow's registry resolves a ``models:/<model id>`` source through the process-wide tracking
    # URI, whose default (the working directory's mlflow.db) is not this store inside a DVC
    # queued-experiment copy: point it at the store for this one call.
    with _process_tracking_uri(mlflow.tracking_uri):
        version = mlflow.create_model_version(name, f"models:/{logged.model_id}", run_id=run_id,
                                              model_id=logged.model_id, description=version_description(run))
    mlflow.set_tag(run_id, _RUN_NOTE_TAG, version_description(run))
    return str(version.version)


def attach_metrics(
    run_id: str,
    metrics: Mapping[str, float],
    artifacts: Sequence[str | os.PathLike[str]] = (),
    artifact_path: str | None = None,
    *,
    params: Params,
) -> None:
    """Metrics (``{"<dataset>/mIoU_base": 41.2, ...}``, at step 0) and files (per-class tables,
    overlays, under ``artifact_path``) of a later stage, attached to the training run ``run_id``
    (a finished run accepts them). Counts (``<dataset>/images``, ``<dataset>/skipped``) are no
    scores: they become tags of the run, not metrics.

    Once every benchmark of ``evaluate.benchmarks`` has its ``mIoU_<variant>`` on the run, the mean
    over them is logged too (``mean/mIoU_base``, ``mean/mIoU_refined``), the one number the UI can
    sort ablations by."""
    mlflow = _client(params)
    scores = {k: v for k, v in metrics.items() if k.rsplit("/", 1)[-1] not in COUNT_METRICS}
    counts = {k: str(int(v)) for k, v in metrics.items() if k not in scores}
    _log_metrics(mlflow, run_id, _metrics(scores, 0))
    for key, value in counts.items():
        mlflow.set_tag(run_id, key, value)
    for path in artifacts:
        mlflow.log_artifact(run_id, str(path), artifact_path=artifact_path)
    if scores:
        logged = mlflow.get_run(run_id).data.metrics
        means = benchmark_means(logged, params.evaluate.benchmarks)
        if means:
            _log_metrics(mlflow, run_id, _metrics(means, 0))
        _describe_versions(mlflow, run_id)


def benchmark_means(logged: Mapping[str, float], benchmarks: Sequence[str]) -> dict[str, float]:
    """``{"mean/mIoU_<variant>": mean over benchmarks}`` for each variant every benchmark has."""
    means = {}
    for variant in ("base", "refined"):
        values = [logged.get(f"{b}/mIoU_{variant}") for b in benchmarks]
        if benchmarks and all(v is not None for v in values):
            means[f"mean/mIoU_{variant}"] = round(sum(values) / len(values), 2)
    return means


# ------------------------------------------------------------------------- champion (the nightly)
# The nightly job works on a project directory other than its working directory: these take the
# store's URI (``tracking_uri(params, project_dir)``) instead of the stage's params.
def checkpoint_run_id(path: str | os.PathLike[str]) -> str:
    """The MLflow run id recorded in an aligner checkpoint."""
    run_id = load_aligner(path).run_id
    if not run_id:
        raise ValueError(f"{path} records no MLflow run id")
    return run_id


def run_scores(run_id: str, benchmarks: Sequence[str], metric: str, *, tracking_uri: str) -> dict[str, Any]:
    """``{"run_id", "score": mean over benchmarks of <benchmark>/<metric>, "metrics": {benchmark: value}}``."""
    if not benchmarks:
        raise ValueError("no benchmarks to score a run on")
    logged = open_store(tracking_uri).get_run(run_id).data.metrics
    keys = {b: f"{b}/{metric}" for b in benchmarks}
    missing = [k for k in keys.values() if k not in logged]
    if missing:
        raise KeyError(f"run {run_id} has no metrics {missing}: evaluate those benchmarks first")
    values = {b: float(logged[k]) for b, k in keys.items()}
    return {"run_id": run_id, "score": sum(values.values()) / len(values), "metrics": values}


def champion_run_id(registered_model: str, *, tracking_uri: str) -> str | None:
    """The run behind the registered model's ``champion`` alias (None: no champion)."""
    try:
        return open_store(tracking_uri).get_model_version_by_alias(registered_model, CHAMPION_ALIAS).run_id
    except MlflowException:
        return None


def champion_scores(
    registered_model: str, benchmarks: Sequence[str], metric: str, *, tracking_uri: str
) -> dict[str, Any] | None:
    """:func:`run_scores` of the run behind the registered model's ``champion`` alias (None: no champion)."""
    run_id = champion_run_id(registered_model, tracking_uri=tracking_uri)
    return None if run_id is None else run_scores(run_id, benchmarks, metric, tracking_uri=tracking_uri)


def promote_champion(registered_model: str, run_id: str, *, tracking_uri: str) -> str:
    """Point the ``champion`` alias of ``registered_model`` at the version the run registered
    (:func:`log_model`; its newest, should it have several); return the version."""
    mlflow = open_store(tracking_uri)
    versions = mlflow.search_model_versions(f"name = '{registered_model}' and run_id = '{run_id}'")
    if not versions:
        raise LookupError(f"run {run_id} registered no version of {registered_model!r}: only a model "
                          "logged by `fmbseg train` (tracking.log_model) can become the champion")
    version = str(max(int(v.version) for v in versions))
    mlflow.set_registered_model_alias(registered_model, CHAMPION_ALIAS, version)
    return version


# ------------------------------------------------------------------------------- comparing runs
def headline_url(params: Params, ui: str = "http://127.0.0.1:5000", *, experiment: str | None = None) -> str | None:
    """The UI's page of the experiment's runs (default ``tracking.experiment``) in the model-training
    view, opened on the shared :data:`HEADLINE_VIEW`; None when the store has no such experiment."""
    found = _client(params).get_experiment_by_name(experiment or params.tracking.experiment)
    if found is None:
        return None
    return (f"{ui.rstrip('/')}/#/experiments/{found.experiment_id}/runs"
            f"?workflowType=machine_learning&viewStateShareKey={HEADLINE_VIEW}")


def model_runs(params: Params, *, experiment: str | None = None, max_results: int = 50) -> pd.DataFrame:
    """The trained-model runs (``fmbseg.stage`` = train) of ``experiment`` (default
    ``tracking.experiment``), newest first, one row each as ``mlflow.search_runs`` frames them:
    run_id, status, start_time, then ``params.*``, ``metrics.*`` and ``tags.*`` columns."""
    mlflow = _client(params)
    found = mlflow.get_experiment_by_name(experiment or params.tracking.experiment)
    if found is None:
        return pd.DataFrame()
    runs = mlflow.search_runs(
        [found.experiment_id], filter_string=f"tags.`{STAGE_TAG}` = 'train'", max_results=max_results,
        order_by=["attributes.start_time DESC"],
    )
    rows = [
        {
            "run_id": run.info.run_id,
            "status": run.info.status,
            "start_time": pd.to_datetime(run.info.start_time, unit="ms", utc=True),
            **{f"params.{k}": v for k, v in run.data.params.items()},
            **{f"metrics.{k}": v for k, v in run.data.metrics.items()},
            **{f"tags.{k}": v for k, v in run.data.tags.items()},
        }
        for run in runs
    ]
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------- model URIs (predict)
CHECKPOINT_FILE = "aligner.pt"  # the name log_checkpoint gives the file under CHECKPOINT_ARTIFACT_DIR


def resolve_model_uri(uri: str | None, params: Params, *, dst_dir: str | os.PathLike[str] | None = None) -> Path:
    """A local checkpoint file for a model reference.

    uri: a checkpoint path; ``runs:/<run_id>`` (the checkpoint :func:`log_checkpoint` logged to
    that run, or ``runs:/<run_id>/<artifact path>``); ``models:/<name>@<alias>`` or
    ``models:/<name>/<version>`` or ``models:/<name>/latest`` (the checkpoint of the registered
    version's run; ``latest``: its highest version, as MLflow reads it); None: the
    ``champion`` of ``tracking.registered_model`` when the store has one, else
    ``${paths.checkpoint}``. Artifacts are downloaded under ``dst_dir`` (default: a folder
    per run in the system's temp dir). Raises ValueError for a malformed URI (a run id that is not
    one name, an artifact path that is absolute or holds ``..``: it must stay inside its run) or an
    unknown run / model / alias, FileNotFoundError for a path that does not exist.
    """
    if uri is None:
        champion = _champion_run(params)
        if champion is None:
            return Path(params.paths.checkpoint)
        return _run_checkpoint(params, champion, f"{CHECKPOINT_ARTIFACT_DIR}/{CHECKPOINT_FILE}", dst_dir)
    if uri.startswith("runs:/"):
        run_id, _, artifact = uri.removeprefix("runs:/").lstrip("/").partition("/")
        if not run_id:
            raise ValueError(f"model URI {uri!r} names no run: use runs:/<run_id>")
        return _run_checkpoint(params, run_id, artifact.rstrip("/") or f"{CHECKPOINT_ARTIFACT_DIR}/{CHECKPOINT_FILE}",
                               dst_dir)
    if uri.startswith("models:/"):
        run_id = _registered_run(params, uri)
        return _run_checkpoint(params, run_id, f"{CHECKPOINT_ARTIFACT_DIR}/{CHECKPOINT_FILE}", dst_dir)
    if re.match(r"[A-Za-z][A-Za-z0-9+.-]+:/", uri):
        raise ValueError(f"unsupported model URI {uri!r}: use a checkpoint path, runs:/<run_id>, "
                         "models:/<name>@<alias>, models:/<name>/<version> or models:/<name>/latest")
    path = Path(uri)
    if not path.exists():
        raise FileNotFoundError(f"no model checkpoint at {path}")
    return path  # what it holds is load_aligner's to judge


def _store_exists(uri: str) -> bool:
    """False for a SQLite store whose file is absent (asking would create it); True otherwise."""
    db = _sqlite_path(uri)
    return db is None or db.exists()


def _champion_run(params: Params) -> str | None:
    """The run behind the ``champion`` alias of the registered model, None when there is none."""
    uri = tracking_uri(params)
    if not _store_exists(uri):
        return None
    return champion_run_id(params.tracking.registered_model, tracking_uri=uri)


def _registered_run(params: Params, uri: str) -> str:
    """The run id of ``models:/<name>@<alias>``, ``models:/<name>/<version>`` or ``models:/<name>/latest``."""
    ref = uri.removeprefix("models:/").strip("/")
    name, at, alias = ref.partition("@")
    version = None
    if not at:
        name, _, version = ref.rpartition("/")
    if not name or not (alias or version):
        raise ValueError(f"model URI {uri!r}: use models:/<name>@<alias>, models:/<name>/<version> or "
                         "models:/<name>/latest")
    store = tracking_uri(params)
    if not _store_exists(store):
        raise ValueError(f"{uri}: there is no MLflow store at {store}")
    client = MlflowClient(store)
    try:
        if alias:
            found = client.get_model_version_by_alias(name, alias)
        elif version == "latest":
            found = _latest_version(client, name)
        else:
            found = client.get_model_version(name, version)
    except MlflowException as err:
        raise ValueError(f"{uri}: no such registered model version in {store} ({err.message})") from None
    if not found.run_id:
        raise ValueError(f"{uri}: version {found.version} of {name} was registered without a run")
    return str(found.run_id)


def _latest_version(client: MlflowClient, name: str) -> Any:
    """The highest version of registered model ``name`` (what ``models:/<name>/latest`` means to
    MLflow); MlflowException when it has none."""
    versions = client.search_model_versions(f"name = '{name}'")
    if not versions:
        raise MlflowException(f"registered model {name!r} has no version")
    return max(versions, key=lambda v: int(v.version))


def _run_checkpoint(params: Params, run_id: str, artifact: str, dst_dir: str | os.PathLike[str] | None) -> Path:
    """Download one artifact file of a run (the checkpoint) and return its local path; ValueError
    for a run id or artifact path that would reach outside the run."""
    from components.outputs import safe_relative

    if not re.fullmatch(r"[A-Za-z0-9_-]+", run_id):
        raise ValueError(f"runs:/{run_id}: a run id is letters, digits, '-' and '_' (refused)")
    safe_relative(artifact, what=f"runs:/{run_id}: artifact path")
    store = tracking_uri(params)
    if not _store_exists(store):
        raise ValueError(f"runs:/{run_id}: there is no MLflow store at {store}")
    client = MlflowClient(store)
    try:
        client.get_run(run_id)
    except MlflowException:
        raise ValueError(f"runs:/{run_id}: no such run in {store}") from None
    target = Path(dst_dir) if dst_dir is not None else Path(tempfile.gettempdir()) / "fmbseg-models" / run_id
    target.mkdir(parents=True, exist_ok=True)
    try:
        local = Path(client.download_artifacts(run_id, artifact, str(target)))
    except (MlflowException, OSError) as err:
        raise ValueError(f"run {run_id} has no artifact {artifact!r} (is it a trained model's run?): {err}") from None
    if not local.is_file():
        raise ValueError(f"run {run_id}: artifact {artifact!r} is a folder, not a checkpoint file")
    return local
