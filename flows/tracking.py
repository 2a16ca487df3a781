"""MLflow tracking: runs and what they log (the model registry: flows/model_registry.py).

One run per trained model (docs/design.md §6). The train flow opens it with :func:`start_run`, logs the loss
per step through a :class:`StepLogger` (buffered: one SQLite write per step would cost more than
the step on a GPU), an epoch summary per epoch (:func:`log_epoch`) and the checkpoint
(:func:`log_checkpoint`); the checkpoint carries the run id, and the evaluate stages attach their
metrics and tables to the same run with :func:`attach_metrics`, which also brings the descriptions
of the model versions the run registered up to date (:func:`describe_versions`).

Where runs go (:func:`tracking_uri`): ``$MLFLOW_TRACKING_URI``, else ``tracking.tracking_uri``, else
``sqlite:///<project root>/mlflow.db`` with artifacts in ``<project root>/mlartifacts``. A
``dvc exp run --queue`` experiment runs in a copy of the project under ``<root>/.dvc/tmp/exps/``;
its runs still land in ``<root>``'s store, so a grid of queued experiments compares in one UI.

What a reader of the UI sees: trained models in experiment ``tracking.experiment``, Stage 1's
scoring runs apart in ``<experiment>-stage1``; each run logs the settings of its own stage
(:func:`stage_settings`), not the whole params.yaml. A SQLite store's artifacts live in
``mlartifacts/`` beside the database; MLflow records them as absolute paths, so a copied or moved
workspace is re-pointed at its own ``mlartifacts/`` the first time fmbseg opens it (:func:`open_store`).
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
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

from components.config import Params, flatten

__all__ = [
    "GROUP_ENV",
    "STAGE_TAG",
    "RESUME_CHANGES_TAG",
    "HEADLINE_VIEW",
    "project_root",
    "tracking_uri",
    "open_store",
    "stage_settings",
    "stage1_experiment",
    "headline_url",
    "standard_tags",
    "start_run",
    "run_exists",
    "StepLogger",
    "log_epoch",
    "logged_steps",
    "log_checkpoint",
    "attach_metrics",
    "model_runs",
    "version_description",
    "describe_versions",
    "store_exists",
]

# Set this to one value for a batch of runs (a nightly, a hand-made sweep) to group them in the UI;
# runs of one `dvc exp run --queue` grid are grouped by their baseline commit without it.
GROUP_ENV = "FMBSEG_RUN_GROUP"
_DVC_EXPS_DIR = (".dvc", "tmp", "exps")
STAGE_TAG = "fmbseg.stage"  # "train" on the one run of each trained model
RESUME_CHANGES_TAG = "fmbseg.params_changed_on_resume"
CHANGED_TAG = "fmbseg.changed"  # an ablation's settings that differ from its baseline (aligner.kind=linear)
CHECKPOINT_ARTIFACT_DIR = "model"


# per-benchmark quantities that count images: run tags, not metrics (attach_metrics)
COUNT_METRICS = frozenset({"images", "skipped"})
# MLflow 3's UI opens an experiment of this kind on its runs table (not the GenAI overview)
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"
ARTIFACTS_DIR = "mlartifacts"  # a SQLite store's artifacts: this folder beside the database
STAGE1_EXPERIMENT_SUFFIX = "-stage1"  # Stage 1's scoring runs: experiment <tracking.experiment>-stage1
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


def describe_versions(mlflow: MlflowClient, run_id: str) -> None:
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
        describe_versions(mlflow, run_id)


def benchmark_means(logged: Mapping[str, float], benchmarks: Sequence[str]) -> dict[str, float]:
    """``{"mean/mIoU_<variant>": mean over benchmarks}`` for each variant every benchmark has."""
    means = {}
    for variant in ("base", "refined"):
        values = [logged.get(f"{b}/mIoU_{variant}") for b in benchmarks]
        if benchmarks and all(v is not None for v in values):
            means[f"mean/mIoU_{variant}"] = round(sum(values) / len(values), 2)
    return means


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


def store_exists(uri: str) -> bool:
    """False for a SQLite store whose file is absent (asking would create it); True otherwise."""
    db = _sqlite_path(uri)
    return db is None or db.exists()
