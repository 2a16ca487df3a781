"""A trained stand-in's file: the tensors that training changed, relative to the seeded init.

A stand-in is a miniature architecture (registry.py) whose seeded random init is reproducible
from its spec alone, so its file stores only what training moved: a tensor in full, or -- where
most of its rows never got a gradient, as in CLIP's 49,408-row token embedding of which the world's
names use a few hundred -- the changed rows and their indices. Loading rebuilds the seeded init
and applies the file (every key must fit the architecture; nothing is silently left random).
Files are safetensors, written atomically, with the training metrics in their metadata.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from components.io import atomic_path

__all__ = ["save_trained", "load_trained", "read_metadata"]

_ROWS = "::rows"
_VALUES = "::values"


def save_trained(
    model: torch.nn.Module,
    init_state: dict[str, torch.Tensor],
    path: str | os.PathLike[str],
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Write ``model``'s trained tensors relative to ``init_state`` (its seeded init) to ``path``.

    A tensor of which at most half the rows changed is stored as ``<name>::rows`` (int64 indices)
    + ``<name>::values``; unchanged tensors are left out; others are stored whole (fp32).
    metadata: JSON-able, kept in the file header (``read_metadata``).
    """
    tensors: dict[str, torch.Tensor] = {}
    for name, value in model.state_dict().items():
        value = value.detach().cpu()
        init = init_state[name].cpu()
        if torch.equal(value, init):
            continue
        if value.dim() >= 2:
            changed = (value != init).flatten(1).any(dim=1).nonzero().flatten()
            if len(changed) <= value.shape[0] // 2:
                tensors[name + _ROWS] = changed.to(torch.int64).contiguous()
                tensors[name + _VALUES] = value[changed].contiguous()
                continue
        tensors[name] = value.contiguous()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = {"format": "fmbseg-standin-1", "metrics": json.dumps(metadata or {}, sort_keys=True)}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=header)
    return path


def read_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The metrics a stand-in file was saved with."""
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != "fmbseg-standin-1":
        raise ValueError(f"{path} is not a stand-in file (format {meta.get('format')!r})")
    return json.loads(meta.get("metrics", "{}"))


def load_trained(model: torch.nn.Module, path: str | os.PathLike[str]) -> torch.nn.Module:
    """Apply a stand-in file to ``model`` (its seeded init, built from the same spec); in place."""
    read_metadata(path)
    state = model.state_dict()
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        for key in sorted(keys):
            if key.endswith(_VALUES):
                continue
            name = key[: -len(_ROWS)] if key.endswith(_ROWS) else key
            if name not in state:
                raise ValueError(f"{path}: tensor {name!r} is not part of the architecture")
            if key.endswith(_ROWS):
                rows, values = f.get_tensor(key), f.get_tensor(name + _VALUES)
                if values.shape[1:] != state[name].shape[1:] or (len(rows) and int(rows.max()) >= len(state[name])):
                    raise ValueError(f"{path}: rows of {name!r} do not fit shape {tuple(state[name].shape)}")
                state[name][rows] = values.to(state[name].dtype)
            else:
                value = f.get_tensor(key)
                if value.shape != state[name].shape:
                    raise ValueError(
                        f"{path}: {name!r} has shape {tuple(value.shape)}, the architecture {tuple(state[name].shape)}"
                    )
                state[name].copy_(value)
    return model
