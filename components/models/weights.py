"""Model weight files: where they are looked for, how they load, how they are fetched.

A real spec (registry.py) lists the files it needs as :class:`WeightFile` records. A file is looked
for, in this order, in

1. the weights dir: ``$FMBSEG_WEIGHTS_DIR`` (default ``~/.cache/fmbseg``), as
   ``<weights dir>/<local_dir>/<name>`` (SAM checkpoints are fetched there; CLIP and DINOv2 files may
   be copied there by hand, e.g. on an offline machine);
2. the Hugging Face hub cache (``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else
   ``~/.cache/huggingface/hub``) for files hosted on the hub (CLIP via open_clip's hf-hub tags,
   DINOv2) -- where :func:`fetch_weights` puts them, and where an earlier download is reused;
3. a copy bundled with the project (the world stand-ins' small trained files,
   components/models/standins/weights/), for files that have one.

A missing file raises :class:`MissingWeightsError` naming the file, every path looked in and the
command that fetches it; a real spec never falls back to random weights. Miniature specs need no
files unless they are trained stand-ins. Checkpoints load with ``torch.load(..., map_location="cpu", weights_only=True)`` or
safetensors. This module takes specs (components/models/specs.py), never names: the registry imports it,
never the reverse.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from components.io import atomic_path
from components.models.specs import ModelSpec, WeightFile

__all__ = [
    "WEIGHTS_DIR_ENV",
    "FETCH_PROFILE_COMMAND",
    "MissingWeightsError",
    "GatedWeightsError",
    "gated_help",
    "WeightStatus",
    "default_weights_dir",
    "hub_cache_dir",
    "candidate_paths",
    "find_weight",
    "resolve_weight",
    "load_state_dict",
    "fetch_command",
    "weights_status",
    "fetch_weights",
]

WEIGHTS_DIR_ENV = "FMBSEG_WEIGHTS_DIR"
FETCH_PROFILE_COMMAND = "fmbseg weights fetch --profile paper"


class MissingWeightsError(FileNotFoundError):
    """A real spec's weight file is in none of the places looked in (the message says which)."""


@dataclass(frozen=True)
class WeightStatus:
    """Whether one weight file of a spec is on disk.

    path: where the file was found; when absent, where a copy by hand belongs (the weights dir).
    size: bytes on disk when present, else the published size (None: not recorded).
    """

    spec: str
    file: str
    path: Path
    present: bool
    size: int | None


def default_weights_dir(weights_dir: str | os.PathLike[str] | None = None) -> Path:
    """``weights_dir`` if given, else ``$FMBSEG_WEIGHTS_DIR``, else ``~/.cache/fmbseg`` (expanded)."""
    if weights_dir is not None:
        return Path(weights_dir).expanduser()
    return Path(os.environ.get(WEIGHTS_DIR_ENV) or "~/.cache/fmbseg").expanduser()


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache, read from the environment at call time (not at import time)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return Path("~/.cache/huggingface/hub").expanduser()


def _hub_cached(repo: str, name: str) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo, name, cache_dir=hub_cache_dir())
    return Path(found) if isinstance(found, str) else None


def candidate_paths(file: WeightFile, weights_dir: str | os.PathLike[str] | None = None) -> list[str]:
    """Every place :func:`find_weight` looks, in order, as human-readable strings."""
    root = default_weights_dir(weights_dir) / file.local_dir
    places = [str(root / name) for name in file.names]
    if file.hub_repo is not None:
        places += [f"hub cache {hub_cache_dir()} ({file.hub_repo}/{name})" for name in file.names]
    if file.bundled is not None:
        places.append(f"bundled {file.bundled}")
    return places


def find_weight(file: WeightFile, weights_dir: str | os.PathLike[str] | None = None) -> Path | None:
    """The first existing copy of ``file`` in the weights dir, then the hub cache; None if absent."""
    root = default_weights_dir(weights_dir) / file.local_dir
    for name in file.names:
        if (root / name).is_file():
            return root / name
    if file.hub_repo is not None:
        for name in file.names:
            found = _hub_cached(file.hub_repo, name)
            if found is not None and found.is_file():
                return found
    if file.bundled is not None and file.bundled.is_file():
        return file.bundled
    return None


def gated_help(file: WeightFile) -> str:
    """How to get a gated hub file: accept the licence on its page, then download with HF_TOKEN."""
    return (f"{file.hub_repo} is gated: accept its licence at https://huggingface.co/{file.hub_repo} (logged in), "
            f"create a read token at https://huggingface.co/settings/tokens, and set HF_TOKEN=<token> "
            "for the fetch")


class GatedWeightsError(PermissionError):
    """A gated repo's file cannot be downloaded: no token, or the licence was not accepted."""


def fetch_command(spec_name: str, file: WeightFile | None = None) -> str:
    """The shell command that downloads (or, for a world stand-in, retrains) a spec's weights."""
    if file is not None and file.bundled is not None:
        return "fmbseg weights train-demo"
    return f"fmbseg weights fetch {spec_name}"


def resolve_weight(
    spec_name: str, file: WeightFile, weights_dir: str | os.PathLike[str] | None = None
) -> Path:
    """Path of ``file`` on disk; raises :class:`MissingWeightsError` naming the fetch command."""
    found = find_weight(file, weights_dir)
    if found is not None:
        return found
    size = f" ({file.size / 1e9:.2f} GB)" if file.size else ""
    looked = "\n".join(f"  - {place}" for place in candidate_paths(file, weights_dir))
    raise MissingWeightsError(
        f"missing weights for model spec {spec_name!r}: file {file.name!r}{size} was not found.\n"
        f"Looked in:\n{looked}\n"
        f"Fetch it with:  {fetch_command(spec_name, file)}\n"
        + (f"({gated_help(file)})\n" if file.gated else "")
        + f"(or every paper model at once:  {FETCH_PROFILE_COMMAND}). "
        f"The weights dir is ${WEIGHTS_DIR_ENV} (default ~/.cache/fmbseg)."
    )


def load_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """A checkpoint's tensors on the CPU: safetensors by suffix, else ``torch.load(weights_only=True)``.

    A ``{"state_dict": ...}`` or ``{"model": ...}`` wrapper is unwrapped.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{path} holds a {type(checkpoint).__name__}, not a state dict")
    for key in ("state_dict", "model"):
        if key in checkpoint and isinstance(checkpoint[key], dict):
            checkpoint = checkpoint[key]
    return checkpoint


def weights_status(
    specs: Iterable[ModelSpec], *, weights_dir: str | os.PathLike[str] | None = None
) -> list[WeightStatus]:
    """One row per weight file of each spec (random miniatures have none)."""
    rows = []
    for spec in specs:
        for file in spec.weights:
            found = find_weight(file, weights_dir)
            if found is not None:
                rows.append(WeightStatus(spec.name, file.name, found, True, found.stat().st_size))
            else:
                path = default_weights_dir(weights_dir) / file.local_dir / file.name
                rows.append(WeightStatus(spec.name, file.name, path, False, file.size))
    return rows


@contextlib.contextmanager
def _hub_progress(enabled: bool) -> Iterator[None]:
    from huggingface_hub.utils import (
        are_progress_bars_disabled,
        disable_progress_bars,
        enable_progress_bars,
    )

    was_disabled = are_progress_bars_disabled()
    if enabled:
        enable_progress_bars()
    else:
        disable_progress_bars()
    try:
        yield
    finally:
        if was_disabled:
            disable_progress_bars()
        else:
            enable_progress_bars()


def _download_url(url: str, target: Path, sha256: str | None, progress: bool) -> None:
    """Stream ``url`` to a temp file next to ``target``, check its sha256, then rename it."""
    import requests
    from tqdm import tqdm

    digest = hashlib.sha256()
    with requests.get(url, stream=True, timeout=60) as response:
        response.raise_for_status()
        total = int(response.headers.get("Content-Length", 0)) or None
        with atomic_path(target) as tmp, open(tmp, "wb") as out:
            with tqdm(total=total, unit="B", unit_scale=True, desc=target.name, disable=not progress) as bar:
                for chunk in response.iter_content(chunk_size=1 << 20):
                    out.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
            out.flush()
            os.fsync(out.fileno())
            if sha256 is not None and digest.hexdigest() != sha256:
                raise OSError(
                    f"sha256 of {url} is {digest.hexdigest()}, expected {sha256}; the file was not kept"
                )


def _fetch_clip(spec: ModelSpec, missing: list[WeightFile], root: Path, progress: bool) -> None:
    import open_clip

    cfg = open_clip.get_pretrained_cfg(spec.architecture, spec.pretrained_tag)
    open_clip.download_pretrained(cfg, cache_dir=str(hub_cache_dir()))
    if open_clip.get_model_config(spec.architecture)["text_cfg"].get("hf_tokenizer_name"):
        open_clip.get_tokenizer(spec.architecture, cache_dir=str(hub_cache_dir()))  # a Hugging Face tokenizer


def _fetch_sam(spec: ModelSpec, missing: list[WeightFile], root: Path, progress: bool) -> None:
    if spec.hub_repo is not None:  # SAM 2.1: transformers files on the hub, fetched as DINOv2's are
        _fetch_dino(spec, missing, root, progress)
        return
    for file in missing:
        _download_url(file.url, root / file.local_dir / file.name, file.sha256, progress)


def _fetch_dino(spec: ModelSpec, missing: list[WeightFile], root: Path, progress: bool) -> None:
    from huggingface_hub import get_token, snapshot_download
    from huggingface_hub.errors import GatedRepoError

    file = spec.weights[0]
    if file.gated and not get_token():
        raise GatedWeightsError(f"cannot fetch {spec.name}: no Hugging Face token. {gated_help(file)}")
    try:
        snapshot_download(file.hub_repo, allow_patterns=[f.name for f in spec.weights], cache_dir=hub_cache_dir())
    except GatedRepoError:
        raise GatedWeightsError(f"cannot fetch {spec.name}: the hub refused the token. {gated_help(file)}") from None


_FETCHERS = {"clip": _fetch_clip, "sam": _fetch_sam, "dino": _fetch_dino, "teacher": _fetch_dino}  # hub files


def fetch_weights(
    specs: Iterable[ModelSpec], *, weights_dir: str | os.PathLike[str] | None = None, progress: bool = True
) -> list[WeightStatus]:
    """Download the weight files of the named specs that are not on disk yet; returns their status.

    CLIP: open_clip's pretrained registry and download function (into the hub cache). SAM: the
    published checkpoint URL into ``<weights dir>/sam/``, verified against its sha256. DINOv2 and
    SAM 2.1: ``config.json`` + ``model.safetensors`` by ``huggingface_hub.snapshot_download`` (hub cache).
    """
    specs = list(specs)
    for spec in specs:
        missing = [f for f in spec.weights if find_weight(f, weights_dir) is None]
        if not missing or spec.miniature:  # a stand-in's file is trained (fmbseg weights train-demo), not fetched
            continue
        with _hub_progress(progress):
            _FETCHERS[spec.family](spec, missing, default_weights_dir(weights_dir), progress)
    return weights_status(specs, weights_dir=weights_dir)
