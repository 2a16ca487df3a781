"""Stand-in foundation models trained on the demo world (demoworld/world.py).

The demo profile's ``world-clip`` and ``world-sam`` are the registry's miniature architectures
trained here so that they have the property the method relies on -- CLIP's crop embeddings and
dense patch features name the world's classes, SAM's point prompts return the region under the
point with an IoU estimate that means something. ``world-dino`` keeps its seeded random weights:
its patch features already separate the world's regions (measured: docs/demo-world.md).
These are toys that make the machinery visible end to end; the method's real numbers need the
paper profile.

:func:`train_standin` is what ``fmbseg weights train-demo`` runs: seeded, on the CPU, one thread,
so the files it writes reproduce the bundled ones (components/models/standins/weights/, loaded by the registry).
"""

from __future__ import annotations

import importlib
import logging
import os
from pathlib import Path
from typing import Any

__all__ = ["TRAINED_FAMILIES", "train_standin"]

log = logging.getLogger(__name__)

TRAINED_FAMILIES: tuple[str, ...] = ("clip", "sam")


def train_standin(family: str, out_dir: str | os.PathLike[str], *, seed: int = 0) -> tuple[Path, dict[str, Any]]:
    """Train ``world-<family>`` and write its file into ``out_dir``; returns (path, metrics)."""
    from components.models.registry import init_model
    from components.models.standins.store import save_trained

    if family not in TRAINED_FAMILIES:
        raise ValueError(f"no trained stand-in for {family!r}; trained: {', '.join(TRAINED_FAMILIES)}")
    module = importlib.import_module(f"demoworld.standins.{family}")
    model, metrics = getattr(module, f"train_{family}")(seed=seed)
    name = f"world-{family}"
    path = save_trained(model, init_model(name).state_dict(), Path(out_dir) / f"{name}.safetensors",
                        {**metrics, "seed": seed})
    log.info("%s written to %s (%.0f KB)", name, path, path.stat().st_size / 1024)
    return path, metrics
