"""Prefect's decorators and helpers, imported on first use: a flow module defines its flows and tasks
at import, but Prefect (1.5-2 s of imports) loads only when one of them is called or inspected.

So ``fmbseg <command> -h`` and a command's checks of its options and settings answer before Prefect
loads, while a flow module reads as it would with ``from prefect import flow, task``. ``@flow(...)``
and ``@task(...)`` here take Prefect's arguments unchanged and return a stand-in that builds the real
``prefect.flow(...)(fn)`` once, on first use, and hands every call and attribute (``.fn``,
``.submit``, ``.with_options``, ``.serve``) to it; ``isinstance(x, prefect.Flow)`` holds for it, as
Prefect's deployment loader checks.
"""

from __future__ import annotations

import functools
import importlib
import threading
from collections.abc import Callable
from typing import Any

__all__ = ["flow", "task", "get_run_logger", "as_completed", "NO_CACHE"]


class _Ref:
    """A Prefect object named by module and attribute, resolved when the flow or task is built."""

    def __init__(self, module: str, name: str) -> None:
        self.module, self.name = module, name

    def resolve(self) -> Any:
        return getattr(importlib.import_module(self.module), self.name)


NO_CACHE = _Ref("prefect.cache_policies", "NO_CACHE")


class _Deferred:
    """A Prefect flow or task (``kind``) of ``fn``, built on first use."""

    _OWN = ("_kind", "_fn", "_options", "_built", "_lock")

    def __init__(self, kind: str, fn: Callable[..., Any], options: dict[str, Any]) -> None:
        own = self.__dict__  # not setattr, which goes to the built object (see __setattr__)
        own.update({a: getattr(fn, a) for a in functools.WRAPPER_ASSIGNMENTS if hasattr(fn, a)}, __wrapped__=fn)
        own.update(_kind=kind, _fn=fn, _options=options, _built=None, _lock=threading.Lock())

    def _real(self) -> Any:
        if self._built is None:
            with self._lock:
                if self._built is None:
                    prefect = importlib.import_module("prefect")
                    options = {k: v.resolve() if isinstance(v, _Ref) else v for k, v in self._options.items()}
                    self.__dict__["_built"] = getattr(prefect, self._kind)(**options)(self._fn)
        return self._built

    @property  # type: ignore[misc]
    def __class__(self) -> type:  # isinstance(x, prefect.Flow) is what Prefect's entrypoint loader asks
        return type(self._real())

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._real()(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name in self._OWN:
            raise AttributeError(name)
        return getattr(self._real(), name)

    def __setattr__(self, name: str, value: Any) -> None:  # Prefect's loaders set _storage, _entrypoint
        setattr(self._real(), name, value)

    def __reduce__(self) -> tuple[Any, ...]:  # by reference, as a module-level function pickles
        return _module_attribute, (self._fn.__module__, self._fn.__qualname__)

    def __repr__(self) -> str:
        return f"<deferred prefect.{self._kind} {self._fn.__qualname__}>"


def _module_attribute(module: str, name: str) -> Any:
    return getattr(importlib.import_module(module), name)


def _decorator(kind: str, fn: Callable[..., Any] | None, options: dict[str, Any]) -> Any:
    if fn is not None:
        return _Deferred(kind, fn, options)
    return lambda f: _Deferred(kind, f, options)


def flow(fn: Callable[..., Any] | None = None, **options: Any) -> Any:
    """``prefect.flow``, built on first use."""
    return _decorator("flow", fn, options)


def task(fn: Callable[..., Any] | None = None, **options: Any) -> Any:
    """``prefect.task``, built on first use."""
    return _decorator("task", fn, options)


def get_run_logger() -> Any:
    """``prefect.get_run_logger()``."""
    from prefect import get_run_logger as run_logger

    return run_logger()


def as_completed(futures: list[Any], timeout: float | None = None) -> Any:
    """``prefect.futures.as_completed``."""
    from prefect.futures import as_completed as completed

    return completed(futures, timeout=timeout)

