"""Ordered look-ahead: the next items of a sequence loaded on threads while the caller works on
the current one (decoding images ahead of the model forwards), in the caller's order, with a
bounded number in flight so memory stays at a few items whatever the length of the sequence."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from itertools import islice
from typing import TypeVar

__all__ = ["prefetch", "batched"]

T = TypeVar("T")
R = TypeVar("R")


def prefetch(fn: Callable[[T], R], items: Iterable[T], *, num_workers: int, depth: int) -> Iterator[R]:
    """``map(fn, items)`` in order, computed by ``num_workers`` threads at most ``depth`` items
    ahead of the one the caller holds (``num_workers`` < 1: in the calling thread, one at a time).
    An exception of ``fn`` is raised when the caller reaches its item."""
    if num_workers < 1:
        yield from map(fn, items)
        return
    it = iter(items)
    with ThreadPoolExecutor(max_workers=num_workers, thread_name_prefix="prefetch") as pool:
        pending: deque[Future[R]] = deque(pool.submit(fn, item) for item in islice(it, max(depth, 1)))
        while pending:
            result = pending.popleft().result()
            for item in islice(it, 1):
                pending.append(pool.submit(fn, item))
            yield result


def batched(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """Consecutive lists of ``size`` items (the last one shorter), as itertools.batched (3.12)."""
    if size < 1:
        raise ValueError(f"batch size must be >= 1, got {size}")
    it = iter(items)
    while batch := list(islice(it, size)):
        yield batch
