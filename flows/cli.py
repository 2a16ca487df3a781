"""`fmbseg`: one subcommand per DVC stage (each runs that stage's Prefect flow) plus tools.

Commands load lazily: `fmbseg <command>` imports only the module that defines it (each module's
`register(app)` adds its commands), so a DVC stage like `fmbseg sync` does not pay for importing
torch, transformers and mlflow, and `fmbseg --help` is instant.
"""

from __future__ import annotations

import functools
import importlib
import os
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

import click
import typer
from typer.core import TyperGroup

from flows.parent import PARENT_ENV

# A stage run alone (no PREFECT_API_URL) starts Prefect's ephemeral server, whose default 20 s
# start-up limit a loaded 2-core machine overruns (seen in CI: "Timed out while attempting to connect
# to ephemeral Prefect API server"); wait as long as flows/server.py waits for the pipeline's server.
# Set before any command module imports Prefect (its settings are read then); a user's value is kept.
EPHEMERAL_STARTUP_S = 120
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", str(EPHEMERAL_STARTUP_S))

# command -> (module under flows/, one-line help shown by `fmbseg --help`)
COMMANDS: dict[str, tuple[str, str]] = {
    "download": ("download", "Download (or locate) a dataset's sources, verify them and convert them."),
    "sync": ("sync", "Copy new images from nightly.source_dir into paths.incoming (the sync stage)."),
    "label": ("label", "Stage 1: pseudo labels from CLIP + SAM for every image (resumable)."),
    "export": ("export", "A Stage 1 store as PNG label maps and a COCO JSON file per variant."),
    "show": ("label", "Write a picture of one image's Stage 1.1 and Stage 1.2 labels."),
    "import-labels": ("import_labels", "Import corrected masks (COCO) that balance prefers over Stage 1's maps."),
    "balance": ("balance", "The training index: every Stage 1.1 map + a seeded share of Stage 1.2 maps."),
    "features": ("features", "Cache frozen student-encoder (DINOv2 / DINOv3) patch features for the training images."),
    "train": ("train", "Train the aligner with TSupCon (one MLflow run per model)."),
    "evaluate": ("evaluate", "Evaluate the model on one benchmark, base and SAM-refined."),
    "evaluate-stage1": ("evaluate_stage1", "Score Stage 1's pseudo labels on a benchmark (paper Table 2)."),
    "predict": ("predict", "Segment new images with a trained model, for any class names (resumable)."),
    "report": ("report", "The benchmark table next to the paper's numbers (markdown + CSV)."),
    "compare": ("compare", "The side-by-side table of trained models (ablations) from MLflow."),
    "weights": ("weights", "Model weights: what a profile needs, and fetching it."),
    "pipeline": ("pipeline", "Run the whole pipeline (dvc repro) as one Prefect flow."),
    "demo": ("pipeline", "The whole pipeline on synthetic data with the demo world's stand-in models."),
    "nightly": ("nightly", "Run the nightly relabel-and-retrain job once, now."),
    "schedule": ("nightly", "Schedule the nightly job as a Prefect deployment (or serve it)."),
    "app": ("app", "A web page to try the model on an image and to review Stage 1's pseudo labels."),
}


class _LazyGroup(TyperGroup):
    """A click group whose commands are built from their module on first use."""

    _set_items: list[str] = []

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def resolve_command(self, ctx: click.Context, args: list[str]) -> tuple[str | None, click.Command | None, list[str]]:
        if args and args[0] not in COMMANDS and not args[0].startswith("-"):
            from components.hints import did_you_mean

            raise _fail(f"no such command {args[0]!r}{did_you_mean(args[0], COMMANDS)}; see `fmbseg -h`")
        return super().resolve_command(ctx, args)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in COMMANDS:
            return None
        module = importlib.import_module(f"flows.{COMMANDS[cmd_name][0]}")
        sub = typer.Typer(**_TYPER_STYLE)
        sub.callback()(lambda: None)  # always a group, so one-command modules resolve the same way
        module.register(sub)
        group = typer.main.get_group(sub)
        command = group.get_command(ctx, cmd_name)
        if command is None:
            return None
        if any(p.name == "params" for p in command.params):
            command.epilog = SET_HELP
        return _checked_settings(_in_parent_flow_run(command), self._set_items)

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        # `-S KEY=VALUE` after the command name belongs to the stage command (see _checked_settings)
        try:
            head = next(i for i, a in enumerate(args) if not a.startswith("-"))
        except StopIteration:
            head = len(args)
        try:
            rest, self._set_items = split_set_args(args[head + 1 :])
        except ValueError as err:
            raise _fail(str(err)) from None
        return super().parse_args(ctx, args[: head + 1] + rest)

    def invoke(self, ctx: click.Context) -> Any:
        """A user error that escapes a command (a missing file, a bad setting or value, a network
        that is down) is one line on stderr and exit status 2; FMBSEG_TRACEBACK=1 shows the traceback."""
        try:
            return super().invoke(ctx)
        except (OSError, ValueError) as err:  # FileNotFoundError, ConfigError, ConnectionError, ...
            if os.environ.get("FMBSEG_TRACEBACK"):
                raise
            raise _fail(str(err) or type(err).__name__) from None

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        with formatter.section("Commands"):
            formatter.write_dl([(name, help_) for name, (_, help_) in COMMANDS.items()])


_SET_FLAGS = ("-S", "--set")
# the end of a stage command's help: _LazyGroup.parse_args takes -S out before the command parses
SET_HELP = ("-S, --set KEY=VALUE  override a setting of the settings file for this run (repeatable), as "
            "`dvc exp run -S` does: -S train.lr=0.05 (values are YAML)")
# one help style for the root and every command: click's plain help, -h and --help
_TYPER_STYLE: dict[str, Any] = {
    "add_completion": False,
    "pretty_exceptions_enable": False,
    "rich_markup_mode": None,
    "context_settings": {"help_option_names": ["-h", "--help"]},
}


def split_set_args(args: list[str]) -> tuple[list[str], list[str]]:
    """``(args without the -S items, the KEY=VALUE items)``: ``-S k=v``, ``--set k=v``,
    ``--set=k=v`` and ``-Sk=v`` after the command name."""
    rest: list[str] = []
    items: list[str] = []
    it = iter(args)
    for arg in it:
        if arg == "--":
            rest.append(arg)
            rest.extend(it)
            break
        if arg in _SET_FLAGS:
            value = next(it, None)
            if value is None:
                raise ValueError(f"{arg} needs KEY=VALUE, e.g. -S train.lr=0.05")
            items.append(value)
        elif arg.startswith("--set="):
            items.append(arg[len("--set="):])
        elif arg.startswith("-S") and len(arg) > 2:
            items.append(arg[2:])
        else:
            rest.append(arg)
    return rest, items


def parse_set(items: list[str]) -> dict[str, Any]:
    """``-S key=value`` items as dotted overrides; values are YAML (``-S train.lr=0.05``,
    ``-S 'label.templates=["a photo of a {}."]'``), the syntax of ``dvc exp run -S``."""
    import yaml

    overrides: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise ValueError(f"-S {item!r}: expected KEY=VALUE with a dotted key, e.g. -S train.lr=0.05")
        try:
            overrides[key] = yaml.safe_load(value) if value.strip() else ""
        except yaml.YAMLError as err:
            raise ValueError(f"-S {item!r}: the value is not valid YAML ({err})") from None
    return overrides


def _in_parent_flow_run(command: Any) -> Any:
    """With ``FMBSEG_PARENT_FLOW_RUN`` set (a stage that `dvc repro` runs for the pipeline or the
    nightly flow), the command's flows run as subflows of that flow run (flows/parent.py).
    _checked_settings wraps this wrapper: the settings are checked first, and a bad one exits before
    any call to the Prefect server."""
    parent = os.environ.get(PARENT_ENV)
    if not parent:
        return command
    run = command.callback

    @functools.wraps(run)
    def linked(*args: Any, **kwargs: Any) -> Any:
        from flows.parent import parent_flow_run

        with parent_flow_run(parent):
            return run(*args, **kwargs)

    command.callback = linked
    return command


def _fail(message: str) -> typer.Exit:
    """A user error: one line on stderr, exit status 2 (raise what this returns); a message of
    several lines (a settings file's list of errors) is joined into one."""
    typer.echo(f"fmbseg: {' '.join(line.strip() for line in message.splitlines() if line.strip())}", err=True)
    return typer.Exit(2)


# stages whose settings depend on a model spec -> whether it runs Stage 1's dense detection
MODEL_CHECKED = {"features": False, "train": False, "label": True}


# commands a user runs on files of their own, from any folder: where the folder has no params.yaml,
# the settings of the checkout fmbseg runs from apply (the device, dtype and weights folder they need)
ANYWHERE = ("predict", "show", "export", "app")


def _checked_settings(command: Any, items: list[str]) -> Any:
    """A stage command (one with a ``--params`` option) reads and validates its settings before
    anything expensive starts (the models, a Prefect server): a bad params.yaml, vocabulary or ``-S``
    override is one message on stderr and exit status 2, never a traceback. With ``-S KEY=VALUE``
    the run reads params.yaml with those overrides, written to a temporary settings file next to it
    for the run's duration; params.yaml itself is not changed."""
    if not any(p.name == "params" for p in command.params):
        if items:
            raise _fail(f"-S applies to the stage commands that read params.yaml (label, train, ...), not to {command.name}")
        return command
    run = command.callback

    @functools.wraps(run)
    def checked(*args: Any, **kwargs: Any) -> Any:
        import yaml

        from components.config import ConfigError, apply_overrides, load_params

        own = any(kwargs.get(option) is not None for option in ("images", "store", "predictions"))
        if own or (kwargs["params"] is None and not Path("params.yaml").exists()):
            # a command with settings of its own making (`fmbseg label --images DIR`, `fmbseg export
            # --store DIR` or `--predictions DIR`) checks its options itself, before any start-up
            if items:
                raise _fail("-S needs a settings file: pass --params FILE (or run in the project root)")
            _preflight(command.name, kwargs, None)
            return run(*args, **kwargs)
        path = Path(kwargs["params"] if kwargs["params"] is not None else "params.yaml")
        if command.name in ANYWHERE and path == Path("params.yaml") and not path.exists():
            from flows.common import PARAMS_FILE, PROJECT_ROOT

            path = PROJECT_ROOT / PARAMS_FILE  # outside a project: the installed checkout's settings
            kwargs = {**kwargs, "params": path}
        try:
            settings = parse_set(items)
            params = load_params(path, settings)
            if command.name in MODEL_CHECKED:
                from flows.common import check_models

                check_models(params, dense_text=MODEL_CHECKED[command.name])
        except (ConfigError, ValueError) as err:
            raise _fail(str(err)) from None
        _preflight(command.name, kwargs, params)
        if not settings:
            return run(*args, **kwargs)
        raw = apply_overrides(yaml.safe_load(path.read_text(encoding="utf-8")) or {}, settings)
        fd, merged = tempfile.mkstemp(prefix=f".{path.stem}-set-", suffix=".yaml", dir=path.resolve().parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                yaml.safe_dump(raw, f, sort_keys=False)
            return run(*args, **{**kwargs, "params": Path(merged)})
        finally:
            Path(merged).unlink(missing_ok=True)

    command.callback = checked
    return command


def _preflight(command: str, options: dict[str, Any], params: Any) -> None:
    """flows/preflight.py's checks of ``command``: a mistake exits before the command's start-up."""
    from flows import preflight

    try:
        preflight.check(command, options, params)
    except (FileNotFoundError, ValueError) as err:
        raise _fail(str(err)) from None


def _version(value: bool) -> None:
    if value:
        try:
            version = metadata.version("fmbseg")
        except metadata.PackageNotFoundError:
            version = "unknown (not installed)"
        click.echo(f"fmbseg {version}")
        raise typer.Exit()


app = typer.Typer(
    name="fmbseg",
    cls=_LazyGroup,
    help="Annotation-free open-vocabulary semantic segmentation from CLIP, SAM and DINOv2.\n\n"
    "Every stage command takes --params FILE and -S KEY=VALUE (repeatable) to override a setting for "
    "one run, as `dvc exp run -S` does: `fmbseg train -S train.lr=0.05`.",
    no_args_is_help=True,
    **_TYPER_STYLE,
)


@app.callback()
def _main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the installed fmbseg version and exit."),
) -> None:
    """Annotation-free open-vocabulary semantic segmentation from CLIP, SAM and DINOv2."""


def main(*args: Any) -> None:
    """Console-script entry point."""
    app(*args)


if __name__ == "__main__":
    app()
