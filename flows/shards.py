"""Mapping a shard task over the pending shards of a resumable stage.

One loop for every sharded stage (``label``, ``features``, the batches of ``evaluate``): submit
each shard on the task runner, show progress image by image while they run (each shard ticks a
:class:`~components.progress.Tally` per image, which the flow polls), and collect every shard's
failure instead of stopping at the first, so the finished shards are kept and a rerun resumes.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

from components.config import OrchestrationConfig
from components.progress import Tally
from flows import runmode
from flows.common import Progress
from flows.runners import shard_resources

__all__ = ["POLL_SECONDS", "map_shards"]

S = TypeVar("S")
POLL_SECONDS = 0.25
"""How often the flow reads the per-image tally while shards run."""


def _completions(outcomes: Iterator[tuple[int, Any, BaseException | None]]) -> queue.Queue[Any]:
    """:func:`flows.runmode.completed`'s outcomes, put on a queue as they finish (an exception of the
    waiting itself goes on the queue too), so that the flow can poll the tally between completions."""
    finished: queue.Queue[Any] = queue.Queue()

    def feed() -> None:
        try:
            for outcome in outcomes:
                finished.put(outcome)
        except BaseException as err:  # handed to the flow's thread, which raises it
            finished.put(err)

    threading.Thread(target=feed, name="shard-completions", daemon=True).start()
    return finished


def map_shards(
    shard_task: Any,
    context: Any,
    shards: Sequence[S],
    *,
    name: Callable[[S], str],
    size: Callable[[S], int],
    out: str | Path,
    orchestration: OrchestrationConfig,
    desc: str,
    key: str,
    done_before: int = 0,
    on_report: Callable[[S, Any], None] | None = None,
) -> list[Any]:
    """Run ``shard_task(context, shard, tally)`` for every shard (task runs on the flow's task
    runner, or plain calls on ``orchestration.max_workers`` threads outside a flow run:
    :func:`flows.runmode.completed`) and return the reports of those that succeeded, in the order
    of ``shards``.

    size(shard): its number of images; the task ticks one per image through
    ``components.progress.counter(tally)``. name(shard): how a failure names it. out: the output
    the flow holds the lock on (the tally lies beside it, named ``key``, as is the Prefect
    progress artifact). done_before: images done by an earlier run (the bar starts there).
    on_report(shard, report): called in the flow as each shard succeeds. Raises RuntimeError
    naming every failed shard once all have ended.
    """
    total = sum(size(s) for s in shards)
    reports: dict[int, Any] = {}
    failures: list[str] = []
    with Progress(done_before + total, desc=desc, key=key) as progress, Tally.beside(out, key) as tally:
        progress.update(done_before)
        with shard_resources(orchestration):  # on Ray: gpus_per_task GPUs per shard task
            outcomes = runmode.completed(shard_task, [(context, shard, tally.file(i)) for i, shard in enumerate(shards)],
                                         max_workers=orchestration.max_workers)
        finished = _completions(outcomes)
        running = set(range(len(shards)))
        while running:
            try:
                outcome = finished.get(timeout=POLL_SECONDS)
            except queue.Empty:
                outcome = None
            if isinstance(outcome, BaseException):
                raise outcome
            if outcome is not None:
                i, report, err = outcome
                running.discard(i)
                if err is not None:  # one shard's failure must not hide the others' results
                    failures.append(f"{name(shards[i])}: {type(err).__name__}: {err}")
                else:
                    reports[i] = report
                    if on_report is not None:
                        on_report(shards[i], reports[i])
            counts = tally.counts()
            progress.advance_to(done_before + sum(min(counts.get(i, 0), size(s)) if i in running else size(s)
                                                  for i, s in enumerate(shards)))
    if failures:
        raise RuntimeError(
            f"{len(failures)} of {len(shards)} shards failed (finished shards are kept; rerun to resume):\n  "
            + "\n  ".join(failures)
        )
    return [reports[i] for i in sorted(reports)]
