"""Run an iterator one or two items ahead in a background thread, keeping its order and its errors.

Extraction alternates GIL-free work (reading, zlib inflate, JPEG decode) with work that holds the GIL
(farthest point sampling). Producing frame i+1 in a thread while the caller turns frame i into a cloud lets
the two overlap on two cores. The queue is bounded, so memory stays at a few items whatever the source size.
"""

from __future__ import annotations

import queue
import threading
from contextlib import contextmanager
from typing import Iterator, TypeVar

T = TypeVar("T")

_DONE = object()
_POLL_SECONDS = 0.1  # how often a blocked producer checks whether the consumer has gone


class _Raised:
    """An exception the producer raised, delivered in order after the items produced before it."""

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


@contextmanager
def read_ahead(items: Iterator[T], depth: int = 1) -> Iterator[Iterator[T]]:
    """Yield an iterator over `items` that is produced up to `depth` items ahead in a background thread.

    Items come in the same order; an exception raised by `items` is re-raised by the consumer at the same
    position (after the items before it), with its own type and message. Leaving the block, normally or by an
    exception (including KeyboardInterrupt), stops the producer and joins it before returning, so whatever
    `items` reads from (an open file) may be closed right after. `items` is consumed only by the thread.
    """
    buffer: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def hand_over(item: object) -> bool:
        """Put `item` in the buffer, waiting for room; False if the consumer has gone."""
        while not stop.is_set():
            try:
                buffer.put(item, timeout=_POLL_SECONDS)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not hand_over(item):
                    return
            hand_over(_DONE)
        except BaseException as exc:  # delivered to the consumer, which re-raises it in order
            hand_over(_Raised(exc))
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()  # a generator's cleanup runs here, in its own thread, not at some later collection

    def consume() -> Iterator[T]:
        while True:
            item = buffer.get()
            if item is _DONE:
                return
            if isinstance(item, _Raised):
                raise item.exc
            yield item

    thread = threading.Thread(target=produce, name="pcd-read-ahead", daemon=True)
    thread.start()
    try:
        yield consume()
    finally:
        stop.set()
        thread.join()
