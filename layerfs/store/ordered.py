"""Blobs read in a given order, a bounded number ahead of the reader, on a few threads.

The generic way a backend serves ``read_blobs_in_order``: each blob is one
``get_blob`` call on a small thread pool, so waits on the disk or the network
overlap with whatever the reader does with the blobs before them.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Generator, Iterable
from concurrent.futures import Future, ThreadPoolExecutor

READ_WORKERS = 4


def ordered_reads(
    get: Callable[[str], bytes],
    digests: Iterable[str],
    ahead: int = 32,
    workers: int = READ_WORKERS,
) -> Generator[bytes, None, None]:
    """``get(digest)`` of each digest in order, up to ``ahead`` of them running ahead."""
    with ThreadPoolExecutor(workers, thread_name_prefix="layerfs-ordered-read") as pool:
        queued: deque[Future[bytes]] = deque()
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
