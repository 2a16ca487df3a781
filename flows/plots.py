"""PNG charts for DVC's image plots: `dvc plots show` puts an image in its HTML page as it is, where
a vega plot needs JavaScript from a CDN (the page stays blank offline)."""

from __future__ import annotations

import io
import math
import os
from collections.abc import Mapping, Sequence

from components.io import atomic_write_bytes

__all__ = ["line_png", "bars_png"]


def _save(fig: object, path: str | os.PathLike[str]) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)  # type: ignore[attr-defined]
    atomic_write_bytes(path, buf.getvalue())


def line_png(path: str | os.PathLike[str], x: Sequence[float], y: Sequence[float], *, xlabel: str, ylabel: str,
             title: str) -> None:
    """``y`` over ``x`` as a line chart with markers (the loss per epoch)."""
    from matplotlib.figure import Figure  # a Figure of its own: no pyplot state, no display needed

    fig = Figure(figsize=(6, 3.5), layout="constrained")
    ax = fig.add_subplot()
    ax.plot(list(x), list(y), marker="o")
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    _save(fig, path)


def bars_png(path: str | os.PathLike[str], labels: Sequence[str], series: Mapping[str, Sequence[float]], *,
             xlabel: str, title: str) -> None:
    """Horizontal bars, one group per label and one bar per series (per-class IoU, base and refined);
    a NaN value (a class absent from the ground truth) draws no bar."""
    from matplotlib.figure import Figure

    height = 0.8 / max(len(series), 1)
    fig = Figure(figsize=(7, 1.0 + 0.22 * len(labels) * max(len(series), 1)), layout="constrained")
    ax = fig.add_subplot()
    for i, (name, values) in enumerate(series.items()):
        ys = [k + i * height for k in range(len(labels))]
        ax.barh(ys, [0.0 if math.isnan(v) else v for v in values], height=height, label=name)
    ax.set_yticks([k + 0.4 - height / 2 for k in range(len(labels))], list(labels), fontsize=8)
    ax.invert_yaxis()  # the first class on top, as the table lists it
    ax.set(xlabel=xlabel, title=title)
    ax.legend(loc="lower right")
    _save(fig, path)
