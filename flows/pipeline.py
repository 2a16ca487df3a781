"""The whole pipeline: a Prefect flow that runs `dvc repro`, and the demo built on it.

DVC is the DAG of record: it decides which stages are stale and runs each as `fmbseg <stage>`
(itself a Prefect flow). This flow never re-implements that DAG; it starts one Prefect server for
all stages (unless ``PREFECT_API_URL`` names one), runs `dvc repro` in a subprocess and hands each
stage its flow run id (``FMBSEG_PARENT_FLOW_RUN``): every stage's flow run is then a subflow of this
one (flows/parent.py), nested under it in the UI and drawn in its run graph, and tagged
``parent-flow-run:<id>``.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import typer
import yaml

from components.config import ConfigError, deep_merge, load_params, parse_params
from flows.common import PROJECT_ROOT
from flows.parent import PARENT_ENV

__all__ = [
    "PROJECT_ROOT",
    "WORKSPACE_FILES",
    "run_logged",
    "dvc_command",
    "stage_env",
    "pipeline_flow",
    "profile_overrides",
    "experiment_args",
    "prepare_workspace",
    "demo_champion",
    "browse_lines",
    "demo_ablation",
    "register",
]


# What a pipeline workspace needs: the DAG, its settings and the code its stages list as deps.
WORKSPACE_FILES = ("dvc.yaml", "params.yaml", "pyproject.toml", ".dvcignore", ".gitignore", "components", "demoworld", "flows",
                   "configs")


def dvc_command() -> str:
    """The `dvc` executable of this environment."""
    exe = Path(sys.executable).with_name("dvc")
    return str(exe) if exe.exists() else "dvc"


def stage_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for stage subprocesses: telemetry off, this venv first on PATH."""
    env = dict(os.environ)
    env.update(DO_NOT_TRACK="true", MLFLOW_DISABLE_TELEMETRY="true", DVC_NO_ANALYTICS="1",
               PREFECT_SERVER_ANALYTICS_ENABLED="false")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra or {})
    return env


# the start of a line Prefect's console handler wrote: "12:00:00.000 | INFO    | "
_PREFECT_RECORD = re.compile(r"^\d{2}:\d{2}:\d{2}\.\d{3} \| [A-Z]+ *\| ")


def run_logged(cmd: list[str], cwd: Path, env: dict[str, str], log: object | None = None) -> str:
    """Run ``cmd``, streaming its output line by line to ``log`` (a logger) or stdout.

    A line that is already a Prefect log record of a stage's own flow run (``12:00:00.000 | INFO |
    Flow run 'label' - ...``: the stage sent it to the server itself) goes to stdout as it is, not
    through ``log`` again, which would show it twice and with two prefixes. Returns the whole
    output; raises CalledProcessError with the output's tail on failure.
    """
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        if log is not None and not _PREFECT_RECORD.match(line):
            log.info(line.rstrip())  # type: ignore[attr-defined]
        else:
            sys.stdout.write(line)
            sys.stdout.flush()
    code = proc.wait()
    output = "".join(lines)
    if code:
        raise subprocess.CalledProcessError(code, cmd, output=output[-5000:])
    return output


def pipeline_flow(project_dir: str = ".", targets: tuple[str, ...] = (), force: bool = False,
                  experiment: tuple[str, ...] | None = None) -> str:
    """Run `dvc repro [targets]` in ``project_dir``, each stage reporting to this flow's server; with
    ``experiment`` (`dvc exp run` arguments, e.g. a profile's ``-S`` items from
    :func:`profile_overrides`), `dvc exp run <experiment> [targets]` instead."""
    from prefect import flow, get_run_logger, runtime

    @flow(name="pipeline", flow_run_name="pipeline", log_prints=True)
    def _pipeline(project_dir: str, targets: tuple[str, ...], force: bool) -> str:
        logger = get_run_logger()
        env = stage_env({PARENT_ENV: str(runtime.flow_run.id)})
        verb = ["repro"] if experiment is None else ["exp", "run", *experiment]
        cmd = [dvc_command(), *verb, *(["--force"] if force else []), *targets]
        return run_logged(cmd, Path(project_dir), env, logger)

    return _pipeline(project_dir, tuple(targets), force)


def _hydra_value(value: Any) -> str:
    """``value`` in the Hydra override grammar that `dvc exp run -S` parses (strings quoted)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return "'" + value.replace("'", "\\'") + "'"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_hydra_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{_hydra_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"a setting of type {type(value).__name__} has no -S form: {value!r}")


def profile_overrides(overlay: Mapping[str, Any], base: Mapping[str, Any], prefix: str = "") -> list[str]:
    """The `dvc exp run -S` items that turn the settings ``base`` into ``deep_merge(base, overlay)``:
    one item per leaf of the overlay (a mapping merges key by key, anything else replaces), ``+key``
    where ``base`` has no such key, so that `dvc exp run` with them reproduces a profile
    (configs/<profile>.yaml) on top of params.yaml and records exactly what it changed."""
    items: list[str] = []
    for key, value in overlay.items():
        dotted = f"{prefix}{key}"
        if key in base and isinstance(value, dict) and isinstance(base[key], dict):
            items += profile_overrides(value, base[key], f"{dotted}.")
        else:
            items.append(f"{'' if key in base else '+'}{dotted}={_hydra_value(value)}")
    return items


def profile_file(profile: str) -> Path:
    """configs/<profile>.yaml of this checkout, or ``profile`` itself when it names a YAML file."""
    shipped = PROJECT_ROOT / "configs" / f"{profile}.yaml"
    if shipped.is_file():
        return shipped
    if Path(profile).suffix in (".yaml", ".yml") and Path(profile).is_file():
        return Path(profile)
    names = sorted(p.stem for p in (PROJECT_ROOT / "configs").glob("*.yaml"))
    raise ConfigError(f"no profile {profile!r}: one of {', '.join(names)}, or a YAML file of settings to merge")


def experiment_args(params_path: Path, profile: str, name: str | None = None, temp: bool = False) -> list[str]:
    """`dvc exp run` arguments that run ``profile`` over ``params_path`` as one DVC experiment; the
    merged settings are validated first (a bad overlay fails here, before any server starts)."""
    base = yaml.safe_load(params_path.read_text(encoding="utf-8")) or {}
    source = profile_file(profile)
    overlay = yaml.safe_load(source.read_text(encoding="utf-8")) or {}
    parse_params(deep_merge(base, overlay), f"{params_path} with {source.name}")
    settings = [arg for item in profile_overrides(overlay, base) for arg in ("-S", item)]
    return [*(["--name", name] if name else []), *(["--temp"] if temp else []), *settings]


def _copy_into(src: Path, dst: Path) -> None:
    if src.is_dir():
        if dst.exists():
            shutil.rmtree(dst)
        shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    else:
        shutil.copy2(src, dst)


def _git(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True)


def prepare_workspace(dest: Path, overlay: Path | None = None, overrides: dict | None = None) -> Path:
    """Make ``dest`` a git + DVC project holding this project's pipeline and code.

    params.yaml is the project's with ``overlay`` (a YAML file, e.g. configs/demo.yaml) and
    ``overrides`` (a nested dict) merged on top, validated. An existing workspace is updated in
    place and committed, so `dvc repro` there reruns only what the update made stale.
    """
    dest = dest.resolve()
    dest.mkdir(parents=True, exist_ok=True)
    for name in WORKSPACE_FILES:
        src = PROJECT_ROOT / name
        if src.exists():
            _copy_into(src, dest / name)
    raw = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text()) or {}
    if overlay is not None:
        raw = deep_merge(raw, yaml.safe_load(overlay.read_text()) or {})
    if overrides:
        raw = deep_merge(raw, overrides)
    parse_params(raw, f"{dest / 'params.yaml'}")  # fail here, not in the middle of dvc repro
    (dest / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    if not (dest / ".git").exists():
        _git(["init", "-q", "-b", "main"], dest)
        _git(["config", "user.email", "fmbseg@localhost"], dest)
        _git(["config", "user.name", "fmbseg"], dest)
    if not (dest / ".dvc").exists():
        subprocess.run([dvc_command(), "init", "-q"], cwd=dest, check=True, env=stage_env())
        subprocess.run([dvc_command(), "config", "core.autostage", "true"], cwd=dest, check=True, env=stage_env())
    commit_workspace(dest, "fmbseg workspace: pipeline, settings and code")
    return dest


def commit_workspace(dest: Path, message: str) -> bool:
    """Commit everything git tracks or may track in the workspace (dvc.lock, git-tracked metrics,
    the .gitignore files DVC writes); False when there was nothing to commit."""
    _git(["add", "-A"], dest)
    if not _git(["status", "--porcelain"], dest).stdout.strip():
        return False
    _git(["commit", "-q", "-m", message], dest)
    return True


@contextlib.contextmanager
def _api(api_url: str) -> Iterator[None]:
    """Point this process (settings already loaded) and its subprocesses at ``api_url``."""
    from prefect.logging.handlers import APILogHandler
    from prefect.settings import PREFECT_API_URL, temporary_settings

    os.environ["PREFECT_API_URL"] = api_url
    with temporary_settings(updates={PREFECT_API_URL: api_url}):
        try:
            yield
        finally:  # send the queued run logs while the server is still up
            APILogHandler().flush()


def demo_champion(workspace: Path) -> str:
    """Name the workspace's trained model the ``champion`` when its store has none (what a first
    night does), so that ``models:/<registered model>@champion`` serves it; return that URI."""
    from flows import model_registry, tracking

    params = load_params(workspace / "params.yaml")
    uri = tracking.tracking_uri(params, workspace)
    name = params.tracking.registered_model
    if model_registry.champion_run_id(name, tracking_uri=uri) is None:
        run_id = model_registry.checkpoint_run_id(workspace / params.paths.checkpoint)
        model_registry.promote_champion(name, run_id, tracking_uri=uri)
    return f"models:/{name}@{model_registry.CHAMPION_ALIAS}"


# The demo's ablation: the paper's Table 3 axis (aligner.kind) as one DVC experiment, evaluated on
# the benchmarks named here only, which keeps `make demo` in its time budget.
DEMO_ABLATION = ("aligner.kind=linear",)
MLFLOW_UI = "http://127.0.0.1:5000"  # where `make ui` serves the MLflow UI
DEMO_ABLATION_TARGETS = ("evaluate@pv21",)


def demo_ablation(workspace: Path) -> Path:
    """Run the demo's ablation as a DVC experiment in a temporary copy (`dvc exp run --temp`: the
    workspace keeps the baseline model), its runs landing in the workspace's MLflow store; write the
    side-by-side table of trained models (`fmbseg compare`) to ``reports/ablation.csv``."""
    from components.evaluation.ablation import ablation_table
    from components.io import atomic_write_text
    from flows import tracking

    settings = [arg for item in DEMO_ABLATION for arg in ("-S", item)]
    print(f"[demo] ablation: dvc exp run --temp {' '.join(settings)} {' '.join(DEMO_ABLATION_TARGETS)}")
    run_logged([dvc_command(), "exp", "run", "--temp", *settings, *DEMO_ABLATION_TARGETS], workspace, stage_env())
    params = load_params(workspace / "params.yaml")
    table = ablation_table(tracking.model_runs(params))
    out = workspace / "reports" / "ablation.csv"
    atomic_write_text(out, table.to_csv(index=False))
    return out


def browse_lines(workspace: Path) -> list[str]:
    """The demo's closing pointers to its MLflow runs: the `make ui` command, and the UI's page of
    the runs opened on the headline metrics (tracking.headline_url), once the store has them."""
    from flows import tracking

    store = workspace.resolve()
    ui = "make ui STORE=demo" if store == (PROJECT_ROOT / "demo").resolve() else f"make ui STORE={store}"
    lines = [f"[demo] browse the runs: {ui}  (MLflow UI on {MLFLOW_UI}, store sqlite:///{store / 'mlflow.db'})"]
    url = tracking.headline_url(load_params(workspace / "params.yaml"), MLFLOW_UI)
    if url is not None:
        lines.append(f"[demo] the headline metrics (mean and PV-21 mIoU, base and refined), with `make ui` running: {url}")
    return lines


def _demo(workspace: Path) -> None:
    import pandas as pd

    from flows.server import prefect_server

    t0 = time.monotonic()
    print(f"[demo] workspace {workspace} (stand-in models trained on a toy world, synthetic twins of the benchmarks)")
    prepare_workspace(workspace, PROJECT_ROOT / "configs" / "demo.yaml")
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{workspace / 'mlflow.db'}")
    with prefect_server(home=workspace / ".prefect", log=workspace / ".prefect" / "server.log") as api_url, _api(api_url):
        print(f"[demo] Prefect server {api_url}; running `dvc repro` in {workspace}")
        pipeline_flow(str(workspace))
        # the run's dvc.lock and metrics become the baseline commit: `dvc exp show` lists its metrics
        # (not `!`) and the ablation below, like any later `dvc exp run -S ...`, compares against them
        commit_workspace(workspace, "fmbseg demo: dvc repro results (dvc.lock, metrics)")
        ablation = demo_ablation(workspace)
    report = workspace / "reports" / "report.md"
    if report.exists():
        print(report.read_text())
    # the benchmarks both models were evaluated on, and the means (the full table is in the file)
    table = pd.read_csv(ablation)
    shared = {t.split("@", 1)[1] for t in DEMO_ABLATION_TARGETS}
    shown = [c for c in table.columns if "/" not in c or c.split("/", 1)[0] in shared | {"mean"}]
    print(f"[demo] the trained models side by side (`fmbseg compare`; every column in {ablation.relative_to(workspace)}):")
    print(table[shown].to_string(index=False, na_rep="-"))
    print(f"[demo] done in {time.monotonic() - t0:.0f} s. The numbers come from miniature stand-ins trained on a toy "
          "world: they show the machinery working end to end; the method's real numbers need the paper profile.")
    print("\n".join(browse_lines(workspace)))
    print(f"[demo] serve the model (docs/mlflow.md): source .venv/bin/activate && MLFLOW_TRACKING_URI="
          f"{os.environ['MLFLOW_TRACKING_URI']} mlflow models serve -m {demo_champion(workspace)} --env-manager local "
          "--host 127.0.0.1 --port 5001")


def register(app: typer.Typer) -> None:
    @app.command("pipeline")
    def pipeline_cmd(
        targets: list[str] = typer.Argument(None, show_default="all", help="dvc.yaml stages to reproduce"),
        force: bool = typer.Option(False, help="rerun stages even when up to date"),
        profile: str = typer.Option(None, "--profile", help="run as a DVC experiment (`dvc exp run -S ...`) with this "
                                    "profile's settings over params.yaml: modern, demo, or a YAML file"),
        name: str = typer.Option(None, "--name", help="with --profile: the experiment's name in `dvc exp show`"),
        temp: bool = typer.Option(False, "--temp", help="with --profile: run in a temporary copy; the workspace keeps its outputs"),
    ) -> None:
        """Run the whole pipeline (`dvc repro`) as one Prefect flow, one server for every stage."""
        from flows.server import prefect_server

        experiment = None
        if profile is not None:
            try:
                experiment = tuple(experiment_args(Path("params.yaml"), profile, name, temp))
            except (ConfigError, OSError) as err:
                typer.echo(f"fmbseg: {err}", err=True)
                raise typer.Exit(2) from None
        elif name or temp:
            typer.echo("fmbseg: --name and --temp go with --profile (a DVC experiment)", err=True)
            raise typer.Exit(2)
        with prefect_server(home=Path(".prefect")) as api_url, _api(api_url):
            pipeline_flow(".", tuple(targets or ()), force, experiment)

    @app.command("demo")
    def demo_cmd(
        workspace: Path = typer.Option(PROJECT_ROOT / "demo", show_default=False,
                                       help="where the demo workspace is written  [default: ./demo]"),
    ) -> None:
        """The whole pipeline on synthetic data with the demo world's stand-in models, in a scratch workspace."""
        _demo(workspace)
