"""Sets of digests on disk (SQLite), so marking a big store needs bounded memory.

Two tables: ``live`` (digests some root references) and ``present`` (blobs the
backend holds, with size and time). Their differences are the garbage and the
missing objects.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from types import TracebackType

_BATCH = 5000


def remove_stale(directory: Path) -> int:
    """Remove live-set files of killed runs; only safe under the exclusive lock."""
    n = 0
    for path in directory.glob("liveset-*.sqlite"):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            n += 1
    return n


class DigestSets:
    """The live and present digests of one maintenance run, in a temporary SQLite file."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        fd, self.path = tempfile.mkstemp(dir=directory, prefix="liveset-", suffix=".sqlite")
        os.close(fd)
        self.db = sqlite3.connect(self.path)
        self.db.executescript(
            """
            PRAGMA journal_mode=OFF;
            PRAGMA synchronous=OFF;
            PRAGMA cache_size=-16384;
            CREATE TABLE live (d TEXT PRIMARY KEY) WITHOUT ROWID;
            CREATE TABLE present (d TEXT PRIMARY KEY, size INTEGER, mtime REAL) WITHOUT ROWID;
            """
        )

    def __enter__(self) -> DigestSets:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        self.db.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    # -- live ------------------------------------------------------------------
    def mark(self, digest: str) -> bool:
        """Add a digest to the live set; True if it was not there yet."""
        cur = self.db.execute("INSERT OR IGNORE INTO live VALUES (?)", (digest,))
        return cur.rowcount == 1

    def mark_many(self, digests: Iterable[str]) -> None:
        self.db.executemany("INSERT OR IGNORE INTO live VALUES (?)", ((d,) for d in digests))

    def is_live(self, digest: str) -> bool:
        row = self.db.execute("SELECT 1 FROM live WHERE d = ?", (digest,)).fetchone()
        return row is not None

    def live_count(self) -> int:
        return self.db.execute("SELECT count(*) FROM live").fetchone()[0]

    # -- present ---------------------------------------------------------------
    def add_present(self, blobs: Iterable[tuple[str, int, float | None]]) -> None:
        batch: list[tuple[str, int, float | None]] = []
        for item in blobs:
            batch.append(item)
            if len(batch) >= _BATCH:
                self.db.executemany("INSERT OR IGNORE INTO present VALUES (?,?,?)", batch)
                batch.clear()
        self.db.executemany("INSERT OR IGNORE INTO present VALUES (?,?,?)", batch)

    def _query(self, sql: str) -> Iterator[tuple]:
        cur = self.db.execute(sql)
        while rows := cur.fetchmany(_BATCH):
            yield from rows

    def garbage(self) -> Iterator[tuple[str, int, float | None]]:
        """Present blobs no root references: (digest, size, mtime)."""
        yield from self._query(
            "SELECT p.d, p.size, p.mtime FROM present p "
            "WHERE NOT EXISTS (SELECT 1 FROM live l WHERE l.d = p.d) ORDER BY p.d"
        )

    def missing(self) -> Iterator[str]:
        """Live digests the backend does not hold."""
        for (d,) in self._query(
            "SELECT l.d FROM live l WHERE NOT EXISTS (SELECT 1 FROM present p WHERE p.d = l.d) "
            "ORDER BY l.d"
        ):
            yield d

    def live_present(self) -> Iterator[str]:
        """Live digests the backend holds."""
        for (d,) in self._query("SELECT l.d FROM live l JOIN present p ON p.d = l.d ORDER BY l.d"):
            yield d

    def all_present(self) -> Iterator[str]:
        for (d,) in self._query("SELECT d FROM present ORDER BY d"):
            yield d
