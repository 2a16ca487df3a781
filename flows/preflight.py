"""A command's checks of what a user can get wrong, run by the command line before the command
starts: they import no torch, model library, mlflow or Prefect, so a mistake is one line on stderr
within a second, not a traceback after the models loaded.

``check(command, options, params)`` runs the checks of ``command`` (its name on the command line)
on its parsed ``options`` and its settings (None where it runs without a params.yaml) and raises
FileNotFoundError or ValueError with the message for the user. The command itself checks again
(a preflight is a fast path, not the only guard), so a check here reuses the components' own.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from components.config import Params

__all__ = ["check", "CHECKS", "check_online", "check_weights", "WEIGHT_HOSTS"]

# where `fmbseg weights fetch` downloads from: the Hugging Face hub (or HF_ENDPOINT) and SAM's host
WEIGHT_HOSTS = ("huggingface.co", "dl.fbaipublicfiles.com")
ONLINE_TIMEOUT_S = 5


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
    if ":/" in path or Path(path).exists():  # a folder or a bad file: the command says what it is
        return
    if model is not None:
        raise FileNotFoundError(f"--model {path}: no such checkpoint")
    raise FileNotFoundError(f"no aligner checkpoint at {path}: train one with `fmbseg train` (or `dvc repro train`), "
                            "or pass --model FILE")


def _evaluate(options: dict[str, Any], params: Params | None) -> None:
    _benchmark(options, params)
    _model_file(options.get("model"), params.paths.checkpoint if params else None)


def _label(options: dict[str, Any], params: Params | None) -> None:
    """The vocabulary of ``--images``, and the weights of Stage 1's models: CLIP, SAM and the
    concept teacher where the settings name one (the student's are the features stage's). The
    weights are checked last, once the options the command checks itself are right (else the
    command names what is wrong with them)."""
    from flows.common import PARAMS_FILE, PROJECT_ROOT
    from flows.label import PROFILES
    from flows.weights import profile_specs

    images, out, given = options.get("images"), options.get("out"), options.get("params")
    if images is None:  # the label stage of the project
        own = ("classes", "vocabulary", "out", "variant", "profile")
        if params is not None and not any(options.get(o) for o in own) and not options.get("overwrite"):
            selected = params.models.selected
            teacher = [params.models.teacher] if params.models.teacher else []
            check_weights([selected.clip, selected.sam, *teacher], weights_dir=params.models.weights_dir,
                          profile=params.models.profile)
        return
    _vocabulary(options, params)
    profile = options.get("profile")
    if (out is None or not Path(images).is_dir() or (options.get("classes") is None) == (options.get("vocabulary") is None)
            or (profile is not None and (given is not None or profile not in PROFILES))
            or (given is not None and not Path(given).is_file())
            or (given is None and profile is None and not Path(PARAMS_FILE).is_file())):
        return
    from components.labelling.export import check_variants
    from components.outputs import check_apart

    check_apart(str(out), [str(images)], what="--images")
    check_variants([options.get("variant") or "both"])
    base = given or (PROJECT_ROOT / PARAMS_FILE if profile is not None else PARAMS_FILE)
    name, (clip, sam, _dino, *teacher), weights_dir = profile_specs(Path(base), profile)
    check_weights([clip, sam, *teacher], weights_dir=weights_dir, profile=name)


def check_weights(specs: list[str], *, weights_dir: str | None, profile: str) -> None:
    """Every weight file of the registry specs ``specs`` is on disk; a FileNotFoundError naming the
    first missing file and the command that fetches (or, for a stand-in, trains) it otherwise."""
    from components.models.registry import get_spec
    from components.models.weights import gated_help, weights_status

    missing = [row for row in weights_status([get_spec(n) for n in specs], weights_dir=weights_dir) if not row.present]
    if missing:
        first = missing[0]
        spec = get_spec(first.spec)
        more = f" (and {len(missing) - 1} more file(s))" if len(missing) > 1 else ""
        fix = "fmbseg weights train-demo" if spec.miniature else f"fmbseg weights fetch --profile {profile}"
        gated = next((f for f in spec.weights if f.gated), None)
        how = f"{gated_help(gated)}, then run `{fix}`" if gated is not None else f"get them with `{fix}`"
        raise FileNotFoundError(f"missing weights of {first.spec!r}: {first.path}{more}; {how}")


CHECKS: dict[str, Callable[[dict[str, Any], Params | None], None]] = {
    "predict": _predict,
    "evaluate": _evaluate,
    "evaluate-stage1": _benchmark,
    "download": _benchmark,
    "label": _label,
}


def check_online(hosts: tuple[str, ...] = WEIGHT_HOSTS) -> None:
    """At least one of the weights' hosts answers on its HTTPS port (HF_ENDPOINT, with its own port,
    replaces the hub); a ConnectionError that says so otherwise, before the model libraries load and
    retry each file."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise ConnectionError("HF_HUB_OFFLINE is set: unset it to fetch weights")
    addresses = [(host, 443) for host in hosts]
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", ""))
    if endpoint.hostname:
        port = endpoint.port or (80 if endpoint.scheme == "http" else 443)
        addresses = [(endpoint.hostname, port) if host == "huggingface.co" else (host, 443) for host in hosts]
    errors = []
    for host, port in addresses:
        try:
            socket.create_connection((host, port), timeout=ONLINE_TIMEOUT_S).close()
            return
        except OSError as err:
            errors.append(f"{host}: {err}")
    raise ConnectionError(f"offline? cannot reach {'; '.join(errors)}. Copy the weight files into the weights "
                          "folder instead (`fmbseg weights status` lists them)")


def check(command: str, options: dict[str, Any], params: Params | None) -> None:
    """Run ``command``'s checks (none for a command without any); FileNotFoundError / ValueError
    with the message for the user."""
    if command in CHECKS:
        CHECKS[command](options, params)
