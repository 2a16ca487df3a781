"""How a one-off command (`predict`, `export`, `label --images`) runs its flow: as a Prefect flow
run, shown in the UI, or as the flow's own function with its tasks' functions: the same code, no
Prefect engine and so no server.

Without a Prefect server configured, Prefect 3 starts a temporary one (15-18 s) for any flow run,
and also for a task called outside a flow (task runs are recorded against the API). A one-off
command therefore runs plain unless :func:`as_flow` says otherwise: ``PREFECT_API_URL`` is set (in
the environment or the active Prefect profile), or ``FMBSEG_AS_FLOW=1``. The pipeline, the DVC
stages and the deployments call their flows directly and always run as flows.

A flow body written for both modes calls its tasks through :func:`call` / :func:`completed` and
logs through :func:`logger`: inside a flow run these are Prefect's task runs and run logger,
outside one the tasks' functions and a stderr logger.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import as_completed as _pool_completed
from typing import Any

from flows.common import in_flow_run

__all__ = ["AS_FLOW_ENV", "as_flow", "run", "call", "completed", "logger"]

AS_FLOW_ENV = "FMBSEG_AS_FLOW"  # 1: one-off commands run as Prefect flows even without PREFECT_API_URL
_TRUE = ("1", "true", "yes", "on")


def as_flow() -> bool:
    """True when one-off commands run as Prefect flows: ``FMBSEG_AS_FLOW=1``, or a Prefect API
    (``PREFECT_API_URL``, from the environment or the active Prefect profile) to report to."""
    if os.environ.get(AS_FLOW_ENV, "").strip().lower() in _TRUE:
        return True
    if os.environ.get("PREFECT_API_URL"):
        return True
    from prefect.settings import get_current_settings

    return bool(get_current_settings().api.url)


def run(flow: Any, *args: Any, **kwargs: Any) -> Any:
    """``flow(*args, **kwargs)`` as a flow run when :func:`as_flow`, else its function ``flow.fn``
    (prints of a ``log_prints`` flow go to stderr, where its log would)."""
    if as_flow():
        return flow(*args, **kwargs)
    redirect = contextlib.redirect_stdout(sys.stderr) if flow.log_prints else contextlib.nullcontext()
    with redirect:
        return flow.fn(*args, **kwargs)


def call(task: Any, *args: Any, **kwargs: Any) -> Any:
    """``task(*args, **kwargs)``: a task run inside a flow run, its plain function outside one."""
    return task(*args, **kwargs) if in_flow_run() else task.fn(*args, **kwargs)


def completed(task: Any, calls: Sequence[tuple[Any, ...]], *, max_workers: int = 1
              ) -> Iterator[tuple[int, Any, BaseException | None]]:
    """Run ``task(*args)`` for each ``args`` of ``calls``; yield ``(index, result, error)`` in the
    order they finish, ``error`` the exception a call raised (then ``result`` is None). Inside a flow
    run: task runs submitted to the flow's task runner; outside one: the task's function on
    ``max_workers`` threads."""
    if in_flow_run():
        from prefect.futures import as_completed

        futures = {task.submit(*args): k for k, args in enumerate(calls)}
        for future in as_completed(list(futures)):
            yield _outcome(futures[future], future.result)
        return
    with ThreadPoolExecutor(max_workers=max(1, max_workers)) as pool:
        pending = {pool.submit(task.fn, *args): k for k, args in enumerate(calls)}
        for future in _pool_completed(pending):
            yield _outcome(pending[future], future.result)


def _outcome(index: int, result: Callable[[], Any]) -> tuple[int, Any, BaseException | None]:
    try:
        return index, result(), None
    except Exception as err:  # the caller reports each failure; the others' results stand
        return index, None, err


def logger() -> logging.Logger | logging.LoggerAdapter[logging.Logger]:
    """Prefect's run logger inside a run, else the ``fmbseg`` logger, INFO to stderr."""
    if in_flow_run():
        from prefect import get_run_logger

        return get_run_logger()
    log = logging.getLogger("fmbseg")
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s | %(levelname)-7s | %(message)s", "%H:%M:%S"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
    return log
