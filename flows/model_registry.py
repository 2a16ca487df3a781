"""The MLflow model registry: registered models, the champion, and model URIs to checkpoints.

A train run's model becomes a version of ``tracking.registered_model`` (an ablation's: of
``<registered_model>-ablations``; :func:`registered_model_for`) through :func:`log_model`, which logs
it as a pyfunc model (the model class is ``flows/serving.py``'s). The nightly job compares a new
model with the registered ``champion`` and moves the alias to the new model's version
(:func:`run_scores`, :func:`champion_scores`, :func:`promote_champion`); ``fmbseg predict`` and the
app turn a checkpoint path, ``runs:/`` or ``models:/`` URI into a local checkpoint
(:func:`resolve_model_uri`). Runs and their logging are flows/tracking.py's.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from components.aligner.checkpoint import load_aligner
from components.config import Params
from flows.tracking import (
    CHECKPOINT_ARTIFACT_DIR,
    describe_versions,
    open_store,
    store_exists,
    tracking_uri,
    version_description,
)

__all__ = [
    "CHAMPION_ALIAS",
    "PYFUNC_MODEL_NAME",
    "registered_model_for",
    "model_description",
    "log_model",
    "checkpoint_run_id",
    "run_scores",
    "champion_run_id",
    "champion_scores",
    "promote_champion",
    "resolve_model_uri",
]

CHAMPION_ALIAS = "champion"
PYFUNC_MODEL_NAME = "segmenter"  # the logged pyfunc model of a train run
ABLATION_MODEL_SUFFIX = "-ablations"  # an ablation's model: registered model <registered_model>-ablations


def registered_model_for(params: Params, changed: Mapping[str, Any]) -> str:
    """The registered model a trained model becomes a version of: ``tracking.registered_model`` for
    the pipeline's model, ``<registered_model>-ablations`` for an ablation (``changed`` not empty), so
    that the production name's versions, ``latest`` and ``champion`` only ever name pipeline models."""
    name = params.tracking.registered_model
    return name + ABLATION_MODEL_SUFFIX if changed else name


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

    mlflow = open_store(tracking_uri(params))
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
    describe_versions(mlflow, run_id)  # the run's own description too
    return str(version.version)


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
                          "logged by `fmbseg train` (model_registry.log_model) can become the champion")
    version = str(max(int(v.version) for v in versions))
    mlflow.set_registered_model_alias(registered_model, CHAMPION_ALIAS, version)
    return version


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


def _champion_run(params: Params) -> str | None:
    """The run behind the ``champion`` alias of the registered model, None when there is none."""
    uri = tracking_uri(params)
    if not store_exists(uri):
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
    if not store_exists(store):
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
    if not store_exists(store):
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
