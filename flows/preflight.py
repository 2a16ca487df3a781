"""A command's checks of what a user can get wrong, run by the command line before the command
starts: they import no torch, model library, mlflow or Prefect, so a mistake is one line on stderr
within a second, not a traceback after the models loaded.

``check(command, options, params)`` runs the checks of ``command`` (its name on the command line)
on its parsed ``options`` and its settings (None where it runs without a params.yaml) and raises
FileNotFoundError or ValueError with the message for the user. The command itself checks again
(a preflight is a fast path, not the only guard), so a check here reuses the components' own.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from components.config import Params

__all__ = ["check", "CHECKS"]


def _vocabulary(options: dict[str, Any], params: Params | None) -> None:
    """``--classes`` / ``--vocabulary``, where the command takes them and one is given."""
    from flows.common import class_lines

    if options.get("classes") is not None or options.get("vocabulary") is not None:
        class_lines(options.get("classes"), options.get("vocabulary"))


def _predict(options: dict[str, Any], params: Params | None) -> None:
    from components.predictions import list_sources

    _vocabulary(options, params)
    list_sources(options["sources"], external_symlinks=params.label.external_symlinks if params else "refuse")
    _model_file(options.get("model"), None)


def _benchmark(options: dict[str, Any], params: Params | None) -> None:
    from components.datasets.registry import get_benchmark

    get_benchmark(options["dataset"])


def _model_file(model: str | Path | None, default: str | None) -> None:
    """A checkpoint given as a path (not an MLflow ``runs:/`` or ``models:/`` URI) is a file."""
    if model is None and default is None:
        return
    path = str(model if model is not None else default)
    if ":/" in path or Path(path).is_file():
        return
    if model is not None:
        raise FileNotFoundError(f"--model {path}: no such checkpoint")
    raise FileNotFoundError(f"no aligner checkpoint at {path}: train one with `fmbseg train` (or `dvc repro train`), "
                            "or pass --model FILE")


def _evaluate(options: dict[str, Any], params: Params | None) -> None:
    _benchmark(options, params)
    _model_file(options.get("model"), params.paths.checkpoint if params else None)


def _label(options: dict[str, Any], params: Params | None) -> None:
    if options.get("images") is not None:
        _vocabulary(options, params)


CHECKS: dict[str, Callable[[dict[str, Any], Params | None], None]] = {
    "predict": _predict,
    "evaluate": _evaluate,
    "evaluate-stage1": _benchmark,
    "download": _benchmark,
    "label": _label,
}


def check(command: str, options: dict[str, Any], params: Params | None) -> None:
    """Run ``command``'s checks (none for a command without any); FileNotFoundError / ValueError
    with the message for the user."""
    if command in CHECKS:
        CHECKS[command](options, params)
