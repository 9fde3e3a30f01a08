"""Read-ahead for patch streams: the next patches are read by background threads while the
current one is consumed, in the order they were drawn.

:func:`read_ahead` takes an iterator of cheap *requests* (drawn one after the other, so a
seeded stream stays a pure function of its seed) and a ``read`` function (the slow part: object
store round trips and decoding), and keeps up to ``depth`` reads in flight in a small thread
pool. Results come out in request order, so the stream is bitwise the one the plain loop
(``map(read, requests)``) gives; a read that raised re-raises when its turn comes, so integrity
errors surface at the same patch. The pool belongs to the generator: closing or dropping it
stops the threads (pending reads are cancelled).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

R = TypeVar("R")
T = TypeVar("T")


def read_ahead(requests: Iterator[R], read: Callable[[R], T], depth: int) -> Iterator[T]:
    """``read(r)`` for each request ``r`` in order, with up to ``depth`` reads running ahead.

    Args:
        requests: the (possibly infinite) requests, drawn lazily in the consumer's thread.
        read: turns one request into its result (runs in a pool thread when ``depth > 0``).
        depth: reads kept in flight; 0 reads each request when it is asked for (no threads).
    """
    if depth <= 0:
        for request in requests:
            yield read(request)
        return
    pool = ThreadPoolExecutor(depth, thread_name_prefix="noisyseg-readahead")
    pending: deque[Future[T]] = deque()
    try:
        for request in requests:
            pending.append(pool.submit(read, request))
            if len(pending) > depth:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        for future in pending:
            future.cancel()
        pool.shutdown(wait=False, cancel_futures=True)
