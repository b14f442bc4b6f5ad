"""Blobs read in a given order, a bounded number ahead of the reader, on a few threads.

The generic way a backend serves ``read_blobs_in_order``: each blob is one
``get_blob`` call on a small thread pool, so waits on the disk or the network
overlap with whatever the reader does with the blobs before them. A packed
store's ``read_blobs`` fetches its pack ranges the same way.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Generator, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

READ_WORKERS = 4

K = TypeVar("K")
V = TypeVar("V")


def ordered_reads(
    get: Callable[[K], V],
    digests: Iterable[K],
    ahead: int = 32,
    workers: int = READ_WORKERS,
) -> Generator[V, None, None]:
    """``get(digest)`` of each digest in order, up to ``ahead`` of them running ahead.

    Closing the generator early cancels the reads not started and waits for the others.
    """
    with ThreadPoolExecutor(workers, thread_name_prefix="layerfs-ordered-read") as pool:
        queued: deque[Future[V]] = deque()
        try:
            for digest in digests:
                queued.append(pool.submit(get, digest))
                if len(queued) >= ahead:
                    yield queued.popleft().result()
            while queued:
                yield queued.popleft().result()
        finally:
            for future in queued:
                future.cancel()
