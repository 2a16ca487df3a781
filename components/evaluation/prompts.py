"""A benchmark's prompts (paper §4.1): the prompt of each class (synonyms kept, mean or max), the
extra prompts some benchmarks vote for background with (PV-21: the COCO-Stuff stuff classes), and
which class background is."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from components.datasets.registry import display_name
from components.evaluation.inference import PromptSet, build_prompt_set

__all__ = ["SYNONYM_RULES", "BACKGROUND_HANDLING", "benchmark_prompts", "background_index", "display_names"]

BACKGROUND_HANDLING: tuple[str, ...] = ("class0", "ignored", "none")
SYNONYM_RULES: tuple[str, ...] = ("mean", "max")


def benchmark_prompts(
    class_lines: Sequence[str], meta: Mapping[str, Any], *, synonyms: str = "mean", background_prompts: bool = True
) -> PromptSet:
    """The prompts a benchmark is evaluated with (paper §4.1) and the class each one votes for.

    class_lines: the benchmark's classes.txt lines (synonyms kept); meta: its meta.json. Most
    benchmarks prompt only their own classes; one whose meta lists ``extra_background_classes``
    (PV-21: the COCO-Stuff stuff classes) adds those prompts, every one mapped to background
    (class 0, which its meta must declare with ``"background": "class0"``), unless
    `background_prompts` is False (background then comes from a threshold alone).
    synonyms: "mean" (one prompt per line, its prototype the mean over the line's synonyms) or
    "max" (one prompt per synonym, so a class scores the max over its synonyms: SCLIP's rule).
    """
    if synonyms not in SYNONYM_RULES:
        raise ValueError(f"synonyms must be one of {list(SYNONYM_RULES)}, got {synonyms!r}")
    extra = (meta.get("extra_background_classes") or []) if background_prompts else []
    if not extra:
        prompts = PromptSet(list(class_lines), torch.arange(len(class_lines), dtype=torch.int64))
    else:
        index = background_index(meta)
        if index is None:
            raise ValueError(f"meta.json lists extra background prompts but background is "
                             f"{meta.get('background')!r}, not 'class0'")
        prompts = build_prompt_set(class_lines, extra, background_index=index)
    if synonyms == "max":
        pairs = [(s.strip(), c) for line, c in zip(prompts.names, prompts.class_map.tolist(), strict=True)
                 for s in line.split(",") if s.strip()]
        prompts = PromptSet([s for s, _ in pairs], torch.tensor([c for _, c in pairs], dtype=torch.int64))
    return prompts


def background_index(meta: Mapping[str, Any]) -> int | None:
    """Class index of background when the benchmark scores it (meta background "class0": 0), else
    None ("ignored": background pixels are 255; "none": there is no background)."""
    handling = meta.get("background")
    if handling not in BACKGROUND_HANDLING:
        raise ValueError(f"meta.json background must be one of {list(BACKGROUND_HANDLING)}, got {handling!r}")
    return 0 if handling == "class0" else None


def display_names(class_lines: Sequence[str]) -> list[str]:
    """The protocol's name of each class: the first of a line's comma-separated synonyms."""
    return [display_name(line) for line in class_lines]
