"""ConfigError, and validation errors as messages that name the key and what it takes."""

from __future__ import annotations

import difflib
from typing import Any

from pydantic import (
    BaseModel,
    ValidationError,
)


class ConfigError(ValueError):
    """params.yaml (or an override) does not describe valid settings."""



def _model_at(root: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The pydantic model class under ``root`` that holds the key at ``loc`` (None where none does)."""
    model: Any = root
    parts = list(loc[:-1])
    while parts:
        part = parts.pop(0)
        field = model.model_fields.get(str(part)) if isinstance(model, type) else None
        if field is None:
            return None
        ann = field.annotation
        if getattr(ann, "__origin__", None) is dict:  # dict[str, Section]: the next part is a key
            ann = ann.__args__[1]
            if parts:
                parts.pop(0)
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return None
        model = ann
    return model



def format_errors(err: ValidationError, source: str, root: type[BaseModel]) -> str:
    """A validation error of settings ``root`` read from ``source``, one line per key: an unknown key
    with the valid keys of its section (and the closest one), a wrong type with the type expected."""
    lines = [f"invalid settings in {source}:"]
    for e in err.errors():
        loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and p.startswith("function-after")))
        key = ".".join(str(p) for p in loc) or "<top level>"
        if e["type"] == "extra_forbidden":
            owner = _model_at(root, loc)
            valid = sorted(owner.model_fields) if owner else []
            close = difflib.get_close_matches(str(loc[-1]), valid, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            lines.append(f"  - unknown key {key!r}{hint} valid keys here: {', '.join(valid)}")
        elif e["type"] == "missing":
            lines.append(f"  - missing key {key!r}")
        elif e["type"] == "value_error":  # a validator's own message names the settings and values
            lines.append(f"  - {key}: {e['msg'].removeprefix('Value error, ')}")
        else:
            owner = _model_at(root, loc)
            expected = ""
            if owner is not None and str(loc[-1]) in owner.model_fields:
                ann = owner.model_fields[str(loc[-1])].annotation
                if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
                    expected = f" (expected {getattr(ann, '__name__', None) or str(ann).replace('typing.', '')})"
            lines.append(f"  - {key}: {e['msg']}{expected}; got {e.get('input')!r}")
    return "\n".join(lines)
