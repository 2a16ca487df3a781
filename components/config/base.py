"""The base of every settings section, and the merge of raw settings dicts."""

from __future__ import annotations

import copy
from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
)


class Section(BaseModel):
    """A section of params.yaml: frozen, and an unknown key is an error."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """A new dict: ``update`` merged into ``base`` recursively (mappings merge, the rest replaces)."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out
