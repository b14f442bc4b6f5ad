"""CacheFiller: puts every file of an image into the content cache, files being read first.

One background thread walks the image's regular files in inode order and
writes each content the cache lacks; a file someone opens before the walk
reaches it is asked for with ``want`` and written next. Without ``walk`` only
the files asked for are written. Until its content is
in the cache a file's bytes are served from the store (by the image view),
except while this filler writes it: then reads wait for the bytes they ask for
and read them from the file being written (``open_written``), so the content
is read from the store and decoded once, not twice.
A content that cannot be read (a missing or corrupt chunk) is logged with the
object it names and skipped; reads of that file then fail the same way.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from layerfs.content.cache import ContentCache, content_id
from layerfs.errors import LayerfsError
from layerfs.index.view import ImageView
from layerfs.store.chunks import ChunkStore

log = logging.getLogger(__name__)


@dataclass
class _Writing:
    """The content a filler is writing: its temp file and how much of it is written."""

    cid: str
    path: str = ""
    written: int = 0
    done: bool = False  # renamed into the cache, or given up
    awaited: list[int] = field(default_factory=list)  # the ends readers wait for


class CacheFiller:
    """Fills ``cache`` with the contents of ``view``'s files on its own thread."""

    def __init__(
        self,
        view: ImageView,
        store: ChunkStore,
        cache: ContentCache,
        on_filled: Callable[[Path], None] | None = None,
        *,
        walk: bool = True,
    ) -> None:
        self.view = view
        self.walk = walk  # False: write only the files asked for with want()
        # called with the image's index once the walk wrote something (to trim the cache)
        self.on_filled = on_filled
        self.store = store
        self.cache = cache
        self._wanted: queue.SimpleQueue[int] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.written = 0  # contents this filler wrote
        self.failed = 0
        self._writing: _Writing | None = None
        self._progress = threading.Condition()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="cache-fill", daemon=True)
        self._thread.start()

    def want(self, ino: int) -> None:
        """Ask for a file's content ahead of the walk (it is being read)."""
        self._wanted.put(ino)

    def close(self) -> None:
        self._stop.set()
        self._wanted.put(0)
        if self._thread is not None:
            self._thread.join()

    def fill(self, ino: int, size: int, inline: bytes | None, packed: bytes | None) -> None:
        """Write one file's content unless the cache has it."""
        cid = content_id(packed, inline)
        if self.cache.has(cid):
            return
        if inline is not None:
            parts: object = [inline]
        else:
            parts = self.store.stream_content(self.view.content_refs(packed or b""))
        writing = _Writing(cid)
        with self._progress:
            self._writing = writing

        def progress(path: str, written: int) -> None:
            with self._progress:
                writing.path, writing.written = path, written
                if writing.awaited and written >= min(writing.awaited):  # wake only to answer
                    self._progress.notify_all()

        try:
            self.cache.put(cid, size, parts, progress)  # type: ignore[arg-type]
        except (LayerfsError, OSError) as exc:
            self.failed += 1
            log.error("cannot cache the content of inode %d (%s): %s", ino, cid, exc)
            return
        finally:
            with self._progress:
                writing.done = True
                self._writing = None
                self._progress.notify_all()
        self.written += 1

    def writes(self, cid: str) -> bool:
        """Whether this filler is writing content ``cid`` now (it does not wait)."""
        writing = self._writing
        return writing is not None and writing.cid == cid

    def open_written(self, cid: str, end: int) -> int | None:
        """While this filler writes content ``cid``: wait until its first ``end`` bytes
        are written and return a descriptor of the file being written (the caller
        closes it). None when it is not writing ``cid`` (any more): the content is then
        in the cache, or to be read from the store."""
        with self._progress:
            writing = self._writing
            if writing is None or writing.cid != cid:
                return None
            writing.awaited.append(end)
            try:
                while not writing.done and (writing.written < end or not writing.path):
                    self._progress.wait()
            finally:
                writing.awaited.remove(end)
            if writing.done:
                return None
            try:
                return os.open(writing.path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:  # renamed into the cache that moment
                return None

    def _fill_wanted(self, block: bool) -> None:
        while True:
            try:
                ino = self._wanted.get(block=block, timeout=1.0 if block else None)
            except queue.Empty:
                return
            if self._stop.is_set():
                return
            node = self.view.node(ino)
            if node is not None:
                inline, packed = self.view.stored_content(ino)
                self.fill(ino, node.size, inline, packed)
            block = False

    def _run(self) -> None:
        started = time.monotonic()
        self.cache.clean_temp()
        key = self.view.index.name
        if not self.walk or self.cache.complete(key):
            # a walk found every content here before, and nothing was evicted since: no
            # look at each file (thousands of stats at every start of a view)
            while not self._stop.is_set():
                self._fill_wanted(block=True)
            return
        generation = self.cache.generation()
        for ino, size, inline, packed in self.view.file_contents():
            self._fill_wanted(block=False)
            if self._stop.is_set():
                return
            self.fill(ino, size, inline, packed)
        if not self.failed:
            self.cache.stamp_complete(key, generation)
        log.info(
            "content cache filled for %s in %.1f s: %d written, %d failed",
            key,
            time.monotonic() - started,
            self.written,
            self.failed,
        )
        if self.written and self.on_filled is not None:
            try:
                self.on_filled(self.view.index)
            except (LayerfsError, OSError) as exc:
                log.error("after filling the content cache: %s", exc)
        while not self._stop.is_set():
            self._fill_wanted(block=True)
