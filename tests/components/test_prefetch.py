"""The ordered look-ahead (components/prefetch.py) that decodes images ahead of the models."""

from __future__ import annotations

import threading
import time

import pytest

from components.prefetch import batched, prefetch


def test_prefetch_keeps_order_and_stays_bounded() -> None:
    started: list[int] = []
    lock = threading.Lock()

    def work(i: int) -> int:
        with lock:
            started.append(i)
        time.sleep(0.002 * (i % 3))  # finish out of order
        return i * i

    seen = []
    for n, value in enumerate(prefetch(work, range(20), num_workers=3, depth=4), start=1):
        seen.append(value)
        time.sleep(0.005)
        with lock:
            assert len(started) <= n + 4  # never more than `depth` items ahead of the consumer
    assert seen == [i * i for i in range(20)]
    assert list(prefetch(work, range(3), num_workers=0, depth=1)) == [0, 1, 4]


@pytest.mark.parametrize("workers", [0, 1, 3])
def test_prefetch_keeps_the_order_and_reads_at_most_depth_ahead(workers: int) -> None:
    started: list[int] = []
    lock = threading.Lock()

    def load(item: int) -> int:
        with lock:
            started.append(item)
        time.sleep(0.002 * (item % 3))  # later items may finish first
        return item * item

    ahead = 0
    for n, value in enumerate(prefetch(load, list(range(12)), num_workers=workers, depth=workers)):
        assert value == n * n
        time.sleep(0.005)  # the model's turn: the threads decode the next items meanwhile
        with lock:
            ahead = max(ahead, len(started) - (n + 1))
    assert ahead <= workers and (ahead > 0) == (workers > 0)


def test_batched_cuts_in_order_with_a_short_last_batch() -> None:
    assert list(batched(range(5), 2)) == [[0, 1], [2, 3], [4]]
    assert list(batched([], 3)) == []
    with pytest.raises(ValueError, match="batch size"):
        list(batched(range(3), 0))
