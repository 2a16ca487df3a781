"""Lazy package exports (PEP 562): a package names what its modules define and loads a module only
when one of its names is first used, so that a light module of the package (its plain settings)
imports without the heavy ones (torch and the model libraries)."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["lazy_exports"]


def lazy_exports(package: str, where: Mapping[str, str]) -> Callable[[str], Any]:
    """The module ``__getattr__`` of ``package``: name -> ``getattr(<package>.<where[name]>, name)``,
    AttributeError for any other name."""

    def __getattr__(name: str) -> Any:
        if name not in where:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f"{package}.{where[name]}"), name)

    return __getattr__
