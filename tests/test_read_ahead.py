"""`read_ahead`: a background producer that keeps order, re-raises errors in place and never outlives its block."""

from __future__ import annotations

import threading
from typing import Iterator

import pytest

from pcd.pipeline.errors import PcdError
from pcd.pipeline.read_ahead import read_ahead


def no_producer_left() -> bool:
    return not any(t.name == "pcd-read-ahead" for t in threading.enumerate())


def test_items_come_in_order_and_the_producer_stays_at_most_depth_plus_one_ahead() -> None:
    produced: list[int] = []
    ahead: list[int] = []

    def numbers() -> Iterator[int]:
        for i in range(50):
            produced.append(i)
            yield i

    with read_ahead(numbers(), depth=2) as items:
        consumed = []
        for item in items:
            ahead.append(len(produced) - len(consumed))
            consumed.append(item)
    assert consumed == list(range(50))
    assert max(ahead) <= 2 + 2  # the queue, the item in the producer's hand, the one just taken
    assert no_producer_left()


def test_an_error_of_the_producer_is_raised_after_the_items_before_it() -> None:
    def frames() -> Iterator[int]:
        yield 0
        yield 1
        raise PcdError("scene s frame 2: corrupt depth")

    consumed = []
    with pytest.raises(PcdError, match=r"^scene s frame 2: corrupt depth$"):
        with read_ahead(frames()) as items:
            for item in items:
                consumed.append(item)
    assert consumed == [0, 1]
    assert no_producer_left()


@pytest.mark.parametrize("leave", [KeyboardInterrupt, ValueError])
def test_leaving_early_stops_the_producer_and_runs_its_cleanup_before_returning(leave: type) -> None:
    cleaned = threading.Event()

    def endless() -> Iterator[int]:
        try:
            i = 0
            while True:
                yield i
                i += 1
        finally:
            cleaned.set()

    with pytest.raises(leave):
        with read_ahead(endless()) as items:
            for item in items:
                if item == 3:
                    raise leave()
    assert cleaned.is_set() and no_producer_left()

    with read_ahead(endless()) as items:  # stopping iteration without an error
        assert next(items) == 0
    assert no_producer_left()
