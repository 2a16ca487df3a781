"""The results table of a model: every benchmark x {base, refined}, next to the paper's numbers.

Inputs are the metric dicts the evaluate stage writes (``metrics/<benchmark>.json``:
``{"mIoU_base": 67.7, "mIoU_refined": 71.0, ...}``) and, optionally, the Stage 1 ones
(``metrics/stage1/<benchmark>_<variant>.json``: ``{"mIoU": ...}``). Outputs are plain rows (dicts),
rendered as markdown and CSV.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

from components.evaluation.paper_numbers import PUBLISHED, TABLE1, TABLE2
from components.labelling.settings import STAGE1_VARIANTS, TEACHER_EVAL_VARIANTS

__all__ = [
    "REPORT_COLUMNS",
    "STAGE1_COLUMNS",
    "report_rows",
    "settings_label",
    "stage1_rows",
    "to_markdown",
    "to_csv",
]

REPORT_COLUMNS: tuple[str, ...] = ("benchmark", "base", "refined", "paper_base", "paper_refined", "published",
                                   "settings")
STAGE1_COLUMNS: tuple[str, ...] = ("benchmark", "variant", "mIoU", "paper")

Row = dict[str, Any]


def settings_label(settings: Mapping[str, Any], protocol: str | None = None) -> str:
    """The evaluation settings that change a number, in a few words (a report cell): the protocol
    (``evaluate.protocol``, when one is named), geometry, templates, background threshold.
    settings: a benchmark's effective ``evaluate`` settings."""
    side = settings["short_side"]
    count = len(settings["templates"])
    parts = [f"short side {side}" if side is not None else "original size",
             f"window {settings['window']}/{settings['stride']}", f"{count} template{'s' * (count != 1)}"]
    if settings.get("synonyms", "mean") != "mean":
        parts.append(f"synonyms {settings['synonyms']}")
    if not settings.get("bg_prompts", True):
        parts.append("no background prompts")
    if settings.get("bg_threshold") is not None:
        scale = settings.get("logit_scale")
        rule = f"p < {settings['bg_threshold']} at logit scale {scale}" if scale is not None else settings["bg_threshold"]
        parts.append(f"bg_threshold {rule}")
    label = ", ".join(parts)
    return f"{protocol}: {label}" if protocol is not None else label


def report_rows(
    metrics: Mapping[str, Mapping[str, float] | None],
    benchmarks: Sequence[str],
    settings: Mapping[str, str] | None = None,
    protocol: str | None = None,
) -> list[Row]:
    """One row per benchmark, in the given order: our mIoU (base, refined) and the paper's (Table 1).

    metrics: benchmark -> the evaluate stage's metric dict, or None when the benchmark was not
    evaluated. A value we do not have (not evaluated, or refinement off) is None; so is a paper
    value for a benchmark outside Table 1. settings: benchmark -> what made its numbers
    (:func:`settings_label`), the row's ``settings`` (None where not given). ``published``: what
    the authors of `protocol` publish for their own method under it (``PUBLISHED``), so a reader
    sees whether a comparison is like for like; None where they publish none.
    """
    published = PUBLISHED.get(protocol, {}) if protocol is not None else {}
    rows = []
    for name in benchmarks:
        ours = metrics.get(name) or {}
        rows.append(
            {
                "benchmark": name,
                "base": ours.get("mIoU_base"),
                "refined": ours.get("mIoU_refined"),
                "paper_base": TABLE1["base"].get(name),
                "paper_refined": TABLE1["refined"].get(name),
                "published": published.get(name),
                "settings": (settings or {}).get(name),
            }
        )
    return rows


def stage1_rows(metrics: Mapping[tuple[str, str], Mapping[str, float]]) -> list[Row]:
    """Rows for Stage 1's pseudo labels against Table 2, sorted by benchmark then variant.

    metrics: (benchmark, variant) -> the evaluate-stage1 metric dict ({"mIoU": ...}). An unknown
    variant raises ValueError listing the known ones.
    """
    rows = []
    for (name, variant), values in sorted(metrics.items()):
        if variant not in TABLE2 and variant not in TEACHER_EVAL_VARIANTS:
            raise ValueError(f"unknown Stage 1 variant {variant!r}; known: {list(STAGE1_VARIANTS + TEACHER_EVAL_VARIANTS)}")
        paper = TABLE2.get(variant, {}).get(name)  # the concept teacher has no paper number
        rows.append({"benchmark": name, "variant": variant, "mIoU": values.get("mIoU"), "paper": paper})
    return rows


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


def to_markdown(rows: Sequence[Row], columns: Sequence[str]) -> str:
    """A GitHub markdown table; numbers with 2 decimals, a missing value as "—"."""
    lines = [
        "| " + " | ".join(columns) + " |",
        "|" + "|".join("---" if c in ("benchmark", "variant") else "---:" for c in columns) + "|",
    ]
    lines += ["| " + " | ".join(_cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def to_csv(rows: Sequence[Row], columns: Sequence[str]) -> str:
    """CSV text with a header; a missing value is an empty cell."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({c: "" if row.get(c) is None else row[c] for c in columns})
    return buf.getvalue()
